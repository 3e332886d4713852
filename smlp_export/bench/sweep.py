"""The sweep: every backend x batch x sequence length, timed with ``timing.measure`` on real
held-out token ids. Unavailable backends and impossible cases become rows with a reason."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from smlp_export.runners.base import RunnerUnavailable

from .backends import BackendSpec, Source, describe_spec, make_runner
from .timing import TimingConfig, measure_interleaved


def real_token_ids(batch: int, seq: int, corpus: str | None = None) -> np.ndarray:
    """int64 [batch, seq] windows of held-out text from the checkpoint's corpus (default: stdlib)."""
    from smlp_export.data import heldout_windows

    return heldout_windows(batch, seq, source=corpus).numpy().astype(np.int64)


def _corpus_of(source: Source) -> str | None:
    if source.kind == "onnx" or (source.kind == "export" and source.checkpoint is None):
        return None
    from smlp_export.checkpoint import read_metadata
    from smlp_export.data import corpus_source_of

    try:
        return corpus_source_of(read_metadata(source.checkpoint))
    except Exception:  # noqa: BLE001 - metadata without a corpus entry: the default corpus
        return None


def run_sweep(source: Source, specs: list[BackendSpec], batches: list[int], seqs: list[int],
              timing: TimingConfig = TimingConfig(), threads: int | None = None,
              progress: bool = True, log: Callable[[str], None] | None = None,
              workdir: Path | None = None, dtypes: tuple[str, ...] = ("fp32",),
              interleave: bool = True) -> list[dict[str, Any]]:
    """Time each backend on each (batch, seq). Returns one row per (backend, dtype, batch, seq):
    {backend, target, dtype, provider, batch, seq, status ("ok" | "skipped" | "failed"), reason,
    p50_ms, p90_ms, p99_ms, mean_ms, std_ms, p10_ms, min_ms, max_ms, spread_pct, runs,
    tokens_per_s (batch * seq / p50), load_avg_1m, runner (the runner's metadata)}.

    interleave: all backends are loaded first and, per (batch, seq), timed side by side in rounds
    (``measure_interleaved``), so their ratios are taken under the same machine load; otherwise
    one backend after the other. dtypes: compute dtypes of the ONNX graphs (each ONNX backend runs
    once per dtype; torch: fp32). workdir: where exports made on the fly are kept (default: a
    temporary folder removed at the end).
    """
    from tqdm import tqdm

    corpus = _corpus_of(source)
    rows: list[dict[str, Any]] = []
    cases = [(b, t) for b in batches for t in seqs]
    units = [(spec, d) for spec in specs for d in (("fp32",) if spec.runtime == "torch" else dtypes)]
    bar = tqdm(total=len(units) * len(cases), desc="bench", unit="case", disable=not progress, leave=False)
    runners: dict[tuple[str, str], Any] = {}
    with tempfile.TemporaryDirectory(prefix="smlp-bench-") as tmp:
        work = Path(workdir) if workdir else Path(tmp)
        try:
            for spec, dtype in units:
                bar.set_postfix_str(f"loading {spec.name} {dtype}")
                try:
                    runner = make_runner(spec, source, work, threads, dtype)
                    runner.load()
                except RunnerUnavailable as e:
                    base = describe_spec(spec, dtype)
                    rows += [{**base, "batch": b, "seq": t, "status": "skipped", "reason": str(e)} for b, t in cases]
                    bar.update(len(cases))
                    continue
                if interleave:
                    runners[(spec.name, dtype)] = (spec, runner)
                else:
                    try:
                        rows += _time_cases({(spec.name, dtype): (spec, runner)}, cases, source, corpus, timing, bar, log)
                    finally:
                        runner.close()
            if runners:
                rows += _time_cases(runners, cases, source, corpus, timing, bar, log)
        finally:
            for _, runner in runners.values():
                runner.close()
    bar.close()
    order = {(s.name, d): i for i, (s, d) in enumerate(units)}
    rows.sort(key=lambda r: (order[(r["backend"], r["dtype"])], r["batch"], r["seq"]))
    return rows


def _time_cases(runners, cases, source, corpus, timing, bar, log) -> list[dict[str, Any]]:
    """Rows for every (batch, seq) case, the given runners timed side by side per case."""
    rows = []
    for b, t in cases:
        heads = {key: {**describe_spec(spec, key[1]), "batch": b, "seq": t} for key, (spec, _) in runners.items()}
        if source.max_seq_len is not None and t > source.max_seq_len:
            rows += [{**h, "status": "skipped", "reason": f"T={t} > max_seq_len {source.max_seq_len}"} for h in heads.values()]
            bar.update(len(heads))
            continue
        ids = real_token_ids(b, t, corpus)
        bar.set_postfix_str(f"B={b} T={t}")
        fns = {key: (lambda r=runner: r.run(ids)) for key, (_, runner) in runners.items()}
        results = measure_interleaved(fns, timing)
        for key, res in results.items():
            if isinstance(res, Exception):  # one failing case must not end the sweep
                rows.append({**heads[key], "status": "failed", "reason": f"{type(res).__name__}: {str(res)[:200]}"})
            else:
                rows.append({**heads[key], "status": "ok", **res.to_dict(),
                             "tokens_per_s": b * t / (res.p50_ms / 1e3), "runner": runners[key][1].metadata()})
                if log:
                    log(f"{key[0]:<14} {key[1]} B={b:<3} T={t:<5} p50 {res.p50_ms:9.3f} ms")
        bar.update(len(heads))
    return rows


def ratio_table(rows: list[dict[str, Any]], numerator: str, denominator: str, dtype: str = "fp32") -> list[dict[str, Any]]:
    """p50(numerator) / p50(denominator) for every (batch, seq) both backends measured (one dtype)."""
    ok = {(r["backend"], r["batch"], r["seq"]): r for r in rows
          if r.get("status") == "ok" and r.get("dtype") == dtype}
    out = []
    for (name, b, t), r in sorted(ok.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if name != numerator or (denominator, b, t) not in ok:
            continue
        out.append({"batch": b, "seq": t, "numerator": numerator, "denominator": denominator,
                    "ratio_p50": r["p50_ms"] / ok[(denominator, b, t)]["p50_ms"]})
    return out
