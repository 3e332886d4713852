"""Single-launch kernels for the TensorRT AOT plugins, in TensorRT's argument order.

A ``tensorrt.plugin`` ``@aot_impl`` launches ONE kernel whose parameters are (input pointers,
int32 scalars, output pointers) (+ the 2 scratch pointers Triton 3.9 appends), with contiguous
(LINEAR) tensors. So each plugin gets a kernel of that exact shape here; they are tested on CPU
under ``TRITON_INTERPRET=1`` against the ops' references like the torch-path kernels.

- ``token_moe_plugin_kernel``: one program per token; routing (greedy top-1 / top-k softmax) is
  computed in the kernel from the token's router logits, then for each of its k experts the FFN runs
  as two GEMVs streamed over f-chunks, accumulating into the token's output row. It reads each routed
  expert's weights once per token: right for decode-sized batches (the weights dominate), not a
  grouped GEMM for large prefill (see docs/kernels.md; the torch path has the grouped kernels).
- ``spatial_moe_plugin_kernel``: the deterministic causal spatial kernel (one launch, all experts).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .grouped_moe import _activate


@triton.jit
def token_moe_plugin_kernel(
    x_ptr, logits_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    d, f,
    out_ptr,
    E: tl.constexpr, ROUTING: tl.constexpr, K: tl.constexpr, ACT: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """ROUTING 0 = base (top-1, gate sigmoid), 1 = topk (softmax over the K largest). K <= 2."""
    tok = tl.program_id(0).to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    lg = tl.load(logits_ptr + tok * E + offs_e, mask=offs_e < E, other=float("-inf")).to(tl.float32)
    # top-1 (lowest index on ties, like torch.max / torch.topk on CPU)
    m1 = tl.max(lg, axis=0)
    e1 = tl.min(tl.where(lg == m1, offs_e, BLOCK_E), axis=0)
    if ROUTING == 0:
        g1 = 1.0 / (1.0 + tl.exp(-m1))
        g2 = 0.0
        e2 = e1
    else:
        if K == 2:
            lg2 = tl.where(offs_e == e1, float("-inf"), lg)
            m2 = tl.max(lg2, axis=0)
            e2 = tl.min(tl.where(lg2 == m2, offs_e, BLOCK_E), axis=0)
            z = tl.exp(m2 - m1)
            g1 = 1.0 / (1.0 + z)
            g2 = z / (1.0 + z)
        else:
            g1 = 1.0
            g2 = 0.0
            e2 = e1
    out_row = out_ptr + tok * d
    # zero the output row, then accumulate each expert's contribution into it
    for d0 in range(0, d, BLOCK_D):
        od = d0 + tl.arange(0, BLOCK_D)
        tl.store(out_row + od, tl.zeros((BLOCK_D,), tl.float32).to(out_ptr.dtype.element_ty), mask=od < d)
    for j in tl.static_range(K):
        if j == 0:
            e = e1.to(tl.int64)
            g = g1
        else:
            e = e2.to(tl.int64)
            g = g2
        for d0 in range(0, d, BLOCK_D):
            od = d0 + tl.arange(0, BLOCK_D)
            d_ok = od < d
            y = tl.zeros((BLOCK_D,), tl.float32)
            for f0 in range(0, f, BLOCK_F):
                of = f0 + tl.arange(0, BLOCK_F)
                f_ok = of < f
                # h[f-chunk] = act(w1[e, f-chunk, :] @ x + b1): recomputed per d-chunk so no
                # scratch memory is needed (TensorRT AOT plugins get none); cheap at decode sizes.
                h = tl.zeros((BLOCK_F,), tl.float32)
                for k0 in range(0, d, BLOCK_D):
                    ok = k0 + tl.arange(0, BLOCK_D)
                    k_ok = ok < d
                    xv = tl.load(x_ptr + tok * d + ok, mask=k_ok, other=0.0).to(tl.float32)
                    w = tl.load(w1_ptr + e * f * d + of[:, None] * d + ok[None, :],
                                mask=f_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                    h += tl.sum(w * xv[None, :], axis=1)
                h += tl.load(b1_ptr + e * f + of, mask=f_ok, other=0.0).to(tl.float32)
                h = _activate(h, ACT)
                h = tl.where(f_ok, h.to(out_ptr.dtype.element_ty).to(tl.float32), 0.0)
                w2 = tl.load(w2_ptr + e * d * f + od[:, None] * f + of[None, :],
                             mask=d_ok[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
                y += tl.sum(w2 * h[None, :], axis=1)
            y += tl.load(b2_ptr + e * d + od, mask=d_ok, other=0.0).to(tl.float32)
            y = y.to(out_ptr.dtype.element_ty).to(tl.float32) * g
            prev = tl.load(out_row + od, mask=d_ok, other=0.0).to(tl.float32)
            tl.store(out_row + od, (prev + y).to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def spatial_moe_plugin_kernel(
    z2_ptr, w_ptr, bias_ptr,
    T, c, n,
    out_ptr,
    E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & col_ok[None, :])


ROUTING_CODES = {"base": 0, "topk": 1}

__all__ = ["token_moe_plugin_kernel", "spatial_moe_plugin_kernel", "ROUTING_CODES"]
