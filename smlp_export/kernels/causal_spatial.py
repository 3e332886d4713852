"""Causal spatial MoE on the GPU: ``s[:, :, chunk] = gate * (tril(W_e[:T, :T]) @ z2[:, :, chunk] + b_e)``.

One launch covers every expert and every sequence. A program owns a BLOCK_M x BLOCK_N tile
(positions t x channels of one expert) and runs its reduction over positions u only up to the
tile's last row: blocks entirely above the diagonal are never loaded or multiplied, so the work is
about half of a masked dense product (T^2/2 + T*BLOCK/2 multiply-adds per channel instead of T^2).

- deterministic routing: channel chunk i (c / E channels) -> expert i, gate 1; the grid is
  (row blocks, column blocks of one chunk, B * E) and needs no index arrays;
- partial prediction: each (sequence, channel) column has its own expert and gate; the B*c columns
  are sorted by expert and padded per expert to BLOCK_N (the token-MoE ``align_by_expert``), and
  each column block then multiplies by ONE expert's W, gathering its columns from z2 by index;
- decode: one new row t against the cached state ``[B, n, c]`` (a causal GEMV per column).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..routing import route_channels
from ._util import interp_bf16
from .configs import GemmConfig, dtype_name, spatial_config
from .grouped_moe import _to_io, align_by_expert


@triton.jit
def _spatial_kernel(
    z2_ptr, w_ptr, bias_ptr, gate_ptr, cols_ptr, block_expert_ptr, out_ptr,
    T, c, cs, n_cols, E,
    stride_zb, stride_zt, stride_we, stride_wt, stride_wu, stride_be,
    ROUTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_N)
    if ROUTED:
        e = tl.load(block_expert_ptr + pid_n)
        col = tl.load(cols_ptr + pid_n * BLOCK_N + offs_n)  # flat b * c + ch; padding = n_cols
        col_ok = col < n_cols
        col = tl.where(col_ok, col, 0)
        b = col // c
        ch = col % c
        gate = tl.load(gate_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    else:
        pid_be = tl.program_id(2)
        b = (pid_be // E) + offs_n * 0
        e = pid_be % E
        within = pid_n * BLOCK_N + offs_n
        col_ok = within < cs
        ch = e * cs + within
        gate = tl.full((BLOCK_N,), 1.0, tl.float32)
    if e < 0:  # column block past the padded total (routed mode)
        return
    e64 = e.to(tl.int64)
    col_base = b.to(tl.int64) * stride_zb + ch
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Causal: rows t < (pid_m + 1) * BLOCK_M only read positions u <= t, so stop at the tile's end.
    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    for u0 in range(0, hi, BLOCK_K):
        offs_u = u0 + tl.arange(0, BLOCK_K)
        u_ok = offs_u < T
        keep = (offs_u[None, :] <= offs_m[:, None]) & m_ok[:, None] & u_ok[None, :]
        a = tl.load(w_ptr + e64 * stride_we + offs_m[:, None] * stride_wt + offs_u[None, :] * stride_wu,
                    mask=keep, other=0.0)
        zt = tl.load(z2_ptr + col_base[None, :] + offs_u[:, None].to(tl.int64) * stride_zt,
                     mask=u_ok[:, None] & col_ok[None, :], other=0.0)
        if INTERP_BF16:
            a, zt = a.to(tl.float32), zt.to(tl.float32)
        acc = tl.dot(a, zt, acc, input_precision=PRECISION)
    bias = tl.load(bias_ptr + e64 * stride_be + offs_m, mask=m_ok, other=0.0).to(tl.float32)
    acc = acc + bias[:, None]
    if ROUTED:
        # The reference rounds the expert output to the input dtype before the gate multiply.
        acc = _to_io(acc, out_ptr.dtype.element_ty, INTERP_BF16).to(tl.float32) * gate[None, :]
    tl.store(out_ptr + col_base[None, :] + offs_m[:, None].to(tl.int64) * stride_zt,
             _to_io(acc, out_ptr.dtype.element_ty, INTERP_BF16), mask=m_ok[:, None] & col_ok[None, :])


@triton.jit
def _spatial_decode_kernel(
    state_ptr, w_ptr, bias_ptr, expert_ptr, gate_ptr, out_ptr,
    t, c,
    stride_sb, stride_su, stride_we, stride_wt, stride_wu, stride_be, stride_ob,
    HAS_GATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    ch = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ch_ok = ch < c
    e = tl.load(expert_ptr + pid_b * c + ch, mask=ch_ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    base = state_ptr + pid_b.to(tl.int64) * stride_sb
    for u0 in range(0, t + 1, BLOCK_K):
        offs_u = u0 + tl.arange(0, BLOCK_K)
        u_ok = offs_u <= t  # causal: row t reads state rows 0..t only
        w = tl.load(w_ptr + e[None, :] * stride_we + t * stride_wt + offs_u[:, None] * stride_wu,
                    mask=u_ok[:, None] & ch_ok[None, :], other=0.0).to(tl.float32)
        s = tl.load(base + offs_u[:, None] * stride_su + ch[None, :],
                    mask=u_ok[:, None] & ch_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * s, axis=0)
    acc += tl.load(bias_ptr + e * stride_be + t, mask=ch_ok, other=0.0).to(tl.float32)
    if HAS_GATE:
        g = tl.load(gate_ptr + pid_b * c + ch, mask=ch_ok, other=0.0).to(tl.float32)
        acc = _to_io(acc, out_ptr.dtype.element_ty, INTERP_BF16).to(tl.float32) * g
    tl.store(out_ptr + pid_b * stride_ob + ch, _to_io(acc, out_ptr.dtype.element_ty, INTERP_BF16), mask=ch_ok)


def _config(z2: torch.Tensor, n: int, config: GemmConfig | None) -> GemmConfig:
    if config is not None:
        return config
    gpu = torch.cuda.get_device_name(z2.device) if z2.is_cuda else "cpu-interpreter"
    return spatial_config(gpu, dtype_name(z2.dtype), n)


def _check(z2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    B, T, c = z2.shape
    E, n, n2 = weight.shape
    if n != n2 or T > n or tuple(bias.shape) != (E, n):
        raise ValueError(f"spatial MoE shapes: z2 {tuple(z2.shape)}, weight {tuple(weight.shape)}, "
                         f"bias {tuple(bias.shape)} (need weight [E, n, n], bias [E, n], T <= n)")


def spatial_moe(z2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                config: GemmConfig | None = None) -> torch.Tensor:
    """Kernel twin of ``torch.ops.smlp.spatial_moe``: z2 [B, T, c], weight [E, n, n], bias [E, n]
    (c divisible by E, T <= n) -> [B, T, c] in z2's dtype."""
    _check(z2, weight, bias)
    B, T, c = z2.shape
    E = weight.shape[0]
    if c % E:
        raise ValueError(f"channels c = {c} not divisible by the number of experts E = {E}")
    cs = c // E
    z2 = z2.contiguous()
    out = torch.empty_like(z2)
    if out.numel() == 0:
        return out
    cfg = _config(z2, weight.shape[1], config)
    grid = (triton.cdiv(T, cfg.BLOCK_M), triton.cdiv(cs, cfg.BLOCK_N), B * E)
    _spatial_kernel[grid](
        z2, weight, bias, z2, z2, z2, out,  # gate/cols/block_expert unused (ROUTED=False)
        T, c, cs, B * c, E,
        z2.stride(0), z2.stride(1), weight.stride(0), weight.stride(1), weight.stride(2), bias.stride(0),
        ROUTED=False, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        PRECISION="ieee" if z2.dtype == torch.float32 else "tf32", INTERP_BF16=interp_bf16(z2.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def spatial_moe_routed(z2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, expert: torch.Tensor,
                       gate: torch.Tensor, config: GemmConfig | None = None) -> torch.Tensor:
    """Per-(sequence, channel) routed causal projection. expert [B, c] int, gate [B, c] -> [B, T, c]."""
    _check(z2, weight, bias)
    B, T, c = z2.shape
    E = weight.shape[0]
    z2 = z2.contiguous()
    out = torch.empty_like(z2)
    if out.numel() == 0:
        return out
    cfg = _config(z2, weight.shape[1], config)
    cols, block_expert, _ = align_by_expert(expert.reshape(-1, 1), E, cfg.BLOCK_N)
    gate = gate.to(z2.dtype).contiguous().reshape(-1)
    grid = (triton.cdiv(T, cfg.BLOCK_M), block_expert.numel())
    _spatial_kernel[grid](
        z2, weight, bias, gate, cols, block_expert, out,
        T, c, c, B * c, E,
        z2.stride(0), z2.stride(1), weight.stride(0), weight.stride(1), weight.stride(2), bias.stride(0),
        ROUTED=True, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        PRECISION="ieee" if z2.dtype == torch.float32 else "tf32", INTERP_BF16=interp_bf16(z2.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def spatial_moe_partial(z2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        router_weight: torch.Tensor, config: GemmConfig | None = None) -> torch.Tensor:
    """Kernel twin of ``torch.ops.smlp.spatial_moe_partial`` (routing = ``ops.route_channels``)."""
    expert, gate, _ = route_channels(z2, router_weight)
    return spatial_moe_routed(z2, weight, bias, expert, gate, config)


def spatial_moe_decode(state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, position: int,
                       expert: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                       block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """Decode form: the spatial output of ONE new row ``t = position`` against the cached state.

    state [B, n, c] holds the normalised z2 rows 0..t (row t already written); weight [E, n, n];
    bias [E, n]; expert/gate [B, c] for partial routing (default: deterministic chunks, gate 1).
    Returns [B, c] = row t of the full forward's output.
    """
    B, n, c = state.shape
    E = weight.shape[0]
    if not 0 <= position < n:
        raise ValueError(f"position {position} outside the state's {n} rows")
    state = state.contiguous()
    if expert is None:
        if c % E:
            raise ValueError(f"channels c = {c} not divisible by the number of experts E = {E}")
        expert = (torch.arange(c, device=state.device) // (c // E)).expand(B, c)
    expert = expert.to(torch.int32).contiguous()
    gate_t = gate.to(state.dtype).contiguous() if gate is not None else state
    out = torch.empty(B, c, dtype=state.dtype, device=state.device)
    _spatial_decode_kernel[(B, triton.cdiv(c, block_n))](
        state, weight, bias, expert, gate_t, out,
        position, c,
        state.stride(0), state.stride(1), weight.stride(0), weight.stride(1), weight.stride(2),
        bias.stride(0), out.stride(0),
        HAS_GATE=gate is not None, BLOCK_N=block_n, BLOCK_K=block_k, INTERP_BF16=interp_bf16(state.dtype),
    )
    return out


__all__ = ["spatial_moe", "spatial_moe_routed", "spatial_moe_partial", "spatial_moe_decode"]
