"""``run_validation``: feed real held-out text through PyTorch and an exported model, compare.

Cases are windows of the checkpoint corpus's held-out split (``smlp_export.data``), several
(batch, seq) shapes including odd ones; each window has T + 1 tokens: the first T are the input,
the last T the next-token targets used for perplexity. Partial-prediction models: positions < p
only condition the routing (their loss is masked in training), so perplexity uses positions >= p.
"""
from __future__ import annotations

import importlib.metadata as _md
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from smlp_export.artifacts import DECODE_FILE, MANIFEST_FILE, MODEL_FILE, Manifest
from smlp_export.errors import CheckpointError, InputError, SMLPError
from smlp_export.export.translations import AUTO_FUSED_MAX_TOKENS

from .compare import LayerRouting, compare_logits, nll_sum
from . import coverage
from .integrity import graph_dtype
from .report import ParityReport
from .tolerances import tolerance_for

BACKENDS = ("ort", "reference", "tensorrt")
# (batch, seq); seq None = max_seq_len; every seq is clipped to max_seq_len and duplicates dropped.
CASES_FULL: tuple[tuple[int, int | None], ...] = ((1, 1), (2, 33), (3, 77), (2, None), (4, 16), (5, 13))
CASES_QUICK: tuple[tuple[int, int | None], ...] = ((1, 1), (3, 77), (1, None))
# onnx.reference is pure NumPy (slow): small cases only, still including T = 1 and an odd T.
CASES_REFERENCE: tuple[tuple[int, int | None], ...] = ((1, 1), (3, 13), (2, 33), (1, 77))
# ort target, ort_moe "auto": short held-out inputs through the fused branch (B * T <= 4 tokens).
FUSED_SHAPES: tuple[tuple[int, int], ...] = ((1, 2), (1, 3), (1, 4), (2, 2), (4, 1))
COVERAGE_SEQ = 64  # length of the windows searched for uncovered experts
COVERAGE_OFFSET = 10_000  # where in the held-out stream the search starts (wraps around)


def read_manifest(export_dir: Path) -> Manifest:
    """manifest.json of an export folder, with the keys validation needs (InputError otherwise)."""
    manifest = Manifest.read(export_dir)
    if not (export_dir / MODEL_FILE).is_file():
        raise InputError(f"{export_dir / MODEL_FILE} is missing")
    return manifest


def case_shapes(cases: tuple[tuple[int, int | None], ...], max_seq_len: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for b, t in cases:
        shape = (b, min(t or max_seq_len, max_seq_len))
        if shape not in out:
            out.append(shape)
    return out


def _load_reference_model(manifest: Manifest, checkpoint: Any, export_dir: Path):
    """The PyTorch model to compare against, its checkpoint facts, and whether its sha was verified."""
    from smlp_export import load_checkpoint

    want = manifest.checkpoint.get("weights_sha256")
    if checkpoint is None or isinstance(checkpoint, (str, Path)):
        path = checkpoint if checkpoint is not None else manifest.checkpoint_path()
        if path is None:
            raise InputError(f"{export_dir / MANIFEST_FILE} names no checkpoint path; pass the checkpoint explicitly")
        if manifest.decode or manifest.quantization:
            # the decode checks and the fake-quant twin read parameters outside module calls
            model = load_checkpoint(path)
        else:
            from .streamed import streamed_reference

            model = streamed_reference(path)  # float32 weights one module at a time (streamed.py)
    else:
        model = checkpoint  # an SMLPForCausalLM already in memory
    info = getattr(model, "checkpoint_info", None) or {}
    got = info.get("weights_sha256")
    if want and got and want != got:
        raise CheckpointError(f"checkpoint {info.get('path')} has weights sha256 {got[:12]}..., but the export "
                              f"was made from {want[:12]}... (manifest.json): pass the matching checkpoint")
    # Compare as configs, not dicts: a manifest written before a config field existed lacks it.
    if manifest.config and not _same_config(model.config, manifest.config):
        raise CheckpointError(f"checkpoint config differs from the config in {export_dir / MANIFEST_FILE}")
    ckpt = {"path": info.get("path"), "weights_sha256": got, "manifest_weights_sha256": want,
            "verified": bool(want and got and want == got)}
    return model.float().eval(), ckpt


def _quantization_quality(float_model, onnx_path: Path, backend: str, providers, source: str, quick: bool,
                          scheme) -> dict[str, Any]:
    """Held-out windows of max_seq_len tokens through the float model and the quantized export."""
    from smlp_export import data
    from smlp_export.quantize.quality import measure_quality
    from smlp_export.runners.torch_runner import TorchRunner

    cfg = float_model.config
    rows = 4 if quick else 16
    # offset far past the parity cases' windows: the quality text is its own sample
    wins = [data.heldout_windows(2, cfg.max_seq_len + 1, source, offset=1000 + 2 * i,
                                 vocab_size=cfg.vocab_size).numpy() for i in range(rows // 2)]
    ref, runner = TorchRunner(float_model), _make_backend(backend, onnx_path, providers)
    ref.load()
    try:
        return measure_quality(ref.run, runner.run, wins, start=cfg.prefix_len, bits=scheme.bits)
    finally:
        runner.close()
        ref.close()


def _scheme(manifest: Manifest):
    from smlp_export.quantize import QuantScheme

    return QuantScheme.from_manifest(manifest.quantization)


def _same_config(cfg, recorded: dict) -> bool:
    try:
        return type(cfg).from_dict(recorded) == cfg
    except SMLPError:
        return False


def _routing_layers(manifest: Manifest, cfg) -> list[LayerRouting]:
    """One accumulator per router output, from the manifest (or the config if the manifest lacks it)."""
    k_tok = cfg.top_k if cfg.token_routing == "topk" else 1
    spec = manifest.routing_outputs
    layers = []
    if spec:
        for name, s in spec.items():
            kind = s.get("kind", "tmoe_logits" if name.endswith(".tmoe") else "smoe_probs")
            # base routing is greedy top-1 whatever top_k says; partial sMoE is top-1 per channel
            k = int(s.get("k") or 1) if kind == "tmoe_logits" and s.get("routing") != "base" else 1
            layers.append(LayerRouting(name, kind, k))
    else:
        for i in cfg.sparse_layer_ids():
            layers.append(LayerRouting(f"blocks.{i}.tmoe", "tmoe_logits", k_tok))
            if cfg.spatial_routing == "partial":
                layers.append(LayerRouting(f"blocks.{i}.smoe", "smoe_probs", 1))
    return layers


def _check_backend(backend: str) -> None:
    """Before any work: an unknown backend or one whose runtime is missing is one clear error."""
    from smlp_export.runners import RunnerUnavailable
    from smlp_export.runners.registry import get_runner_class

    if backend not in BACKENDS:
        raise InputError(f"unknown validation backend {backend!r}; choose from {', '.join(BACKENDS)}")
    try:
        get_runner_class(backend).check_available()
    except RunnerUnavailable as e:
        raise SMLPError(f"backend {backend} cannot run here: {e}") from None


def _make_backend(backend: str, onnx_path: Path, providers: list[str] | None, engine: str | None = None):
    from smlp_export.runners import RunnerUnavailable, get_runner

    _check_backend(backend)
    kwargs = {"providers": providers} if backend == "ort" and providers else {}
    if backend == "tensorrt" and engine:
        kwargs["engine"] = engine
    if backend == "ort" and (onnx_path.parent / f"{onnx_path.name}.data").is_file():
        # a large (external-data) model: no second copy of the weights (docs/export.md)
        kwargs["large_model"] = True
    runner = get_runner(backend, onnx_path, **kwargs)
    try:
        runner.load()
    except RunnerUnavailable as e:
        raise SMLPError(f"backend {backend} cannot run here: {e}") from None
    return runner


def _sha256(path: Path) -> str:
    from smlp_export.checkpoint import sha256_file

    return sha256_file(path)


def run_validation(export_dir: str | Path, backend: str = "ort", *, checkpoint: Any = None, quick: bool = False,
                   providers: list[str] | None = None, progress: bool = False, write: bool = True,
                   bisect: str | None = None, save_inputs: str | None = None,
                   save_outputs: str | None = None, atol: float | None = None,
                   rtol: float | None = None, engine: str | None = None) -> ParityReport:
    """Compare the export in ``export_dir`` with PyTorch on real held-out text; write parity.json.

    checkpoint: path, name, or an ``SMLPForCausalLM``; default the manifest's (``Manifest.checkpoint_path``).
    Its weights sha256 must match the manifest's (CheckpointError otherwise).
    quick: fewer cases (used after every export). engine: the TensorRT engine file for backend
    ``tensorrt`` (default OUT/model.engine if present, else one is built). bisect: None, or a mode of
    ``validate.bisect.MODES`` to add the per-block comparison (report ``bisect``). The report's ``passed`` is True only if every
    check passed; errors in the inputs (missing files, unknown backend) raise ``SMLPError``.
    """
    t0 = time.perf_counter()
    export_dir = Path(export_dir)
    _check_backend(backend)
    if bisect and backend == "tensorrt":
        raise InputError("--bisect adds graph outputs and runs them on ONNX Runtime; it does not take "
                         "--backend tensorrt (an engine's outputs are fixed when it is built)")
    if engine and backend != "tensorrt":
        raise InputError("--engine is for --backend tensorrt")
    # Held from here to the write of parity.json: if OUT is replaced meanwhile (export --force), the
    # report must not land in the new export (report.write checks this folder is still OUT).
    try:
        dir_fd = os.open(export_dir, os.O_RDONLY | os.O_DIRECTORY) if write else None
    except OSError:
        dir_fd = None  # read_manifest names the problem
    from tqdm import tqdm

    # stderr, stage + case counter; progress=False (not a terminal, --quiet, --json) shows nothing
    bar = tqdm(desc=f"validate {backend}", unit=" cases", disable=not progress, leave=False, file=sys.stderr)
    try:
        return _run_validation(export_dir, backend, dir_fd, checkpoint=checkpoint, quick=quick, providers=providers,
                               bar=bar, write=write, bisect=bisect, save_inputs=save_inputs,
                               save_outputs=save_outputs, atol=atol, rtol=rtol, engine=engine, t0=t0)
    finally:
        bar.close()
        if dir_fd is not None:
            os.close(dir_fd)


def _run_validation(export_dir: Path, backend: str, dir_fd: int | None, *, checkpoint: Any, quick: bool,
                    providers: list[str] | None, bar: Any, write: bool, bisect: str | None,
                    save_inputs: str | None, save_outputs: str | None, atol: float | None,
                    rtol: float | None, engine: str | None, t0: float) -> ParityReport:
    from smlp_export import data

    def stage(name: str) -> None:
        bar.set_description_str(f"validate {backend}: {name}")

    from smlp_export.runners.torch_runner import ROUTER_PREFIX, TorchRunner

    from .polygraphy_io import check_save_paths

    check_save_paths(export_dir, save_inputs, save_outputs)  # before the long run, not after it
    stage("checksums")
    manifest = read_manifest(export_dir)
    digests = manifest.verify_files()  # refuse files that changed after export (or point outside it)
    target = manifest.target
    onnx_path = export_dir / MODEL_FILE
    # The tolerance table follows what the graph computes in, never the manifest's label.
    dtype = graph_dtype(onnx_path)
    tol = tolerance_for(dtype)
    from .overrides import apply_overrides

    tol, overrides = apply_overrides(tol, atol, rtol)  # --atol/--rtol; looser ones are flagged
    stage("load")
    model, ckpt = _load_reference_model(manifest, checkpoint, export_dir)
    float_model = model
    if manifest.quantization:  # compare with the fake-quant twin: the export's exact numbers
        from smlp_export.quantize.twin import fake_quant_twin

        model = fake_quant_twin(model, _scheme(manifest))
    cfg = model.config
    source = data.corpus_source_of(model)
    base = CASES_REFERENCE if backend == "reference" else (CASES_QUICK if quick else CASES_FULL)
    shapes = case_shapes(base, cfg.max_seq_len)
    layers = _routing_layers(manifest, cfg)
    p = cfg.prefix_len
    cov = coverage.new_coverage(cfg, [(layer.name, layer.kind, layer.k) for layer in layers])
    fused_max = AUTO_FUSED_MAX_TOKENS if (target, manifest.ort_moe) == ("ort", "auto") else 0
    fused_cov = coverage.token_layers(cov) if fused_max else None

    from .streamed import RowCache

    ref_runner = RowCache(TorchRunner(model))  # picked search windows are not recomputed
    ref_runner.load()
    runner = _make_backend(backend, onnx_path, providers, engine)
    rows: list[dict[str, Any]] = []
    inputs: list[tuple[str, np.ndarray]] = []  # (case, input_ids): what --bisect replays
    failures: list[str] = []
    if dtype != manifest.dtype:
        failures.append(f"dtype: {MANIFEST_FILE} says {manifest.dtype!r} but {MODEL_FILE} computes in {dtype} "
                        f"(validated with the {dtype} tolerances)")
    nll_t = nll_b = 0.0
    n_tok = 0

    def run_case(case: str, ids: np.ndarray, tgt: np.ndarray | None) -> None:
        """Compare one batch; tgt None = synthetic input (no perplexity tokens)."""
        nonlocal nll_t, nll_b, n_tok
        b, t = ids.shape
        inputs.append((case, ids))
        ref, got = ref_runner.run(ids), runner.run(ids)
        if "logits" not in got:
            raise SMLPError(f"{onnx_path} has no output 'logits' (outputs: {', '.join(got)})")
        if got["logits"].shape != ref["logits"].shape:
            failures.append(f"case {case}: logits shape {got['logits'].shape} != torch {ref['logits'].shape}")
            return
        row = {"case": case, "batch": b, "seq": t, **compare_logits(ref["logits"], got["logits"], tol)}
        for layer in layers:
            key = ROUTER_PREFIX + layer.name
            if key not in got or key not in ref:
                msg = f"router output {key} missing from the {'backend' if key not in got else 'torch model'}"
                if msg not in failures:
                    failures.append(msg)
                continue
            if got[key].shape != ref[key].shape:
                failures.append(f"case {case}: {key} shape {got[key].shape} != torch {ref[key].shape}")
                continue
            layer.add(case, ref[key], got[key], tol)
        cov.add(ref, ROUTER_PREFIX)
        cov.add_deterministic(b, cfg.spatial_channels // cfg.n_spatial_experts)
        if fused_cov is not None and b * t <= fused_max:
            fused_cov.add(ref, ROUTER_PREFIX)
        if tgt is not None:
            a, n = nll_sum(ref["logits"], tgt, p)
            c, _ = nll_sum(got["logits"], tgt, p)
            nll_t, nll_b, n_tok = nll_t + a, nll_b + c, n_tok + n
            row.update({"ppl_tokens": n, "nll_torch": a, "nll_backend": c})
        else:
            row.update({"ppl_tokens": 0, "synthetic": True})
        rows.append(row)
        bar.update(1)

    try:
        offset = 0
        stage(f"{len(shapes)} held-out cases")
        for b, t in shapes:
            win = data.heldout_windows(b, t + 1, source, offset=offset, vocab_size=cfg.vocab_size).numpy()
            offset += b
            run_case(f"{b}x{t}", win[:, :t], win[:, 1:])
        if fused_cov is not None:
            # Many short inputs through the fused branch: fixed shapes, then a search for every expert.
            stage("fused-branch expert coverage")
            for b, t in FUSED_SHAPES:
                win = data.heldout_windows(b, t + 1, source, offset=offset, vocab_size=cfg.vocab_size).numpy()
                offset += b
                run_case(f"fused {b}x{t}", win[:, :t], win[:, 1:])
            _cover(run_case, ref_runner, fused_cov, source, cfg.vocab_size, fused_max, "fused ",
                   coverage.SHORT_SCAN_WINDOWS, batch_rows=False)
        L = min(cfg.max_seq_len, COVERAGE_SEQ)
        stage("expert coverage")
        _cover(run_case, ref_runner, cov, source, cfg.vocab_size, L, "coverage ", coverage.SCAN_WINDOWS,
               batch_rows=True)
    finally:
        backend_meta = runner.metadata()
        runner.close()
        ref_meta = ref_runner.metadata()
        ref_runner.close()

    metrics = _metrics(rows, layers, nll_t, nll_b, n_tok)
    checks = _checks(metrics, rows, tol, p)
    cov_report = {"experts": cov.to_dict(), "fused_branch": None if fused_cov is None else
                  {"max_tokens": fused_max, **fused_cov.to_dict()}}
    unreached = _verify_unreached(export_dir, model, cov, fused_cov, tol, dtype, providers)
    if unreached:
        cov_report["unreached"] = unreached
    for name, c in (("expert_coverage", cov), ("fused_branch_expert_coverage", fused_cov)):
        if c is not None:
            d = c.to_dict()
            bad = {layer: [e for e in es if not unreached.get(layer, {}).get(str(e), {}).get("ok")]
                   for layer, es in d["missing"].items()}
            bad = {layer: es for layer, es in bad.items() if es}
            n_direct = sum(len(es) for es in d["missing"].values()) - sum(len(es) for es in bad.values())
            value = f"{d['experts_hit']}/{d['experts']}" + (f" + {n_direct} verified directly" if n_direct else "")
            checks.append({"name": name, "value": value, "limit": "every expert, routed or verified directly",
                           "ok": not bad})
            if bad:
                failures.append(f"{name}: no validation input reaches experts {bad} (held-out and synthetic "
                                "search exhausted) and driving them directly did not verify them "
                                "(parity.json coverage.unreached)")
    quality = None
    if manifest.quantization:  # what the quantization costs: export vs the float model
        quality = _quantization_quality(float_model, onnx_path, backend, providers, source, quick, _scheme(manifest))
        checks += quality["checks"]
    failures += [f"{c['name']} = {c['value']} (limit {c['limit']})" for c in checks if not c["ok"]]
    decode = None
    if manifest.decode:
        stage("decode graph")
        decode = _validate_decode(export_dir, model, backend, quick, providers)
        if decode.get("passed") is not None:
            checks.append({"name": "decode", "value": decode["passed"], "limit": "true", "ok": bool(decode["passed"])})
            if not decode["passed"]:
                failures += [f"decode graph: {c['name']} = {c['value']} (limit {c['bound']})"
                             for c in decode.get("checks", []) if not c["ok"]]
    plugins = _check_plugin_attributes(export_dir, manifest, cfg)
    if plugins is not None:
        checks.append({"name": "plugin_attributes", "value": plugins["passed"], "limit": "true",
                       "ok": plugins["passed"]})
        failures += plugins["failures"]
    poly = None
    if save_inputs or save_outputs:  # Polygraphy JSON of these very inputs and PyTorch's outputs
        from .polygraphy_io import polygraphy_tolerances, save_polygraphy

        stage("polygraphy files")
        outs = save_polygraphy(model, inputs, save_inputs, save_outputs)
        poly = {"cases": len(inputs), "rtol": 0.0, "atol": None if outs is None else polygraphy_tolerances(
            outs, tol, {ROUTER_PREFIX + layer.name: layer.kind for layer in layers})}
    bis = None
    if bisect:
        from .bisect import bisect_export

        stage("bisect")
        bis = bisect_export(export_dir, model, inputs, tol, backend=backend, providers=providers, mode=bisect,
                            routing=[(layer.name, layer.kind, layer.k) for layer in layers],
                            decode=manifest.decode if backend == "ort" else None)
    report = ParityReport(
        passed=not failures, backend=backend, target=target, dtype=dtype, tolerances=tol.to_dict(),
        metrics=metrics, checks=checks, failures=failures, cases=rows, checkpoint=ckpt,
        # The file name, not the path: validation runs inside export's temp dir before it is renamed.
        model={"path": MODEL_FILE, "sha256": digests[MODEL_FILE], "files_sha256": digests,
               "manifest_dtype": manifest.dtype, "graph_dtype": dtype}, backend_metadata=backend_meta,
        reference={**ref_meta, "onnx": _md.version("onnx"), "numpy": np.__version__},
        corpus={"source": source, "split": "held-out", "ppl_from_position": p,
                "windows": "consecutive held-out windows of seq + 1 tokens (input + next-token targets)"},
        time_s=round(time.perf_counter() - t0, 3), quick=quick, decode=decode, coverage=cov_report,
        extra={**({"plugin_attributes": plugins} if plugins is not None else {}),
               **({"quantization": {"scheme": manifest.quantization, **quality}} if quality else {})}, bisect=bis,
        tolerance_overrides=overrides, polygraphy=poly)
    if write:
        report.write(export_dir, dir_fd)
    return report


def _verify_unreached(export_dir: Path, model, cov, fused_cov, tol, dtype: str,
                      providers: list[str] | None) -> dict[str, Any]:
    """Experts no input reached (either coverage), driven directly (``unreached.verify``)."""
    missing: dict[str, set[int]] = {}
    for c in (cov, fused_cov):
        for layer, es in (c.missing() if c is not None else {}).items():
            missing.setdefault(layer, set()).update(es)
    if not missing:
        return {}
    from .unreached import verify

    return verify(export_dir, model, {k: sorted(v) for k, v in sorted(missing.items())}, tol, dtype, providers)


def _check_plugin_attributes(export_dir: Path, manifest: Manifest, cfg) -> dict[str, Any] | None:
    """tensorrt exports: every plugin node's fields vs the config (ORT runs the fallback bodies, so
    only this check sees a field TensorRT would read wrong). None for other targets."""
    if manifest.target != "tensorrt":
        return None
    from .plugin_attrs import check_plugin_nodes

    out = {MODEL_FILE: check_plugin_nodes(export_dir / MODEL_FILE, cfg)}
    dec = manifest.decode_path()
    if dec is not None and dec.is_file():
        out[DECODE_FILE] = check_plugin_nodes(dec, cfg, decode=True)
    seq = manifest.sequence or {}  # decode_seq.onnx: the same plugin nodes as decode.onnx
    if seq and manifest.path(seq["file"]).is_file():
        out[seq["file"]] = check_plugin_nodes(manifest.path(seq["file"]), cfg, decode=True)
    return {"passed": all(r["passed"] for r in out.values()),
            "failures": [f"{name}: {line}" for name, r in out.items() for line in r["failures"]],
            "files": out}


def _cover(run_case, ref_runner, cov, source: str, vocab: int, L: int, label: str, n_windows: int, *,
           batch_rows: bool) -> None:
    """Add cases until ``cov`` is complete: held-out windows of L tokens first, then synthetic ones.
    batch_rows: the picked windows run as one batch [n, L]; else one case each ([1, L]: the fused
    branch only runs for at most L = 4 tokens per call)."""
    from smlp_export import data
    from smlp_export.runners.torch_runner import ROUTER_PREFIX

    def run(ids):
        return ref_runner.run(ids)

    for kind in ("held-out", "synthetic"):
        if cov.complete():
            return
        if kind == "held-out":
            def windows(i: int) -> np.ndarray:
                return data.heldout_windows(n_windows, L + 1, source, vocab_size=vocab,
                                            offset=COVERAGE_OFFSET // (L + 1) + i * n_windows).numpy()
        else:
            def windows(i: int) -> np.ndarray:
                return coverage.synthetic_windows(vocab, n_windows, L + 1, i)
        picked, _ = coverage.search(run, ROUTER_PREFIX, cov, windows, coverage.MAX_SCANS)
        if not picked:
            continue
        w = np.stack(picked)
        tgt = (lambda x: x[:, 1:]) if kind == "held-out" else (lambda x: None)
        if batch_rows:
            run_case(f"{label}{kind} {len(w)}x{L}", w[:, :L], tgt(w))
        else:
            for j in range(len(w)):
                run_case(f"{label}{kind} #{j} 1x{L}", w[j:j + 1, :L], tgt(w[j:j + 1]))


def _validate_decode(export_dir: Path, model: Any, backend: str, quick: bool,
                     providers: list[str] | None) -> dict[str, Any]:
    """decode.onnx parity (greedy token-for-token + per-step logits vs PyTorch full recompute).

    It runs on ONNX Runtime only: stepping token by token through onnx.reference would take minutes.
    """
    if backend != "ort":
        return {"passed": None, "skipped": f"the decode graph is checked with --backend ort, not {backend}"}
    from smlp_export.decode.validate import validate_decode

    return validate_decode(export_dir, model, quick=quick, providers=providers)


def _metrics(rows: list[dict], layers: list[LayerRouting], nll_t: float, nll_b: float, n_tok: int) -> dict[str, Any]:
    n_values = sum(r["n_values"] for r in rows)
    positions = sum(r["positions"] for r in rows)
    ties = sum(r["ties"] for r in rows)
    outside = positions - ties
    routing = {layer.name: layer.to_dict() for layer in layers}
    dec = sum(layer.decisions for layer in layers)
    ppl_t = float(np.exp(nll_t / n_tok)) if n_tok else None
    ppl_b = float(np.exp(nll_b / n_tok)) if n_tok else None
    return {
        "max_abs_err": max((r["max_abs_err"] for r in rows), default=None),
        "mean_abs_err": sum(r["sum_abs_err"] for r in rows) / n_values if n_values else None,
        "max_abs_err_rel": max((r["max_abs_err_rel"] for r in rows), default=None),
        "logits_scale": max((r["logits_scale"] for r in rows), default=None),
        "top1_agreement": (sum(r["top1_agree_outside_ties"] for r in rows) / outside) if outside else 1.0,
        "top1_positions": positions, "top1_ties": ties,
        "top1_disagree_in_ties": sum(r["top1_disagree_in_ties"] for r in rows),
        "routing_agreement": {
            "overall": (sum(layer.agree for layer in layers) / dec) if dec else 1.0,
            "decisions": dec, "ties": sum(layer.ties for layer in layers),
            "tie_flips": sum(layer.tie_flips for layer in layers),
            "flips_outside_ties": sum(layer.flips for layer in layers),
            "layers": routing},
        "ppl_reference": ppl_t, "ppl_backend": ppl_b,
        "ppl_rel_delta": abs(ppl_b - ppl_t) / ppl_t if n_tok else None, "ppl_tokens": n_tok,
        "all_finite": all(r["finite"] for r in rows),
    }


def _checks(m: dict[str, Any], rows: list[dict], tol, p: int) -> list[dict[str, Any]]:
    def check(name: str, value: Any, limit: str, ok: bool) -> dict[str, Any]:
        return {"name": name, "value": value, "limit": limit, "ok": bool(ok)}

    out = [check("cases", len(rows), ">= 1", len(rows) >= 1),
           check("all_finite", m["all_finite"], "true", m["all_finite"])]
    if rows:
        rel = m["max_abs_err_rel"]
        if getattr(tol, "atol", 0.0):  # --atol: per case max|diff| <= atol + rtol * scale
            from .overrides import logits_bound_ok

            out.append(check("max_abs_err_rel", rel, f"<= {tol.max_abs_err_rel:g} + atol {tol.atol:g} / scale",
                             logits_bound_ok(rows, tol)))
        else:
            out.append(check("max_abs_err_rel", rel, f"<= {tol.max_abs_err_rel:g}", rel <= tol.max_abs_err_rel))
        out.append(check("top1_agreement", m["top1_agreement"], f">= {tol.top1_min:g} outside ties",
                         m["top1_agreement"] >= tol.top1_min))
        flips = m["routing_agreement"]["flips_outside_ties"]
        out.append(check("routing_flips_outside_ties", flips, "== 0", flips == 0))
        if m["ppl_rel_delta"] is not None:
            out.append(check("ppl_rel_delta", m["ppl_rel_delta"], f"<= {tol.ppl_rel_delta:g}",
                             m["ppl_rel_delta"] <= tol.ppl_rel_delta))
        else:
            out.append(check("ppl_tokens", 0, f"> 0 (positions >= {p})", False))
    return out
