"""smlp_export.bench: timing rule, statistics, machine description, outputs, sweep, ORT profile, CLI.

No speed goals here (those live in benchmarks/): these tests check that the harness measures what
it says, on real components (a real checkpoint, real ORT sessions, real held-out text).
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from smlp_export import SMLPForCausalLM, preset, save_checkpoint
from smlp_export.bench.machine import cpu_model, describe_machine, short_description
from smlp_export.bench.report import format_table, write_json, write_plot
from smlp_export.bench.timing import LatencyStats, TimingConfig, measure, percentile

VOCAB = 257


# ---- statistics ------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentile_matches_numpy(n):
    rng = random.Random(n)
    xs = sorted(rng.uniform(0.1, 50) for _ in range(n))
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)


def test_stats_from_samples_match_numpy():
    rng = np.random.default_rng(0)
    xs = list(rng.lognormal(0.0, 0.5, 257))
    s = LatencyStats.from_samples(xs)
    assert s.runs == 257
    assert s.p50_ms == pytest.approx(np.median(xs))
    assert s.p99_ms == pytest.approx(np.percentile(xs, 99))
    assert s.mean_ms == pytest.approx(np.mean(xs))
    assert s.std_ms == pytest.approx(np.std(xs, ddof=1))
    assert s.spread_pct == pytest.approx((np.percentile(xs, 90) - np.percentile(xs, 10)) / np.median(xs) * 100)
    assert s.min_ms <= s.p10_ms <= s.p50_ms <= s.p90_ms <= s.p99_ms <= s.max_ms


def test_stats_reject_empty():
    with pytest.raises(ValueError):
        LatencyStats.from_samples([])


# ---- the stopping rule (a fake clock makes it exact) -----------------------------------------
class FakeClock:
    """Each call to the timed function advances time by ``dt_ns``."""

    def __init__(self, dt_ns: int):
        self.now, self.dt, self.calls = 0, dt_ns, 0

    def clock(self) -> int:
        return self.now

    def fn(self) -> None:
        self.calls += 1
        self.now += self.dt


@pytest.mark.parametrize("dt_ms, cfg, expect_runs", [
    (1.0, TimingConfig(warmup=2, min_runs=10, min_time_s=0.5, max_time_s=5), 500),  # time-bound
    (200.0, TimingConfig(warmup=2, min_runs=10, min_time_s=0.5, max_time_s=5), 10),  # count-bound
    (1000.0, TimingConfig(warmup=1, min_runs=10, min_time_s=0.5, max_time_s=3), 3),  # capped by max_time
])
def test_measure_stopping_rule(dt_ms, cfg, expect_runs):
    fc = FakeClock(int(dt_ms * 1e6))
    st = measure(fc.fn, cfg, clock=fc.clock)
    assert st.runs == expect_runs
    assert fc.calls == expect_runs + cfg.warmup
    assert st.p50_ms == pytest.approx(dt_ms)
    assert st.spread_pct == pytest.approx(0.0)


def test_measure_real_sleep_is_in_range():
    import time

    st = measure(lambda: time.sleep(0.002), TimingConfig(warmup=1, min_runs=5, min_time_s=0.02, max_time_s=1))
    assert st.runs >= 5 and st.total_s >= 0.02
    assert st.p50_ms >= 2.0  # a sleep never returns early


@pytest.mark.parametrize("kw", [dict(min_runs=0), dict(warmup=-1), dict(min_time_s=2, max_time_s=1)])
def test_timing_config_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        TimingConfig(**kw)


# ---- machine description -------------------------------------------------------------------
def test_cpu_model_parsing():
    info = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz\n"
    assert cpu_model(info) == "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"


def test_describe_machine_has_what_reports_need():
    d = describe_machine()
    for key in ("cpu_model", "logical_cores", "usable_cores", "load_avg_1_5_15m", "python", "libraries",
                "torch_threads", "timestamp_utc"):
        assert key in d, key
    assert d["libraries"]["torch"].startswith(torch.__version__.split("+")[0])
    assert d["usable_cores"] >= 1
    json.dumps(d)  # JSON-ready
    assert d["cpu_model"] in short_description(d)


# ---- outputs -------------------------------------------------------------------------------
def _row(backend, b, t, p50, status="ok"):
    if status != "ok":
        return {"backend": backend, "target": None, "dtype": "float32", "batch": b, "seq": t,
                "status": status, "reason": "no GPU here"}
    s = LatencyStats.from_samples([p50 * 0.9, p50, p50 * 1.2]).to_dict()
    return {"backend": backend, "target": None, "dtype": "float32", "batch": b, "seq": t, "status": "ok",
            **s, "tokens_per_s": b * t / (s["p50_ms"] / 1e3)}


def test_table_json_and_plot(tmp_path):
    rows = [_row("torch", b, t, 1.0 + t / 10 * b) for b in (1, 8) for t in (16, 64)]
    rows.append(_row("ort-cuda", 1, 16, 0, status="skipped"))
    table = format_table(rows)
    assert "skipped: no GPU here" in table
    assert len(table.splitlines()) == 2 + len(rows)
    write_json({"rows": rows}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == rows
    write_plot(rows, tmp_path / "r.png", title="test")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]  # no temp files left


def test_plot_without_measurements_writes_nothing(tmp_path):
    with pytest.raises(ValueError):
        write_plot([_row("ort-cuda", 1, 16, 0, status="skipped")], tmp_path / "r.png")
    assert list(tmp_path.iterdir()) == []


# ---- real components: checkpoint, held-out text, ORT session ---------------------------------
@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "micro"
    save_checkpoint(SMLPForCausalLM(preset("micro")).eval(), path, metadata={"kind": "test"})
    return path


@pytest.fixture(scope="module")
def bigram_onnx(tmp_path_factory) -> Path:
    """A real (tiny) language model graph: logits = Embedding(ids) @ W, i.e. Gather + MatMul."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.standard_normal((VOCAB, 16)).astype(np.float32), "emb")
    out = numpy_helper.from_array(rng.standard_normal((16, VOCAB)).astype(np.float32), "out")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "input_ids"], ["h"]), helper.make_node("MatMul", ["h", "out"], ["logits"])],
        "bigram", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "T", VOCAB])], [emb, out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # this ORT refuses IR > 13 (runtime-facts.md)
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("onnx") / "bigram.onnx"
    onnx.save(model, path)
    return path


def test_real_token_ids_are_heldout_text():
    from smlp_export.bench.sweep import real_token_ids

    ids = real_token_ids(2, 64)
    assert ids.shape == (2, 64) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < VOCAB
    text = bytes(int(i) for i in ids[0] if i < 256).decode("utf-8", "replace")
    assert sum(c.isprintable() or c in "\n\t" for c in text) > 0.9 * len(text)  # real text, not noise


def test_sweep_ort_matches_numpy_and_torch_eager(micro_ckpt, bigram_onnx):
    from smlp_export.bench.backends import BACKENDS, Source
    from smlp_export.runners.ort_runner import OrtRunner
    from smlp_export.bench.sweep import run_sweep

    # The ORT runner the sweep times computes the right thing.
    import onnx
    from onnx import numpy_helper

    init = {t.name: numpy_helper.to_array(t) for t in onnx.load(bigram_onnx).graph.initializer}
    ids = np.array([[1, 2, 255, 256]], dtype=np.int64)
    with OrtRunner(bigram_onnx, intra_op_threads=1) as r:
        np.testing.assert_allclose(r.run(ids)["logits"], init["emb"][ids] @ init["out"], rtol=1e-5, atol=1e-5)
        assert r.metadata()["intra_op_threads"] == 1

    quick = TimingConfig(warmup=1, min_runs=3, min_time_s=0.0, max_time_s=5)
    rows = run_sweep(Source.resolve(str(bigram_onnx)), [BACKENDS["ort"], BACKENDS["torch"]], [1, 2], [8],
                     quick, threads=1, progress=False)
    by = {(r["backend"], r["batch"]): r for r in rows}
    assert by[("ort", 1)]["status"] == "ok" and by[("ort", 2)]["status"] == "ok"
    assert by[("ort", 2)]["tokens_per_s"] == pytest.approx(16 / (by[("ort", 2)]["p50_ms"] / 1e3))
    assert by[("ort", 1)]["runner"]["providers"][0] == "CPUExecutionProvider"
    assert by[("torch", 1)]["status"] == "skipped" and "needs the checkpoint" in by[("torch", 1)]["reason"]

    rows = run_sweep(Source.resolve(str(micro_ckpt)), [BACKENDS["torch"], BACKENDS["ort-cuda"]], [1], [8, 64],
                     quick, threads=1, progress=False)
    by = {(r["backend"], r["seq"]): r for r in rows}
    assert by[("torch", 8)]["status"] == "ok" and by[("torch", 8)]["runs"] >= 3
    assert by[("torch", 64)]["status"] == "skipped" and "max_seq_len 32" in by[("torch", 64)]["reason"]
    if not torch.cuda.is_available():
        assert by[("ort-cuda", 8)]["status"] == "skipped" and "GPU" in by[("ort-cuda", 8)]["reason"]


def test_ort_profile_summary(bigram_onnx):
    from smlp_export.bench.profile import format_profile, profile_onnx

    ids = np.arange(4 * 32, dtype=np.int64).reshape(4, 32) % VOCAB
    s = profile_onnx(bigram_onnx, ids, runs=4, warmup=1, intra_op_threads=1)
    ops = {r["name"]: r for r in s["by_op_type"]}
    assert set(ops) == {"Gather", "MatMul"}
    assert ops["MatMul"]["calls"] == 1 and ops["Gather"]["calls"] == 1  # per run: warm-up dropped
    assert sum(r["pct"] for r in s["by_op_type"]) == pytest.approx(100.0)
    assert s["kernel_ms_per_run"] > 0
    assert "MatMul" in format_profile(s)


# ---- CLI -----------------------------------------------------------------------------------
def _cli(args):
    from click.testing import CliRunner

    from smlp_cli.main import cli

    return CliRunner().invoke(cli, args, catch_exceptions=True)


def test_cli_bench_json_and_skips(micro_ckpt, tmp_path):
    out = tmp_path / "b.json"
    res = _cli(["bench", str(micro_ckpt), "--backends", "torch,tensorrt", "--batch", "1", "--seq", "8",
                "--quick", "--threads", "1", "--no-progress", "--json", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["machine"]["cpu_model"] and rep["settings"]["threads"] == 1
    rows = {r["backend"]: r for r in rep["rows"]}
    assert rows["torch"]["status"] == "ok" and math.isfinite(rows["torch"]["p50_ms"])
    assert rows["tensorrt"]["status"] == "skipped" and rows["tensorrt"]["reason"]
    assert "skipped" in res.output


@pytest.mark.parametrize("args, msg", [
    (["--backends", "torch,nope"], "unknown backend 'nope'"),
    (["--batch", "1,x"], "--batch expects comma-separated integers"),
    (["--seq", "0"], "--seq expects integers >= 1"),
])
def test_cli_bench_bad_options(micro_ckpt, args, msg, capsys):
    from smlp_cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["bench", str(micro_ckpt), "--quick", "--no-progress", *args])
    err = capsys.readouterr().err
    assert e.value.code == 1 and msg in err and len(err.strip().splitlines()) == 1


def test_cli_bench_bad_source_and_empty_plot(tmp_path, micro_ckpt, capsys):
    from smlp_cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["bench", str(tmp_path / "missing")])
    assert e.value.code == 1 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bench", str(micro_ckpt), "--backends", "tensorrt", "--batch", "1", "--seq", "8", "--quick",
              "--no-progress", "--plot", str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    # without TensorRT, --backends tensorrt alone stops before the sweep (one line saying what to install)
    assert e.value.code == 1 and ("no backend produced a measurement" in err or "TensorRT not installed" in err), err
    assert not (tmp_path / "p.png").exists()


def test_sweep_on_export_folder_uses_its_manifest(micro_ckpt, tmp_path):
    """An export folder: ORT runs its model.onnx; torch runs the checkpoint its manifest names."""
    from smlp_export.bench.backends import BACKENDS, Source
    from smlp_export.bench.sweep import run_sweep
    from smlp_export.export.pipeline import export_model

    out = tmp_path / "ort"
    export_model(str(micro_ckpt), out, target="ort", validate=False)
    src = Source.resolve(str(out))
    assert src.kind == "export" and src.max_seq_len == 32 and ("ort", "fp32") in src.onnx
    rows = run_sweep(src, [BACKENDS["ort"], BACKENDS["torch"], BACKENDS["ort-portable"]], [1], [8],
                     TimingConfig(warmup=1, min_runs=3, min_time_s=0.0, max_time_s=5), threads=1, progress=False)
    by = {r["backend"]: r for r in rows}
    assert by["ort"]["status"] == "ok" and by["ort"]["target"] == "ort"
    assert by["torch"]["status"] == "ok"
    assert by["ort-portable"]["status"] == "skipped" and "no portable/fp32 export" in by["ort-portable"]["reason"]


def test_render_readme_tables_come_from_json(tmp_path):
    """docs/benchmarks.md is generated: every figure in it is read from the results JSON."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "render_readme", Path(__file__).resolve().parent.parent / "benchmarks" / "render_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    machine = describe_machine()
    stats = LatencyStats.from_samples([1.0, 1.25, 2.0]).to_dict()
    rep = {"benchmark": "moe_layer", "command": "benchmarks/moe_layer.py", "quick": False, "machine": machine,
           "config": {"experts": 8, "d_model": 16, "d_expert": 32, "routing": "base", "k": 1, "threads": 1,
                      "timing": TimingConfig().to_dict()},
           "rows": [{"tokens": 4, "reference": stats, "naive_loop": {**stats, "p50_ms": 3.75}, "dense": stats}]}
    es = {"benchmark": "experts_scaling", "machine": machine, "quick": True,
          "config": {"preset": "micro", "batch": 1, "seq": 8, "threads": 1, "timing": TimingConfig().to_dict(),
                     "parity_atol": 1e-3},
          "rows": [{"experts": e, "active_params": 10, "ort": {"p50_ms": p}} for e, p in ((4, 2.0), (64, 3.0))],
          "ratios_last_over_first": {"ort": 1.5},
          "goals": [{"goal": "ort ratio", "value": 1.5, "limit": 1.3, "op": "<=", "met": False}]}
    write_json(rep, tmp_path / "moe_layer.json")
    write_json(es, tmp_path / "experts_scaling.json")
    text = mod.render(tmp_path, tmp_path / "benchmarks.md")
    assert "| 4 | 1.250 | 3.750 | 1.250 | - | 1.00 | 3.00 | - |" in text
    assert "measured 1.50 (**not met**, off by 15%)" in text and "(**--quick: smoke-run timings**)" in text
    assert machine["cpu_model"] in text
    assert "No results yet: run `python benchmarks/exported_vs_eager.py`" in text


def test_measure_interleaved_rounds_and_failures():
    """Each callable stops at its own limit; calls alternate; a failing callable is reported, not fatal."""
    from smlp_export.bench.timing import measure_interleaved

    now = [0]
    order: list[str] = []

    def make(name, dt_ms):
        def fn():
            order.append(name)
            now[0] += int(dt_ms * 1e6)
        return fn

    def broken():
        raise RuntimeError("boom")

    cfg = TimingConfig(warmup=1, min_runs=4, min_time_s=0.01, max_time_s=1.0)
    res = measure_interleaved({"fast": make("fast", 1.0), "slow": make("slow", 5.0), "bad": broken}, cfg,
                              clock=lambda: now[0])
    assert isinstance(res["bad"], RuntimeError)
    assert res["fast"].runs == 10 and res["slow"].runs == 4  # 10 x 1 ms >= 10 ms; 4 x 5 ms >= 4 runs
    assert res["fast"].p50_ms == pytest.approx(1.0) and res["slow"].p50_ms == pytest.approx(5.0)
    assert order[2:10] == ["fast", "slow"] * 4  # after warm-up, strictly alternating while both run


def test_profile_counts_loop_bodies_once():
    """A Loop's span contains its body's kernels: the Loop is counted by self time only."""
    from smlp_export.bench.profile import summarize_trace

    def ev(name, op, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [ev("mm", "MatMul", 0, 100), ev("loop", "Loop", 100, 1000),
              ev("g", "Gemm", 150, 300), ev("g", "Gemm", 500, 300), ev("t", "Tanh", 850, 100), ev("add", "Add", 1100, 200)]
    s = summarize_trace(events, n_runs=1)
    ops = {r["name"]: r for r in s["by_op_type"]}
    assert ops["Loop (self)"]["total_ms"] == pytest.approx(0.3)  # 1000 - 300 - 300 - 100 us
    assert ops["Gemm"]["calls"] == 2 and ops["Gemm"]["total_ms"] == pytest.approx(0.6)
    assert s["kernel_ms_per_run"] == pytest.approx(1.3)  # the wall span of the run, not 2.3
    assert sum(r["pct"] for r in s["by_op_type"]) == pytest.approx(100.0)


def test_cli_bench_profile_on_onnx_file(bigram_onnx, tmp_path):
    out = tmp_path / "b.json"
    res = _cli(["bench", str(bigram_onnx), "--backends", "ort", "--batch", "2", "--seq", "16", "--quick",
                "--threads", "1", "--no-progress", "--profile", "--profile-runs", "3", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "ORT profile" in res.output and "MatMul" in res.output
    prof = json.loads(out.read_text())["profiles"]
    assert len(prof) == 1 and prof[0]["batch"] == 2 and prof[0]["seq"] == 16
    assert {r["name"] for r in prof[0]["by_op_type"]} == {"Gather", "MatMul"}
