"""`smlp build-engine`: refuses non-tensorrt exports; without TensorRT, one clear line."""
from __future__ import annotations

import importlib.util

import pytest

from smlp_cli.main import main
from smlp_export import save_checkpoint

from .conftest import micro_model


def _run(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
        raise SystemExit(0)
    return e.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from smlp_export.export.pipeline import export_model

    tmp = tmp_path_factory.mktemp("be")
    ck = save_checkpoint(micro_model(), tmp / "ck")
    for target in ("ort", "tensorrt"):
        export_model(str(ck), tmp / target, target=target, validate=False)
    return tmp


def test_refuses_non_tensorrt_export(exports, capsys):
    code, err = _run(capsys, "build-engine", str(exports / "ort"))
    assert code == 1 and "need --target tensorrt" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_without_tensorrt_one_line(exports, capsys):
    code, err = _run(capsys, "build-engine", str(exports / "tensorrt"))
    assert code == 1 and err.startswith("error: TensorRT not installed") and len(err.strip().splitlines()) == 1
    assert not (exports / "tensorrt" / "model.engine").exists()


# --- the build plan (smlp_export.engine_plan): profiles, options, manifest; no TensorRT needed ----

import json  # noqa: E402

from smlp_export import engine_plan as plan  # noqa: E402


def _manifest(exports):
    return json.loads((exports / "tensorrt" / "manifest.json").read_text())


def test_default_profiles_take_n_from_the_export(exports):
    n = micro_model().config.max_seq_len
    assert n != 1024
    prefill, decode = plan.engine_profiles(_manifest(exports), max_batch=6)
    assert (prefill.name, decode.name) == ("prefill", "decode")
    assert prefill.shapes == {"input_ids": ((1, 1), (3, n // 2), (6, n))}
    assert decode.shapes == {"input_ids": ((1, 1), (3, 1), (6, 1))}
    assert [p.name for p in plan.engine_profiles(_manifest(exports), decode=False)] == ["prefill"]


def test_shape_overrides_replace_the_prefill_profile(exports):
    n = micro_model().config.max_seq_len
    lo, op, hi = (plan.parse_shapes(s) for s in ("input_ids:1x1", "input_ids:2x16", f"input_ids:4x{n}"))
    prefill, decode = plan.engine_profiles(_manifest(exports), min_shapes=lo, opt_shapes=op, max_shapes=hi)
    assert prefill.shapes["input_ids"] == ((1, 1), (2, 16), (4, n))
    assert decode.shapes["input_ids"] == ((1, 1), (2, 1), (4, 1))


@pytest.mark.parametrize("text, message", [
    ("input_ids", "is not NAME:DxD"), ("input_ids:1xq", "not an integer"), ("input_ids:0x4", r"in 1\.\.2147483647"),
    ("input_ids:1x1,input_ids:2x2", "given twice"), (":1x1", "is not NAME:DxD"),
])
def test_parse_shapes_errors(text, message):
    with pytest.raises(plan.EngineOptionError, match=message):
        plan.parse_shapes(text, "--min-shapes")


def test_parse_shapes_several_inputs():
    assert plan.parse_shapes("a:1x2, b:3x4x5") == {"a": (1, 2), "b": (3, 4, 5)}
    assert plan.parse_shapes(None) == {} and plan.parse_shapes("") == {}


@pytest.mark.parametrize("lo, op, hi, message", [
    ("input_ids:1x1", "input_ids:1x8", "input_ids:2x4096", "exceeds the model's max_seq_len"),
    ("input_ids:2x1", "input_ids:1x8", "input_ids:4x8", "min <= opt <= max"),
    ("input_ids:1x1x1", "input_ids:1x8", "input_ids:4x8", "rank 2"),
    ("ids:1x1", "ids:1x8", "ids:4x8", "is not an input of the model"),
    ("input_ids:1x1", None, "input_ids:4x8", "missing --opt-shapes"),
])
def test_bad_overrides_fail_with_one_message(exports, lo, op, hi, message):
    with pytest.raises(plan.EngineOptionError, match=message):
        plan.engine_profiles(_manifest(exports), min_shapes=plan.parse_shapes(lo), opt_shapes=plan.parse_shapes(op),
                             max_shapes=plan.parse_shapes(hi))


def test_manifest_without_n_is_refused(exports):
    m = _manifest(exports)
    del m["max_seq_len"], m["config"]["max_seq_len"]
    with pytest.raises(plan.EngineOptionError, match="max_seq_len"):
        plan.engine_profiles(m)


def test_cli_dry_run_prints_the_plan(exports, capsys):
    n = micro_model().config.max_seq_len
    main(["build-engine", str(exports / "tensorrt"), "--dry-run", "--max-batch", "2"])
    got = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in got["profiles"]] == ["prefill", "decode"]
    assert got["profiles"][0]["shapes"]["input_ids"] == {"min": [1, 1], "opt": [1, n // 2], "max": [2, n]}
    assert got["profiles"][1]["shapes"]["input_ids"]["max"] == [2, 1]
    layers = len(micro_model().config.sparse_layer_ids())
    assert {p["name"]: p["nodes"] for p in got["plugins"]} == {"SMLPGroupedExpertGemm": 2 * layers,
                                                             "SMLPSpatialMoE": layers}
    assert all((p["namespace"], p["version"]) == ("smlp", "1") for p in got["plugins"])


@pytest.mark.parametrize("args, message", [
    (["--max-shapes", "input_ids:8x100000", "--min-shapes", "input_ids:1x1", "--opt-shapes", "input_ids:1x1"],
     "exceeds the model's max_seq_len"),
    (["--min-shapes", "input_ids:1"], "give all of --min-shapes"),
    (["--min-shapes", "input_ids:axb"], "not an integer"),
])
def test_cli_bad_shapes_one_line_before_tensorrt(exports, capsys, args, message):
    code, err = _run(capsys, "build-engine", str(exports / "tensorrt"), *args)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert "TensorRT" not in err  # checked before TensorRT is imported


def test_cli_timing_cache_that_is_a_directory(exports, tmp_path, capsys):
    code, err = _run(capsys, "build-engine", str(exports / "tensorrt"), "--timing-cache", str(tmp_path))
    assert code == 2 and "'--timing-cache': File" in err and "is a directory" in err  # click's usage error


def test_build_manifest_records_what_made_the_engine(exports, tmp_path):
    import hashlib

    export = exports / "tensorrt"
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not really an engine")
    profiles = plan.engine_profiles(_manifest(exports))
    inv = plan.plugin_inventory(export / "model.onnx")
    m = plan.build_manifest(engine_path=engine, export_manifest=_manifest(exports), onnx_path=export / "model.onnx",
                            precision="fp16", profiles=profiles, plugins=inv, tensorrt_version="10.13.0",
                            gpu={"name": "H200", "compute_capability": "9.0"}, timing_cache=None, build_seconds=1.5,
                            workspace_gib=4.0)
    path = plan.write_json_atomic(plan.manifest_path(engine), m)
    assert path == tmp_path / "m.engine.json"
    saved = json.loads(path.read_text())
    model_sha = hashlib.sha256((export / "model.onnx").read_bytes()).hexdigest()
    assert saved["export"]["model_sha256"] == model_sha == saved["export"]["manifest_model_sha256"]
    assert saved["engine"]["sha256"] == hashlib.sha256(b"not really an engine").hexdigest()
    assert saved["tensorrt_version"] == "10.13.0" and saved["precision"] == "fp16" and saved["gpu"]["name"] == "H200"
    assert [p["name"] for p in saved["profiles"]] == ["prefill", "decode"]
    assert saved["export"]["max_seq_len"] == micro_model().config.max_seq_len
    assert not list(tmp_path.glob(".*.tmp"))


def test_timing_cache_io(tmp_path):
    assert plan.read_timing_cache(None) == b"" and plan.read_timing_cache(tmp_path / "new.cache") == b""
    plan.write_bytes_atomic(tmp_path / "t.cache", b"\x01\x02")
    assert plan.read_timing_cache(tmp_path / "t.cache") == b"\x01\x02"
    with pytest.raises(plan.EngineOptionError, match="is not a file"):
        plan.read_timing_cache(tmp_path)


def test_progress_printer_lines():
    import io

    buf = io.StringIO()
    p = plan.ProgressPrinter(buf)
    p.phase_start("Building engine", None, 3)
    p.phase_start("Tactic selection", "Building engine", 10)
    assert p.step_complete("Tactic selection", 1) is True  # False would cancel the build
    p.phase_finish("Tactic selection")
    p.phase_finish("Building engine")
    assert buf.getvalue().splitlines() == ["[build] Building engine (3 steps)", "[build]   Tactic selection (10 steps)",
                                           "[build]   Tactic selection done", "[build] Building engine done"]


# --- the thin TensorRT layer, against a recording stand-in of the few tensorrt calls it makes -----
# (shapes of the real Python API, TensorRT 10.x: Builder / OnnxParser / IBuilderConfig /
# IOptimizationProfile / ITimingCache / IProgressMonitor; the parser's network inputs come from the
# ONNX file, dynamic dims as -1, like TensorRT's)

class _FakeTRT:
    __version__ = "10.13.0.35"

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            self.severity = severity

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class BuilderFlag:
        FP16 = "FP16"
        BF16 = "BF16"

    class IProgressMonitor:
        def __init__(self):
            pass

    calls: list = []

    class _Input:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class _Network:
        def __init__(self):
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.num_errors = 0

        def parse_from_file(self, path):
            import onnx

            m = onnx.load(path, load_external_data=False)
            for vi in m.graph.input:
                shape = tuple(-1 if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim)
                self.network.inputs.append(_FakeTRT._Input(vi.name, shape))
            return True

    class _Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class _Cache:
        def __init__(self, data):
            self.data = bytes(data) + b"+tuned"

        def serialize(self):
            return memoryview(self.data)

    class _Config:
        def __init__(self):
            self.profiles, self.flags, self.cache, self.progress_monitor = [], [], None, None

        def set_memory_pool_limit(self, pool, size):
            self.pool = (pool, size)

        def set_flag(self, flag):
            self.flags.append(flag)

        def add_optimization_profile(self, p):
            self.profiles.append(p)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            return _FakeTRT._Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return _FakeTRT._Network()

        def create_builder_config(self):
            return _FakeTRT._Config()

        def create_optimization_profile(self):
            return _FakeTRT._Profile()

        def build_serialized_network(self, network, config):
            mon = config.progress_monitor
            mon.phase_start("Building engine", None, 1)
            assert mon.step_complete("Building engine", 0) is True
            mon.phase_finish("Building engine")
            _FakeTRT.calls.append((network, config))
            return memoryview(b"ENGINE")


def _load_build_module():
    import importlib

    return importlib.import_module("smlp_plugins.build_engine")


def test_build_engine_with_profiles_makes_the_planned_calls(exports, tmp_path, monkeypatch):
    import io
    import sys
    import types

    fake = types.ModuleType("tensorrt")
    for k, v in vars(_FakeTRT).items():
        if not k.startswith("__") or k == "__version__":
            setattr(fake, k, v)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    trtp = types.ModuleType("tensorrt.plugin")
    trtp.aot_impl = object()  # import_trtp only checks that the AOT layer exists (TensorRT >= 10.10)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    _FakeTRT.calls.clear()
    mod = _load_build_module()
    monkeypatch.setattr(mod, "register_plugins", lambda: ["SMLPGroupedExpertGemm", "SMLPSpatialMoE"])
    export = exports / "tensorrt"
    profiles = plan.engine_profiles(_manifest(exports), max_batch=4)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    buf = io.StringIO()
    path, info = mod.build_engine_with_profiles(
        export / "model.onnx", tmp_path / "e" / "m.engine", profiles=profiles, export_manifest=_manifest(exports),
        precision="fp16", timing_cache=str(cache), printer=plan.ProgressPrinter(buf))
    (network, config), = _FakeTRT.calls
    assert [p.shapes for p in config.profiles] == [p.shapes for p in profiles]  # profile i = plan[i]
    assert config.flags == ["FP16"] and config.pool == ("WORKSPACE", 4 << 30)
    assert path.read_bytes() == b"ENGINE"
    assert cache.read_bytes() == b"old+tuned"  # read, then the tuned cache written back
    saved = json.loads((tmp_path / "e" / "m.engine.json").read_text())
    assert saved == json.loads(json.dumps(info))
    assert saved["tensorrt_version"] == "10.13.0.35" and saved["registered_plugins"] == ["SMLPGroupedExpertGemm",
                                                                                          "SMLPSpatialMoE"]
    assert "[build] Building engine (1 steps)" in buf.getvalue() and "[build] Building engine done" in buf.getvalue()
    # a profile that misses a dynamic input is refused before building
    _FakeTRT.calls.clear()
    with pytest.raises(RuntimeError, match="no shapes for dynamic input"):
        mod.build_engine_with_profiles(export / "model.onnx", tmp_path / "x.engine", profiles=[plan.Profile("empty")],
                                       export_manifest=_manifest(exports), printer=plan.ProgressPrinter(buf))
    assert not _FakeTRT.calls and not (tmp_path / "x.engine").exists()


@pytest.mark.parametrize("args, message", [
    (["--max-batch", "3000000000"], "--max-batch must be in 1..2147483647 (int32)"),
    (["--max-shapes", "input_ids:3000000000x1", "--min-shapes", "input_ids:1x1", "--opt-shapes", "input_ids:1x1"],
     "every dimension must be in 1..2147483647 (int32)"),
    # 2e6 x n routed rows > 2^24: the counting sort's float32 counts would no longer be exact
    (["--max-batch", "2000000"], "lower --max-batch or --max-shapes"),
])
def test_cli_dry_run_refuses_profiles_the_graph_cannot_run(exports, capsys, args, message):
    code, err = _run(capsys, "build-engine", str(exports / "tensorrt"), "--dry-run", *args)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err


def test_cli_largest_exact_profile_is_accepted(exports, capsys):
    from smlp_export.export.moe_graph import MAX_GRAPH_ROWS

    cfg = micro_model().config
    batch = MAX_GRAPH_ROWS // (cfg.max_seq_len * cfg.top_k)
    main(["build-engine", str(exports / "tensorrt"), "--dry-run", "--max-batch", str(batch)])
    assert json.loads(capsys.readouterr().out)["profiles"][0]["shapes"]["input_ids"]["max"] == [batch, cfg.max_seq_len]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_cli_workspace_must_be_finite(exports, capsys, value):
    code, err = _run(capsys, "build-engine", str(exports / "tensorrt"), "--dry-run", "--workspace-gib", value)
    assert code == 2 and "--workspace-gib" in err
    assert "finite" in err or "not in the range" in err  # -inf is FloatRange's own refusal


def test_help_and_readme_name_the_build_manifest_file(capsys):
    from pathlib import Path

    name = plan.manifest_path(Path("OUT") / "model.engine").name
    try:
        main(["build-engine", "--help"])
    except SystemExit:
        pass
    help_text = " ".join(capsys.readouterr().out.split())
    root = Path(__file__).resolve().parents[1]
    for text in (help_text, (root / "README.md").read_text(), (root / "plugins" / "README.md").read_text()):
        assert name in text and "ENGINE.json" not in text
