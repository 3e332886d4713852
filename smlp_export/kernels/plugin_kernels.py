"""Single-launch kernels for the TensorRT AOT plugins, in TensorRT's argument order.

Every kernel takes a constexpr ``INTERP_BF16`` (True only for bf16 under ``TRITON_INTERPRET=1``, see
``_util.interp_bf16``; the AOT compile sets it False).

A ``tensorrt.plugin`` ``@aot_impl`` launches ONE kernel whose parameters are (input pointers,
int32 scalars, output pointers) (+ the 2 scratch pointers Triton 3.9 appends), with contiguous
(LINEAR) tensors. So each plugin gets a kernel of that exact shape here; they are tested on CPU
under ``TRITON_INTERPRET=1`` against the ops' references like the torch-path kernels.

- ``spatial_moe_plugin_kernel``: the deterministic causal spatial kernel (one launch, all experts).
- ``spatial_moe_partial_plugin_kernel``: partial-prediction routing computed in the kernel, then each
  column's causal projection by its chosen expert only (columns grouped by expert inside the tile).
- ``grouped_expert_gemm_plugin_kernel``: one grouped expert GEMM over rows already grouped by expert
  (the token MoE of the tensorrt target is routing + permutation in ONNX ops around two of these).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .grouped_moe import _activate, _to_io


@triton.jit
def _dot(a, b, acc, INTERP_BF16: tl.constexpr):
    """acc + a @ b with fp32 accumulation: fp16/bf16 operands go to the tensor cores as they are
    (mma.sync / wgmma), fp32 operands in IEEE precision (no TF32, to match the fp32 reference).
    Under the interpreter bf16 operands are upcast first (its bf16 dot is broken; exact)."""
    if INTERP_BF16:
        a, b = a.to(tl.float32), b.to(tl.float32)
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


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
        acc = _dot(a, zt, acc, INTERP_BF16)
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
    logits and probabilities in the I/O dtype). The program's BLOCK_N columns are then grouped by
    their expert: for each expert, its columns are gathered (compacted) into sub-tiles of SUB_N
    columns and only those are multiplied by that expert's causal weights. A column is computed for
    its chosen expert only; the padding waste is at most SUB_N - 1 columns per expert present in the
    tile (the old kernel multiplied every column by every expert present: up to E x the work).
    BLOCK_N >= 16. SUB_N = 16 for BLOCK_N <= 64, else 32 (wider sub-tiles reuse the weight tile more).
    """
    SUB_N: tl.constexpr = 16 if BLOCK_N <= 64 else 32
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    ch = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = ch < c
    col_base = b * T * c + ch
    seq_base = b * T * c
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
    expert = tl.where(col_ok, expert, BLOCK_E)  # columns past c belong to no expert
    # --- causal projection: per expert, only the columns routed to it, compacted into sub-tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    offs_s = tl.arange(0, SUB_N)
    for e in range(E):
        sel = expert == e
        sel_i = sel.to(tl.int32)
        cnt = tl.sum(sel_i, axis=0)
        rank = tl.cumsum(sel_i, axis=0) - 1  # rank of each selected column among the selected
        for s0 in range(0, cnt, SUB_N):
            # gather: sub-tile slot j holds the selected column of rank s0 + j ([BLOCK_N, SUB_N] match)
            hit = sel[:, None] & (rank[:, None] == (s0 + offs_s)[None, :])
            sub_ok = (s0 + offs_s) < cnt
            sub_ch = tl.sum(tl.where(hit, ch[:, None], 0), axis=0)
            sub_gate = tl.sum(tl.where(hit, gate[:, None], 0.0), axis=0)
            sub_base = seq_base + sub_ch
            acc = tl.zeros((BLOCK_M, SUB_N), tl.float32)
            for u0 in range(0, hi, BLOCK_K):
                offs_u = u0 + tl.arange(0, BLOCK_K)
                u_ok = offs_u < T
                keep = (offs_u[None, :] <= offs_m[:, None]) & m_ok[:, None] & u_ok[None, :]
                a = tl.load(w_ptr + e * n * n + offs_m[:, None] * n + offs_u[None, :], mask=keep, other=0.0)
                zt = tl.load(z2_ptr + sub_base[None, :] + offs_u[:, None].to(tl.int64) * c,
                             mask=u_ok[:, None] & sub_ok[None, :], other=0.0)
                acc = _dot(a, zt, acc, INTERP_BF16)
            acc += tl.load(bias_ptr + e * n + offs_m, mask=m_ok, other=0.0).to(tl.float32)[:, None]
            # The reference rounds the expert output to the I/O dtype before the gate multiply.
            res = _to_io(acc, io, INTERP_BF16).to(tl.float32) * sub_gate[None, :]
            tl.store(out_ptr + sub_base[None, :] + offs_m[:, None].to(tl.int64) * c, _to_io(res, io, INTERP_BF16),
                     mask=m_ok[:, None] & sub_ok[None, :])


@triton.jit
def grouped_expert_gemm_plugin_kernel(
    x_ptr, offsets_ptr, w_ptr, b_ptr,
    M,
    out_ptr,
    E: tl.constexpr, N: tl.constexpr, K: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    """Grouped expert GEMM ``out[r] = act(x[r] @ w[e]^T + b[e])`` for the rows r of expert e.

    x [M, K] with rows grouped by expert; offsets [E + 1] int32 (expert e owns rows
    offsets[e]:offsets[e+1]); w [E, N, K] (Linear layout); b [E, N]; out [M, N]; all contiguous.
    ACT: GEMM_ACT_CODES (gelu 0, gelu_tanh 1, relu 2, silu 3, identity 4).

    Grid (cdiv(N, BLOCK_N), E, 1): program (j, e) owns output columns [j*BLOCK_N, (j+1)*BLOCK_N) of
    expert e and walks over all of e's rows in BLOCK_M chunks, reducing over K with ``tl.dot``
    (fp32 accumulation; tensor cores for fp16/bf16, IEEE fp32 for fp32). Its weight slice
    w[e, j-tile, :] is read by this program only, so each weight byte is read once per call when the
    expert has <= BLOCK_M rows (decode) and re-read per further BLOCK_M chunk otherwise (L2-served on
    a GPU when the slices of the resident programs fit). An expert with no row returns at once. Rows
    outside [0, M) are never touched, whatever ``offsets`` holds (memory safety on bad input).
    """
    pid_n = tl.program_id(0)
    e = tl.program_id(1)
    start = tl.maximum(tl.load(offsets_ptr + e).to(tl.int32), 0)
    end = tl.minimum(tl.load(offsets_ptr + e + 1).to(tl.int32), M)
    if end <= start:  # empty expert: no weight byte read
        return
    e64 = e.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    io = out_ptr.dtype.element_ty
    bias = tl.load(b_ptr + e64 * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    w_base = w_ptr + e64 * N * K
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        r_ok = rows < end
        rows64 = rows.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            a = tl.load(x_ptr + rows64[:, None] * K + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :],
                        other=0.0)
            # w[e] is [N, K]; the tile is read transposed as [BLOCK_K, BLOCK_N]
            wt = tl.load(w_base + offs_n[None, :].to(tl.int64) * K + offs_k[:, None],
                         mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _dot(a, wt, acc, INTERP_BF16)
        # Round the pre-activation to the I/O dtype as the reference does (F.linear returns the dtype).
        acc = _to_io(acc + bias[None, :], io, INTERP_BF16).to(tl.float32)
        acc = _activate(acc, ACT)
        tl.store(out_ptr + rows64[:, None] * N + offs_n[None, :], _to_io(acc, io, INTERP_BF16),
                 mask=r_ok[:, None] & n_ok[None, :])


GEMM_ACT_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3, "identity": 4}  # grouped_moe.ACTIVATIONS + identity

__all__ = ["spatial_moe_plugin_kernel", "spatial_moe_partial_plugin_kernel", "grouped_expert_gemm_plugin_kernel",
           "GEMM_ACT_CODES"]
