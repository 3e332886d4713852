"""Per-token latency vs position: incremental decoding with the spatial-state cache vs full recompute.

For one checkpoint (default: the embedded model) this exports model.onnx + decode.onnx (ONNX
Runtime target) into a temp dir and times, at B = 1, the cost of producing ONE next token at
position t for each t in --positions, with:

- ``ort-decode``: decode.onnx, one new token, IO-bound states updated in place (what
  ``smlp generate --backend ort`` runs);
- ``ort-decode-copy``: the same graph with ORT allocating fresh state outputs every step;
- ``ort-full``: model.onnx on the whole prefix ``ids[:, :t + 1]`` (full recompute);
- ``torch-decode`` / ``torch-full``: the same two strategies in PyTorch eager.

How a step at position t is timed: the states are filled once by prefilling the whole held-out
window; a step at t rewrites state row t with the value it already had (same token, same prefix),
so any position can be timed in any order and every call does exactly the work of a real decode
step at t. Methods and positions are interleaved round by round (one call each per round) and
the median over rounds is reported, so load drift on a shared machine hits all of them alike.

Goals (issue 5), reported as met / missed, never asserted:
- ort-decode latency at position max_seq_len - 1 <= 1.5 x at position 8;
- tokens/s of ort-decode >= 5 x ort-full at position max_seq_len / 2 (B = 1, CPU).
"""
from __future__ import annotations

import atexit
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from smlp_export.artifacts import MODEL_FILE  # noqa: E402


def scatter_inplace_check(threads: int, rows: int = 2048, channels: int = 2048) -> dict:
    """What ONNX Runtime does with a state output bound to its input buffer: a one-node ScatterND
    graph writing one row of a [1, rows, channels] float32 state (16 MiB by default), timed with
    the output bound to the input's OrtValue ("inplace") and bound to "cpu" ("copy")."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from smlp_export.runners.ort_session import create_session

    g = helper.make_graph(
        [helper.make_node("ScatterND", ["state", "idx", "upd"], ["new_state"])], "scatter",
        [helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, rows, channels]),
         helper.make_tensor_value_info("idx", TensorProto.INT64, [1, 1, 2]),
         helper.make_tensor_value_info("upd", TensorProto.FLOAT, [1, 1, channels])],
        [helper.make_tensor_value_info("new_state", TensorProto.FLOAT, [1, rows, channels])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    sess = create_session(m.SerializeToString(), intra_op_threads=threads)
    buf = np.zeros((1, rows, channels), np.float32)
    ov = ort.OrtValue.ortvalue_from_numpy(buf)
    out: dict = {"state_mib": buf.nbytes / 2**20}
    for mode in ("inplace", "copy"):
        b = sess.io_binding()
        b.bind_ortvalue_input("state", ov)
        b.bind_cpu_input("idx", np.array([[[0, 5]]], np.int64))
        b.bind_cpu_input("upd", np.full((1, 1, channels), 1.0 if mode == "inplace" else 2.0, np.float32))
        if mode == "inplace":
            b.bind_ortvalue_output("new_state", ov)
        else:
            b.bind_output("new_state", "cpu")
        ts = []
        for _ in range(15):
            t0 = time.perf_counter_ns()
            sess.run_with_iobinding(b)
            ts.append((time.perf_counter_ns() - t0) / 1e6)
        res = b.get_outputs()[0]
        out[mode] = {"median_ms": statistics.median(ts), "output_is_input_buffer": res.data_ptr() == buf.ctypes.data,
                     "input_buffer_row_written": float(buf[0, 5, 0])}
    print(f"ScatterND on a {out['state_mib']:.0f} MiB state: in place {out['inplace']['median_ms']:.3f} ms "
          f"(output is the input buffer: {out['inplace']['output_is_input_buffer']}), "
          f"copy {out['copy']['median_ms']:.3f} ms")
    return out


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint dir (default: the embedded model)")
    p.add_argument("--positions", default=None, help="comma-separated positions (default: 8 .. max_seq_len-1)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per (method, position) (default 20, quick 5)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch methods")
    p.add_argument("--block", type=int, default=8, help="consecutive calls per (method, position) per round; "
                   "the first is reported as cold, the rest as warm (default 8)")
    args = p.parse_args()
    threads = _common.setup_threads(args.threads)

    import numpy as np
    import torch

    from smlp_export import load_checkpoint
    from smlp_export.bench.machine import describe_machine
    from smlp_export.data import corpus_source_of, heldout_windows
    from smlp_export.decode.runtime import OrtDecoder, OrtGenerator, TorchGenerator
    from smlp_export.decode.state import init_states, step
    from smlp_export.export.pipeline import export_model
    from smlp_export.runners.ort_session import create_session

    model = load_checkpoint(args.checkpoint)
    cfg = model.config
    n = cfg.max_seq_len
    positions = [int(x) for x in args.positions.split(",")] if args.positions else \
        sorted({8, n // 4, n // 2, 3 * n // 4, n - 1})
    if any(not max(8, cfg.prefix_len) <= t < n for t in positions):
        sys.exit(f"positions must be in [{max(8, cfg.prefix_len)}, {n - 1}]")
    rounds = args.rounds or (5 if args.quick else 20)
    ids = heldout_windows(1, n, source=corpus_source_of(model)).numpy()

    tmp = Path(tempfile.mkdtemp(prefix="decode-bench-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    print(f"exporting to {tmp} ...", flush=True)
    export_model(model, tmp / "out", target="ort", validate=False, decode=True, force=True)
    out = tmp / "out"

    full_sess = create_session(out / MODEL_FILE, intra_op_threads=threads)
    dec = OrtDecoder(out, threads=threads)
    dec.bind(1)
    dec.step_bound(ids, 0)  # fill every state row once (see module docstring)
    dec_copy = OrtDecoder(out, threads=threads)
    dec_copy.bind(1, in_place=False)
    dec_copy.step_bound(ids, 0)
    with torch.no_grad():
        _, t_states = step(model, torch.from_numpy(ids), 0, init_states(model, 1))
    tids = torch.from_numpy(ids)

    def ort_decode(t: int):
        return dec.step_bound(ids[:, t:t + 1], t)

    def ort_decode_copy(t: int):
        return dec_copy.step_bound(ids[:, t:t + 1], t)

    def ort_full(t: int):
        return full_sess.run(["logits"], {"input_ids": ids[:, :t + 1]})[0][:, -1:]

    def torch_decode(t: int):
        return step(model, tids[:, t:t + 1], t, t_states)[0]

    def torch_full(t: int):
        with torch.no_grad():
            return model(tids[:, :t + 1])[:, -1:]

    methods = {"ort-decode": ort_decode, "ort-decode-copy": ort_decode_copy, "ort-full": ort_full}
    if not args.no_torch:
        methods.update({"torch-decode": torch_decode, "torch-full": torch_full})

    # Sanity before timing: every method's next-token logits at each position agree.
    for t in positions:
        ref = torch_full(t).float().numpy()
        for name, fn in methods.items():
            got = np.asarray(fn(t), dtype=np.float32).reshape(ref.shape)
            err = float(np.abs(got - ref).max())
            if err > 1e-4 * max(1.0, float(np.abs(ref).max())):
                sys.exit(f"{name} at position {t} disagrees with torch-full by {err:.3g}: not timing a wrong answer")

    # Each round runs a block of `block` consecutive calls per (method, position): the first call
    # of a block runs with caches cold (the previous method's weights were just used) and is kept
    # apart as "cold"; the others are "warm", the state of a generation loop stepping one method.
    samples: dict[tuple[str, int], list[float]] = {(m, t): [] for m in methods for t in positions}
    cold: dict[tuple[str, int], list[float]] = {(m, t): [] for m in methods for t in positions}
    block = args.block
    for _ in range(2):  # warm-up round
        for t in positions:
            for fn in methods.values():
                fn(t)
    for r in range(rounds):
        for t in positions:
            for name, fn in methods.items():
                for i in range(block):
                    t0 = time.perf_counter_ns()
                    fn(t)
                    (cold if i == 0 else samples)[(name, t)].append((time.perf_counter_ns() - t0) / 1e6)
        if r % 10 == 9:
            print(f"  round {r + 1}/{rounds}", flush=True)

    rows = []
    for (name, t), v in samples.items():
        v = sorted(v)
        med = statistics.median(v)
        rows.append({"method": name, "position": t, "median_ms": med, "p10_ms": v[len(v) // 10],
                     "p90_ms": v[(9 * len(v)) // 10], "runs": len(v), "tokens_per_s": 1e3 / med,
                     "cold_median_ms": statistics.median(cold[(name, t)])})
    med = {(r["method"], r["position"]): r["median_ms"] for r in rows}
    cold_med = {(r["method"], r["position"]): r["cold_median_ms"] for r in rows}

    names = list(methods)
    for title, table in (("warm", med), ("cold: first call of each block", cold_med)):
        print(f"\nper-token latency, {title} (median ms, B=1, {threads} thread(s)); rows: position")
        print("position " + " ".join(f"{m:>16}" for m in names))
        for t in positions:
            print(f"{t:>8} " + " ".join(f"{table[(m, t)]:>16.3f}" for m in names))

    half = min(positions, key=lambda t: abs(t - n // 2))
    goals = [
        _common.goal_line(f"ort-decode latency at position {max(positions)} / at position {min(positions)}",
                          med[("ort-decode", max(positions))] / med[("ort-decode", min(positions))], 1.5, "<="),
        _common.goal_line(f"ort-decode tokens/s / ort-full tokens/s at position {half}",
                          med[("ort-full", half)] / med[("ort-decode", half)], 5.0, ">="),
    ]
    extra = {"inplace_vs_copy_at_half": med[("ort-decode-copy", half)] / med[("ort-decode", half)],
             "cold_ort_full_over_ort_decode_at_half": cold_med[("ort-full", half)] / cold_med[("ort-decode", half)],
             "cold_ort_decode_last_over_first": cold_med[("ort-decode", max(positions))] / cold_med[("ort-decode", min(positions))]}
    if not args.no_torch:
        extra["torch_decode_speedup_at_half"] = med[("torch-full", half)] / med[("torch-decode", half)]
        extra["torch_decode_latency_ratio_last_vs_first"] = med[("torch-decode", max(positions))] / med[("torch-decode", min(positions))]
    print("other ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in extra.items()))

    # End to end: greedy generation from an 8-token prompt to the end of the window, as the CLI runs it.
    e2e = {}
    gens = {"ort": OrtGenerator(out, threads=threads)}
    if not args.no_torch:
        gens["torch"] = TorchGenerator(model)
    for name, g in gens.items():
        g.generate(ids[:, :8], 4, stop_on_eos=False)
        res = g.generate(ids[:, :8], n - 8, stop_on_eos=False)
        e2e[name] = {"new_tokens": res.n_new, "tokens_per_s": res.tokens_per_s,
                     "decode_tokens_per_s": res.decode_tokens_per_s, "stop_reason": res.stop_reason}
        print(f"generate [{name}]: {res.n_new} tokens at {res.tokens_per_s:.1f} tokens/s "
              f"(decode steps {res.decode_tokens_per_s:.1f} tokens/s)")

    payload = {
        "checkpoint": model.checkpoint_info.get("path") if hasattr(model, "checkpoint_info") else None,
        "weights_sha256": model.checkpoint_info.get("weights_sha256") if hasattr(model, "checkpoint_info") else None,
        "config": {"max_seq_len": n, "d_model": cfg.d_model, "n_layers": cfg.n_layers, "d_ffn": cfg.d_ffn},
        "settings": {"threads": threads, "rounds": rounds, "block": block, "positions": positions, "batch": 1,
                     "timing": "interleaved rounds; per round `block` consecutive calls per (method, position); "
                               "median of the warm calls (all but the first of each block); cold = first calls"},
        "state_update": scatter_inplace_check(threads),
        "rows": rows, "goals": goals, "ratios": extra, "generate": e2e,
    }
    machine = describe_machine()
    path = _common.save("decode_latency", args, payload, machine)
    if not args.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for m in names:
            ax.plot(positions, [med[(m, t)] for t in positions], marker="o", label=m)
        ax.set_xlabel("position of the new token")
        ax.set_ylabel("ms per token (median, B=1)")
        ax.set_yscale("log")
        ax.set_title(f"decode vs full recompute, {threads} thread(s), load {machine.get('load_avg_1_5_15m')}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=110)
        print(f"wrote {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
