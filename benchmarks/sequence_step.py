"""What stepping many sequences together buys: decode_seq.onnx at B rows (each at its own position)
vs decode.onnx run once per sequence (B = 1), as a sequence batcher would otherwise have to.

For one checkpoint (default: the embedded model) this exports decode.onnx + decode_seq.onnx (ort
target) into a temp dir, fills the spatial states of B held-out sequences at B different positions
(spread over the window), and times one decode step (one new token per sequence) with:

- ``decode-x{B}``: decode.onnx called B times, one sequence each (scalar position);
- ``seq-B{B}``: decode_seq.onnx called once on all B rows, each at its own position (what
  ``<name>_sequence`` runs when Triton's sequence batcher hands it B sequences);
- ``decode-B1`` / ``seq-B1``: one sequence, either graph (the cost of the per-row form).

Both graphs run through ``session.run`` (ONNX Runtime allocates the state outputs, as Triton's
backend does), methods interleaved round by round, median over rounds. Before timing, the logits of
``seq-B{B}`` are checked against the B separate decode.onnx steps. Nothing is asserted about speed.
"""
from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from smlp_export.artifacts import DECODE_FILE, SEQ_FILE  # noqa: E402


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint dir (default: the embedded model)")
    p.add_argument("--batch", type=int, default=8, help="sequences stepped together")
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    threads = _common.setup_threads(args.threads)
    import numpy as np

    from smlp_export import load_checkpoint
    from smlp_export.bench.machine import describe_machine
    from smlp_export.data import corpus_source_of, heldout_windows
    from smlp_export.decode.export import export_decode_graph
    from smlp_export.decode.sequence_export import export_sequence_graph
    from smlp_export.runners.ort_session import create_session

    model = load_checkpoint(args.checkpoint)
    cfg = model.config
    n, B = cfg.max_seq_len, args.batch
    rounds = 5 if args.quick else args.rounds
    tmp = Path(tempfile.mkdtemp(prefix="seq-bench-"))
    try:
        export_decode_graph(model, tmp / DECODE_FILE, target="ort")
        export_sequence_graph(model, tmp / SEQ_FILE, target="ort")
        dec = create_session(tmp / DECODE_FILE, intra_op_threads=threads)
        seq = create_session(tmp / SEQ_FILE, intra_op_threads=threads)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    names = [i.name for i in dec.get_inputs()][2:]
    ids = heldout_windows(B, n, source=corpus_source_of(model), offset=3).numpy()
    positions = np.linspace(max(8, cfg.prefix_len), n - 1, B).astype(np.int64)  # B different positions
    # states of each sequence: prefill its whole window once (a step at t rewrites row t identically)
    states = []
    for b in range(B):
        out = dec.run(None, {"input_ids": ids[b:b + 1], "position": np.array(0, np.int64),
                             **{k: np.zeros((1, n, cfg.spatial_channels), np.float32) for k in names}})
        states.append(out[1:])
    batch_states = {k: np.concatenate([states[b][i] for b in range(B)]) for i, k in enumerate(names)}
    tok = np.stack([ids[b, positions[b]:positions[b] + 1] for b in range(B)])

    def decode_each(rows: range) -> list:
        return [dec.run(["logits"], {"input_ids": tok[b:b + 1], "position": np.array(positions[b], np.int64),
                                     **{k: states[b][i] for i, k in enumerate(names)}})[0] for b in rows]

    def seq_rows(rows: slice):
        return seq.run(["logits"], {"input_ids": tok[rows], "position": positions[rows, None],
                                    "START": np.zeros((len(positions[rows]), 1), np.int32),
                                    **{k: v[rows] for k, v in batch_states.items()}})[0]

    ref = np.concatenate(decode_each(range(B)))
    err = float(np.abs(seq_rows(slice(0, B)) - ref).max())
    print(f"seq-B{B} logits vs {B} decode.onnx steps: max |diff| {err:.2e}")
    methods = {f"decode-x{B}": lambda: decode_each(range(B)), f"seq-B{B}": lambda: seq_rows(slice(0, B)),
               "decode-B1": lambda: decode_each(range(1)), "seq-B1": lambda: seq_rows(slice(0, 1))}
    times: dict[str, list[float]] = {k: [] for k in methods}
    for fn in methods.values():  # warm-up
        fn()
    for _ in range(rounds):
        for k, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:>12}: {v:8.3f} ms per step")
    gain = med[f"decode-x{B}"] / med[f"seq-B{B}"]
    print(f"tokens/s gain of one batched step over {B} separate steps: {gain:.2f}x; "
          f"per-row form at B=1: {med['seq-B1'] / med['decode-B1']:.2f}x the scalar graph's time")
    _common.save("sequence_step", args, {
        "model": {"max_seq_len": n, "blocks": len(model.blocks), "spatial_channels": cfg.spatial_channels},
        "batch": B, "positions": positions.tolist(), "rounds": rounds, "threads": threads,
        "logits_max_abs_diff": err, "median_ms": med, "batched_gain": gain,
        "per_row_overhead_b1": med["seq-B1"] / med["decode-B1"]}, describe_machine())


if __name__ == "__main__":
    main()
