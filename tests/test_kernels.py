"""Triton kernels vs the custom ops' plain-torch references, on CPU with TRITON_INTERPRET=1.

Marker ``triton``: needs the optional extra (``pip install -e '.[triton]'``). The interpreter must be
switched on before the kernel modules are decorated, so this module sets it before importing them;
if they were already imported in JIT mode (e.g. on a GPU run), the tests run on the GPU instead.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton extra not installed: pip install -e '.[triton]'")

from smlp_export import ops  # noqa: E402
from smlp_export.kernels import plugin_kernels as pk  # noqa: E402
from smlp_export.kernels._util import interp_bf16  # noqa: E402
from smlp_export.kernels import causal_spatial as sk  # noqa: E402
from smlp_export.kernels import grouped_moe as tk  # noqa: E402
from smlp_export.kernels.configs import GemmConfig, TokenMoEConfig, token_moe_config  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

# One tolerance table for every kernel test. The kernels and the references round the same
# intermediates (expert hidden h, expert output before the gate) to the dtype but accumulate in a
# different order, so a result may differ by about one to two units in the last place of the dtype:
# fp32 ~1e-7 relative, fp16 2^-10, bf16 2^-7.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
DTYPES = list(TOL)


def test_kernels_run_in_the_interpreter_on_cpu():
    """Fail loudly (never skip) when the kernels were decorated before TRITON_INTERPRET was set."""
    if DEVICE == "cpu":
        assert type(tk._up_kernel).__name__ == "InterpretedFunction", (
            "smlp_export.kernels was imported before tests/test_kernels.py set TRITON_INTERPRET=1; "
            "run with TRITON_INTERPRET=1 in the environment")


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), **TOL[dtype])


def _moe_inputs(N: int, E: int, d: int, f: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype).to(DEVICE)  # noqa: E731
    return (r(N, d), r(N, E, scale=2.0), r(E, f, d, scale=d ** -0.5), r(E, f, scale=0.1),
            r(E, d, f, scale=f ** -0.5), r(E, d, scale=0.1))


ROUTINGS = [("base", 1), ("topk", 1), ("topk", 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", [1, 33, 511])
@pytest.mark.parametrize("routing,k", ROUTINGS, ids=[f"{r}{k}" for r, k in ROUTINGS])
def test_token_moe_matches_reference(N, routing, k, dtype):
    E, d, f = 5, 24, 40  # odd, not multiples of the block sizes
    x, lg, w1, b1, w2, b2 = _moe_inputs(N, E, d, f, dtype, seed=N)
    act = "gelu_tanh"
    got = tk.token_moe(x, lg, w1, b1, w2, b2, routing, k, act)
    want = ops.token_moe_reference(x, lg, w1, b1, w2, b2, routing, k, act)
    _close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
def test_token_moe_activations(activation, dtype):
    x, lg, w1, b1, w2, b2 = _moe_inputs(17, 3, 20, 36, dtype, seed=1)
    got = tk.token_moe(x, lg, w1, b1, w2, b2, "topk", 2, activation)
    _close(got, ops.token_moe_reference(x, lg, w1, b1, w2, b2, "topk", 2, activation), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_expert_everywhere(dtype):
    """E = 1: every token / channel on the one expert; 1 token and T not a multiple of the tile;
    d, c, n not powers of two. Token MoE (base, top-1), spatial (torch path + plugin kernel), decode."""
    for N in (1, 33):
        x, lg, w1, b1, w2, b2 = _moe_inputs(N, 1, 22, 34, dtype, seed=N)
        for routing in ("base", "topk"):
            _close(tk.token_moe(x, lg, w1, b1, w2, b2, routing, 1, "gelu"),
                   ops.token_moe_reference(x, lg, w1, b1, w2, b2, routing, 1, "gelu"), dtype)
    for T in (1, 50):
        z2, w, b = _spatial_inputs(2, T, 7, 1, 56, dtype, seed=T)
        want = ops.spatial_moe_reference(z2, w, b)
        _close(sk.spatial_moe(z2, w, b, config=GemmConfig(16, 16, 16)), want, dtype)
        out = torch.empty_like(z2)
        pk.spatial_moe_plugin_kernel[(triton.cdiv(T, 16), triton.cdiv(7, 16), 2)](
            z2, w, b, T, 7, 56, out, E=1, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, INTERP_BF16=interp_bf16(dtype))
        _close(out, want, dtype)
        state = torch.full((2, 56, 7), 1e3, dtype=dtype, device=DEVICE)
        state[:, :T] = z2
        _close(sk.spatial_moe_decode(state, w, b, T - 1, block_n=16, block_k=16), want[:, T - 1], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_moe_skewed_routing(dtype):
    """All tokens to one expert (the others get none), and k=2 with two experts always chosen."""
    E, d, f, N = 6, 24, 40, 45
    x, lg, w1, b1, w2, b2 = _moe_inputs(N, E, d, f, dtype, seed=3)
    lg = lg.clone()
    lg[:, 4] += 50  # expert 4 wins every token
    lg[:, 1] += 30  # expert 1 is every token's second choice
    for routing, k in ROUTINGS:
        got = tk.token_moe(x, lg, w1, b1, w2, b2, routing, k, "gelu_tanh")
        _close(got, ops.token_moe_reference(x, lg, w1, b1, w2, b2, routing, k, "gelu_tanh"), dtype)


def test_align_by_expert_pads_per_expert_and_skips_empty_experts():
    E, BM = 7, 16
    ids = torch.tensor([[3], [3], [0], [3], [5]] * 7)  # experts 1, 2, 4, 6 get nothing
    sorted_slots, block_expert, counts = tk.align_by_expert(ids.to(DEVICE), E, BM)
    sorted_slots, block_expert, counts = sorted_slots.cpu(), block_expert.cpu(), counts.cpu()
    S = ids.numel()
    assert counts.tolist() == torch.bincount(ids.reshape(-1), minlength=E).tolist()
    # every routed row exactly once, padding rows hold the sentinel S
    real = sorted_slots[sorted_slots < S]
    assert sorted(real.tolist()) == list(range(S))
    # an expert owns exactly cdiv(count, BM) blocks (0 for an empty expert); blocks hold only its rows
    for e in range(E):
        assert int((block_expert == e).sum()) == -(-int(counts[e]) // BM)
    for blk, e in enumerate(block_expert.tolist()):
        rows = sorted_slots[blk * BM:(blk + 1) * BM]
        rows = rows[rows < S]
        if e < 0:
            assert rows.numel() == 0
        else:
            assert (ids.reshape(-1)[rows.long()] == e).all()


def test_token_moe_explicit_config_and_table_default(caplog):
    x, lg, w1, b1, w2, b2 = _moe_inputs(40, 4, 32, 48, torch.float32, seed=5)
    cfg = TokenMoEConfig(GemmConfig(16, 16, 16), GemmConfig(16, 32, 16))
    got = tk.token_moe(x, lg, w1, b1, w2, b2, "topk", 2, "gelu_tanh", config=cfg)
    _close(got, ops.token_moe_reference(x, lg, w1, b1, w2, b2, "topk", 2, "gelu_tanh"), torch.float32)
    with caplog.at_level("INFO", logger="smlp_export.kernels"):
        token_moe_config("Some GPU", "float16", 3, 7, 11, 100)
    assert any("no tuned token_moe config" in r.message for r in caplog.records)


def _spatial_inputs(B: int, T: int, c: int, E: int, n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z2 = torch.randn(B, T, c, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(E, n, n, generator=g) * n ** -0.5).to(dtype).to(DEVICE)
    b = torch.randn(E, n, generator=g).to(dtype).to(DEVICE)
    return z2, w, b


N_MAX = 96


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 77, N_MAX])
def test_spatial_moe_matches_reference(T, dtype):
    z2, w, b = _spatial_inputs(2, T, 12, 3, N_MAX, dtype, seed=T)
    _close(sk.spatial_moe(z2, w, b), ops.spatial_moe_reference(z2, w, b), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_spatial_moe_long_sequence_default_tiles(dtype):
    """n >= 128 takes the 64-wide default tiles (the GPU default): several row blocks, partial last one."""
    z2, w, b = _spatial_inputs(1, 150, 8, 2, 160, dtype, seed=9)
    _close(sk.spatial_moe(z2, w, b), ops.spatial_moe_reference(z2, w, b), dtype)


def test_spatial_moe_ignores_weights_above_the_diagonal():
    z2, w, b = _spatial_inputs(1, 50, 8, 4, 64, torch.float32, seed=2)
    noisy = w + torch.triu(torch.full_like(w, 1e3), diagonal=1)
    _close(sk.spatial_moe(z2, noisy, b), sk.spatial_moe(z2, w, b), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 77, N_MAX])
def test_spatial_moe_partial_matches_reference(T, dtype):
    E = 4
    z2, w, b = _spatial_inputs(3, T, 10, E, N_MAX, dtype, seed=10 + T)
    p = -(-N_MAX // 5)
    router = (torch.randn(p, E, generator=torch.Generator().manual_seed(T)) * 0.5).to(dtype).to(DEVICE)
    _close(sk.spatial_moe_partial(z2, w, b, router),
           ops.spatial_moe_partial_reference(z2, w, b, router), dtype)


def test_spatial_moe_partial_all_channels_to_one_expert():
    E, T = 4, 40
    z2, w, b = _spatial_inputs(2, T, 10, E, 48, torch.float32, seed=4)
    router = torch.zeros(10, E, device=DEVICE)
    router[:, 2] = 1.0
    z2 = z2.abs() + 1  # positive inputs: expert 2 has the largest logit for every channel
    expert, _, _ = ops.route_channels(z2, router)
    assert (expert == 2).all()
    _close(sk.spatial_moe_partial(z2, w, b, router),
           ops.spatial_moe_partial_reference(z2, w, b, router), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("partial", [False, True], ids=["deterministic", "partial"])
def test_spatial_decode_row_equals_full_forward_row(dtype, partial):
    B, c, E, n = 2, 12, 3, 80
    T = 67
    z2, w, b = _spatial_inputs(B, T, c, E, n, dtype, seed=7)
    state = torch.zeros(B, n, c, dtype=dtype, device=DEVICE)
    state[:, :T] = z2
    state[:, T:] = 1e3  # rows after t must never be read
    if partial:
        router = torch.randn(16, E, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
        expert, gate, _ = ops.route_channels(z2, router)
        full = ops.spatial_moe_partial_reference(z2, w, b, router)
    else:
        expert = gate = None
        full = ops.spatial_moe_reference(z2, w, b)
    for t in (0, 33, T - 1):
        state_t = state.clone()
        state_t[:, t + 1:] = 1e3
        got = sk.spatial_moe_decode(state_t, w, b, t, expert, gate, block_n=16, block_k=16)
        _close(got, full[:, t], dtype)


# --- the single-launch kernels the TensorRT plugins run (same oracle) -----------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plugin_spatial_moe_kernel(dtype):
    B, T, c, E, n = 2, 45, 12, 3, 64
    z2, w, b = _spatial_inputs(B, T, c, E, n, dtype, seed=12)
    out = torch.empty_like(z2)
    grid = (triton.cdiv(T, 16), triton.cdiv(c, E * 16), B * E)
    pk.spatial_moe_plugin_kernel[grid](z2, w, b, T, c, n, out, E=E, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16,
                                       INTERP_BF16=interp_bf16(dtype))
    _close(out, ops.spatial_moe_reference(z2, w, b), dtype)


def test_package_entry_points_stay_functions_after_submodule_imports():
    """The custom ops call ``kernels.token_moe(...)``: a submodule of the same name would shadow it."""
    import smlp_export.kernels as K

    for name in ("token_moe", "grouped_ffn", "spatial_moe", "spatial_moe_partial", "spatial_moe_decode",
                 "grouped_expert_gemm"):
        assert callable(getattr(K, name)) and not hasattr(getattr(K, name), "__path__")
        assert getattr(K, name).__module__ == "smlp_export.kernels"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 37, 64])
def test_plugin_spatial_moe_partial_kernel(T, dtype):
    B, c, E, n, p = 2, 12, 3, 64, 13
    z2, w, b = _spatial_inputs(B, T, c, E, n, dtype, seed=20 + T)
    router = (torch.randn(p, E, generator=torch.Generator().manual_seed(T)) * 0.5).to(dtype).to(DEVICE)
    out = torch.empty_like(z2)
    grid = (triton.cdiv(T, 16), triton.cdiv(c, 16), B)
    pk.spatial_moe_partial_plugin_kernel[grid](z2, w, b, router, T, c, n, out, E=E, P=p, BLOCK_M=16, BLOCK_N=16,
                                               BLOCK_K=16, BLOCK_P=8, BLOCK_E=4,
                                               INTERP_BF16=interp_bf16(dtype))
    _close(out, ops.spatial_moe_partial_reference(z2, w, b, router), dtype)


def _partial_router_for(expert_of_channel: torch.Tensor, z2: torch.Tensor, E: int, p: int):
    """Make partial routing send channel ch to ``expert_of_channel[ch]`` in every sequence: the first E
    positions of z2 carry a one-hot of the expert (+4), the router reads position e into logit e."""
    z2 = z2.clone()
    z2[:, :E, :] = 0
    for ch, e in enumerate(expert_of_channel.tolist()):
        z2[:, e, ch] = 4
    router = torch.zeros(p, E, dtype=z2.dtype, device=z2.device)
    router[torch.arange(E), torch.arange(E)] = 1
    return z2, router


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["spread", "one_expert", "E1", "T1"])
def test_plugin_spatial_moe_partial_kernel_awkward(case, dtype):
    """Experts with more columns than one sub-tile (several sub-tiles), all channels on one expert (the
    others empty), E = 1, a single token; c and T not multiples of any block; BLOCK_N 64 and 128."""
    B, c, n = 2, {"spread": 70, "one_expert": 45, "E1": 21, "T1": 19}[case], 48
    E = 1 if case == "E1" else 3
    T = 1 if case == "T1" else 41
    p = 10
    z2, w, b = _spatial_inputs(B, T, c, E, n, dtype, seed=31)
    if case == "T1":  # routing from one real row: random router
        router = (torch.randn(p, E, generator=torch.Generator().manual_seed(3)) * 0.5).to(dtype).to(DEVICE)
    else:
        pick = {"spread": torch.arange(c) % 3, "one_expert": torch.full((c,), 1),
                "E1": torch.zeros(c, dtype=torch.long)}[case]
        z2, router = _partial_router_for(pick, z2, E, p)
        assert (ops.route_channels(z2, router)[0].cpu() == pick).all()
    want = ops.spatial_moe_partial_reference(z2, w, b, router)
    block_n = 128 if case == "spread" else 64
    out = torch.full_like(z2, float("nan"))  # every element must be written
    grid = (triton.cdiv(T, 16), triton.cdiv(c, block_n), B)
    pk.spatial_moe_partial_plugin_kernel[grid](z2, w, b, router, T, c, n, out, E=E, P=p, BLOCK_M=16,
                                               BLOCK_N=block_n, BLOCK_K=16, BLOCK_P=8,
                                               BLOCK_E=max(2, triton.next_power_of_2(E)),
                                               INTERP_BF16=interp_bf16(dtype))
    _close(out, want, dtype)


def test_plugin_spatial_moe_partial_does_only_the_chosen_experts_work(monkeypatch):
    """Count the multiply-adds the interpreter's tl.dot performs: with 4 experts interleaved over the
    64 columns of a tile (16 each), each column is multiplied by its expert only: 64 columns per
    reduction step, not 4 experts x 64 (what the old per-expert masked tile did)."""
    if DEVICE != "cpu":
        pytest.skip("counts the interpreter's dot calls")
    from triton.runtime import interpreter

    calls = []
    real = interpreter.interpreter_builder.create_dot

    def counting_dot(a, b, d, *args):
        calls.append((a.data.shape[0], b.data.shape[1], a.data.shape[1]))
        return real(a, b, d, *args)

    monkeypatch.setattr(interpreter.interpreter_builder, "create_dot", counting_dot)
    B, T, c, E, n, p, BM, BN, BK = 1, 32, 64, 4, 32, 8, 16, 64, 16
    z2, w, b = _spatial_inputs(B, T, c, E, n, torch.float32, seed=5)
    z2, router = _partial_router_for(torch.arange(c) % E, z2, E, p)
    out = torch.empty_like(z2)
    pk.spatial_moe_partial_plugin_kernel[(T // BM, 1, B)](z2, w, b, router, T, c, n, out, E=E, P=p, BLOCK_M=BM,
                                                          BLOCK_N=BN, BLOCK_K=BK, BLOCK_P=8, BLOCK_E=4,
                                                          INTERP_BF16=False)
    _close(out, ops.spatial_moe_partial_reference(z2, w, b, router), torch.float32)
    macs = sum(m * nn * k for m, nn, k in calls)
    # row block 0 reduces over 16 positions (1 step), row block 1 over 32 (2 steps): 3 steps of
    # BM x BK x (columns multiplied); the ideal is every column once.
    ideal = 3 * BM * BK * c
    assert macs == ideal, f"{macs} multiply-adds, ideal {ideal} ({macs / ideal:.1f}x)"


# --- grouped expert GEMM (the SMLPGroupedExpertGemm plugin's kernel, also smlp::grouped_expert_gemm) ---

GEMM_ACTS = ["identity", "gelu", "gelu_tanh", "relu", "silu"]


def _gemm_inputs(rows: list[int], N: int, K: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    E, M = len(rows), sum(rows)
    offsets = torch.tensor([0] + rows).cumsum(0).to(torch.int32)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(E, N, K, generator=g) * K ** -0.5).to(dtype)
    b = (torch.randn(E, N, generator=g) * 0.1).to(dtype)
    return x.to(DEVICE), offsets.to(DEVICE), w.to(DEVICE), b.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", GEMM_ACTS)
def test_grouped_expert_gemm_activations(activation, dtype):
    """Every activation x dtype; empty experts between busy ones; N, K not multiples of the tiles;
    an expert with more rows than BLOCK_M (several row chunks)."""
    from smlp_export.kernels.grouped_gemm import grouped_expert_gemm

    x, off, w, b = _gemm_inputs([5, 0, 37, 0, 1], N=40, K=24, dtype=dtype, seed=1)
    got = grouped_expert_gemm(x, off, w, b, activation, config=GemmConfig(16, 16, 16))
    _close(got, ops.grouped_expert_gemm_reference(x, off, w, b, activation), dtype)


GEMM_SHAPES = {  # name: (rows per expert, N, K)
    "one_token": ([1], 33, 20),  # E = 1, one row
    "one_token_of_many_experts": ([0, 0, 1, 0], 48, 17),
    "all_rows_on_one_expert": ([0, 45, 0], 36, 40),
    "decode_top2_8_tokens": ([3, 4, 0, 2, 5, 2, 0, 0], 24, 56),
    "prefill_tiles": ([120, 0, 163, 20], 40, 24),  # M = 303 > 256: the 128 x 128 prefill tiles
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(GEMM_SHAPES))
def test_grouped_expert_gemm_shapes_default_tiles(shape, dtype):
    """The launcher's own tile choice (configs.grouped_gemm_blocks) on awkward shapes."""
    from smlp_export.kernels.grouped_gemm import grouped_expert_gemm

    rows, N, K = GEMM_SHAPES[shape]
    x, off, w, b = _gemm_inputs(rows, N, K, dtype, seed=len(rows))
    got = grouped_expert_gemm(x, off, w, b, "gelu_tanh")
    _close(got, ops.grouped_expert_gemm_reference(x, off, w, b, "gelu_tanh"), dtype)


def test_grouped_expert_gemm_no_rows_and_bad_input():
    from smlp_export.kernels.grouped_gemm import grouped_expert_gemm

    x, off, w, b = _gemm_inputs([0, 0], N=8, K=8, dtype=torch.float32)
    assert grouped_expert_gemm(x, off, w, b, "relu").shape == (0, 8)
    x, off, w, b = _gemm_inputs([2, 3], N=8, K=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown activation"):
        grouped_expert_gemm(x, off, w, b, "tanh")
    with pytest.raises(ValueError, match="shapes"):
        grouped_expert_gemm(x, off[:-1], w, b, "relu")
    with pytest.raises(ValueError, match="dtypes"):
        grouped_expert_gemm(x, off, w.half(), b, "relu")


def test_grouped_expert_gemm_kernel_never_writes_outside_m_rows():
    """offsets past M (bad input from a graph) are clamped in the kernel: no row >= M is touched."""
    E, N, K, M = 3, 16, 16, 20
    x, _, w, b = _gemm_inputs([7, 6, 7], N=N, K=K, dtype=torch.float32)
    off = torch.tensor([0, 7, 13, M + 9], dtype=torch.int32, device=DEVICE)  # last expert overruns M
    buf = torch.full((M + 16, N), 7.0, device=DEVICE)
    pk.grouped_expert_gemm_plugin_kernel[(triton.cdiv(N, 16), E, 1)](
        x, off, w, b, M, buf, E=E, N=N, K=K, ACT=4, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, INTERP_BF16=False)
    assert (buf[M:] == 7.0).all()
    good = torch.tensor([0, 7, 13, M], dtype=torch.int32)
    _close(buf[:M], ops.grouped_expert_gemm_reference(x, good.to(DEVICE), w, b, "identity"), torch.float32)


def test_grouped_gemm_blocks_regimes():
    from smlp_export.kernels.configs import grouped_gemm_blocks

    dec = grouped_gemm_blocks(16, 4096, 14336, torch.bfloat16)
    assert dec.BLOCK_M == 16 and triton.cdiv(4096, dec.BLOCK_N) >= 132  # one expert covers every SM
    assert grouped_gemm_blocks(8, 14336, 4096, "bfloat16").BLOCK_M == 16
    assert grouped_gemm_blocks(32, 14336, 4096, "bfloat16").BLOCK_M == 16  # 16 tokens at top-2
    big = grouped_gemm_blocks(8192, 14336, 4096, "bfloat16")
    assert big.BLOCK_M >= 64 and big.BLOCK_N >= 64
    with pytest.raises(ValueError):
        grouped_gemm_blocks(-1, 8, 8, "float16")


# --- the torch-path kernels must also compile for real GPUs (the interpreter is more lenient) ------

def _gpu_specs(arch: int, dtype: str) -> list[dict]:
    from smlp_export.kernels.configs import TOKEN_MOE_TABLE

    P = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}[dtype]
    i32 = lambda *names: {n: "i32" for n in names}  # noqa: E731
    prec = "ieee" if dtype == "float32" else "tf32"
    specs = []
    configs = {cfg for by_bucket in TOKEN_MOE_TABLE.values() for cfg in by_bucket.values()}
    for cfg in sorted(configs, key=repr)[:2]:
        specs.append(dict(module="grouped_moe", kernel="_up_kernel", arch=arch, num_warps=cfg.up.num_warps,
                          num_stages=cfg.up.num_stages,
                          signature={"x_ptr": P, "w1_ptr": P, "b1_ptr": P, "sorted_ptr": "*i32",
                                     "block_expert_ptr": "*i32", "h_ptr": P,
                                     **i32("S", "d", "f", "K_SLOTS", "stride_xn", "stride_we", "stride_wf",
                                           "stride_wd", "stride_be", "stride_hp")},
                          constexprs=dict(ACT=1, BLOCK_M=cfg.up.BLOCK_M, BLOCK_N=cfg.up.BLOCK_N,
                                          BLOCK_K=cfg.up.BLOCK_K, PRECISION=prec, INTERP_BF16=False)))
        specs.append(dict(module="grouped_moe", kernel="_down_kernel", arch=arch, num_warps=cfg.down.num_warps,
                          num_stages=cfg.down.num_stages,
                          signature={"h_ptr": P, "w2_ptr": P, "b2_ptr": P, "gate_ptr": P, "sorted_ptr": "*i32",
                                     "block_expert_ptr": "*i32", "y_ptr": P,
                                     **i32("S", "d", "f", "stride_hp", "stride_we", "stride_wd", "stride_wf",
                                           "stride_be", "stride_ys")},
                          constexprs=dict(BLOCK_M=cfg.down.BLOCK_M, BLOCK_N=cfg.down.BLOCK_N,
                                          BLOCK_K=cfg.down.BLOCK_K, PRECISION=prec, INTERP_BF16=False)))
    for routed in (False, True):
        specs.append(dict(module="causal_spatial", kernel="_spatial_kernel", arch=arch,
                          signature={"z2_ptr": P, "w_ptr": P, "bias_ptr": P, "gate_ptr": P, "cols_ptr": "*i32",
                                     "block_expert_ptr": "*i32", "out_ptr": P,
                                     **i32("T", "c", "cs", "n_cols", "E", "stride_zb", "stride_zt", "stride_we",
                                           "stride_wt", "stride_wu", "stride_be")},
                          constexprs=dict(ROUTED=routed, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, PRECISION=prec,
                                          INTERP_BF16=False)))
    specs.append(dict(module="causal_spatial", kernel="_spatial_decode_kernel", arch=arch,
                      signature={"state_ptr": P, "w_ptr": P, "bias_ptr": P, "expert_ptr": "*i32", "gate_ptr": P,
                                 "out_ptr": P, **i32("t", "c", "stride_sb", "stride_su", "stride_we", "stride_wt",
                                                     "stride_wu", "stride_be", "stride_ob")},
                      constexprs=dict(HAS_GATE=True, BLOCK_N=64, BLOCK_K=64, INTERP_BF16=False)))
    return specs


def test_torch_path_kernels_compile_for_gpus():
    """sm_90 bf16 and sm_80 fp16, every torch-path kernel, in one interpreter-off subprocess."""
    from smlp_export.kernels.aot import compile_specs

    specs = _gpu_specs(90, "bfloat16") + _gpu_specs(80, "float16")
    compiled = compile_specs(specs)
    for spec, ck in zip(specs, compiled):
        assert ck.name == spec["kernel"] and f".target sm_{spec['arch']}" in ck.ptx
    # Hopper tiles of the grouped GEMM and the spatial kernel use wgmma tensor cores, Ampere mma.sync
    assert any("wgmma" in ck.ptx for ck in compiled if ck.arch == 90)
    assert any("mma.sync" in ck.ptx for ck in compiled if ck.arch == 80)


def test_spatial_and_grouped_gemm_kernels_use_tensor_cores_for_half_types():
    """sm_90 PTX of every spatial kernel (torch path deterministic / routed, plugin deterministic /
    partial) and of the grouped expert GEMM's prefill tile holds wgmma for fp16 and bf16; the GEMM's
    decode tile (BLOCK_M 16, below wgmma's 64 rows) mma.sync. The plugin kernels' PTX has the
    parameter layout TensorRT's AOT launcher gets (user args + Triton's scratch pointers)."""
    from smlp_export.kernels.aot import PLUGIN_KERNELS, SCRATCH_PARAMS, compile_specs, plugin_spec
    from smlp_export.kernels.configs import grouped_gemm_blocks

    specs, want = [], []
    for dt in ("float16", "bfloat16"):
        P = {"bfloat16": "*bf16", "float16": "*fp16"}[dt]
        for routed in (False, True):
            specs.append(dict(module="causal_spatial", kernel="_spatial_kernel", arch=90,
                              signature={"z2_ptr": P, "w_ptr": P, "bias_ptr": P, "gate_ptr": P, "cols_ptr": "*i32",
                                         "block_expert_ptr": "*i32", "out_ptr": P,
                                         **{a: "i32" for a in ("T", "c", "cs", "n_cols", "E", "stride_zb", "stride_zt",
                                                               "stride_we", "stride_wt", "stride_wu", "stride_be")}},
                              constexprs=dict(ROUTED=routed, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, PRECISION="tf32",
                                              INTERP_BF16=False)))
            want.append("wgmma")
        specs.append(plugin_spec("spatial_moe", dt, 90, dict(E=4, BLOCK_M=64, BLOCK_N=32, BLOCK_K=32)))
        want.append("wgmma")
        for bn in (32, 128):  # sub-tiles of 16 and 32 columns
            specs.append(plugin_spec("spatial_moe_partial", dt, 90, dict(E=4, P=13, BLOCK_M=64, BLOCK_N=bn, BLOCK_K=32,
                                                                         BLOCK_P=16, BLOCK_E=4)))
            want.append("wgmma")
        for M, instr in ((8, "mma.sync"), (8192, "wgmma")):
            cfg = grouped_gemm_blocks(M, 14336, 4096, dt)
            specs.append(plugin_spec("grouped_expert_gemm", dt, 90,
                                     dict(E=8, N=14336, K=4096, ACT=1, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                                          BLOCK_K=cfg.BLOCK_K), num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            want.append(instr)
    compiled = compile_specs(specs)
    for spec, ck, instr in zip(specs, compiled, want):
        label = f"{spec['kernel']} {spec['signature'].get('out_ptr')} {spec['constexprs']}"
        assert ck.name == spec["kernel"] and ".target sm_90" in ck.ptx, label
        assert instr in ck.ptx, f"no {instr} (tensor cores) in the PTX of {label}"
        if spec["module"] == "plugin_kernels":
            key = next(k for k, v in PLUGIN_KERNELS.items() if v[0] == spec["kernel"])
            _, ptrs, scalars, outs = PLUGIN_KERNELS[key]
            assert ck.num_params == len(ptrs) + len(scalars) + len(outs) + SCRATCH_PARAMS, label
    gemm = next(s for s in specs if s["kernel"] == "grouped_expert_gemm_plugin_kernel")
    assert gemm["signature"]["offsets_ptr"] == "*i32" and gemm["signature"]["M"] == "i32"


def test_gpu_benchmark_script_dry_run(tmp_path):
    """benchmarks/gpu_kernels.py --dry-run: every section's code path on CPU, JSON + PNG written."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_kernels.py"
    spec = importlib.util.spec_from_file_location("gpu_kernels_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_kernels.json").read_text())
    assert report["dry_run"] and report["token_moe"] and report["spatial_moe"] and report["grouped_gemm_plugin"]
    # the grouped-GEMM section checks the plugin kernel pair against the plain-torch reference
    assert all(r["max_abs_err_vs_reference"] < 1e-4 for r in report["grouped_gemm_plugin"])
    assert "spatial_plugin_vs_masked_bmm_T512plus_min" not in report["goals"]  # T < 512 in the dry run
    # the end-to-end section compares the kernel path with the reference path on the same model
    assert report["e2e"]["max_abs_logit_diff"] < 1e-4
    assert (tmp_path / "gpu_kernels.png").stat().st_size > 0
