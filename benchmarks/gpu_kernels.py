"""GPU benchmark of the Triton kernels, every ratio measured side by side in one run.

    python benchmarks/gpu_kernels.py --out benchmarks/results/gpu_kernels          # one GPU, < 8 min on H200
    python benchmarks/gpu_kernels.py --dry-run --out /tmp/gk                        # CPU, TRITON_INTERPRET=1, tiny shapes

Sections (bf16 unless --dtype):
1. grouped expert FFN (``smlp_export.kernels.grouped_ffn``) vs a dense cuBLAS GEMM pair of the same
   FLOPs (``torch.matmul`` [N*k, d] x [d, f] then [N*k, f] x [f, d]) and vs the per-expert torch loop
   (``smlp_export.ops.grouped_expert_ffn``); tokens 16..16384, E 8..64, top-1 / top-2, d 1024..4096.
   Goals: >= 60 % of dense cuBLAS TFLOP/s at >= 4096 tokens; at <= 16 tokens >= 60 % of the GPU's
   memory bandwidth (measured here with a device copy) for the expert weights actually read.
2. causal spatial MoE kernel vs the masked dense ``torch.bmm`` (weights pre-masked, the cheapest
   dense form). Goal: >= 1.6x faster at T >= 512.
3. end-to-end forward of a ~1B-parameter sMLP: custom ops dispatching to the kernels vs the same
   model with the ops' plain-torch references.
4. the tensorrt target's token-MoE FFN: two ``smlp::grouped_expert_gemm`` launches (the
   SMLPGroupedExpertGemm plugin's kernel; up-projection with the activation, then down-projection) on
   rows already grouped by expert, vs the same dense cuBLAS pair. Same goals as 1; the decode goal
   is achieved HBM bandwidth (weights + activations moved) as a fraction of the GPU's PEAK (spec
   sheet, ``PEAK_HBM_GBS``; measured copy bandwidth when the GPU is not in the table), parity of
   every row against the plain-torch reference.
Section 2 also times the spatial plugin kernels (TensorRT's) with the plugins' tiles, and the
partial-routing kernels (torch path and plugin) against the same masked bmm.
``--quick`` runs a reduced sweep that still covers every goal (benchmarks/gpu_check.sh uses it).
``--tune`` also searches the tile candidates per (E, d, f, token bucket) and reports the best ones
(``tuned`` in the JSON) for the table in ``smlp_export/kernels/configs.py``.
Writes ``<out>/gpu_kernels.json`` and ``<out>/gpu_kernels.png`` (roofline-style plot).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

# Tiny CPU mode must switch the Triton interpreter on before anything imports triton.
if "--dry-run" in sys.argv or "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from smlp_export import SMLPConfig, SMLPForCausalLM, kernels, ops  # noqa: E402
from smlp_export.permutation import permute_by_expert  # noqa: E402

if kernels.available():
    import triton  # noqa: E402

    from smlp_export.kernels import plugin_kernels as pk  # noqa: E402
    from smlp_export.kernels._util import interp_bf16  # noqa: E402

FULL = dict(
    tokens=[16, 128, 1024, 4096, 16384],
    # (E, d, f): small/many experts and Mixtral-like large experts
    experts=[(8, 1024, 4096), (64, 1024, 1024), (8, 4096, 14336), (32, 4096, 2048)],
    topk=[1, 2],
    spatial=[(8, 256, 1536, 4), (8, 512, 1536, 4), (4, 1024, 1536, 4), (2, 2048, 1536, 4)],  # B, T, c, E
    e2e=dict(batch=4, seq=1024),
    reps=20,
)
QUICK = dict(
    tokens=[1, 16, 4096, 8192],
    experts=[(8, 4096, 14336), (64, 1024, 1024)],
    topk=[2],
    spatial=[(8, 512, 1536, 4), (4, 1024, 1536, 4)],
    e2e=dict(batch=2, seq=1024),
    reps=10,
)
DRY = dict(
    tokens=[1, 33],
    experts=[(4, 32, 48)],
    topk=[1, 2],
    spatial=[(2, 37, 12, 3)],
    e2e=dict(batch=1, seq=16),
    reps=1,
)


def e2e_config(dry: bool) -> SMLPConfig:
    """~1B parameters (printed in the report), or a tiny one for --dry-run."""
    if dry:
        return SMLPConfig(d_model=32, n_layers=3, n_sparse=2, max_seq_len=32, d_ffn=64,
                          n_token_experts=4, d_expert=64, n_spatial_experts=4)
    return SMLPConfig(d_model=2048, n_layers=16, n_sparse=4, max_seq_len=1024, d_ffn=8192,
                      n_token_experts=8, d_expert=4096, n_spatial_experts=4)


# Peak HBM bandwidth from the vendors' spec sheets, GB/s (substring of torch.cuda.get_device_name).
PEAK_HBM_GBS = {"H200": 4800.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0, "H100": 3350.0, "H800": 3350.0,
                "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100": 1555.0, "L40S": 864.0, "L4": 300.0}


def peak_bandwidth(gpu: str, copy_gbs: float) -> tuple[float, str]:
    """(GB/s, source): the spec-sheet peak of ``gpu``, else the measured copy bandwidth (labelled)."""
    for name, gbs in PEAK_HBM_GBS.items():  # dict order: the more specific names first
        if name.lower() in gpu.lower():
            return gbs, f"spec sheet ({name})"
    return copy_gbs, "measured device copy (GPU not in PEAK_HBM_GBS)"


class Timer:
    """Median wall time of ``fn`` in ms: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device, reps: int):
        self.device, self.reps = device, reps

    def __call__(self, fn) -> float:
        fn()  # warm-up (compiles the Triton kernels)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(self.reps):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


def copy_bandwidth(device: torch.device, timer: Timer, dry: bool) -> float:
    """Achievable memory bandwidth in GB/s: a device-to-device copy (reads + writes)."""
    n = (1 << 16) if dry else (1 << 30)  # 2 GiB of bf16 on a GPU
    x = torch.empty(n, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    ms = timer(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def bench_token_moe(cfg: dict, device: torch.device, dtype: torch.dtype, timer: Timer, bw_gbs: float,
                    peak_gbs: float) -> list[dict]:
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for E, d, f in cfg["experts"]:
        w1 = (torch.randn(E, f, d, generator=g) * d ** -0.5).to(dtype).to(device)
        b1 = torch.zeros(E, f, dtype=dtype, device=device)
        w2 = (torch.randn(E, d, f, generator=g) * f ** -0.5).to(dtype).to(device)
        b2 = torch.zeros(E, d, dtype=dtype, device=device)
        wa, wb = w1[0].t().contiguous(), w2[0].t().contiguous()  # dense stand-ins [d, f], [f, d]
        for N in cfg["tokens"]:
            x = torch.randn(N, d, generator=g).to(dtype).to(device)
            logits = torch.randn(N, E, generator=g).to(dtype).to(device)
            for k in cfg["topk"]:
                if k > E:
                    continue
                ids, gates = ops.route_tokens(logits, "topk", k)
                M = N * k
                flops = 2 * M * d * f * 2
                xm = torch.randn(M, d, generator=g).to(dtype).to(device)
                t_kernel = timer(lambda: kernels.grouped_ffn(x, ids, gates, w1, b1, w2, b2, "gelu_tanh"))
                t_dense = timer(lambda: torch.matmul(torch.matmul(xm, wa), wb))
                t_loop = timer(lambda: ops.grouped_expert_ffn(x, ids, gates, w1, b1, w2, b2, "gelu_tanh"))
                used = int(torch.unique(ids).numel())
                w_bytes = used * (2 * d * f + f + d) * w1.element_size()
                act_bytes = (N * d * 2 + M * f * 2 + M * d * 2) * w1.element_size()
                row = dict(E=E, d=d, f=f, tokens=N, k=k, experts_used=used, gflop=flops / 1e9,
                           ms_kernel=t_kernel, ms_dense=t_dense, ms_loop=t_loop,
                           tflops_kernel=flops / t_kernel / 1e9, tflops_dense=flops / t_dense / 1e9,
                           tflops_loop=flops / t_loop / 1e9,
                           vs_dense=t_dense / t_kernel, vs_loop=t_loop / t_kernel,
                           weight_gbs=w_bytes / (t_kernel * 1e-3) / 1e9,
                           intensity=flops / (w_bytes + act_bytes))
                row["weight_bw_fraction"] = row["weight_gbs"] / bw_gbs
                row["hbm_gbs"] = (w_bytes + act_bytes) / (t_kernel * 1e-3) / 1e9
                row["hbm_peak_fraction"] = row["hbm_gbs"] / peak_gbs
                rows.append(row)
                print(f"tmoe E={E:3d} d={d:5d} f={f:5d} N={N:6d} k={k}: kernel {row['tflops_kernel']:7.1f} TF/s "
                      f"({row['vs_dense']:.2f}x dense, {row['vs_loop']:.2f}x loop, "
                      f"weights {row['weight_gbs']:.0f} GB/s = {row['weight_bw_fraction']:.0%} of copy BW)",
                      flush=True)
        del w1, w2, wa, wb
    return rows


def group_rows(x: torch.Tensor, ids: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the tensorrt graph does in standard ops before the plugin: rows sorted by expert + offsets."""
    order, _, offsets = permute_by_expert(ids, E)
    return x.index_select(0, order // ids.shape[1]), offsets.to(torch.int32)


def bench_grouped_gemm(cfg: dict, device: torch.device, dtype: torch.dtype, timer: Timer, bw_gbs: float,
                       peak_gbs: float) -> list[dict]:
    """Section 4: the SMLPGroupedExpertGemm kernel pair (tensorrt target) vs dense cuBLAS, + parity."""
    rows = []
    g = torch.Generator(device="cpu").manual_seed(3)
    for E, d, f in cfg["experts"]:
        w1 = (torch.randn(E, f, d, generator=g) * d ** -0.5).to(dtype).to(device)
        b1 = (torch.randn(E, f, generator=g) * 0.1).to(dtype).to(device)
        w2 = (torch.randn(E, d, f, generator=g) * f ** -0.5).to(dtype).to(device)
        b2 = (torch.randn(E, d, generator=g) * 0.1).to(dtype).to(device)
        wa, wb = w1[0].t().contiguous(), w2[0].t().contiguous()
        for N in cfg["tokens"]:
            x = torch.randn(N, d, generator=g).to(dtype).to(device)
            logits = torch.randn(N, E, generator=g).to(dtype).to(device)
            for k in cfg["topk"]:
                if k > E:
                    continue
                ids, _ = ops.route_tokens(logits, "topk", k)
                xs, offsets = group_rows(x, ids, E)
                M = xs.shape[0]

                def ffn():
                    h = kernels.grouped_expert_gemm(xs, offsets, w1, b1, "gelu_tanh")
                    return kernels.grouped_expert_gemm(h, offsets, w2, b2, "identity")

                xm = torch.randn(M, d, generator=g).to(dtype).to(device)
                t_kernel = timer(ffn)
                t_dense = timer(lambda: torch.matmul(torch.matmul(xm, wa), wb))
                # parity with the plain-torch reference of the same two GEMMs
                ref = ops.grouped_expert_gemm_reference(
                    ops.grouped_expert_gemm_reference(xs, offsets, w1, b1, "gelu_tanh"), offsets, w2, b2, "identity")
                err = (ffn().float() - ref.float()).abs().max().item()
                used = int((offsets[1:] > offsets[:-1]).sum())
                flops = 2 * M * d * f * 2
                w_bytes = used * (2 * d * f + f + d) * w1.element_size()
                act_bytes = (M * d + 2 * M * f + M * d) * w1.element_size()  # x in, h out + in, y out
                row = dict(E=E, d=d, f=f, tokens=N, k=k, rows=M, experts_used=used, gflop=flops / 1e9,
                           ms_kernel=t_kernel, ms_dense=t_dense, tflops_kernel=flops / t_kernel / 1e9,
                           tflops_dense=flops / t_dense / 1e9, vs_dense=t_dense / t_kernel,
                           hbm_gbs=(w_bytes + act_bytes) / (t_kernel * 1e-3) / 1e9, max_abs_err_vs_reference=err,
                           intensity=flops / (w_bytes + act_bytes))
                row["hbm_peak_fraction"] = row["hbm_gbs"] / peak_gbs
                row["hbm_copy_fraction"] = row["hbm_gbs"] / bw_gbs
                rows.append(row)
                print(f"ggemm E={E:3d} d={d:5d} f={f:5d} N={N:6d} k={k}: {row['tflops_kernel']:7.1f} TF/s "
                      f"({row['vs_dense']:.2f}x dense), HBM {row['hbm_gbs']:.0f} GB/s = "
                      f"{row['hbm_peak_fraction']:.0%} of peak, max |err| {err:.3g}", flush=True)
        del w1, w2, wa, wb
    return rows


def bench_spatial(cfg: dict, device: torch.device, dtype: torch.dtype, timer: Timer) -> list[dict]:
    rows = []
    g = torch.Generator(device="cpu").manual_seed(1)
    for B, T, c, E in cfg["spatial"]:
        n = T
        z2 = torch.randn(B, T, c, generator=g).to(dtype).to(device)
        w = (torch.randn(E, n, n, generator=g) * n ** -0.5).to(dtype).to(device)
        b = torch.randn(E, n, generator=g).to(dtype).to(device)
        cs = c // E
        masked = torch.tril(w)  # the dense baseline gets its mask for free
        zc = z2.reshape(B, T, E, cs).permute(2, 1, 0, 3).reshape(E, T, B * cs).contiguous()
        t_kernel = timer(lambda: kernels.spatial_moe(z2, w, b))
        t_bmm = timer(lambda: torch.bmm(masked, zc))
        t_ref = timer(lambda: ops.spatial_moe_reference(z2, w, b))
        # the TensorRT plugins' kernels, with the plugins' tiles (plugins/smlp_spatial_moe*/plugin.py)
        out = torch.empty_like(z2)
        t_plugin = timer(lambda: pk.spatial_moe_plugin_kernel[(triton.cdiv(T, 64), triton.cdiv(cs, 32), B * E)](
            z2, w, b, T, c, n, out, E=E, BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, INTERP_BF16=interp_bf16(dtype)))
        p = -(-n // 5)
        router = (torch.randn(p, E, generator=g) * 0.5).to(dtype).to(device)
        t_partial = timer(lambda: kernels.spatial_moe_partial(z2, w, b, router))

        def partial_plugin(bn: int):  # the glue's BLOCK_N (32 today) and a wider one (smaller padding share)
            return lambda: pk.spatial_moe_partial_plugin_kernel[(triton.cdiv(T, 64), triton.cdiv(c, bn), B)](
                z2, w, b, router, T, c, n, out, E=E, P=p, BLOCK_M=64, BLOCK_N=bn, BLOCK_K=32, BLOCK_P=16,
                BLOCK_E=max(2, triton.next_power_of_2(E)), INTERP_BF16=interp_bf16(dtype))

        t_partial_plugin = timer(partial_plugin(128))
        t_partial_plugin_bn32 = timer(partial_plugin(32))
        flops_dense = 2 * E * T * T * B * cs
        row = dict(B=B, T=T, c=c, E=E, ms_kernel=t_kernel, ms_masked_bmm=t_bmm, ms_reference=t_ref,
                   ms_plugin=t_plugin, ms_partial=t_partial, ms_partial_plugin=t_partial_plugin,
                   ms_partial_plugin_block_n32=t_partial_plugin_bn32,
                   speedup_plugin_vs_bmm=t_bmm / t_plugin, speedup_partial_vs_bmm=t_bmm / t_partial,
                   speedup_partial_plugin_vs_bmm=t_bmm / t_partial_plugin,
                   speedup_vs_bmm=t_bmm / t_kernel, speedup_vs_reference=t_ref / t_kernel,
                   tflops_kernel_useful=flops_dense / 2 / t_kernel / 1e9, tflops_bmm=flops_dense / t_bmm / 1e9,
                   intensity=(flops_dense / 2) / ((2 * B * T * c + E * T * T / 2) * z2.element_size()))
        rows.append(row)
        print(f"smoe B={B} T={T:5d} c={c} E={E}: {row['speedup_vs_bmm']:.2f}x vs masked bmm "
              f"(plugin {row['speedup_plugin_vs_bmm']:.2f}x; partial {row['speedup_partial_vs_bmm']:.2f}x, "
              f"partial plugin {row['speedup_partial_plugin_vs_bmm']:.2f}x), "
              f"{row['speedup_vs_reference']:.2f}x vs reference", flush=True)
    return rows


@contextlib.contextmanager
def reference_ops():
    """Make the custom ops' CUDA branch call the plain-torch references (the 'without kernels' path)."""
    saved = {name: getattr(kernels, name) for name in ("token_moe", "spatial_moe", "spatial_moe_partial")}
    kernels.token_moe = ops.token_moe_reference
    kernels.spatial_moe = ops.spatial_moe_reference
    kernels.spatial_moe_partial = ops.spatial_moe_partial_reference
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(kernels, name, fn)


def bench_e2e(cfg: dict, device: torch.device, dtype: torch.dtype, timer: Timer, dry: bool) -> dict:
    mc = e2e_config(dry)
    torch.manual_seed(0)
    model = SMLPForCausalLM(mc).to(device=device, dtype=dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    B, T = cfg["e2e"]["batch"], min(cfg["e2e"]["seq"], mc.max_seq_len)
    ids = torch.randint(0, mc.vocab_size, (B, T), device=device)
    with torch.no_grad():
        if device.type == "cuda":
            t_kernels = timer(lambda: model(ids))
            out_k = model(ids)
            with reference_ops():
                t_ref = timer(lambda: model(ids))
                out_r = model(ids)
        else:
            # CPU (dry run): the ops take their CPU branch; route it through the kernels (interpreter)
            # so the same model-level code path is exercised and compared.
            with kernels_on_cpu():
                t_kernels = timer(lambda: model(ids))
                out_k = model(ids)
            t_ref = timer(lambda: model(ids))
            out_r = model(ids)
    diff = (out_k.float() - out_r.float()).abs().max().item()
    res = dict(params=params, batch=B, seq=T, ms_kernels=t_kernels, ms_reference=t_ref,
               speedup=t_ref / t_kernels, max_abs_logit_diff=diff, config=mc.to_dict())
    print(f"e2e {params / 1e9:.2f}B params, B={B} T={T}: kernels {t_kernels:.1f} ms, reference {t_ref:.1f} ms "
          f"({res['speedup']:.2f}x), max |logit diff| {diff:.3g}", flush=True)
    return res


@contextlib.contextmanager
def kernels_on_cpu():
    """Dry run only: route the custom ops' CPU path through the kernels (interpreter)."""
    # sys.modules: the package re-exports ops named like their modules (ops.token_moe is the op)
    tm = sys.modules["smlp_export.ops.token_moe"]
    sm = sys.modules["smlp_export.ops.spatial_moe"]

    saved = (tm.token_moe_reference, sm.spatial_moe_reference, sm.spatial_moe_partial_reference)
    tm.token_moe_reference = kernels.token_moe
    sm.spatial_moe_reference = kernels.spatial_moe
    sm.spatial_moe_partial_reference = kernels.spatial_moe_partial
    try:
        yield
    finally:
        tm.token_moe_reference, sm.spatial_moe_reference, sm.spatial_moe_partial_reference = saved


TUNE_CANDIDATES = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), shared by up and down
    (16, 64, 128, 4, 4), (16, 128, 128, 4, 3), (32, 64, 64, 4, 4), (32, 128, 64, 4, 3),
    (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
]


def tune_token_moe(cfg: dict, device: torch.device, dtype: torch.dtype, timer: Timer) -> list[dict]:
    """Try every candidate tile per (E, d, f, token bucket); print table entries for configs.py."""
    from smlp_export.kernels.configs import GemmConfig, TokenMoEConfig, _bucket

    out = []
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    g = torch.Generator(device="cpu").manual_seed(2)
    for E, d, f in cfg["experts"]:
        w1 = (torch.randn(E, f, d, generator=g) * d ** -0.5).to(dtype).to(device)
        w2 = (torch.randn(E, d, f, generator=g) * f ** -0.5).to(dtype).to(device)
        b1, b2 = torch.zeros(E, f, dtype=dtype, device=device), torch.zeros(E, d, dtype=dtype, device=device)
        toks = cfg["tokens"]
        for N in sorted({toks[0], toks[len(toks) // 2], toks[-1]}):
            x = torch.randn(N, d, generator=g).to(dtype).to(device)
            ids, gates = ops.route_tokens(torch.randn(N, E, generator=g).to(device), "topk", 1)
            best = None
            for bm, bn, bk, nw, ns in TUNE_CANDIDATES:
                gc = GemmConfig(bm, bn, bk, nw, ns)
                tc = TokenMoEConfig(gc, gc)
                try:
                    ms = timer(lambda: kernels.grouped_ffn(x, ids, gates, w1, b1, w2, b2, "gelu_tanh", config=tc))
                except Exception as exc:  # e.g. out of shared memory for this tile on this GPU
                    print(f"  tile {gc} failed: {type(exc).__name__}", flush=True)
                    continue
                if best is None or ms < best[0]:
                    best = (ms, gc)
            if best is None:
                continue
            entry = dict(gpu=gpu, dtype=str(dtype).replace("torch.", ""), E=E, d=d, f=f, tokens=N,
                         bucket=_bucket(N / E), ms=best[0], config=best[1].as_dict())
            out.append(entry)
            print(f"tune {entry}", flush=True)
    return out


GGEMM_CANDIDATES = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for grouped_expert_gemm
    (16, 16, 128, 4, 4), (16, 32, 128, 4, 4), (16, 32, 256, 4, 3), (16, 64, 128, 4, 4), (64, 64, 64, 4, 4),
    (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
]


def tune_grouped_gemm(cfg: dict, device: torch.device, dtype: torch.dtype, timer: Timer) -> list[dict]:
    """Best tile per (E, N=f, K=d, rows) for the up-projection grouped GEMM (top-2 routing), to
    compare with / replace ``configs.grouped_gemm_blocks``."""
    from smlp_export.kernels.configs import GemmConfig, grouped_gemm_blocks

    out = []
    g = torch.Generator(device="cpu").manual_seed(4)
    for E, d, f in cfg["experts"]:
        w1 = (torch.randn(E, f, d, generator=g) * d ** -0.5).to(dtype).to(device)
        b1 = torch.zeros(E, f, dtype=dtype, device=device)
        toks = cfg["tokens"]
        for N in sorted({toks[0], toks[-1]}):
            k = min(2, E)
            ids, _ = ops.route_tokens(torch.randn(N, E, generator=g).to(device), "topk", k)
            xs, offsets = group_rows(torch.randn(N, d, generator=g).to(dtype).to(device), ids, E)
            results = []
            chosen = grouped_gemm_blocks(xs.shape[0], f, d, dtype)
            cands = [GemmConfig(*c) for c in GGEMM_CANDIDATES]
            for gc in cands + ([chosen] if chosen not in cands else []):
                try:
                    ms = timer(lambda: kernels.grouped_expert_gemm(xs, offsets, w1, b1, "gelu_tanh", config=gc))
                except Exception as exc:  # e.g. out of shared memory for this tile
                    print(f"  tile {gc} failed: {type(exc).__name__}", flush=True)
                    continue
                results.append((ms, gc))
            if not results:
                continue
            best = min(results, key=lambda r: r[0])
            chosen_ms = next((ms for ms, gc in results if gc == chosen), None)
            entry = dict(E=E, N=f, K=d, rows=xs.shape[0], best=best[1].as_dict(), best_ms=best[0],
                         grouped_gemm_blocks=chosen.as_dict(), grouped_gemm_blocks_ms=chosen_ms)
            out.append(entry)
            print(f"tune ggemm {entry}", flush=True)
    return out


def goals(tmoe: list[dict], smoe: list[dict], ggemm: list[dict] | None = None) -> dict:
    g = {}

    def worst(name: str, rows: list[dict], value, goal: float) -> None:
        if rows:
            v = min(value(r) for r in rows)
            g[name] = dict(value=v, goal=goal, met=v >= goal)

    for prefix, rows in (("grouped", tmoe), ("grouped_gemm_plugin", ggemm or [])):
        worst(f"{prefix}_vs_dense_at_4096plus_min", [r for r in rows if r["tokens"] >= 4096],
              lambda r: r["tflops_kernel"] / r["tflops_dense"], 0.6)
        worst(f"{prefix}_decode_hbm_peak_fraction_min", [r for r in rows if r["tokens"] <= 16],
              lambda r: r["hbm_peak_fraction"], 0.6)
    long = [r for r in smoe if r["T"] >= 512]
    worst("spatial_vs_masked_bmm_T512plus_min", long, lambda r: r["speedup_vs_bmm"], 1.6)
    worst("spatial_plugin_vs_masked_bmm_T512plus_min", long, lambda r: r["speedup_plugin_vs_bmm"], 1.6)
    return g


def plot(path: Path, tmoe: list[dict], smoe: list[dict], bw_gbs: float, ggemm: list[dict] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    peak = max([r["tflops_dense"] for r in tmoe + (ggemm or [])] + [1e-9])
    xs = [2 ** i for i in range(-4, 13)]
    ax.plot(xs, [min(peak, x * bw_gbs / 1e3) for x in xs], "k--", lw=1,
            label=f"roof: copy BW {bw_gbs:.0f} GB/s, best dense {peak:.0f} TF/s (measured)")
    for k, marker in ((1, "o"), (2, "s")):
        pts = [r for r in tmoe if r["k"] == k]
        ax.scatter([r["intensity"] for r in pts], [r["tflops_kernel"] for r in pts], marker=marker,
                   label=f"grouped FFN kernel, top-{k}")
        ax.scatter([r["intensity"] for r in pts], [r["tflops_loop"] for r in pts], marker=marker,
                   facecolors="none", edgecolors="gray", label=f"per-expert torch loop, top-{k}")
    if ggemm:
        ax.scatter([r["intensity"] for r in ggemm], [r["tflops_kernel"] for r in ggemm], marker="x",
                   label="grouped expert GEMM pair (TensorRT plugin kernel)")
    if smoe:
        ax.scatter([r["intensity"] for r in smoe], [r["tflops_kernel_useful"] for r in smoe], marker="^",
                   label="causal spatial kernel (useful FLOPs)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title("smlp Triton kernels (measured in one run)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gpu_kernels", help="output folder")
    ap.add_argument("--dry-run", "--interpret", dest="dry", action="store_true",
                    help="tiny shapes on CPU with TRITON_INTERPRET=1 (checks the script, measures nothing useful)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--skip", nargs="*", default=[], choices=["tmoe", "smoe", "e2e", "ggemm"])
    ap.add_argument("--quick", action="store_true", help="reduced sweep that still covers every goal (~half the time)")
    ap.add_argument("--tune", action="store_true",
                    help="also try the candidate tiles per (E, d, f, token bucket) and report the best "
                         "(entries for smlp_export/kernels/configs.py; adds a few minutes)")
    args = ap.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        print("error: no CUDA GPU; use --dry-run to check the script on CPU", file=sys.stderr)
        return 1
    if not kernels.available():
        print("error: triton not installed (pip install -e '.[triton]')", file=sys.stderr)
        return 1
    cfg = DRY if args.dry else (QUICK if args.quick else FULL)
    device = torch.device("cpu" if args.dry else "cuda")
    dtype = getattr(torch, args.dtype)
    if args.dry and dtype == torch.bfloat16:
        dtype = torch.float32  # the per-expert torch loop on CPU is slow in bf16; the point is coverage
    timer = Timer(device, cfg["reps"])
    t0 = time.time()
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (TRITON_INTERPRET=1)"
    bw = copy_bandwidth(device, timer, args.dry)
    peak, peak_source = peak_bandwidth(gpu, bw)
    print(f"{gpu}: device copy bandwidth {bw:.0f} GB/s; peak HBM {peak:.0f} GB/s ({peak_source})", flush=True)
    tmoe = [] if "tmoe" in args.skip else bench_token_moe(cfg, device, dtype, timer, bw, peak)
    ggemm = [] if "ggemm" in args.skip else bench_grouped_gemm(cfg, device, dtype, timer, bw, peak)
    smoe = [] if "smoe" in args.skip else bench_spatial(cfg, device, dtype, timer)
    e2e = None if "e2e" in args.skip else bench_e2e(cfg, device, dtype, timer, args.dry)
    tuned = tune_token_moe(cfg, device, dtype, timer) if args.tune else []
    tuned_ggemm = tune_grouped_gemm(cfg, device, dtype, timer) if args.tune else []
    report = dict(gpu=gpu, dtype=str(dtype), dry_run=args.dry, torch=torch.__version__, triton=triton.__version__,
                  copy_bandwidth_gbs=bw, peak_hbm_gbs=peak, peak_hbm_source=peak_source, token_moe=tmoe,
                  grouped_gemm_plugin=ggemm, spatial_moe=smoe, e2e=e2e, tuned=tuned, tuned_grouped_gemm=tuned_ggemm,
                  goals=goals(tmoe, smoe, ggemm),
                  seconds=time.time() - t0, command=" ".join(sys.argv))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "gpu_kernels.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "gpu_kernels.json")
    plot(out / "gpu_kernels.png", tmoe, smoe, bw, ggemm)
    for name, g in report["goals"].items():
        verdict = "dry run: not a measurement" if args.dry else ("MET" if g["met"] else "NOT MET")
        print(f"goal {name}: {g['value']:.2f} (goal {g['goal']}) {verdict}")
    print(f"wrote {out / 'gpu_kernels.json'} and {out / 'gpu_kernels.png'} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
