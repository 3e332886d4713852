"""Token MoE on the GPU: routing, sort-and-pad by expert, two grouped GEMM launches.

Pipeline for ``hidden [N, d]`` with ``k`` experts per token (``S = N * k`` routed rows):

1. route (torch ops, no host sync): ``expert_ids [N, k]``, ``gates [N, k]`` exactly as
   ``smlp_export.ops.route_tokens`` (the op's reference), so decisions never differ from it;
2. :func:`align_by_expert`: group the S (token, slot) rows by expert (the counting sort of
   ``smlp_export.permutation``) and pad each expert's run to a
   multiple of BLOCK_M, in one vectorised pass (no Python loop over experts, no ``.item()``);
3. ``_up_kernel``: one launch for all experts; program (m, n) owns BLOCK_M sorted rows of ONE
   expert: ``h = act(hidden[tok] @ w1[e]^T + b1[e])`` -> ``h_buf [P, f]`` (input dtype, as the
   reference rounds it);
4. ``_down_kernel``: ``y = (h @ w2[e]^T + b2[e]) * gate`` written straight to the slot's row of
   ``y_buf [S, d]`` (the combine's un-permute is fused into the epilogue's store);
5. combine: ``y_buf.view(N, k, d).sum(1)`` (k = 1: y_buf is the output). Deterministic, no atomics.

Blocks past the padded total (the grid is sized by the upper bound ``cdiv(S, BM) + E`` so no host
sync is needed) exit at once; an expert that receives no token owns no block and costs nothing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..permutation import permute_by_expert
from ..routing import route_tokens
from ._util import interp_bf16
from .configs import TokenMoEConfig, dtype_name, token_moe_config

ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}


@triton.jit
def _activate(x, ACT: tl.constexpr):
    """x fp32. Matches ``smlp_export.ops.activation_fn`` (gelu_tanh = torch's approximate='tanh');
    code 4 (not in ACTIVATIONS) is the identity."""
    if ACT == 0:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 1:
        y = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        # tanh(y) = 1 - 2 / (exp(2y) + 1): saturates correctly to +-1 for large |y|
        x = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * y) + 1.0))
    elif ACT == 2:
        x = tl.maximum(x, 0.0)
    elif ACT == 3:
        x = x / (1.0 + tl.exp(-x))
    # ACT == 4: identity (the grouped expert GEMM's down-projection)
    return x


@triton.jit
def _to_io(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """fp32 -> I/O dtype with round-to-nearest-even. Triton 3.9's interpreter truncates fp32 -> bf16
    (the GPU rounds to nearest even), so under the interpreter the rounding is done by hand on the
    bits first; the cast is then exact. (NaN/inf payloads are not special-cased.)"""
    if INTERP_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _up_kernel(
    x_ptr, w1_ptr, b1_ptr, sorted_ptr, block_expert_ptr, h_ptr,
    S, d, f, K_SLOTS,
    stride_xn, stride_we, stride_wf, stride_wd, stride_be, stride_hp,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:  # past the padded total: nothing to do
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_ptr + offs_m)
    valid = slot < S
    tok = tl.where(valid, slot // K_SLOTS, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < f
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    e64 = e.to(tl.int64)
    for k0 in range(0, d, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < d
        a = tl.load(x_ptr + tok[:, None].to(tl.int64) * stride_xn + offs_k[None, :],
                    mask=valid[:, None] & k_ok[None, :], other=0.0)
        # w1[e] is [f, d]; the tile is read transposed as [BLOCK_K, BLOCK_N]
        b = tl.load(w1_ptr + e64 * stride_we + offs_n[None, :] * stride_wf + offs_k[:, None] * stride_wd,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if INTERP_BF16:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    bias = tl.load(b1_ptr + e64 * stride_be + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    # Round the pre-activation to the I/O dtype first, as the reference does (F.linear returns the
    # dtype, then the activation runs on it): keeps fp16/bf16 results within ~1 ulp of the reference.
    acc = _to_io(acc + bias[None, :], h_ptr.dtype.element_ty, INTERP_BF16).to(tl.float32)
    acc = _activate(acc, ACT)
    tl.store(h_ptr + offs_m[:, None].to(tl.int64) * stride_hp + offs_n[None, :],
             _to_io(acc, h_ptr.dtype.element_ty, INTERP_BF16), mask=n_ok[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w2_ptr, b2_ptr, gate_ptr, sorted_ptr, block_expert_ptr, y_ptr,
    S, d, f,
    stride_hp, stride_we, stride_wd, stride_wf, stride_be, stride_ys,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_ptr + offs_m)
    valid = slot < S
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < d
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    e64 = e.to(tl.int64)
    for k0 in range(0, f, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < f
        a = tl.load(h_ptr + offs_m[:, None].to(tl.int64) * stride_hp + offs_k[None, :],
                    mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w2_ptr + e64 * stride_we + offs_n[None, :] * stride_wd + offs_k[:, None] * stride_wf,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if INTERP_BF16:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    bias = tl.load(b2_ptr + e64 * stride_be + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    acc = acc + bias[None, :]
    # The reference rounds the expert output to the input dtype before the gate multiply.
    acc = _to_io(acc, y_ptr.dtype.element_ty, INTERP_BF16).to(tl.float32)
    g = tl.load(gate_ptr + slot, mask=valid, other=0.0).to(tl.float32)
    acc = acc * g[:, None]
    # Un-permute in the epilogue: sorted row -> its (token, slot) row of y.
    tl.store(y_ptr + slot[:, None].to(tl.int64) * stride_ys + offs_n[None, :],
             _to_io(acc, y_ptr.dtype.element_ty, INTERP_BF16), mask=valid[:, None] & n_ok[None, :])


def align_by_expert(expert_ids: torch.Tensor, num_experts: int, block_m: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routed rows grouped by expert (``permutation.permute_by_expert``), each expert's run
    padded to a multiple of ``block_m`` (vLLM's layout: a row block never mixes experts).

    expert_ids [N, k] int. Returns
      sorted_slots [P] int32: flat slot id ``token * k + j`` per padded row; padding rows hold S = N*k,
      block_expert [P / block_m] int32: the expert of each row block, -1 past the padded total,
      counts [E] int64: rows per expert.
    P = (cdiv(S, block_m) + E) * block_m is an upper bound known without a device->host sync.
    """
    flat = expert_ids.reshape(-1).to(torch.int64)
    S = flat.numel()
    dev = flat.device
    _, position, offsets = permute_by_expert(flat, num_experts)
    counts = offsets[1:] - offsets[:-1]
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    n_blocks = triton.cdiv(S, block_m) + num_experts
    P = n_blocks * block_m
    sorted_slots = torch.full((P,), S, dtype=torch.int32, device=dev)
    # a row's padded position = its expert's padded start + its rank inside the expert
    rank = position - offsets[flat]
    sorted_slots[pad_start[flat] + rank] = torch.arange(S, device=dev, dtype=torch.int32)
    block_start = torch.arange(n_blocks, device=dev) * block_m
    owner = torch.searchsorted(pad_end, block_start, right=True)
    block_expert = torch.where(owner < num_experts, owner, -1).to(torch.int32)
    return sorted_slots, block_expert, counts


def _gpu_name(t: torch.Tensor) -> str:
    return torch.cuda.get_device_name(t.device) if t.is_cuda else "cpu-interpreter"


def grouped_ffn(hidden: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
                w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                activation: str, config: TokenMoEConfig | None = None) -> torch.Tensor:
    """``out[i] = sum_j gates[i, j] * FFN_{expert_ids[i, j]}(hidden[i])`` with the Triton kernels.

    hidden [N, d] fp32/fp16/bf16; expert_ids [N, k] int; gates [N, k]; w1 [E, f, d]; b1 [E, f];
    w2 [E, d, f]; b2 [E, d] (all in hidden's dtype). Returns [N, d] in hidden's dtype.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    N, d = hidden.shape
    E, f, _ = w1.shape
    k = expert_ids.shape[1]
    S = N * k
    if N == 0:
        return hidden.new_zeros(0, d)
    hidden = hidden.contiguous()
    w1, b1, w2, b2 = (t.contiguous() for t in (w1, b1, w2, b2))
    gates = gates.to(hidden.dtype).contiguous().reshape(-1)
    cfg = config or token_moe_config(_gpu_name(hidden), dtype_name(hidden.dtype), E, d, f, S)
    up, down = cfg.up, cfg.down
    if up.BLOCK_M != down.BLOCK_M:
        raise ValueError("up and down configs must share BLOCK_M (the padding of the sorted rows)")
    sorted_slots, block_expert, _ = align_by_expert(expert_ids, E, up.BLOCK_M)
    P = sorted_slots.numel()
    n_blocks = block_expert.numel()
    # fp32 runs in IEEE precision (no TF32) so it matches the reference; fp16/bf16 use tensor cores.
    prec = "ieee" if hidden.dtype == torch.float32 else "tf32"
    upcast = interp_bf16(hidden.dtype)
    h_buf = torch.empty(P, f, dtype=hidden.dtype, device=hidden.device)
    _up_kernel[(n_blocks, triton.cdiv(f, up.BLOCK_N))](
        hidden, w1, b1, sorted_slots, block_expert, h_buf,
        S, d, f, k,
        hidden.stride(0), w1.stride(0), w1.stride(1), w1.stride(2), b1.stride(0), h_buf.stride(0),
        ACT=ACTIVATIONS[activation], BLOCK_M=up.BLOCK_M, BLOCK_N=up.BLOCK_N, BLOCK_K=up.BLOCK_K,
        PRECISION=prec, INTERP_BF16=upcast, num_warps=up.num_warps, num_stages=up.num_stages,
    )
    y = torch.empty(S, d, dtype=hidden.dtype, device=hidden.device)
    _down_kernel[(n_blocks, triton.cdiv(d, down.BLOCK_N))](
        h_buf, w2, b2, gates, sorted_slots, block_expert, y,
        S, d, f,
        h_buf.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), b2.stride(0), y.stride(0),
        BLOCK_M=down.BLOCK_M, BLOCK_N=down.BLOCK_N, BLOCK_K=down.BLOCK_K,
        PRECISION=prec, INTERP_BF16=upcast, num_warps=down.num_warps, num_stages=down.num_stages,
    )
    if k == 1:
        return y
    return y.view(N, k, d).float().sum(1).to(hidden.dtype)


def token_moe(hidden: torch.Tensor, router_logits: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
              w2: torch.Tensor, b2: torch.Tensor, routing: str, k: int, activation: str,
              config: TokenMoEConfig | None = None) -> torch.Tensor:
    """Kernel twin of ``torch.ops.smlp.token_moe`` (same arguments, same routing, [N, d] out)."""
    expert_ids, gates = route_tokens(router_logits, routing, k)
    return grouped_ffn(hidden, expert_ids, gates, w1, b1, w2, b2, activation, config)


__all__ = ["align_by_expert", "grouped_ffn", "token_moe", "ACTIVATIONS"]
