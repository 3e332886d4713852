"""Mixed precision (fp16 / bf16 with LayerNorms and the token router in fp32) and half checkpoints.

Oracles: parameter dtypes read from the module tree; the ONNX graph's own types (shape
inference); safetensors' own reader for what a checkpoint holds; the validator's verdict on real
exports (bf16 checked by onnx.reference, which is what ``smlp export`` uses for bf16).
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from smlp_export import load_checkpoint, save_checkpoint
from smlp_export.export.graph import build_onnx
from smlp_export.export.pipeline import ExportError, export_model
from smlp_export.precision import COMPUTE_DTYPES, to_compute_dtype
from smlp_export.validate import TOLERANCES, run_validation

from .conftest import micro_model, rehash_manifest

HALF = ("fp16", "bf16")
# Deterministic spatial routing: the micro test models' partial-prediction routers are scaled
# x50 (conftest), and in bf16 their channel decisions flip outside the 4-ulp tie noise on real text
# (probabilities off by up to 0.15, the same in the torch bf16 model; docs/validation.md).
MODES = {"token_routing": "topk", "top_k": 2}


def _fp32_names(model) -> set[str]:
    """Parameters that mixed precision keeps in float32: every LayerNorm's, and the centroids."""
    names = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, torch.nn.LayerNorm)
             for p, _ in mod.named_parameters(recurse=False)}
    return names | {n for n, _ in model.named_parameters() if n.endswith(".centroids")}


@pytest.mark.parametrize("dtype", HALF)
def test_mixed_precision_keeps_norms_and_router_fp32(dtype: str) -> None:
    model = to_compute_dtype(micro_model(seed=1), dtype)
    keep = _fp32_names(model)
    assert len(keep) > 10  # the LayerNorms of 3 blocks + final norm, and 2 centroid matrices
    for name, p in model.named_parameters():
        want = torch.float32 if name in keep else COMPUTE_DTYPES[dtype]
        assert p.dtype == want, f"{name}: {p.dtype}, expected {want}"
    with torch.no_grad():
        routing: dict = {}
        logits = model(torch.randint(0, 257, (2, 9)), routing)
    assert logits.dtype == COMPUTE_DTYPES[dtype]
    assert all(r.dtype == torch.float32 for r in routing.values())  # router logits computed in fp32


@pytest.mark.parametrize("dtype", HALF)
def test_graph_runs_layer_norms_and_router_in_fp32(dtype: str) -> None:
    model = micro_model(seed=1)
    proto = onnx.shape_inference.infer_shapes(build_onnx(model, target="portable", dtype=dtype, opset=18))
    g = proto.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    half = onnx.helper.np_dtype_to_tensor_dtype(np.dtype("float16")) if dtype == "fp16" else onnx.TensorProto.BFLOAT16
    norms = [n for n in g.node if n.op_type == "LayerNormalization"]
    assert len(norms) == 2 * 1 + 5 * 2 + 1  # dense: 2 (1 block); sparse: 5 each (2 blocks); final
    assert all(types[n.input[0]] == onnx.TensorProto.FLOAT and types[n.input[1]] == onnx.TensorProto.FLOAT
               for n in norms)
    producer = {o: n for n in g.node for o in n.output}
    for out in g.output:
        if out.name.endswith(".tmoe"):  # the router output: a float32 product of fp32 inputs, no Cast
            node = producer[out.name]
            while node.op_type == "Reshape":  # [N, E] -> [B, T, E]
                node = producer[node.input[0]]
            assert node.op_type in ("MatMul", "Gemm"), node.op_type
            assert all(types[i] == onnx.TensorProto.FLOAT for i in node.input)
    # the bulk of the weights is half: the expert and projection initializers
    big = [t for t in g.initializer if np.prod(t.dims) >= 32 * 64]
    assert big and all(t.data_type == half for t in big if "centroid" not in t.name)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "micro"
    save_checkpoint(micro_model(seed=3, **MODES), d)
    return d


def test_bf16_export_is_validated_with_the_reference_evaluator(ckpt, tmp_path) -> None:
    import onnxruntime as ort

    out = tmp_path / "bf16"
    res = export_model(str(ckpt), out, target="ort", dtype="bf16", quick=True)
    assert res.parity == "passed" and res.manifest["dtype"] == "bf16"
    report = run_validation(out, "reference", write=False)
    assert report.passed and report.dtype == "bf16", report.failures
    assert report.tolerances["eps"] == 2.0 ** -7
    assert report.metrics["max_abs_err_rel"] > 1e-3  # it really computes in bf16 (fp32: ~1e-7)
    # why the reference evaluator: ORT's CPU provider has no bfloat16 MatMul (docs/validation.md)
    with pytest.raises(Exception, match="MatMul"):
        ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])


def test_bf16_bound_catches_an_error_a_3x_looser_bound_would_pass(ckpt, tmp_path) -> None:
    """A 20 % error of the vocabulary projection: over the 16-ulp bf16 bound (12.5 %), under 3x it."""
    out = tmp_path / "bf16bad"
    export_model(str(ckpt), out, target="portable", dtype="bf16", validate=False)
    m = onnx.load(str(out / "model.onnx"))
    head = next(i for i in m.graph.initializer if list(i.dims) == [32, 257])
    w = numpy_helper.to_array(head).astype(np.float32) * 1.2
    head.CopyFrom(onnx.helper.make_tensor(head.name, onnx.TensorProto.BFLOAT16, w.shape, w.reshape(-1).tolist()))
    onnx.save(m, str(out / "model.onnx"))
    rehash_manifest(out)  # an exporter bug with a consistent manifest (else the checksum refuses it)
    report = run_validation(out, "reference", write=False)
    bound = TOLERANCES["bf16"].max_abs_err_rel
    assert any(f.startswith("max_abs_err_rel") for f in report.failures), report.failures
    assert bound < report.metrics["max_abs_err_rel"] < 3 * bound


@pytest.mark.parametrize("dtype", HALF)
def test_half_checkpoint_loads_without_inflating(ckpt, tmp_path, dtype: str) -> None:
    from safetensors import safe_open

    src = load_checkpoint(ckpt)
    d = save_checkpoint(src, tmp_path / dtype, dtype=COMPUTE_DTYPES[dtype])
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert {t.dtype for t in saved.values()} == {COMPUTE_DTYPES[dtype]}
    model = load_checkpoint(d)
    keep = _fp32_names(model)
    params = dict(model.named_parameters())
    assert set(params) == set(saved)
    for name, p in params.items():
        assert p.dtype == (torch.float32 if name in keep else COMPUTE_DTYPES[dtype]), name
        assert torch.equal(p.detach().float(), saved[name].float()), name  # same values, only widened
    # memory: the parameters hold the half bytes (+ the few fp32 norms/centroids), not fp32's
    half_bytes = sum(t.numel() * t.element_size() for t in saved.values())
    held = sum(p.numel() * p.element_size() for p in params.values())
    extra = sum(params[n].numel() * 2 for n in keep)
    assert held == half_bytes + extra and held < 0.6 * sum(t.numel() * 4 for t in saved.values())


@pytest.mark.parametrize("dtype", HALF)
def test_export_from_half_checkpoint(ckpt, tmp_path, dtype: str) -> None:
    d = save_checkpoint(load_checkpoint(ckpt), tmp_path / f"ck-{dtype}", dtype=COMPUTE_DTYPES[dtype])
    res = export_model(str(d), tmp_path / "out", target="ort", dtype=dtype, quick=True)
    assert res.parity == "passed" and res.manifest["dtype"] == dtype


@pytest.mark.parametrize("stored, asked, want", [("fp16", None, "fp16"), ("bf16", None, "bf16"),
                                                 ("fp32", None, "fp32"), ("fp16", "fp32", "fp32")])
def test_export_dtype_follows_the_checkpoint_unless_asked(ckpt, tmp_path, stored, asked, want) -> None:
    """Issue 21: a half checkpoint exported without --dtype is a half export (it used to be fp32)."""
    from smlp_cli.main import cli

    d = save_checkpoint(load_checkpoint(ckpt), tmp_path / f"ck-{stored}", dtype=COMPUTE_DTYPES[stored])
    out = tmp_path / "out"
    args = ["export", str(d), "-o", str(out), "--no-validate", "--target", "portable"]
    r = CliRunner().invoke(cli, args + (["--dtype", asked] if asked else []))
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["dtype"] == want
    from smlp_export.validate.integrity import graph_dtype

    assert graph_dtype(out / "model.onnx") == want


def test_init_writes_half_checkpoints(tmp_path) -> None:
    from safetensors import safe_open

    from smlp_cli.main import cli

    out = tmp_path / "h"
    r = CliRunner().invoke(cli, ["init", "--preset", "micro", "--dtype", "bf16", "-o", str(out)])
    assert r.exit_code == 0, r.output
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert load_checkpoint(out).embed.weight.dtype == torch.bfloat16


def test_fused_moe_refused_for_bf16(ckpt, tmp_path) -> None:
    with pytest.raises(ExportError, match="no bfloat16"):
        export_model(str(ckpt), tmp_path / "x", target="ort", dtype="bf16", ort_moe="fused")
    assert not (tmp_path / "x").exists()


def test_fp32_from_half_model_is_plain_fp32() -> None:
    model = to_compute_dtype(to_compute_dtype(micro_model(seed=1), "bf16"), "fp32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(type(m) is torch.nn.LayerNorm for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    assert dataclasses.is_dataclass(model.config)
