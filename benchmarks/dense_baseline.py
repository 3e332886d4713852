"""BASELINE ONLY: a "dense all-experts" ONNX export of an sMLP model, for comparison.

This is what trace-friendly MoE exports usually fall back to (runtime-facts.md: data-dependent
expert loops break torch.export, so every expert is computed on every token and the routed
outputs are masked in). Its cost grows with the number of experts E; the project's exports
(``ort``: com.microsoft.MoE, ``portable``: sorted grouped loop) should not. It is never shipped.

The model is unchanged except the token-MoE and spatial-MoE layers, which use plain-torch
formulations with the same numbers (checked against the model before export).
"""
from __future__ import annotations

import types
from pathlib import Path

import torch

from smlp_export.ops.spatial_moe import spatial_moe_reference
from smlp_export.ops.token_moe import activation_fn


def _dense_token_moe_forward(self, x, routing=None, name=""):
    """All E experts on all N tokens ([E, N, f] intermediate), combined with a dense gate matrix
    that is zero for unselected experts. Same routing rule as ``route_tokens``."""
    B, T, d = x.shape
    flat = x.reshape(B * T, d)
    logits = torch.nn.functional.linear(flat, self.centroids)  # [N, E]
    h = self.norm(flat)
    cfg = self.cfg
    if cfg.token_routing == "base":
        top, idx = logits.max(dim=-1, keepdim=True)
        gates = torch.sigmoid(top)
    else:
        top, idx = torch.topk(logits, cfg.top_k, dim=-1)
        gates = torch.softmax(top, dim=-1)
    dense_gates = torch.zeros_like(logits).scatter(1, idx, gates)  # [N, E]
    a = activation_fn(cfg.expert_activation, torch.einsum("nd,efd->enf", h, self.w1) + self.b1[:, None, :])
    y = torch.einsum("enf,edf->end", a, self.w2) + self.b2[:, None, :]  # [E, N, d]
    return torch.einsum("end,ne->nd", y, dense_gates).reshape(B, T, d)


def _plain_spatial_moe_forward(self, x, routing=None, name=""):
    if self.router is not None:
        raise NotImplementedError("dense baseline: partial spatial routing not supported")
    z = torch.nn.functional.gelu(self.proj_in(self.norm(x)))
    z1, z2 = z.chunk(2, dim=-1)
    s = spatial_moe_reference(self.norm_z2(z2), self.weight, self.bias)
    return self.proj_out(z1 * s)


def densify(model: torch.nn.Module) -> torch.nn.Module:
    """Swap the MoE layers' forward for the dense / plain-torch versions (in place)."""
    from smlp_export.model import SpatialMoE, TokenMoE

    for m in model.modules():
        if isinstance(m, TokenMoE):
            m.forward = types.MethodType(_dense_token_moe_forward, m)
        elif isinstance(m, SpatialMoE):
            m.forward = types.MethodType(_plain_spatial_moe_forward, m)
    return model


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids)


def export_dense_onnx(checkpoint: str | Path | None, path: str | Path, opset: int = 18) -> Path:
    """Export the dense baseline of ``checkpoint`` to ``path`` (input_ids [B, T] -> logits)."""
    import onnx

    from smlp_export import load_checkpoint

    ref = load_checkpoint(checkpoint)
    model = densify(load_checkpoint(checkpoint)).eval()
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, min(16, cfg.max_seq_len)), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), ref(ids), rtol=1e-4, atol=1e-4)  # same numbers as the model
    B = torch.export.Dim("B", min=1, max=1024)
    T = torch.export.Dim("T", min=1, max=cfg.max_seq_len)
    prog = torch.onnx.export(_LogitsOnly(model).eval(), (ids,), dynamo=True, opset_version=opset,
                             input_names=["input_ids"], output_names=["logits"],
                             dynamic_shapes={"input_ids": {0: B, 1: T}}, verbose=False)
    proto = prog.model_proto
    proto.ir_version = 10  # ORT 1.31 refuses IR > 13
    path = Path(path)
    onnx.save(proto, path)
    return path
