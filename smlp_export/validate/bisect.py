"""``smlp validate OUT --bisect``: find the first block whose output diverges from PyTorch.

The export's graph records, per block, which tensor holds the block output and (sparse blocks) the
tMoE and sMoE outputs (``smlp.probes`` in its metadata_props, written by
``smlp_export.export.probes``). Bisection writes a temporary copy of the graph (the published
file is never touched; external weights are neither copied nor loaded), exposes those
tensors as extra float32 outputs (``probe.<name>``, a Cast so fp16/bf16 graphs compare alike),
runs it on the validation inputs, and compares each with the same tensor captured from PyTorch by
forward hooks. Rows, in execution order: ``embed``, then per block ``blocks.N.tmoe.router``,
``blocks.N.tmoe``, ``blocks.N.smoe.router`` (partial routing), ``blocks.N.smoe``,
``blocks.N.out``; last ``logits``. The first row over the dtype's bound
(``Tolerance.max_abs_err_rel``, relative to the PyTorch tensor's scale) is the first divergence.

decode.onnx (``--bisect`` on an export with a decode graph, ORT backend): each case runs as one
prefill step from zero states; rows are its probes (embed, tMoE, sMoE and block outputs), every block's new state
rows ``[0, T)`` (``blocks.N.state``, PyTorch: that block's ``norm_z2`` output) and the logits.

Memory: ``mode="each"`` exposes one block's tensors per session (one session alive at a time)
and keeps PyTorch's captures on disk, so a paper-scale model needs one session's memory plus one
block's outputs; ``"auto"`` picks it for models above ``EACH_ABOVE_BYTES``.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from smlp_export.artifacts import DECODE_FILE, MODEL_FILE, export_path
from smlp_export.errors import InputError, SMLPError

from .tolerances import Tolerance

EACH_ABOVE_BYTES = 512 * 1024**2  # graph + external data above this: one block per session
MODES = ("auto", "all", "each")
PROBE_PREFIX = "probe."


@dataclass
class Row:
    """Accumulated comparison of one probed tensor over all cases."""

    name: str
    output: str  # graph output name in the probed copy
    tensor: str  # tensor name in the published graph
    block: int  # -1: embed, n_layers: logits
    scale_one: bool = False  # probabilities: compared at scale 1
    max_abs_err: float = 0.0
    max_abs_err_rel: float = 0.0
    sum_abs_err: float = 0.0
    n_values: int = 0
    scale: float = 0.0
    where: dict[str, Any] = field(default_factory=dict)
    finite: bool = True
    error: str | None = None
    excluded: int = 0  # values left out because their router decision flipped inside the tie noise

    def add(self, case: str, ref: np.ndarray, got: np.ndarray, exclude: np.ndarray | None = None) -> None:
        if got.shape != ref.shape:
            self.error = f"case {case}: shape {tuple(got.shape)} != torch {tuple(ref.shape)}"
            return
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        if exclude is not None and exclude.any():
            mask = np.broadcast_to(exclude, diff.shape)
            self.excluded += int(mask.sum())
            diff = np.where(mask, 0.0, diff)
        finite = bool(np.isfinite(got).all())
        self.finite &= finite
        scale = 1.0 if self.scale_one else float(np.abs(ref).max()) if ref.size else 0.0
        err = float(np.nanmax(np.where(np.isfinite(diff), diff, np.inf))) if diff.size else 0.0
        rel = err / scale if scale else err
        self.scale = max(self.scale, scale)
        self.sum_abs_err += float(np.where(np.isfinite(diff), diff, 0.0).sum())
        self.n_values += int(diff.size)
        if rel > self.max_abs_err_rel or not self.where:
            idx = np.unravel_index(int(np.argmax(np.where(np.isfinite(diff), diff, np.inf))), diff.shape) if diff.size else ()
            self.where = {"case": case, "index": [int(i) for i in idx]}
            self.max_abs_err_rel = max(self.max_abs_err_rel, rel)
        self.max_abs_err = max(self.max_abs_err, err)

    def to_dict(self, limit: float) -> dict[str, Any]:
        ok = self.error is None and self.finite and self.n_values > 0 and self.max_abs_err_rel <= limit
        return {"name": self.name, "tensor": self.tensor, "max_abs_err_rel": self.max_abs_err_rel,
                "max_abs_err": self.max_abs_err,
                "mean_abs_err": self.sum_abs_err / self.n_values if self.n_values else None,
                "scale": self.scale, "where": self.where, "finite": self.finite, "limit": limit,
                "excluded_tie_values": self.excluded,
                "ok": bool(ok), **({"error": self.error} if self.error else {})}


def tie_flips(ref: np.ndarray, got: np.ndarray, kind: str, k: int, tol: Tolerance) -> np.ndarray:
    """[B, R] True where the router's decision differs from PyTorch's *and* PyTorch's margin is
    inside the dtype's tie noise (the validator accepts those flips; compare.LayerRouting)."""
    from .compare import decisions

    scale = 1.0 if kind == "smoe_probs" else float(np.abs(ref).max())
    dr, dg = decisions(ref, k), decisions(got, k)
    flip = ~(dr.chosen == dg.chosen).all(-1) & (dr.margin < tol.noise(scale))
    return flip.reshape(ref.shape[0], ref.shape[1])


def _exclusion(name: str, kind: str, flips: np.ndarray) -> np.ndarray:
    """Which values of a MoE layer's output [B, T, d] a tie flip explains: the flipped tokens
    (tMoE); every position of a sequence whose channel routing flipped (sMoE: proj_out mixes channels)."""
    if kind == "tmoe_logits":
        return flips[:, :, None]
    return flips.any(axis=1)[:, None, None]


def _read_graph(path: Path):
    import onnx

    from smlp_export.export.probes import read_probes

    proto = onnx.load(str(path), load_external_data=False)  # weights stay on disk
    probes = read_probes(proto)
    if probes is None:
        raise InputError(f"{path} records no block probes (smlp.probes): it was exported by an older "
                         "smlp-export; export it again to bisect")
    return proto, probes


def _external_files(proto) -> set[str]:
    out = set()
    for t in proto.graph.initializer:
        if t.data_location == t.EXTERNAL:
            out |= {e.value for e in t.external_data if e.key == "location"}
    return out


def _graph_bytes(path: Path, proto) -> int:
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in _external_files(proto)
                                     if (path.parent / f).is_file())


def probed_copy(src: Path, proto, exposed: list[tuple[str, str]], tmp: Path, name: str) -> Path:
    """Write ``proto`` plus one float32 output per (output name, tensor) to ``tmp/name``; ``proto``
    is not modified. A graph with external data is written as a hidden temporary file next to the
    published one instead (``.name.smlp-bisect-PID.onnx``, removed by the caller): ONNX Runtime
    refuses external data outside the model's folder, even through a symlink, and copying the
    weights is what this avoids."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    h = onnx.helper
    known = {o.name for o in m.graph.output}
    for out, tensor in exposed:
        if out in known:
            continue
        m.graph.node.append(h.make_node("Cast", [tensor], [out], to=onnx.TensorProto.FLOAT, name=f"bisect_{out}"))
        m.graph.output.append(h.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    path = tmp / name
    if _external_files(m):
        path = src.parent / f".{name}.smlp-bisect-{os.getpid()}.onnx"
    onnx.save_model(m, str(path))
    return path


class TorchCapture:
    """Forward hooks on the float32 reference: embed, block / tMoE / sMoE outputs, norm_z2 (state)."""

    def __init__(self, model) -> None:
        from smlp_export.model import SparseBlock

        self.model = model
        self.mods: dict[str, Any] = {"embed": model.embed}
        for i, blk in enumerate(model.blocks):
            if isinstance(blk, SparseBlock):
                self.mods[f"blocks.{i}.tmoe"] = blk.tmoe
                self.mods[f"blocks.{i}.smoe"] = blk.smoe
                self.mods[f"blocks.{i}.state"] = blk.smoe.norm_z2
            else:
                self.mods[f"blocks.{i}.state"] = blk.norm_z2
            self.mods[f"blocks.{i}.out"] = blk

    def run(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        got: dict[str, np.ndarray] = {}
        hooks = [m.register_forward_hook(lambda _m, _i, o, k=k: got.__setitem__(k, o.detach().float().numpy()))
                 for k, m in self.mods.items()]
        routing: dict[str, torch.Tensor] = {}
        try:
            with torch.inference_mode():
                logits = self.model(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)), routing)
        finally:
            for hk in hooks:
                hk.remove()
        got["logits"] = logits.float().numpy()
        for k, v in routing.items():
            got[f"{k}.router"] = v.float().numpy()
        return got


def _rows_full(probes: list[dict[str, str]], routing: list[tuple[str, str, int]], n_layers: int) -> list[Row]:
    rows = [Row(p["name"], PROBE_PREFIX + p["name"], p["tensor"],
                -1 if p["name"] == "embed" else int(p["name"].split(".")[1])) for p in probes]
    for name, kind, _ in routing:  # router outputs are already graph outputs
        rows.append(Row(f"{name}.router", f"router.{name}", f"router.{name}", int(name.split(".")[1]),
                        scale_one=kind == "smoe_probs"))
    rows.append(Row("logits", "logits", "logits", n_layers))
    return sorted(rows, key=_row_order)


def _row_order(r: Row) -> tuple[int, int]:
    part = r.name.split(".", 2)[2] if r.name.startswith("blocks.") else ""
    order = {"tmoe.router": 0, "tmoe": 1, "smoe.router": 2, "smoe": 3, "state": 4, "out": 5}
    return (r.block, order.get(part, 0))


def _groups(rows: list[Row], mode: str) -> list[list[Row]]:
    if mode == "all":
        return [rows]
    by_block: dict[int, list[Row]] = {}
    for r in rows:
        by_block.setdefault(max(r.block, 0), []).append(r)
    return [by_block[b] for b in sorted(by_block)]


def _summarise(rows: list[Row], tol: Tolerance, extra: dict[str, Any]) -> dict[str, Any]:
    table = [r.to_dict(tol.max_abs_err_rel) for r in rows]
    first = next((t["name"] for t in table if not t["ok"]), None)
    return {"first_divergence": first, "limit": tol.max_abs_err_rel, "blocks": table, **extra}


def _pick_mode(mode: str, size: int) -> str:
    if mode not in MODES:
        raise InputError(f"unknown bisect mode {mode!r}; choose from {', '.join(MODES)}")
    if mode == "auto":
        return "each" if size > EACH_ABOVE_BYTES else "all"
    return mode


def _compare(src: Path, proto, rows: list[Row], groups: list[list[Row]], cases: list[tuple[str, np.ndarray]],
             capture: TorchCapture, make_runner: Callable[[Path], Any], feeds: Callable[[np.ndarray], Any],
             tmp: Path, routing: list[tuple[str, str, int]] = (), tol: Tolerance | None = None) -> None:
    """Run PyTorch once per case (captures on disk), then the probed graph group by group.
    MoE outputs leave out the values that a router tie flip (routing: [(layer, kind, k)]) explains."""
    want = {r.name for r in rows} | {f"{name}.router" for name, _, _ in routing}
    routers = {name: (kind, k) for name, kind, k in routing}
    for ci, (case, ids) in enumerate(cases):
        for k, v in capture.run(ids).items():
            if k in want:
                np.save(tmp / f"ref-{ci}-{k}.npy", v)
    for gi, group in enumerate(groups):
        exposed = [(r.output, r.tensor) for r in group if r.output.startswith(PROBE_PREFIX)]
        path = probed_copy(src, proto, exposed, tmp, f"probed-{gi}.onnx")
        try:
            runner = make_runner(path)
            for ci, (case, ids) in enumerate(cases):
                got = runner(feeds(ids))
                for r in group:
                    ref_file = tmp / f"ref-{ci}-{r.name}.npy"
                    if r.output not in got:
                        r.error = f"output {r.output} missing from the probed graph"
                        continue
                    if not ref_file.is_file():
                        r.error = f"PyTorch has no tensor {r.name}"
                        continue
                    ref = np.load(ref_file, mmap_mode="r")
                    out = got[r.output]
                    if r.name.endswith(".state"):  # new state rows [0, T); the rest is the zero input
                        out = out[:, : ref.shape[1]]
                    exclude = None
                    if r.name in routers and tol is not None and f"router.{r.name}" in got:
                        kind, k = routers[r.name]
                        rref = np.load(tmp / f"ref-{ci}-{r.name}.router.npy")
                        rgot = got[f"router.{r.name}"]
                        if rref.shape == rgot.shape:
                            exclude = _exclusion(r.name, kind, tie_flips(rref, rgot, kind, k, tol))
                    r.add(case, np.asarray(ref), out, exclude)
            del runner
        finally:
            path.unlink(missing_ok=True)


def bisect_export(export_dir: str | Path, model, cases: list[tuple[str, np.ndarray]], tol: Tolerance, *,
                  backend: str = "ort", providers: list[str] | None = None, mode: str = "auto",
                  routing: list[tuple[str, str, int]] | None = None, decode: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per-block comparison of ``export_dir/model.onnx`` (and decode.onnx) with PyTorch.

    model: the float32 reference SMLPForCausalLM; cases: [(case label, input_ids int64 [B, T])];
    routing: [(layer name, kind, k)] of the router outputs; decode: manifest["decode"] or None.
    Returns {first_divergence, limit, mode, blocks: [row...], decode: {...} | absent}.
    """
    from smlp_export.runners import RunnerUnavailable, get_runner

    export_dir = Path(export_dir)
    src = export_dir / MODEL_FILE
    proto, probes = _read_graph(src)
    chosen = _pick_mode(mode, _graph_bytes(src, proto))
    capture = TorchCapture(model)
    rows = _rows_full(probes, routing or [], len(model.blocks))

    def make_runner(path: Path):
        kwargs = {"providers": providers} if backend == "ort" and providers else {}
        r = get_runner(backend, path, **kwargs)
        try:
            r.load()
        except RunnerUnavailable as e:
            raise SMLPError(f"backend {backend} cannot run here: {e}") from None
        return r.run

    with tempfile.TemporaryDirectory(prefix="smlp-bisect-") as t:
        tmp = Path(t)
        _compare(src, proto, rows, _groups(rows, chosen), cases, capture, make_runner, lambda ids: ids, tmp,
                 routing or [], tol)
        out = _summarise(rows, tol, {"mode": chosen, "graph": MODEL_FILE})
        if decode:
            out["decode"] = _bisect_decode(export_dir, decode, model, cases, tol, chosen, providers, capture, tmp)
    return out


def _bisect_decode(export_dir: Path, dec: dict[str, Any], model, cases, tol: Tolerance, mode: str,
                   providers: list[str] | None, capture: TorchCapture, tmp: Path) -> dict[str, Any]:
    """decode.onnx as one prefill step (position 0, zero states) per case; ORT only."""
    src = export_path(export_dir, dec.get("file", DECODE_FILE))
    proto, probes = _read_graph(src)
    names = dec["inputs"]["states"]
    outs = dec["outputs"]["states"]
    n = len(model.blocks)
    rows = [Row(p["name"], PROBE_PREFIX + p["name"], p["tensor"],
                -1 if p["name"] == "embed" else int(p["name"].split(".")[1])) for p in probes]
    for i, o in enumerate(outs):
        rows.append(Row(f"blocks.{i}.state", o, o, i))
    rows.append(Row("logits", dec["outputs"]["logits"], dec["outputs"]["logits"], n))
    rows.sort(key=_row_order)
    state_np = np.float16 if dec.get("state_dtype") == "float16" else np.float32
    shape = dec["state_shape"]
    min_prompt = int(dec.get("min_prompt_tokens", 1))
    usable = [(c, ids) for c, ids in cases if ids.shape[1] >= min_prompt]

    def feeds(ids: np.ndarray) -> dict[str, np.ndarray]:
        b = ids.shape[0]
        f = {dec["inputs"]["input_ids"]: np.ascontiguousarray(ids, dtype=np.int64),
             dec["inputs"]["position"]: np.array(0, dtype=np.int64)}
        f.update({s: np.zeros((b, int(shape[1]), int(shape[2])), dtype=state_np) for s in names})
        return f

    def make_runner(path: Path):
        from smlp_export.runners.ort_session import create_session

        sess = create_session(path, providers=providers)
        wanted = [o.name for o in sess.get_outputs()]

        def run(f):
            vals = sess.run(wanted, f)
            return {k: v.astype(np.float32) for k, v in zip(wanted, vals)}
        return run

    sub = tmp / "decode"
    sub.mkdir()
    _compare(src, proto, rows, _groups(rows, mode), usable, capture, make_runner, feeds, sub)
    return _summarise(rows, tol, {"mode": mode, "graph": src.name, "cases": [c for c, _ in usable],
                                  "step": "prefill from position 0 with zero states"})


def table_lines(bisect: dict[str, Any]) -> list[str]:
    """The per-block table and the verdict line, for the CLI."""
    lines = []
    sections = [(MODEL_FILE, bisect)] + ([(DECODE_FILE, bisect["decode"])] if bisect.get("decode") else [])
    for title, sec in sections:
        rows = [("tensor", "max|diff|/scale", "mean|diff|", "scale", "where", "ok")]
        for r in sec["blocks"]:
            w = r["where"]
            where = f"{w['case']} {tuple(w['index'])}" if w else "-"
            name = r["name"] + (f" ({r['excluded_tie_values']} tie values left out)" if r.get("excluded_tie_values") else "")
            rows.append((name, f"{r['max_abs_err_rel']:.3g}",
                         f"{r['mean_abs_err']:.3g}" if r["mean_abs_err"] is not None else "-",
                         f"{r['scale']:.3g}", where, "ok" if r["ok"] else ("FAIL " + r.get("error", "")).strip()))
        widths = [max(len(x[i]) for x in rows) for i in range(6)]
        lines.append(f"bisect {title} ({sec['mode']}, limit {sec['limit']:.3g} of scale)")
        lines += ["  " + "  ".join(s.ljust(w) for s, w in zip(x, widths)).rstrip() for x in rows]
        lines.append(f"first divergence{'' if title == MODEL_FILE else ' (decode)'}: {sec['first_divergence'] or 'none'}")
    return lines
