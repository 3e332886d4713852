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


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
def test_token_moe_activations(activation):
    x, lg, w1, b1, w2, b2 = _moe_inputs(17, 3, 20, 36, torch.float32, seed=1)
    got = tk.token_moe(x, lg, w1, b1, w2, b2, "topk", 2, activation)
    _close(got, ops.token_moe_reference(x, lg, w1, b1, w2, b2, "topk", 2, activation), torch.float32)


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

    for name in ("token_moe", "grouped_ffn", "spatial_moe", "spatial_moe_partial", "spatial_moe_decode"):
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
    assert report["dry_run"] and report["token_moe"] and report["spatial_moe"]
    # the end-to-end section compares the kernel path with the reference path on the same model
    assert report["e2e"]["max_abs_logit_diff"] < 1e-4
    assert (tmp_path / "gpu_kernels.png").stat().st_size > 0
