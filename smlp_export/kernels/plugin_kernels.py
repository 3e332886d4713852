"""Single-launch kernels for the TensorRT AOT plugins, in TensorRT's argument order.

Every kernel takes a constexpr ``INTERP_BF16`` (True only for bf16 under ``TRITON_INTERPRET=1``, see
``_util.interp_bf16``; the AOT compile sets it False).

A ``tensorrt.plugin`` ``@aot_impl`` launches ONE kernel whose parameters are (input pointers,
int32 scalars, output pointers) (+ the 2 scratch pointers Triton 3.9 appends), with contiguous
(LINEAR) tensors. So each plugin gets a kernel of that exact shape here; they are tested on CPU
under ``TRITON_INTERPRET=1`` against the ops' references like the torch-path kernels.

- ``spatial_moe_plugin_kernel``: the deterministic causal spatial kernel (one launch, all experts).
- ``spatial_moe_partial_plugin_kernel``: partial-prediction routing computed in the kernel, then the
  causal projection per expert used by the tile's columns.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .grouped_moe import _to_io


@triton.jit
def spatial_moe_plugin_kernel(
    z2_ptr, w_ptr, bias_ptr,
    T, c, n,
    out_ptr,
    E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_M), cdiv(c / E, BLOCK_N), B * E); contiguous z2 [B, T, c], weight [E, n, n]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_be = tl.program_id(2)
    cs = c // E
    b = (pid_be // E).to(tl.int64)
    e = (pid_be % E).to(tl.int64)
    within = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = within < cs
    ch = e * cs + within
    col_base = b * T * c + ch
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    for u0 in range(0, hi, BLOCK_K):
        offs_u = u0 + tl.arange(0, BLOCK_K)
        u_ok = offs_u < T
        keep = (offs_u[None, :] <= offs_m[:, None]) & m_ok[:, None] & u_ok[None, :]
        a = tl.load(w_ptr + e * n * n + offs_m[:, None] * n + offs_u[None, :], mask=keep, other=0.0)
        zt = tl.load(z2_ptr + col_base[None, :] + offs_u[:, None].to(tl.int64) * c,
                     mask=u_ok[:, None] & col_ok[None, :], other=0.0)
        # fp32 operands: exact products for every input dtype, and the interpreter's bf16 dot is broken
        acc = tl.dot(a.to(tl.float32), zt.to(tl.float32), acc, input_precision="ieee")
    acc += tl.load(bias_ptr + e * n + offs_m, mask=m_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + col_base[None, :] + offs_m[:, None].to(tl.int64) * c,
             _to_io(acc, out_ptr.dtype.element_ty, INTERP_BF16), mask=m_ok[:, None] & col_ok[None, :])


@triton.jit
def spatial_moe_partial_plugin_kernel(
    z2_ptr, w_ptr, bias_ptr, router_ptr,
    T, c, n,
    out_ptr,
    E: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    """Partial-prediction spatial MoE with the routing inside: grid (cdiv(T, BLOCK_M), cdiv(c, BLOCK_N), B).

    Each (sequence, channel) column is routed from its first P rows (zero-padded when T < P) through
    router [P, E]: expert = argmax softmax, gate = that probability (rounded like the reference:
    logits and probabilities in the I/O dtype). The tile then loops over the experts its columns use
    (an expert no column of the tile picked is skipped), so the cost is at most E times a dense tile.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    ch = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = ch < c
    col_base = b * T * c + ch
    io = out_ptr.dtype.element_ty
    # --- routing: logits[col, e] = sum_{u < P} z2[b, u, col] * router[u, e]
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    logits = tl.zeros((BLOCK_N, BLOCK_E), tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        zp = tl.load(z2_ptr + col_base[None, :] + offs_p[:, None].to(tl.int64) * c,
                     mask=(offs_p[:, None] < T) & (offs_p[:, None] < P) & col_ok[None, :], other=0.0).to(tl.float32)
        r = tl.load(router_ptr + offs_p[:, None] * E + offs_e[None, :],
                    mask=(offs_p[:, None] < P) & e_ok[None, :], other=0.0).to(tl.float32)
        logits += tl.sum(zp[:, :, None] * r[:, None, :], axis=0)
    logits = tl.where(e_ok[None, :], _to_io(logits, io, INTERP_BF16).to(tl.float32), float("-inf"))
    mx = tl.max(logits, axis=1)
    ex = tl.exp(logits - mx[:, None])
    probs = _to_io(ex / tl.sum(ex, axis=1)[:, None], io, INTERP_BF16).to(tl.float32)
    probs = tl.where(e_ok[None, :], probs, -1.0)
    gate = tl.max(probs, axis=1)
    expert = tl.min(tl.where(probs == gate[:, None], offs_e[None, :], BLOCK_E), axis=1)
    # --- causal projection, one expert at a time
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    res = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for e in range(E):
        sel = (expert == e) & col_ok
        if tl.sum(sel.to(tl.int32), axis=0) > 0:
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for u0 in range(0, hi, BLOCK_K):
                offs_u = u0 + tl.arange(0, BLOCK_K)
                u_ok = offs_u < T
                keep = (offs_u[None, :] <= offs_m[:, None]) & m_ok[:, None] & u_ok[None, :]
                a = tl.load(w_ptr + e * n * n + offs_m[:, None] * n + offs_u[None, :], mask=keep, other=0.0)
                zt = tl.load(z2_ptr + col_base[None, :] + offs_u[:, None].to(tl.int64) * c,
                             mask=u_ok[:, None] & sel[None, :], other=0.0)
                acc = tl.dot(a.to(tl.float32), zt.to(tl.float32), acc, input_precision="ieee")
            acc += tl.load(bias_ptr + e * n + offs_m, mask=m_ok, other=0.0).to(tl.float32)[:, None]
            res = tl.where(sel[None, :], _to_io(acc, io, INTERP_BF16).to(tl.float32), res)
    res = res * gate[None, :]
    tl.store(out_ptr + col_base[None, :] + offs_m[:, None].to(tl.int64) * c, _to_io(res, io, INTERP_BF16),
             mask=m_ok[:, None] & col_ok[None, :])


__all__ = ["spatial_moe_plugin_kernel", "spatial_moe_partial_plugin_kernel"]
