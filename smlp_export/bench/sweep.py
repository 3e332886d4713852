"""The sweep: every backend x batch x sequence length, timed with ``timing.measure`` on real
held-out token ids. Unavailable backends and impossible cases become rows with a reason."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from smlp_export.runners.base import RunnerUnavailable

from .backends import BackendSpec, Source, describe_spec, make_runner
from .timing import TimingConfig, measure


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
              workdir: Path | None = None, dtypes: tuple[str, ...] = ("fp32",)) -> list[dict[str, Any]]:
    """Time each backend on each (batch, seq). Returns one row per (backend, batch, seq):
    {backend, target, dtype, provider, batch, seq, status ("ok" | "skipped" | "failed"), reason,
    p50_ms, p90_ms, p99_ms, mean_ms, std_ms, p10_ms, min_ms, max_ms, spread_pct, runs,
    tokens_per_s (batch * seq / p50), load_avg_1m, runner (the runner's metadata)}.
    dtypes: compute dtypes of the ONNX graphs (each ONNX backend runs once per dtype; torch: fp32).
    workdir: where exports made on the fly are kept (default: a temporary folder removed at the end).
    """
    from tqdm import tqdm

    corpus = _corpus_of(source)
    rows: list[dict[str, Any]] = []
    cases = [(b, t) for b in batches for t in seqs]
    units = [(spec, d) for spec in specs for d in (("fp32",) if spec.runtime == "torch" else dtypes)]
    bar = tqdm(total=len(units) * len(cases), desc="bench", unit="case", disable=not progress, leave=False)
    with tempfile.TemporaryDirectory(prefix="smlp-bench-") as tmp:
        work = Path(workdir) if workdir else Path(tmp)
        for spec, dtype in units:
            base = describe_spec(spec, dtype)
            bar.set_postfix_str(f"{spec.name} {dtype}")
            try:
                runner = make_runner(spec, source, work, threads, dtype)
                runner.load()
            except RunnerUnavailable as e:
                rows += [{**base, "batch": b, "seq": t, "status": "skipped", "reason": str(e)} for b, t in cases]
                bar.update(len(cases))
                continue
            try:
                meta = runner.metadata()
                for b, t in cases:
                    row = {**base, "batch": b, "seq": t}
                    if source.max_seq_len is not None and t > source.max_seq_len:
                        rows.append({**row, "status": "skipped", "reason": f"T={t} > max_seq_len {source.max_seq_len}"})
                        bar.update(1)
                        continue
                    ids = real_token_ids(b, t, corpus)
                    try:
                        stats = measure(lambda: runner.run(ids), timing)
                    except Exception as e:  # noqa: BLE001 - one failing case must not end the sweep
                        rows.append({**row, "status": "failed", "reason": f"{type(e).__name__}: {str(e)[:200]}"})
                    else:
                        rows.append({**row, "status": "ok", **stats.to_dict(),
                                     "tokens_per_s": b * t / (stats.p50_ms / 1e3), "runner": meta})
                        if log:
                            log(f"{spec.name:<14} B={b:<3} T={t:<5} p50 {stats.p50_ms:9.3f} ms")
                    bar.update(1)
            finally:
                runner.close()
    bar.close()
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
