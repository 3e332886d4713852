"""The timing method: warm-up, then timed runs until a minimum count AND a minimum time are reached.

Why both limits: a minimum count gives stable percentiles for slow cases; a minimum wall time
averages over scheduler noise for fast cases (a 0.2 ms call timed 20 times is all noise).
Every run is timed individually with ``time.perf_counter_ns`` so percentiles are real, not
derived from a mean. A ``max_time_s`` cap stops very slow cases early, even before ``min_runs``
(the row then records how many runs it got).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class TimingConfig:
    """How long to measure one case.

    warmup: untimed calls first (allocations, JIT, ORT arena growth). min_runs / min_time_s:
    both must be reached. max_time_s: stop once this much timed time has passed, whatever the
    count (keeps a sweep over very slow cases bounded).
    """

    warmup: int = 3
    min_runs: int = 10
    min_time_s: float = 1.0
    max_time_s: float = 30.0

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.min_runs < 1:
            raise ValueError(f"warmup must be >= 0 and min_runs >= 1, got {self.warmup}, {self.min_runs}")
        if self.min_time_s < 0 or self.max_time_s < self.min_time_s:
            raise ValueError(f"need 0 <= min_time_s <= max_time_s, got {self.min_time_s}, {self.max_time_s}")

    @classmethod
    def quick(cls) -> "TimingConfig":
        """For smoke runs and --quick benchmark modes: fewer, shorter measurements."""
        return cls(warmup=1, min_runs=5, min_time_s=0.2, max_time_s=5.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method) of an ascending list, q in [0, 100]."""
    if not sorted_values:
        raise ValueError("percentile of an empty list")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True)
class LatencyStats:
    """Summary of per-call latencies, in milliseconds.

    spread_pct: (p90 - p10) / p50 * 100, a robust width of the distribution; a large value means
    the machine was noisy and the figure should be retaken. load_avg_1m: os.getloadavg()[0] when
    the measurement ended (other processes competing for the CPU).
    """

    runs: int
    total_s: float
    mean_ms: float
    std_ms: float
    min_ms: float
    p10_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    spread_pct: float
    load_avg_1m: float | None = None

    @classmethod
    def from_samples(cls, samples_ms: list[float], load_avg_1m: float | None = None) -> "LatencyStats":
        if not samples_ms:
            raise ValueError("no samples")
        s = sorted(samples_ms)
        n = len(s)
        mean = sum(s) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in s) / (n - 1)) if n > 1 else 0.0
        p10, p50, p90 = percentile(s, 10), percentile(s, 50), percentile(s, 90)
        return cls(runs=n, total_s=sum(s) / 1e3, mean_ms=mean, std_ms=std, min_ms=s[0], p10_ms=p10,
                   p50_ms=p50, p90_ms=p90, p99_ms=percentile(s, 99), max_ms=s[-1],
                   spread_pct=(p90 - p10) / p50 * 100.0 if p50 > 0 else 0.0, load_avg_1m=load_avg_1m)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):  # not available on every platform
        return None


def measure(fn: Callable[[], Any], cfg: TimingConfig = TimingConfig(),
            clock: Callable[[], int] = time.perf_counter_ns) -> LatencyStats:
    """Time ``fn()``: ``cfg.warmup`` untimed calls, then timed calls until at least ``cfg.min_runs``
    calls AND ``cfg.min_time_s`` seconds of timed calls, or until ``cfg.max_time_s`` seconds.

    ``fn`` must block until its result is ready (CPU backends do; a GPU runner must synchronise).
    ``clock`` returns nanoseconds (injectable so tests can check the stopping rule exactly).
    """
    for _ in range(cfg.warmup):
        fn()
    samples: list[float] = []
    elapsed_ns = 0
    min_ns, max_ns = cfg.min_time_s * 1e9, cfg.max_time_s * 1e9
    while True:
        t0 = clock()
        fn()
        dt = clock() - t0
        samples.append(dt / 1e6)
        elapsed_ns += dt
        if (len(samples) >= cfg.min_runs and elapsed_ns >= min_ns) or elapsed_ns >= max_ns:
            break
    return LatencyStats.from_samples(samples, _load_avg())


def measure_interleaved(fns: dict[str, Callable[[], Any]], cfg: TimingConfig = TimingConfig(),
                        clock: Callable[[], int] = time.perf_counter_ns) -> dict[str, LatencyStats | Exception]:
    """Time several callables side by side: after each one's warm-up, rounds call every callable
    once in turn, until each has ``cfg.min_runs`` runs and ``cfg.min_time_s`` of timed time (or
    ``cfg.max_time_s``).

    Why: on a shared machine the load changes over minutes; timing A then B puts A and B under
    different loads and their *ratio* drifts. Interleaving exposes all of them to the same load, so
    ratios stay meaningful even when absolute figures are noisy. A callable that raises is dropped
    from the rotation and its exception returned in its place.
    """
    results: dict[str, LatencyStats | Exception] = {}
    live: dict[str, Callable[[], Any]] = {}
    for name, fn in fns.items():
        try:
            for _ in range(cfg.warmup):
                fn()
            live[name] = fn
        except Exception as e:  # noqa: BLE001 - reported per callable
            results[name] = e
    samples: dict[str, list[float]] = {n: [] for n in live}
    elapsed: dict[str, int] = {n: 0 for n in live}
    min_ns, max_ns = cfg.min_time_s * 1e9, cfg.max_time_s * 1e9

    def done(n: str) -> bool:
        return (len(samples[n]) >= cfg.min_runs and elapsed[n] >= min_ns) or elapsed[n] >= max_ns

    while live:
        for name in list(live):
            if done(name):
                continue
            try:
                t0 = clock()
                live[name]()
                dt = clock() - t0
            except Exception as e:  # noqa: BLE001
                results[name] = e
                del live[name]
                continue
            samples[name].append(dt / 1e6)
            elapsed[name] += dt
        if all(done(n) for n in live):
            break
    load = _load_avg()
    for name in live:
        results[name] = LatencyStats.from_samples(samples[name], load)
    return {n: results[n] for n in fns}
