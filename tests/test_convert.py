"""`smlp convert --from g-mlp-pytorch`: parity with the library's own forward, through every export target.

The oracle is g-mlp-pytorch itself (the dev extra installs it): models built with its ``gMLP`` class, all
parameters randomised so that tokens really mix (spatial weights, biases and norms included), logits
from its forward. Nothing here calls ``smlp_export.convert`` to compute an expected value.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from smlp_cli.main import main
from smlp_export import load_checkpoint
from smlp_export.convert import CHECK_TOLERANCE, convert_checkpoint

gmlp = pytest.importorskip("g_mlp_pytorch", reason="g-mlp-pytorch is a dev-extra dependency (pip install -e '.[dev]')")
from g_mlp_pytorch import gMLP  # noqa: E402
from g_mlp_pytorch.autoregressive_wrapper import AutoregressiveWrapper  # noqa: E402

V, DIM, DEPTH, SEQ = 256, 16, 2, 12
TOL = 1e-4  # fp32: max |diff| <= 1e-4 of the logits' scale


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random and O(1)-scaled: spatial weights mix all earlier positions (and the
    upper triangle is non-zero, so a missing causal mask shows), biases and norm scales are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("sgu.weight"):
                p.copy_(r / p.shape[-1] ** 0.5)
            elif p.dim() >= 2 and "embed" not in name:
                p.copy_(r / p.shape[-1] ** 0.5)
            elif name.endswith("norm.weight") or name.endswith("to_logits.0.weight"):
                p.copy_(1 + 0.3 * r)
            else:
                p.copy_(0.5 * r)
    return model.eval()


def gmlp_model(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    args = dict(num_tokens=V, dim=DIM, depth=DEPTH, seq_len=SEQ, causal=True)
    args.update(kw)
    return randomised(gMLP(**args), seed)


def ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


def cli(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    scale = float(np.abs(want).max())
    diff = float(np.abs(got - want).max())
    assert got.shape == want.shape, what
    assert diff <= TOL * scale, f"{what}: max |diff| {diff:.3g} > {TOL:g} x logit scale {scale:.3g}"


SHAPES = [(2, SEQ), (1, 1), (3, 5)]


def test_source_really_mixes_tokens() -> None:
    """Guard against a vacuous oracle: in the randomised library model a later position depends on
    earlier tokens (and not on later ones), and the masked upper triangle is non-zero."""
    m = gmlp_model(seed=3)
    x = ids(1, SEQ, 0)
    y = x.clone()
    y[0, 0] = (y[0, 0] + 1) % V
    with torch.no_grad():
        a, b = m(x), m(y)
        assert (a[0, -1] - b[0, -1]).abs().max() > 1e-2 * a.abs().max()
        z = x.clone()
        z[0, -1] = (z[0, -1] + 1) % V
        assert torch.equal(m(z)[0, :-1], a[0, :-1])  # causal
    assert m.layers[0].fn.fn.fn.sgu.weight.triu(1).abs().max() > 0.1


def convert_and_compare(tmp_path: Path, capsys, prefix: str):
    """Save a randomised library model (with/without the wrapper's prefix), convert it through the
    CLI, and compare the checkpoint's logits with the library's; -> (library model, checkpoint dir)."""
    src_model = gmlp_model(seed=1)
    sd = (AutoregressiveWrapper(src_model) if prefix else src_model).state_dict()
    assert all(k.startswith(prefix) for k in sd)
    src = tmp_path / "gmlp.pt"
    torch.save(sd, src)
    ckpt = tmp_path / "ckpt"
    code, out, err = cli(capsys, "convert", src, "-o", ckpt, "--from", "g-mlp-pytorch", "--causal")
    assert code == 0, err
    assert f"vocab {V}, dim {DIM}, dim_ff {4 * DIM}, seq_len {SEQ}, depth {DEPTH}" in out
    ours = load_checkpoint(ckpt)
    cfg = ours.config
    assert (cfg.n_sparse, cfg.lm_head_bias, cfg.eos_token_id) == (0, True, None)
    assert ours.checkpoint_info["metadata"]["source"]["prefix"] == prefix
    with torch.no_grad():
        for i, (b, t) in enumerate(SHAPES):
            x = ids(b, t, i)
            assert_close(ours(x).numpy(), src_model(x).numpy(), f"torch B={b} T={t}")
    return src_model, ckpt


@pytest.mark.parametrize("prefix", ["net.", ""], ids=["autoregressive-wrapper", "bare-gmlp"])
def test_convert_parity_torch(tmp_path: Path, capsys, prefix: str) -> None:
    convert_and_compare(tmp_path, capsys, prefix)


@pytest.mark.slow  # three exports: ~30 s on 2 busy cores
def test_convert_parity_all_export_targets(tmp_path: Path, capsys) -> None:
    """The converted checkpoint's model.onnx of every target, run by ONNX Runtime, against the library."""
    import onnxruntime as ort

    from smlp_export.artifacts import MODEL_FILE
    from smlp_export.export.pipeline import export_model

    src_model, ckpt = convert_and_compare(tmp_path, capsys, "net.")
    for target in ("ort", "tensorrt", "portable"):
        out_dir = tmp_path / f"export-{target}"
        export_model(ckpt, out_dir, target=target, validate=False)
        sess = ort.InferenceSession(str(out_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
        for i, (b, t) in enumerate(SHAPES):
            x = ids(b, t, 10 + i)
            got = sess.run(["logits"], {"input_ids": x.numpy()})[0]
            with torch.no_grad():
                want = src_model(x).numpy()
            assert_close(got, want, f"{target} B={b} T={t}")


def _rename_layer_keys(sd: dict, fn) -> dict:
    out = {}
    for k, v in sd.items():
        m = re.match(r"^layers\.(\d+)\.(.+)$", k)
        out.update(fn(int(m.group(1)), m.group(2), v) if m else {k: v})
    return out


def _as_0_1_0(i: int, rest: str, v: torch.Tensor) -> dict:
    """0.1.0/0.1.1: Residual(PreNorm(gMLPBlock)), sgu.weight [n, n], sgu.bias [n], plus an unused Conv1d."""
    rest = rest.replace("fn.fn.fn.", "fn.fn.")
    if rest.endswith("sgu.weight"):
        return {f"layers.{i}.{rest}": v[0],
                f"layers.{i}.{rest[:-6]}proj.weight": torch.randn(SEQ, SEQ, 1),  # never used by 0.1.0
                f"layers.{i}.{rest[:-6]}proj.bias": torch.randn(SEQ)}
    if rest.endswith("sgu.bias"):
        return {f"layers.{i}.{rest}": v[0]}
    return {f"layers.{i}.{rest}": v}


def _as_0_0_18(i: int, rest: str, v: torch.Tensor) -> dict:
    """0.0.1x: Residual(PreNorm(gMLPBlock)) with a Conv1d spatial projection sgu.proj [n, n, 1]."""
    rest = rest.replace("fn.fn.fn.", "fn.fn.")
    if rest.endswith("sgu.weight"):
        return {f"layers.{i}.{rest[:-6]}proj.weight": v[0][:, :, None]}
    if rest.endswith("sgu.bias"):
        return {f"layers.{i}.{rest[:-4]}proj.bias": v[0]}
    return {f"layers.{i}.{rest}": v}


def _as_sequential(i: int, rest: str, v: torch.Tensor) -> dict:
    """Early 0.0.x: Residual(Sequential(LayerNorm, Linear, GELU, SpatialGatingUnit(Conv1d), Linear))."""
    rest = (rest.replace("fn.norm.", "fn.0.").replace("fn.fn.fn.proj_in.0.", "fn.1.")
            .replace("fn.fn.fn.sgu.", "fn.3.").replace("fn.fn.fn.proj_out.", "fn.4."))
    if rest == "fn.3.weight":
        return {f"layers.{i}.fn.3.proj.weight": v[0][:, :, None]}
    if rest == "fn.3.bias":
        return {f"layers.{i}.fn.3.proj.bias": v[0]}
    return {f"layers.{i}.{rest}": v}


@pytest.mark.parametrize("layout", [_as_0_1_0, _as_0_0_18, _as_sequential], ids=["0.1.0", "0.0.18", "0.0.x-seq"])
def test_older_key_layouts(tmp_path: Path, layout) -> None:
    """Older releases store the same function under other names/shapes (read from their sources):
    the 0.1.5 model's weights rewritten into each layout must convert to the same logits."""
    src_model = gmlp_model(seed=2)
    sd = _rename_layer_keys(src_model.state_dict(), layout)
    torch.save(sd, tmp_path / "old.pt")
    res = convert_checkpoint(tmp_path / "old.pt", tmp_path / "ckpt", causal=True)
    assert res.check_max_abs_diff is not None and res.check_max_abs_diff <= CHECK_TOLERANCE * res.check_scale
    ours = load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        x = ids(2, SEQ, 5)
        assert_close(ours(x).numpy(), src_model(x).numpy(), layout.__name__)


def test_safetensors_source(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src_model = gmlp_model(seed=4)
    save_file({k: v.contiguous() for k, v in src_model.state_dict().items()}, str(tmp_path / "g.safetensors"))
    convert_checkpoint(tmp_path / "g.safetensors", tmp_path / "ckpt", causal=True)
    with torch.no_grad():
        x = ids(1, SEQ, 1)
        assert_close(load_checkpoint(tmp_path / "ckpt")(x).numpy(), src_model(x).numpy(), "safetensors")


def _one_line_error(capsys, tmp_path: Path, src, *flags, match: str) -> None:
    out = tmp_path / "out"
    code, _, err = cli(capsys, "convert", src, "-o", out, "--from", "g-mlp-pytorch", *flags)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(match, lines[0]), lines[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("kw, flags, match", [
    (dict(heads=2), ["--causal"], r"heads=2 cannot be represented"),
    (dict(attn_dim=8), ["--causal"], r"tiny attention \(attn_dim\)"),
    (dict(circulant_matrix=True), ["--causal"], r"circulant"),
    ({}, [], r"non-causal .* pass --causal"),
    ({}, ["--causal", "--act", "tanh"], r"act='tanh' cannot be represented"),
    ({}, ["--causal", "--shift-tokens", "1"], r"shift_tokens=1 cannot be represented"),
    ({}, ["--causal", "--eos-token-id", "300"], r"eos_token_id 300 outside the vocabulary"),
], ids=["heads", "attn", "circulant", "non-causal", "act", "shift", "eos"])
def test_refuses_what_it_cannot_represent(tmp_path: Path, capsys, kw, flags, match) -> None:
    src = tmp_path / "g.pt"
    torch.save(AutoregressiveWrapper(gmlp_model(**kw)).state_dict(), src)
    _one_line_error(capsys, tmp_path, src, *flags, match=match)


class _RunsCode:
    """A pickle that would create a file if it were ever unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bad_input(tmp_path: Path, capsys) -> None:
    good = tmp_path / "good.pt"
    sd = gmlp_model().state_dict()
    torch.save(sd, good)
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    _one_line_error(capsys, tmp_path, tmp_path / "trunc.pt", "--causal", match=r"truncated or corrupt")
    marker = tmp_path / "code-ran"
    torch.save({"w": _RunsCode(marker)}, tmp_path / "code.pt")
    _one_line_error(capsys, tmp_path, tmp_path / "code.pt", "--causal", match=r"refused: the pickle holds more than tensors")
    assert not marker.exists()
    # another architecture: this project's own model, and a plain MLP
    from smlp_export import SMLPForCausalLM, preset

    torch.save(SMLPForCausalLM(preset("micro")).state_dict(), tmp_path / "smlp.pt")
    _one_line_error(capsys, tmp_path, tmp_path / "smlp.pt", "--causal", match=r"not a g-mlp-pytorch gMLP language model")
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 4)).state_dict(), tmp_path / "mlp.pt")
    _one_line_error(capsys, tmp_path, tmp_path / "mlp.pt", match=r"not a g-mlp-pytorch gMLP language model")
    bad = dict(sd)
    bad["to_embed.weight"] = bad["to_embed.weight"].clone()
    bad["to_embed.weight"][3, 1] = float("nan")
    torch.save(bad, tmp_path / "nan.pt")
    _one_line_error(capsys, tmp_path, tmp_path / "nan.pt", "--causal", match=r"NaN or Inf")
    # a shape that does not fit, a missing tensor, an extra one, a non-tensor pickle
    bad = dict(sd)
    bad["layers.1.fn.fn.fn.proj_out.weight"] = torch.zeros(DIM, 2 * DIM + 1)
    torch.save(bad, tmp_path / "shape.pt")
    _one_line_error(capsys, tmp_path, tmp_path / "shape.pt", "--causal",
                    match=r"layers\.1\.fn\.fn\.fn\.proj_out\.weight has shape \[16, 33\], expected \[16, 32\]")
    bad = dict(sd)
    bad["layers.1.fn.fn.fn.sgu.weight"] = torch.zeros(1, SEQ + 1, SEQ + 1)
    torch.save(bad, tmp_path / "seq.pt")
    _one_line_error(capsys, tmp_path, tmp_path / "seq.pt", "--causal", match=r"expected \[12, 12\] as in layer 0")
    bad = dict(sd)
    del bad["to_logits.1.bias"]
    torch.save(bad, tmp_path / "missing.pt")
    _one_line_error(capsys, tmp_path, tmp_path / "missing.pt", "--causal", match=r"missing tensor to_logits\.1\.bias")
    bad = dict(sd)
    bad["layers.0.fn.fn.fn.extra"] = torch.zeros(2)
    torch.save(bad, tmp_path / "extra.pt")
    _one_line_error(capsys, tmp_path, tmp_path / "extra.pt", "--causal", match=r"unexpected tensor layers\.0\.fn\.fn\.fn\.extra")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    _one_line_error(capsys, tmp_path, tmp_path / "list.pt", "--causal", match=r"expected a state dict")
    _one_line_error(capsys, tmp_path, tmp_path / "nope.pt", "--causal", match=r"does not exist")
    # an existing output is kept without --force
    (tmp_path / "out").mkdir()
    code, _, err = cli(capsys, "convert", good, "-o", tmp_path / "out", "--from", "g-mlp-pytorch", "--causal")
    assert code == 1 and "already exists" in err and not any((tmp_path / "out").iterdir())
    code, _, err = cli(capsys, "convert", good, "-o", tmp_path / "out", "--from", "g-mlp-pytorch", "--causal", "--force")
    assert code == 0, err


def test_generation_without_eos_stops_on_length(tmp_path: Path) -> None:
    """A 256-token vocabulary has no EOS: generation stops at max-new-tokens or at max_seq_len."""
    from smlp_export.decode.runtime import STOP_MAX_NEW, STOP_MAX_SEQ, TorchGenerator

    torch.save(gmlp_model(seed=5).state_dict(), tmp_path / "g.pt")
    convert_checkpoint(tmp_path / "g.pt", tmp_path / "ckpt", causal=True)
    model = load_checkpoint(tmp_path / "ckpt")
    assert model.tokenizer.eos_token_id is None and model.config.eos_token_id is None
    gen = TorchGenerator(model)
    r = gen.generate([1, 2, 3], 4)
    assert r.stop_reason == STOP_MAX_NEW and len(r.tokens[0]) == 4
    r = gen.generate([1, 2, 3], 100)
    assert r.stop_reason == STOP_MAX_SEQ and 3 + len(r.tokens[0]) == SEQ
    # and greedy decoding with the state cache picks what the library's own forward picks
    seq = [1, 2, 3]
    with torch.no_grad():
        src = gmlp_model(seed=5)
        for _ in range(SEQ - 3):
            seq.append(int(src(torch.tensor([seq]))[0, -1].argmax()))
    assert [1, 2, 3] + r.tokens[0] == seq


def test_corpus_fits_a_vocabulary_without_eos() -> None:
    """Held-out text and training batches separate documents with EOS (256); a 256-token model gets a
    newline there instead of an id outside its vocabulary, and nothing else changes."""
    from smlp_export import data

    held = data.load_corpus(None).heldout.long()
    i = int((held == 256).nonzero()[0])
    plain = data.heldout_windows(1, i + 2)
    fitted = data.heldout_windows(1, i + 2, vocab_size=V)
    assert int(plain[0, i]) == 256 and int(fitted[0, i]) == 10 and int(fitted.max()) < V
    assert torch.equal(torch.cat([fitted[0, :i], fitted[0, i + 1:]]), torch.cat([plain[0, :i], plain[0, i + 1:]]))
    assert torch.equal(data.heldout_windows(1, i + 2, vocab_size=257), plain)
    b = data.random_batch(held, 64, i, torch.Generator().manual_seed(0), vocab_size=V)
    assert int(b.max()) < V


def test_cli_generate_without_eos(tmp_path: Path, capsys) -> None:
    torch.save(gmlp_model(seed=6).state_dict(), tmp_path / "g.pt")
    convert_checkpoint(tmp_path / "g.pt", tmp_path / "ckpt", causal=True)
    code, out, err = cli(capsys, "generate", tmp_path / "ckpt", "--prompt", "ab", "--max-new-tokens", "50")
    assert code == 0, err
    assert "reached max_seq_len 12" in err
