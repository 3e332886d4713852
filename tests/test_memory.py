"""smlp_export.memory: the estimate from the config, and the refusals before anything is allocated."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smlp_export import SMLPForCausalLM, memory, preset, save_checkpoint
from smlp_export.config import PRESETS, SMLPConfig
from smlp_export.errors import SMLPError
from smlp_export.memory import MemoryEstimateError

from .conftest import micro_model


def _module_count(cfg: SMLPConfig) -> int:
    """The oracle: the real module's parameter count (built on meta, so no data)."""
    with torch.device("meta"):
        return SMLPForCausalLM(cfg).num_parameters()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_num_parameters_matches_the_module_for_every_preset(name: str) -> None:
    cfg = preset(name)
    assert memory.num_parameters(cfg) == _module_count(cfg)


@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 48), half_f=st.integers(1, 24), n=st.integers(2, 40), layers=st.integers(1, 9),
       sparse_frac=st.floats(0, 1), et=st.integers(1, 6), ft=st.integers(1, 40), es=st.sampled_from([1, 2, 4]),
       partial=st.booleans(), vocab=st.integers(2, 300))
def test_num_parameters_matches_the_module_for_random_configs(d, half_f, n, layers, sparse_frac, et, ft, es,
                                                                partial, vocab) -> None:
    cfg = SMLPConfig(vocab_size=vocab, d_model=d, d_ffn=2 * half_f * es, max_seq_len=n, n_layers=layers,
                     n_sparse=round(sparse_frac * layers), n_token_experts=et, d_expert=ft, n_spatial_experts=es,
                     spatial_routing="partial" if partial else "deterministic", eos_token_id=None)
    assert memory.num_parameters(cfg) == _module_count(cfg)


def test_presets_have_the_documented_sizes() -> None:
    """docs/model.md: small 100-400 M with n = 1024; the benchmark shapes; the paper's ~3.5 B / ~9.4 B
    with d = 1024 / 2048, n = 1024 and 64 token experts."""
    count = {name: _module_count(preset(name)) for name in ("small", "100m", "350m", "1.5b", "3.5b", "9.4b")}
    assert 100e6 <= count["small"] <= 400e6 and preset("small").max_seq_len == 1024
    assert 90e6 <= count["100m"] <= 130e6
    assert 330e6 <= count["350m"] <= 400e6
    assert count["1.5b"] >= 1.5e9
    assert abs(count["3.5b"] / 3.5e9 - 1) < 0.05
    assert abs(count["9.4b"] / 9.4e9 - 1) < 0.05
    for name in ("3.5b", "9.4b"):
        cfg = preset(name)
        assert (cfg.max_seq_len, cfg.n_token_experts) == (1024, 64)
    assert preset("3.5b").d_model == 1024


def test_estimate_grows_with_the_model_and_with_validation() -> None:
    small, big = preset("100m"), preset("1.5b")
    for op in memory.OPS:
        assert memory.estimate(big, op) > memory.estimate(small, op)
    assert memory.estimate(big, "export+validate") > memory.estimate(big, "export")
    # validation holds the float32 model: at least the weights' float32 bytes
    assert memory.estimate(big, "export+validate") > 4 * _module_count(big)
    with pytest.raises(ValueError, match="unknown op"):
        memory.estimate(small, "train")


def test_available_bytes_reads_this_machine() -> None:
    have = memory.available_bytes()
    assert 0 < have < 1 << 50
    total = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                     if ln.startswith("MemTotal:")).split()[1]) * 1024
    assert have <= total


def _tight(monkeypatch, gib: float) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda: int(gib * memory.GiB))
    monkeypatch.delenv("SMLP_SKIP_MEMORY_CHECK", raising=False)


def _run_cli(args: list[str], capsys) -> tuple[int, str]:
    from smlp_cli.main import main

    with pytest.raises(SystemExit) as e:
        main(args)
        raise SystemExit(0)
    return int(e.value.code or 0), capsys.readouterr().err


def _no_allocation(monkeypatch) -> None:
    """Building the model would allocate: make that an error the tests would see."""
    def boom(self, *a, **k):
        raise AssertionError("the model was built before the memory check refused it")

    monkeypatch.setattr(SMLPForCausalLM, "__init__", boom)


@pytest.mark.parametrize("overrides, gib, message", [
    (["d_model=400000"], 16, "d_model = 400000 is beyond any sMLP"),
    (["n_layers=1000000"], 16, "n_layers = 1000000 is beyond any sMLP"),
    # streamed init needs the interpreter plus one slice: refused only on a machine without that
    (["n_layers=4"], 0.5, "needs about"),
])
def test_init_refuses_a_model_that_cannot_fit_before_allocating(overrides, gib, message, tmp_path: Path, capsys,
                                                                monkeypatch) -> None:
    """Issue 11: `smlp init --set d_model=400000` used to allocate until killed, and n_layers=10**6
    spent minutes building modules. Issue 21: implausible configs are refused by the config itself;
    a plausible one too big for this machine by the memory estimate; both before anything exists."""
    _tight(monkeypatch, gib)
    _no_allocation(monkeypatch)
    out = tmp_path / "ckpt"
    sets = [a for o in overrides for a in ("--set", o)]
    code, err = _run_cli(["init", *sets, "-o", str(out)], capsys)
    assert code == 1
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_init_within_the_budget_still_works(tmp_path: Path, capsys, monkeypatch) -> None:
    _tight(monkeypatch, 16)
    code, err = _run_cli(["init", "--preset", "micro", "-o", str(tmp_path / "ok")], capsys)
    assert code == 0, err
    assert (tmp_path / "ok" / "model.safetensors").is_file()


def test_skip_variable_turns_the_refusal_off(monkeypatch) -> None:
    _tight(monkeypatch, 0.001)
    with pytest.raises(MemoryEstimateError):
        memory.require(preset("micro"), "load")
    monkeypatch.setenv("SMLP_SKIP_MEMORY_CHECK", "1")
    assert memory.require(preset("micro"), "load") > 0


@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mem") / "micro"
    save_checkpoint(micro_model(seed=3), d)
    return d


def test_export_refuses_before_tracing_and_leaves_nothing(micro_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    from smlp_export.export import graph
    from smlp_export.export.pipeline import export_model

    _tight(monkeypatch, 0.5)  # below even the interpreter's base
    monkeypatch.setattr(graph, "build_onnx", lambda *a, **k: pytest.fail("traced before the memory check"))
    out = tmp_path / "out"
    with pytest.raises(MemoryEstimateError, match="exporting .* needs about"):
        export_model(micro_ckpt, out, target="ort")
    assert list(tmp_path.iterdir()) == []


def test_load_checkpoint_refuses_before_reading_weights(micro_ckpt: Path, monkeypatch) -> None:
    from smlp_export import load_checkpoint

    _tight(monkeypatch, 0.5)
    with pytest.raises(SMLPError, match="loading .* needs about"):
        load_checkpoint(micro_ckpt)
