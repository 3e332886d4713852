"""Incremental decoding: the PyTorch step, decode.onnx in ONNX Runtime, generation, the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smlp_export import InputError
from smlp_export.decode.export import export_decode_graph
from smlp_export.decode.runtime import (STOP_EOS, STOP_MAX_NEW, STOP_MAX_SEQ, OrtDecoder, OrtGenerator,
                                        TorchFullGenerator, TorchGenerator)
from smlp_export.decode.state import init_states, step
from smlp_export.decode.validate import validate_decode

from .conftest import ROUTING_MODES, micro_model, mixing_model

# Step logits vs full-forward logits: only the summation order differs (the step multiplies the
# causal rows of W over all n state rows, zeros included), so errors are a few ulps of the logits.
STEP_ATOL = {torch.float32: 2e-6, torch.float64: 1e-13}


def _ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 257, (B, T), generator=torch.Generator().manual_seed(seed))


def _run_chunks(m, x: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Step through x [B, T] in chunks of the given sizes; concatenated logits [B, T, V]."""
    states = init_states(m, x.shape[0])
    outs, pos = [], 0
    for S in chunks:
        lg, states = step(m, x[:, pos:pos + S], pos, states)
        outs.append(lg)
        pos += S
    return torch.cat(outs, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_step_equals_full_forward_every_mode(routed_model, dtype):
    """Prefill + a multi-token chunk + single-token steps == full forward at every position, B=2."""
    m = routed_model.to(dtype)
    n, p = m.config.max_seq_len, m.config.prefix_len
    x = _ids(2, n)
    first = max(p, 5)
    chunks = [first, 3] + [1] * (n - first - 3)
    with torch.no_grad():
        full = m(x)
    got = _run_chunks(m, x, chunks)
    torch.testing.assert_close(got, full, rtol=0, atol=STEP_ATOL[dtype])


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_step_any_chunking_equals_full_forward(data):
    """Property: any split of the sequence into prefill + chunks (fp64, B in 1..3) matches the full forward."""
    m = _MICRO_FP64
    n = m.config.max_seq_len
    B = data.draw(st.integers(1, 3))
    T = data.draw(st.integers(1, n))
    chunks, left = [], T
    while left:
        chunks.append(data.draw(st.integers(1, left)))
        left -= chunks[-1]
    x = _ids(B, T, seed=data.draw(st.integers(0, 1000)))
    with torch.no_grad():
        full = m(x)
    torch.testing.assert_close(_run_chunks(m, x, chunks), full, rtol=0, atol=STEP_ATOL[torch.float64])


_MICRO_FP64 = micro_model(**ROUTING_MODES["topk2"]).double()


def test_step_batch_rows_independent_and_inputs_untouched():
    m = micro_model()
    x = _ids(3, 12, seed=1)
    states = init_states(m, 3)
    before = [s.clone() for s in states]
    lg3, new = step(m, x, 0, states)
    assert all(torch.equal(a, b) for a, b in zip(states, before))  # functional: inputs not modified
    assert all(not torch.equal(a, b) for a, b in zip(new, before))
    lg1, _ = step(m, x[1:2], 0, init_states(m, 1))
    torch.testing.assert_close(lg3[1:2], lg1, rtol=0, atol=STEP_ATOL[torch.float32])


def test_step_bad_inputs_are_clear_errors():
    m = micro_model()
    n = m.config.max_seq_len
    st = init_states(m, 1)
    ok = _ids(1, 2)
    with pytest.raises(InputError, match="exceeds max_seq_len"):
        step(m, ok, n - 1, st)
    with pytest.raises(InputError, match="position must be >= 0"):
        step(m, ok, -1, st)
    with pytest.raises(InputError, match="outside the vocabulary"):
        step(m, torch.tensor([[1, 257]]), 0, st)
    with pytest.raises(InputError, match=r"state.blocks.0 has shape \(1, 31, 32\)"):
        step(m, ok, 0, [torch.zeros(1, n - 1, 32)] + st[1:])
    with pytest.raises(InputError, match=r"expected \(2, 32, 32\)"):
        step(m, _ids(2, 2), 0, st)
    with pytest.raises(InputError, match="dtype float64, expected float32"):
        step(m, ok, 0, [s.double() for s in st])
    with pytest.raises(InputError, match="expected 3 state tensors"):
        step(m, ok, 0, st[:2])


def test_partial_model_needs_prompt_of_p_tokens():
    m = micro_model(**ROUTING_MODES["partial"])
    p = m.config.prefix_len
    with pytest.raises(InputError, match=f"at least {p} tokens"):
        step(m, _ids(1, p - 1), 0, init_states(m, 1))
    with pytest.raises(InputError, match=f"p = {p}"):
        TorchGenerator(m).generate(list(range(65, 65 + p - 1)), 4)
    step(m, _ids(1, p), 0, init_states(m, 1))  # exactly p is fine


@pytest.mark.parametrize("mode", ["base-deterministic", "topk2-partial"])
def test_torch_generation_equals_full_recompute(mode):
    """Greedy and seeded sampling: the cached generator picks the same tokens as full recompute."""
    m = micro_model(**ROUTING_MODES[mode])
    prompts = _ids(2, 9, seed=2).numpy()
    for kw in ({}, {"temperature": 0.9, "seed": 5}, {"temperature": 1.3, "top_k": 5, "seed": 1}):
        a = TorchGenerator(m).generate(prompts, 16, stop_on_eos=False, **kw)
        b = TorchFullGenerator(m).generate(prompts, 16, stop_on_eos=False, **kw)
        assert a.tokens == b.tokens, kw
        assert all(len(t) == 16 for t in a.tokens)
    s1 = TorchGenerator(m).generate(prompts, 20, temperature=1.0, seed=1, stop_on_eos=False).tokens
    s2 = TorchGenerator(m).generate(prompts, 20, temperature=1.0, seed=2, stop_on_eos=False).tokens
    assert s1 != s2  # the seed matters


def test_stop_reasons():
    m = micro_model()
    n = m.config.max_seq_len
    r = TorchGenerator(m).generate(list(range(40, 40 + n - 3)), 50, stop_on_eos=False)
    assert r.stop_reason == STOP_MAX_SEQ and r.n_new == 3 and "max_seq_len 32" in r.stop_message
    assert TorchGenerator(m).generate([65, 66], 4, stop_on_eos=False).stop_reason == STOP_MAX_NEW
    # Make EOS the argmax everywhere: logits = lm_head(norm_f(x)) with norm_f's output fixed to ones.
    with torch.no_grad():
        m.norm_f.weight.zero_()
        m.norm_f.bias.fill_(1.0)
        m.lm_head.weight.zero_()
        m.lm_head.weight[m.config.eos_token_id] = 1.0
    streamed: list[int] = []
    r = TorchGenerator(m).generate([65, 66], 10, on_token=lambda i, t: streamed.append(int(t[0])))
    assert r.stop_reason == STOP_EOS and r.tokens == [[256]] and streamed == [256]
    with pytest.raises(InputError, match="leaves no room"):
        TorchGenerator(m).generate(list(range(n)), 4)


# ---- decode.onnx ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(model, export dir) per case; decode.onnx + a manifest.json holding only the decode section."""
    out = {}
    for case, mode, target in [("det-ort", "base-deterministic", "ort"),
                               ("partial-ort", "topk2-partial", "ort"),
                               ("partial-tensorrt", "partial", "tensorrt")]:
        m = micro_model(**ROUTING_MODES[mode])
        d = tmp_path_factory.mktemp(case)
        section = export_decode_graph(m, d / "decode.onnx", target=target, dtype="fp32", opset=18)
        (d / "manifest.json").write_text(json.dumps({"decode": section}))
        out[case] = (m, d, section)
    return out


def test_decode_manifest_section(exports):
    m, d, s = exports["partial-ort"]
    assert s["file"] == "decode.onnx" and sorted(p.name for p in d.iterdir()) == ["decode.onnx", "manifest.json"]
    assert s["inputs"]["states"] == [f"state.blocks.{i}" for i in range(3)]
    assert s["outputs"]["states"] == [f"new_state.blocks.{i}" for i in range(3)]
    assert s["state_shape"] == ["batch", 32, 32] and s["min_prompt_tokens"] == m.config.prefix_len == 7
    import onnx

    g = onnx.load(str(d / "decode.onnx")).graph
    assert [i.name for i in g.input] == ["input_ids", "position", *s["inputs"]["states"]]
    assert [o.name for o in g.output] == ["logits", *s["outputs"]["states"]]
    assert "MoE" in {n.op_type for n in g.node}  # ort target: the fused token MoE, as in the full graph
    # In-place safety of the IO binding: each state input is read ONLY by the ScatterND that writes
    # the new rows (Shape nodes aside), and that ScatterND's output IS the state output (no Transpose/copy around it).
    for i_name, o_name in zip(s["inputs"]["states"], s["outputs"]["states"]):
        readers = [n for n in g.node if i_name in n.input and n.op_type != "Shape"]  # Shape reads no data
        assert [n.op_type for n in readers] == ["ScatterND"] and list(readers[0].output) == [o_name]


@pytest.mark.parametrize("case", ["det-ort", "partial-ort", "partial-tensorrt"])
def test_ort_decode_parity(exports, case):
    """Greedy generation from ORT == PyTorch full recompute on real held-out prompts; per-step logits close."""
    m, d, _ = exports[case]
    rep = validate_decode(d, m, n_prompts=6, max_new_tokens=12, n_lengths=2)
    assert rep["passed"], rep["checks"]
    assert rep["prompts"] == 6 and rep["greedy_agree"] + rep["greedy_diverged_in_ties"] == 6
    assert rep["step_logits_max_abs_err_rel"] <= 1e-4


def test_ort_states_updated_in_place(exports):
    """IO binding: the state buffers we bound are the ones ORT wrote (same memory), rows [pos, pos+S)
    filled, later rows untouched; the copy mode gives the same logits."""
    m, d, _ = exports["det-ort"]
    dec = OrtDecoder(d)
    bufs = dec.bind(1)
    ptrs = [b.ctypes.data for b in bufs]
    prompt = _ids(1, 6, seed=3).numpy()
    lg = dec.step_bound(prompt, 0)
    assert [v.data_ptr() for v in dec._values] == ptrs
    for b in bufs:
        assert np.abs(b[0, :6]).sum() > 0 and not b[0, 6:].any()
    lg2 = dec.step_bound(np.array([[65]]), 6)
    assert all(np.abs(b[0, 6]).sum() > 0 for b in bufs)
    ref, states = dec.run(prompt, 0, dec.init_states(1))
    np.testing.assert_allclose(lg, ref, rtol=0, atol=1e-6)
    ref2, _ = dec.run(np.array([[65]]), 6, states)
    np.testing.assert_allclose(lg2, ref2, rtol=0, atol=1e-6)
    with torch.no_grad():
        full = m(torch.cat([torch.from_numpy(prompt), torch.tensor([[65]])], 1)).numpy()
    np.testing.assert_allclose(lg2[:, 0], full[:, 6], rtol=0, atol=2e-6)
    a = OrtGenerator(d).generate(prompt, 10, stop_on_eos=False)
    b = OrtGenerator(d, state_mode="copy").generate(prompt, 10, stop_on_eos=False)
    assert a.tokens == b.tokens


@pytest.mark.parametrize("mode", ["base-deterministic", "topk2-partial"])
def test_copy_and_inplace_states_on_mixing_weights(mode, tmp_path):
    """Copy vs in-place states vs PyTorch full recompute, on spatial weights that really mix tokens
    (W ~ N(0, 1/n)): a step that reads a stale or half-updated state changes the tokens here."""
    m = mixing_model(**ROUTING_MODES[mode])
    section = export_decode_graph(m, tmp_path / "decode.onnx", target="ort", dtype="fp32", opset=18)
    (tmp_path / "manifest.json").write_text(json.dumps({"decode": section}))
    prompts = _ids(3, 8, seed=4).numpy()
    n_new = m.config.max_seq_len - 8  # to the end of the window
    want = TorchFullGenerator(m).generate(prompts, n_new, stop_on_eos=False, record_logits=True)
    for state_mode in ("inplace", "copy"):
        got = OrtGenerator(tmp_path, state_mode=state_mode).generate(prompts, n_new, stop_on_eos=False,
                                                                      record_logits=True)
        assert got.tokens == want.tokens, state_mode
        err = max(float(np.abs(a - b).max()) for a, b in zip(got.step_logits, want.step_logits))
        assert err < 1e-4 * max(float(np.abs(b).max()) for b in want.step_logits), state_mode
    # the weights do mix: dropping the state (a fresh generator per token) changes the logits a lot
    with torch.no_grad():
        full = m(torch.from_numpy(prompts)).numpy()
        alone = m(torch.from_numpy(prompts[:, -1:])).numpy()
    assert np.abs(full[:, -1] - alone[:, 0]).max() > 0.03 * np.abs(full[:, -1]).max()


def test_ort_bad_inputs_are_clear_errors(exports):
    _, d, _ = exports["det-ort"]
    dec = OrtDecoder(d)
    st = dec.init_states(1)
    ok = np.array([[1, 2]], dtype=np.int64)
    with pytest.raises(InputError, match="exceeds max_seq_len 32"):
        dec.run(ok, 31, st)
    with pytest.raises(InputError, match="outside the vocabulary"):
        dec.run(np.array([[300]], dtype=np.int64), 0, st)
    with pytest.raises(InputError, match="must be int64"):
        dec.run(ok.astype(np.int32), 0, st)
    with pytest.raises(InputError, match=r"expected \(1, 32, 32\)"):
        dec.run(ok, 0, [np.zeros((1, 16, 32), np.float32)] + st[1:])
    with pytest.raises(InputError, match="dtype float64, expected float32"):
        dec.run(ok, 0, [s.astype(np.float64) for s in st])
    dec.bind(2)
    with pytest.raises(InputError, match="does not match the bound states' batch 2"):
        dec.step_bound(ok, 0)
    _, dp, s = exports["partial-ort"]
    with pytest.raises(InputError, match="at least 7 tokens"):
        OrtGenerator(dp).generate([65, 66, 67], 4)


# ---- CLI -----------------------------------------------------------------------------------------
def _cli(argv, capsys):
    from smlp_cli.main import main

    threads = torch.get_num_threads()  # `generate --backend torch` sets 1 thread for the process
    try:
        with pytest.raises(SystemExit) as e:
            main(argv)
            raise SystemExit(0)
    finally:
        torch.set_num_threads(threads)
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def test_cli_generate_torch_and_ort(tmp_path, exports, capsys):
    from smlp_export import save_checkpoint

    m, d, _ = exports["det-ort"]
    ck = tmp_path / "ck"
    save_checkpoint(m, ck)
    code, out, err = _cli(["generate", str(ck), "--prompt", "def f(x):", "--max-new-tokens", "8", "--json"], capsys)
    assert code == 0, err
    rt = json.loads(out)
    code, out, err = _cli(["generate", str(d), "--backend", "ort", "--prompt", "def f(x):", "--max-new-tokens", "8",
                           "--json"], capsys)
    assert code == 0, err
    ro = json.loads(out)
    assert rt["tokens"] == ro["tokens"] and len(rt["tokens"]) == 8 and ro["stop_reason"] == STOP_MAX_NEW
    code, out, err = _cli(["generate", str(d), "--backend", "ort", "--prompt", "def", "--max-new-tokens", "4",
                           "--temperature", "0.8", "--seed", "3"], capsys)
    assert code == 0 and out.startswith("def") and "tokens/s" in err
    code, out, err = _cli(["generate", str(ck), "--prompt", "x" * 40], capsys)
    assert code == 1 and out == "" and err.strip() == "error: prompt has 40 tokens: max_seq_len 32 leaves no room to generate"
    code, out, err = _cli(["generate", str(ck), "--backend", "ort", "--prompt", "x"], capsys)
    assert code == 1 and "smlp export ... --decode" in err
