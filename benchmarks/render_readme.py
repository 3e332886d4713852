"""Regenerate docs/benchmarks.md from benchmarks/results/*.json (figures are never typed by hand).

Run after the benchmark scripts: ``python benchmarks/render_readme.py [--out docs/benchmarks.md]``.
Each section names the machine, the command and the date of its figures, and says for every goal
whether it is met and, if not, by how much.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _machine(m: dict) -> str:
    libs = m.get("libraries", {})
    ort = libs.get("onnxruntime-gpu") or libs.get("onnxruntime") or "?"
    load = m.get("load_avg_1_5_15m") or ["?"]
    return (f"{m.get('cpu_model', '?')}, {m.get('usable_cores', '?')} usable cores, "
            f"{m.get('mem_total_gib', '?')} GiB; load average {load[0]} at the end of the run; "
            f"torch {libs.get('torch', '?')}, onnxruntime {ort}, onnx {libs.get('onnx', '?')}; "
            f"{m.get('timestamp_utc', '?')}")


def _header(rep: dict) -> list[str]:
    out = [f"Machine: {_machine(rep['machine'])}.  ",
           f"Command: `{rep.get('command', '?')}`" + (" (**--quick: smoke-run timings**)" if rep.get("quick") else "") + "  "]
    cfg = rep.get("config", {})
    if "threads" in cfg:
        t = cfg.get("timing", {})
        out.append(f"Threads: {cfg['threads']}; timing: {t.get('warmup')} warm-up runs, then at least "
                   f"{t.get('min_runs')} runs and {t.get('min_time_s')} s per case (cap {t.get('max_time_s')} s).")
    return out + [""]


def _goals(rep: dict) -> list[str]:
    lines = []
    for g in rep.get("goals", []):
        status = "met" if g["met"] else f"**not met**, off by {abs(g['value'] / g['limit'] - 1) * 100:.0f}%"
        lines.append(f"- Goal {g['goal']} {g['op']} {g['limit']}: measured {g['value']:.2f} ({status}).")
    return lines + [""] if lines else []


def _img(rep_path: Path, out: Path) -> list[str]:
    png = rep_path.with_suffix(".png")
    return [f"![{png.stem}]({os.path.relpath(png, out.parent)})", ""] if png.exists() else []


def exported_vs_eager(rep: dict, path: Path, out: Path) -> list[str]:
    lines = ["## Exported vs eager (benchmark 1)", "", *_header(rep)]
    lines += ["| backend | target | B | T | p50 ms | p90 ms | p99 ms | tokens/s | spread | runs |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rep["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['backend']} | {r.get('target') or '-'} | {r['batch']} | {r['seq']} | "
                         f"{r['status']}: {r.get('reason', '')} | | | | | |")
            continue
        lines.append(f"| {r['backend']} | {r.get('target') or '-'} | {r['batch']} | {r['seq']} | {r['p50_ms']:.2f} | "
                     f"{r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['tokens_per_s']:.0f} | {r['spread_pct']:.0f}% | {r['runs']} |")
    lines += ["", "| B | T | ort / eager | ort / torch.compile | portable / eager |", "|---:|---:|---:|---:|---:|"]
    rat = rep.get("ratios", {})
    key = lambda x: (x["batch"], x["seq"])  # noqa: E731
    comp = {key(x): x["ratio_p50"] for x in rat.get("ort_over_compile", [])}
    port = {key(x): x["ratio_p50"] for x in rat.get("portable_over_eager", [])}
    for x in rat.get("ort_over_eager", []):
        c, q = comp.get(key(x)), port.get(key(x))
        lines.append(f"| {x['batch']} | {x['seq']} | {x['ratio_p50']:.2f} | {'-' if c is None else f'{c:.2f}'} | "
                     f"{'-' if q is None else f'{q:.2f}'} |")
    lines += ["", *_goals(rep)]
    prof = rep.get("profile")
    if prof:
        lines += [f"ONNX Runtime profile of the ort graph (B={prof['batch']}, T={prof['seq']}, "
                  f"{prof['kernel_ms_per_run']:.2f} ms of kernels per run):", "",
                  "| op type | calls/run | ms/run | % |", "|---|---:|---:|---:|"]
        lines += [f"| {o['name']} | {o['calls']} | {o['total_ms']:.3f} | {o['pct']:.1f} |" for o in prof["by_op_type"][:10]]
        lines.append("")
    lines += _moe_kernel_diagnosis(rep, path.parent)
    return lines + _img(path, out)


def _moe_kernel_diagnosis(rep: dict, results: Path) -> list[str]:
    """Where a goal is missed: relate the MoE node's share of the ORT profile to benchmark 3's
    kernel-alone figures at the same token counts (B*T of each measured case), if both exist."""
    layer = results / "moe_layer.json"
    if not layer.exists() or all(g["met"] for g in rep.get("goals", [])):
        return []
    layer_rep = json.loads(layer.read_text())
    by_tokens = {r["tokens"]: r for r in layer_rep["rows"] if "ort_moe" in r}
    lc = layer_rep["config"]
    out = []
    for b, t in sorted({(r["batch"], r["seq"]) for r in rep["rows"]}):
        r = by_tokens.get(b * t)
        if r:
            out.append(f"  - {b * t} tokens (B={b}, T={t}): ORT MoE kernel {r['ort_moe']['p50_ms']:.2f} ms vs the "
                       f"sorted grouped reference {r['reference']['p50_ms']:.2f} ms "
                       f"({r['ort_moe']['p50_ms'] / r['reference']['p50_ms']:.2f}x).")
    if not out:
        return []
    head = "Diagnosis (generated from the JSON):"
    moe = next((o for o in (rep.get("profile") or {}).get("by_op_type", []) if o["name"] == "MoE"), None)
    if moe:
        head += (f" the com.microsoft.MoE nodes take {moe['pct']:.0f}% of ONNX Runtime's kernel time in the profile above;")
    head += (f" the same kernel timed alone in benchmark 3 (one layer, E={lc['experts']}, d={lc['d_model']}, "
             f"f={lc['d_expert']}, {lc['threads']} thread(s)) against the custom op's CPU reference:")
    return [head, *out, ""]


def experts_scaling(rep: dict, path: Path, out: Path) -> list[str]:
    cfg = rep["config"]
    names = list(rep["ratios_last_over_first"])
    lines = ["## Cost vs number of experts (benchmark 2)", "", *_header(rep),
             f"Random-init `{cfg['preset']}` checkpoints, top-1 routing, fixed expert width; ONNX Runtime CPU, "
             f"B={cfg['batch']}, T={cfg['seq']}; p50 latency in ms (spread in brackets); all graphs timed side by "
             "side in rounds. The dense all-experts export is a **baseline** "
             "(benchmarks/dense_baseline.py), not a product target. Each graph matched PyTorch eager "
             f"(max |diff| of logits <= {cfg['parity_atol']}) before it was timed.", "",
             "| E | active params | experts used (all MoE layers) | expert weights read (MB) | "
             + " | ".join(names) + " |", "|---:|---:|---:|---:|" + "---:|" * len(names)]
    for r in rep["rows"]:
        used = sum(r.get("experts_used_per_layer", {}).values()) or "-"
        lines.append(f"| {r['experts']} | {r['active_params']:,} | {used} | {r.get('expert_weight_mb_read', '-')} | "
                     + " | ".join(f"{r[n]['p50_ms']:.2f}" + (f" ({r[n]['spread_pct']:.0f}%)" if "spread_pct" in r[n] else "")
                                  for n in names) + " |")
    lines.append(f"| p50(E={rep['rows'][-1]['experts']}) / p50(E={rep['rows'][0]['experts']}) | | | | "
                 + " | ".join(f"{rep['ratios_last_over_first'][n]:.2f}x" for n in names) + " |")
    return lines + ["", *_goals(rep), *_img(path, out)]


def moe_layer(rep: dict, path: Path, out: Path) -> list[str]:
    cfg = rep["config"]
    lines = ["## Sparse MoE layer alone (benchmark 3)", "", *_header(rep),
             f"Token MoE, E={cfg['experts']}, d={cfg['d_model']}, f={cfg['d_expert']}, routing {cfg['routing']} "
             f"k={cfg['k']}, PyTorch CPU; p50 ms. reference = the custom op's CPU kernel (sorted, one GEMM per used "
             "expert); naive loop = per-expert Python loop with masks; dense = all experts on all tokens; "
             "ORT MoE = ONNX Runtime's com.microsoft.MoE kernel on the same weights (what the `ort` export runs).", "",
             "| tokens | reference | naive loop | dense | ORT MoE | dense / ref | naive / ref | ORT MoE / ref |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(v, spec):
        return "-" if v is None else format(v, spec)

    for r in rep["rows"]:
        ref = r["reference"]["p50_ms"]
        nv, dn, om = (r.get(k, {}).get("p50_ms") for k in ("naive_loop", "dense", "ort_moe"))
        lines.append(f"| {r['tokens']} | {ref:.3f} | {cell(nv, '.3f')} | {cell(dn, '.3f')} | {cell(om, '.3f')} | "
                     f"{cell(dn and dn / ref, '.2f')} | {cell(nv and nv / ref, '.2f')} | {cell(om and om / ref, '.2f')} |")
    return lines + ["", *_img(path, out)]


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def _measured(r: dict) -> str:
    """The day a row was measured; rows of runs before the field existed say so."""
    return str(r["measured_at"])[:10] if r.get("measured_at") else "before 2026-12-08"


def _export_scaling_table(rep: dict) -> list[str]:
    lines = ["| preset (checkpoint) | parameters | weights GB | init: peak RSS GB (x weights) | "
             "export: peak RSS GB (x weights) | export: wall s (s/GB) | --quick: peak RSS GB (x weights) | "
             "--quick: wall s | parity | load avg before | measured |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in rep["rows"]:
        nv, q, ini = r.get("export_no_validate") or {}, r.get("export_quick") or {}, r.get("init") or {}
        name = f"{r['preset']} ({r.get('checkpoint_dtype', 'fp32')})"
        if not nv:
            lines.append(f"| {name} | {r['parameters']:,} | {_gb(r.get('weight_bytes'))} | "
                         f"{ini.get('error', 'not run')} | | | | | | | {_measured(r)} |")
            continue

        def cell(f: dict) -> str:
            if not f.get("peak_rss_bytes"):
                return "-"
            return f"{_gb(f.get('peak_rss_bytes'))} ({f['peak_rss_bytes'] / r['weight_bytes']:.2f}x)"

        per_gb = nv["wall_s"] / (r["weight_bytes"] / 1e9) if nv.get("wall_s") else None
        qcell = (f"{cell(q)} | {q.get('wall_s', 0):.0f} | {q.get('parity', q.get('error', '?'))}" if q
                 else "not run (does not fit; docs/export.md) | | -")
        lines.append(f"| {name} | {r['parameters']:,} | {_gb(r['weight_bytes'])} | {cell(ini)} | {cell(nv)} | "
                     f"{nv.get('wall_s', 0):.0f}" + (f" ({per_gb:.0f})" if per_gb else "") + f" | {qcell} | "
                     f"{nv.get('load_avg_1m_before')}, {q.get('load_avg_1m_before', '-')} | "
                     f"{_measured(r)} |")
    return lines + [""]


def export_scaling(rep: dict, path: Path, out: Path) -> list[str]:
    lines = ["## Export cost vs model size (benchmark 5)", "", *_header(rep),
             "Random-init checkpoints of the size presets (docs/model.md; the paper's 3.5b / 9.4b in float16, "
             "made by the streamed `smlp init`), `smlp export --target ort` "
             "in its own process under `/usr/bin/time -v` (peak RSS = its \"Maximum resident set size\"), once "
             "with `--no-validate` (trace + translate + save) and once with `--quick` (then parity against "
             "PyTorch on held-out text). Wall times come from a shared machine (load average before each run "
             "in the last column): compare memory, not seconds. "
             + ("" if rep.get("complete", True) else "**The run did not finish every size.** "), "",
             *_export_scaling_table(rep),
             "Estimated need (`smlp_export.memory.estimate`, what export checks against MemAvailable before "
             "allocating) vs measured:", "",
             "| preset | estimate export GB | measured | estimate export + validate GB | measured |",
             "|---|---:|---:|---:|---:|"]
    for r in rep["rows"]:
        nv, q = r.get("export_no_validate") or {}, r.get("export_quick") or {}
        lines.append(f"| {r['preset']} | {_gb(r['estimate_export_bytes'])} | {_gb(nv.get('peak_rss_bytes'))} | "
                     f"{_gb(r['estimate_export_validate_bytes'])} | {_gb(q.get('peak_rss_bytes'))} |")
    return lines + ["", *_goals(rep), *_img(path, out)]


def profiles(results: Path) -> list[str]:
    """Every saved ``smlp bench --profile --json`` report named profile_*.json: top op types per graph."""
    lines = []
    for path in sorted(results.glob("profile_*.json")):
        rep = json.loads(path.read_text())
        if not rep.get("profiles"):
            continue
        lines += [f"### {path.stem}", "", f"Machine: {_machine(rep['machine'])}.  ",
                  f"Command: `{rep.get('command') or 'smlp bench ... --profile --json ' + path.name}`  ",
                  f"Settings: backends {', '.join(rep['settings']['backends'])}, threads {rep['settings']['threads']}, "
                  f"source {rep['settings']['source']}.", ""]
        for prof in rep["profiles"]:
            lines += [f"{prof['backend']} ({prof['target']}, {prof['dtype']}), B={prof['batch']}, T={prof['seq']}: "
                      f"{prof['kernel_ms_per_run']:.2f} ms of kernels per run (profiler on).", "",
                      "| op type | calls/run | ms/run | % |", "|---|---:|---:|---:|"]
            lines += [f"| {o['name']} | {o['calls']} | {o['total_ms']:.3f} | {o['pct']:.1f} |" for o in prof["by_op_type"][:8]]
            lines.append("")
    return ["## ONNX Runtime profiles (`smlp bench --profile`)", "", *lines] if lines else []


def _flops_line(rep: dict) -> str:
    cfg = rep["config"]
    m = cfg["model"]
    return (f"Model: d={m['d_model']}, f={m['d_ffn']}, f_t={m['d_expert']}, n={m['max_seq_len']}, {m['n_layers']} blocks "
            f"({m['n_sparse']} sparse), {m['n_token_experts']} token / {m['n_spatial_experts']} spatial experts, "
            f"{cfg['params'] / 1e6:.0f}M parameters ({cfg['active_params'] / 1e6:.0f}M active per token). FLOPs per "
            f"token at T={m['max_seq_len']}: {cfg['flops_per_token_T1024'] / 1e6:.1f} M useful (2 x MACs of every "
            f"GEMM, active experts only, causal half of the spatial products; "
            f"{cfg['flops_per_token_T1024_dense_spatial'] / 1e6:.1f} M with the full n x n spatial squares), "
            "from `smlp_export.flops.flops_per_token`.")


def _blocked_line(rep: dict) -> str:
    return ("Blocked-causal spatial products (C = " + str(rep["config"]["block"]) + " rows per block) vs dense, "
            "p50 dense / p50 blocked, side by side: "
            + ", ".join(f"B x T = {k}: {v:.2f}x" for k, v in rep["blocked_speedup"].items()) + ".")


def cpu_real_shapes(rep: dict, path: Path, out: Path) -> list[str]:
    names = list(rep["rows"][0]["backends"])
    lines = ["## CPU performance at real shapes (d=1024, n=1024)", "", *_header(rep), _flops_line(rep), "",
             "Achieved GFLOP/s = useful FLOPs of the forward / p50; % = of the fp32 GEMM rate (torch.mm 1024^3, "
             "same threads) measured in the same case's interleaved rounds. Every graph matched PyTorch eager "
             "(relative logits error " + ", ".join(f"{k}: {v:.1e}" for k, v in rep["parity_rel"].items()) + ").", "",
             "| B | T | GEMM GFLOP/s | " + " | ".join(f"{n} p50 ms (GFLOP/s, %)" for n in names) + " |",
             "|---:|---:|---:|" + "---:|" * len(names)]
    for r in rep["rows"]:
        lines.append(f"| {r['batch']} | {r['seq']} | {r['gemm_gflops']:.0f} | " + " | ".join(
            f"{r['backends'][n]['p50_ms']:.0f} ({r['backends'][n]['gflops']:.0f}, "
            f"{r['backends'][n]['fraction_of_gemm'] * 100:.0f}%)" for n in names) + " |")
    e = rep["config"]["model"]["n_token_experts"]
    notes = ["Notes. Token experts: the FLOPs per token do not depend on E (top-1), but each expert's GEMMs "
             f"get B*T/E rows; this run used E={e} (the command line says why if it differs from 16: the export "
             "path before the low-memory work peaks at ~14x the fp32 weights, too much next to other jobs on a "
             "shared machine). B=8, T=1024 is left out: one eager call is 8192 tokens x ~0.2 GFLOP, ~20 s at one "
             "thread unloaded and minutes under load. The fractions are ratios measured in the same rounds, "
             "but the GEMM rate itself swings with the load (compare it with the machine's unloaded rate), so "
             "read differences under ~10 % as noise."]
    return lines + ["", _blocked_line(rep), "", *notes, "", *_goals(rep), *_img(path, out)]


def _load_table(rep: dict) -> list[str]:
    lines = ["| config | clients | requests | errors | mismatches | p50 ms | p90 ms | p99 ms | requests/s | mean batch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rep["rows"]:
        lines.append(f"| {r['config']} | {r['concurrency']} | {r['requests']} | {r['errors']} | {r['mismatches']} | "
                     f"{r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['throughput_per_s']:.0f} | "
                     f"{r['mean_batch']:.2f} |")
    ratios = rep.get("ratios", {})
    cfg = rep.get("config", {})
    return lines + ["", f"Throughput with batching at {max(cfg.get('concurrency', [0]))} clients: "
                        f"{ratios.get('batching_hi_over_lo', float('nan')):.2f}x its 1-client figure and "
                        f"{ratios.get('batching_on_over_off_at_hi', float('nan')):.2f}x the same load without "
                        "batching (medians of alternating rounds).", ""]


def serving_load(rep: dict, path: Path, out: Path) -> list[str]:
    cfg = rep.get("config", {})
    lines = ["## Serving under load (real local tritonserver, python backend)", "", *_header(rep),
             f"Each client sends held-out requests of mixed lengths ({cfg.get('pool_lengths')}) back to back for "
             f"{cfg.get('duration_s')} s per row; {cfg.get('rounds')} alternating rounds of batching "
             f"(max_batch_size 8, queue delay {cfg.get('queue_delay_us', '?')} us) / no batching, the round with "
             "the median throughput shown. Clients run on the "
             "same machine as the server. Mismatches: responses differing from the export run in-process by more "
             "than the serving bound (docs/deploy.md).", ""]
    return lines + _load_table(rep) + _goals(rep)


def serve_generate(rep: dict, path: Path, out: Path) -> list[str]:
    lines = ["## Streaming generation from Triton (`<name>_generate`)", "", *_header(rep),
             f"{rep.get('max_new_tokens')} new tokens after {rep.get('prompt_len')}-token held-out prompts, greedy; "
             "served tokens are compared with local generation (mismatches).", "",
             "| mode | streams | requests | tokens/s | first token p50 ms | p90 ms | errors | mismatches |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def ms(v):
        return "-" if v is None else f"{v:.1f}"

    for r in rep["rows"]:
        lines.append(f"| {r['mode']} | {r['streams']} | {r['requests']} | {r['tokens_per_s']:.0f} | "
                     f"{ms(r.get('first_token_p50_ms'))} | {ms(r.get('first_token_p90_ms'))} | {r['errors']} | "
                     f"{r['mismatches']} |")
    return lines + [""]


def sequence_step(rep: dict, path: Path, out: Path) -> list[str]:
    m = rep["median_ms"]
    lines = ["## Sequences stepping together (`decode_seq.onnx`)", "", *_header(rep),
             f"One decode step for {rep['batch']} sequences at positions {rep['positions']} "
             f"(median of {rep['rounds']} rounds):", "",
             "| run | median ms |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in m.items()]
    return lines + ["", f"Stepping together: {rep['batched_gain']:.2f}x the tokens/s of {rep['batch']} separate "
                        f"B=1 steps; the per-row graph at B=1 costs {rep['per_row_overhead_b1']:.2f}x the "
                        f"scalar-position graph. Logits max |difference| {rep['logits_max_abs_diff']:.2g}.", ""]


def _quantized_table(rep: dict) -> list[str]:
    cfg, bw = rep["config"], rep["bandwidth"]
    m = cfg["model"]
    lines = [f"Shape: preset `{cfg['preset']}` (d={m['d_model']}, f={m['d_ffn']}, n={m['max_seq_len']}, "
             f"{m['n_layers']} blocks ({m['n_sparse']} sparse), {m['n_token_experts']} token / "
             f"{m['n_spatial_experts']} spatial experts), ort target, {cfg['threads']} thread(s); prefill B=1, "
             f"T={cfg['seq']} (median of {cfg['reps']}); decode: median of {cfg['steps']} single-token steps after a "
             f"64-token prefill. Memory bandwidth measured in the same run (1 thread): read {bw['read_gb_s']:.1f} GB/s, "
             f"copy {bw['copy_gb_s']:.1f} GB/s. Bytes per token: weights a B=1 decode step reads (k/E of the experts, "
             f"one row of each spatial weight). Bound = read bandwidth / bytes per token.", "",
             "| variant | model.onnx MB | bits/weight (quantized part) | prefill p50 ms | decode tok/s B=1 | "
             "decode tok/s B=8 | MB read per token | bound tok/s B=1 | B=1 vs fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = next((r.get("decode_tok_s_b1") for r in rep["rows"] if r["variant"] == "fp32" and r.get("status") == "ok"), None)
    for r in rep["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['variant']} | {r.get('status')}: {r.get('reason', '')} | | | | | | | |")
            continue
        rel = f"{r['decode_tok_s_b1'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['variant']} | {r['model_bytes'] / 1e6:.0f} | {r.get('bits_per_weight') or '-'} | "
                     f"{r['prefill_p50_ms']:.0f} | {r['decode_tok_s_b1']:.1f} | {r['decode_tok_s_b8']:.1f} | "
                     f"{r['bytes_per_token'] / 1e6:.0f} | {r['bound_tok_s_b1']:.1f} | {rel} |")
    return lines + [""]


def quantized(rep: dict, path: Path, out: Path) -> list[str]:
    return ["## Quantized exports (int8 / int4 weight-only)", "", *_header(rep), *_quantized_table(rep), *_goals(rep)]


SECTIONS = {"exported_vs_eager": exported_vs_eager, "experts_scaling": experts_scaling, "moe_layer": moe_layer,
            "cpu_real_shapes": cpu_real_shapes, "export_scaling": export_scaling, "serving_load": serving_load,
            "serve_generate": serve_generate, "sequence_step": sequence_step, "quantized": quantized}


def render(results: Path, out: Path) -> str:
    lines = ["# Benchmarks", "",
             "<!-- Generated by benchmarks/render_readme.py from benchmarks/results/*.json: do not edit by hand. -->", "",
             "Latency figures depend on the machine and its load: each section names both. Re-run the scripts "
             "(`python benchmarks/<name>.py`, `--quick` for a smoke run, `--threads N` to fix the thread count) and "
             "then `python benchmarks/render_readme.py` to refresh this page.", "",
             "Time your own checkpoint or export: `smlp bench CKPT|OUT --backends torch,torch-compile,ort,ort-portable "
             "--batch 1,8 --seq 64,128 --json bench.json --plot bench.png`. Add `--profile` to print where ONNX Runtime "
             "spends its time (its profiler, summed per op type and per node), e.g. to diagnose a slow export.", "",
             "Method: warm-up runs, then timed runs until both a minimum count and a minimum time are reached; p50/p90/p99 "
             "of the individual runs; spread = (p90 - p10) / p50; tokens/s = B*T / p50; inputs are held-out text. "
             "A spread above ~30% or a load average above the core count means the figure is noisy.", ""]
    for name, fn in SECTIONS.items():
        path = results / f"{name}.json"
        if not path.exists():
            lines += [f"## {name}", "", f"No results yet: run `python benchmarks/{name}.py`.", ""]
            continue
        lines += fn(json.loads(path.read_text()), path, out)
    lines += profiles(results)
    return "\n".join(lines).rstrip() + "\n"


README_BEGIN = "<!-- BENCHMARKS:BEGIN (generated by benchmarks/render_readme.py; do not edit by hand) -->"
README_END = "<!-- BENCHMARKS:END -->"
README_SECTIONS = {"exported_vs_eager": "Exported vs eager", "experts_scaling": "Cost vs number of experts",
                   "moe_layer": "MoE layer alone", "decode_latency": "Incremental decoding",
                   "gpu_kernels": "GPU kernels", "cpu_real_shapes": "CPU at real shapes (d=1024, n=1024)",
                   "export_scaling": "Export cost vs model size", "serving_load": "Serving under load (Triton)",
                   "quantized": "Quantized exports (int8 / int4 weight-only)"}


def readme_summary(results: Path, readme: Path) -> list[str]:
    """The README's benchmark section: every goal of every result file, with its machine and command,
    plus benchmark 1's ratio table and plot. Full tables: docs/benchmarks.md."""
    lines = [README_BEGIN, ""]
    for name, title in README_SECTIONS.items():
        path = results / f"{name}.json"
        if not path.exists():
            continue
        rep = json.loads(path.read_text())
        lines += [f"**{title}** (`python {rep.get('command', name)}`" + (", --quick" if rep.get("quick") else "")
                  + f"; {_machine(rep['machine']) if 'machine' in rep else 'machine not recorded'})", ""]
        if name == "exported_vs_eager":
            lines += [ln for ln in exported_vs_eager(rep, path, readme)
                      if ln.startswith("| B |") or ln.startswith("|---:|---:|---:|---:|---:|")
                      or (ln.startswith("| ") and ln.count("|") == 6 and not ln.startswith("| backend"))]
            lines.append("")
        if name == "cpu_real_shapes":
            lines += [_flops_line(rep), "", _blocked_line(rep), ""]
        if name == "export_scaling":
            lines += _export_scaling_table(rep)
        if name == "serving_load":
            lines += _load_table(rep)
        if name == "quantized":
            lines += _quantized_table(rep)
        lines += _goals(rep) or ["(no goals recorded)", ""]
        if name == "export_scaling":
            lines += _img(path, readme)
        if name == "exported_vs_eager":
            lines += _loop_formulation(rep)
            lines += _img(path, readme)
    return lines + ["Full tables, profiles and plots: [docs/benchmarks.md](docs/benchmarks.md).", "", README_END]


def _loop_formulation(rep: dict) -> list[str]:
    """The same two goals for the `portable` target (default-domain ops, sort + Loop token MoE),
    computed from the same rows."""
    p50 = {(r["backend"], r["batch"], r["seq"]): r["p50_ms"] for r in rep["rows"] if r.get("status") == "ok"}
    cases = sorted({(b, t) for (_, b, t) in p50})
    eager = [p50[("ort-portable", b, t)] / p50[("torch", b, t)] for b, t in cases
             if b == 1 and ("ort-portable", b, t) in p50 and ("torch", b, t) in p50]
    comp = [p50[("ort-portable", b, t)] / p50[("torch-compile", b, t)] for b, t in cases
            if ("ort-portable", b, t) in p50 and ("torch-compile", b, t) in p50]
    if not eager or not comp:
        return []
    return [f"- Same goals for the `portable` target (default-domain ops, sort + Loop token MoE): "
            f"p50 / eager at B=1 (worst T) {max(eager):.2f}, p50 / torch.compile (worst case) {max(comp):.2f}.", ""]


def splice_readme(readme: Path, section: list[str]) -> str | None:
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return None
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    return head + "\n".join(section) + tail


DEPLOY_BEGIN = "<!-- LOAD:BEGIN (generated by benchmarks/render_readme.py from benchmarks/results/serving_load.json) -->"
DEPLOY_END = "<!-- LOAD:END -->"


def splice_deploy(doc: Path, results: Path) -> str | None:
    """docs/deploy.md's load table, between its markers."""
    path = results / "serving_load.json"
    if not path.exists() or not doc.exists():
        return None
    text = doc.read_text()
    if DEPLOY_BEGIN not in text or DEPLOY_END not in text:
        return None
    rep = json.loads(path.read_text())
    section = [DEPLOY_BEGIN, "", *_header(rep), *_load_table(rep), *_goals(rep), DEPLOY_END]
    head, rest = text.split(DEPLOY_BEGIN, 1)
    return head + "\n".join(section) + rest.split(DEPLOY_END, 1)[1]


SERVING_BEGIN, SERVING_END = "<!-- SERVING:BEGIN -->", "<!-- SERVING:END -->"


def splice_serving_ratio(text: str, results: Path) -> str | None:
    """The README's inline figure: throughput at the most clients / at 1 client, with batching."""
    path = results / "serving_load.json"
    if SERVING_BEGIN not in text or not path.exists():
        return None
    rep = json.loads(path.read_text())
    value = f"{rep['ratios']['batching_hi_over_lo']:.2f}x" + (" (--quick run)" if rep.get("quick") else "")
    head, rest = text.split(SERVING_BEGIN, 1)
    return head + SERVING_BEGIN + value + SERVING_END + rest.split(SERVING_END, 1)[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from smlp_export.bench.report import atomic_write

    text = render(args.results, args.out)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {args.out}")
    readme = ROOT / "README.md"
    new = splice_readme(readme, readme_summary(args.results, readme)) if readme.exists() else None
    ratio = splice_serving_ratio(new if new is not None else readme.read_text(), args.results) \
        if readme.exists() else None
    new = ratio if ratio is not None else new
    if new is not None:
        atomic_write(readme, lambda tmp: Path(tmp).write_text(new))
        print(f"updated the benchmark section of {readme}")
    deploy_doc = ROOT / "docs" / "deploy.md"
    new = splice_deploy(deploy_doc, args.results)
    if new is not None:
        atomic_write(deploy_doc, lambda tmp: Path(tmp).write_text(new))
        print(f"updated the load table of {deploy_doc}")


if __name__ == "__main__":
    main()
