"""Streaming generation through a local tritonserver (the <name>_generate model) vs in-process ORT.

For one checkpoint (default: the embedded model) this exports model.onnx + decode.onnx (ort target)
and writes a python-backend repository (``smlp deploy --backend python``) into a temp dir, then runs the
same greedy generations (held-out prompts, ``--prompt-len`` tokens, up to ``--max-new-tokens``):

- ``local``: ``OrtGenerator`` in this process, one prompt after another (``smlp generate --backend ort``);
- ``served xN``: N client threads streaming from the server at once over gRPC (``deploy.client``),
  for each N in ``--streams``.

Reported per row: requests, new tokens, wall time, tokens/s over the whole run, median / p90 time to
the first token, and mismatches (served tokens that differ from the local run: must be 0). Client and
server share this machine's cores, so the served figures include the client's cost; nothing is asserted.
"""
from __future__ import annotations

import atexit
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def _served_run(url: str, model: str, prompts, max_new: int, streams: int) -> dict:
    from smlp_export.deploy.client import stream_tokens

    todo = list(range(len(prompts)))
    lock = threading.Lock()
    tokens: list = [None] * len(prompts)
    first: list[float] = []
    errors: list[str] = []

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            try:
                t0, got = time.perf_counter(), []
                for t, _ in stream_tokens(url, prompts[i], model=model, max_new_tokens=max_new, temperature=0.0):
                    if not got:
                        first.append(time.perf_counter() - t0)
                    got.append(t)
                tokens[i] = got
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(str(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall_s": wall, "first": sorted(first), "errors": errors}


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint dir (default: the embedded model)")
    p.add_argument("--streams", default="1,2,4", help="concurrent client streams per served row (default 1,2,4)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per row (default 8, quick 4)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: up to the model's window")
    args = p.parse_args()
    threads = _common.setup_threads(args.threads)

    from smlp_export import load_checkpoint
    from smlp_export.bench.machine import describe_machine
    from smlp_export.data import corpus_source_of, heldout_windows
    from smlp_export.decode.runtime import OrtGenerator
    from smlp_export.deploy import write_triton_repository
    from smlp_export.deploy.server import local_tritonserver
    from smlp_export.export.pipeline import export_model

    model = load_checkpoint(args.checkpoint)
    n = model.config.max_seq_len
    n_prompts = args.prompts or (4 if args.quick else 8)
    max_new = args.max_new_tokens or n - args.prompt_len
    streams = [int(s) for s in args.streams.split(",")]
    prompts = heldout_windows(n_prompts, args.prompt_len, source=corpus_source_of(model)).numpy()

    tmp = Path(tempfile.mkdtemp(prefix="serve-generate-bench-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    print(f"exporting to {tmp} ...", flush=True)
    export_model(model, tmp / "out", target="ort", validate=False, decode=True, force=True)
    write_triton_repository(tmp / "out", tmp / "repo", backend="python", name="smlp", intra_op_threads=threads)

    gen = OrtGenerator(tmp / "out", threads=threads)
    gen.warmup()
    t0 = time.perf_counter()
    local = [gen.generate(pr, max_new).tokens[0] for pr in prompts]
    local_wall = time.perf_counter() - t0
    rows = [{"mode": "local", "streams": 1, "requests": n_prompts, "new_tokens": sum(map(len, local)),
             "wall_s": local_wall, "tokens_per_s": sum(map(len, local)) / local_wall,
             "first_token_p50_ms": None, "first_token_p90_ms": None, "errors": 0, "mismatches": 0}]
    with local_tritonserver(tmp / "repo") as srv:
        _served_run(srv.grpc_url, "smlp_generate", prompts[:1], 4, 1)  # warm-up: sessions, connections
        for s in streams:
            r = _served_run(srv.grpc_url, "smlp_generate", prompts, max_new, s)
            done = [t for t in r["tokens"] if t is not None]
            f = r["first"]
            rows.append({"mode": "served", "streams": s, "requests": n_prompts, "new_tokens": sum(map(len, done)),
                         "wall_s": r["wall_s"], "tokens_per_s": sum(map(len, done)) / r["wall_s"],
                         "first_token_p50_ms": statistics.median(f) * 1e3 if f else None,
                         "first_token_p90_ms": f[(9 * len(f)) // 10] * 1e3 if f else None,
                         "errors": len(r["errors"]),
                         "mismatches": sum(t != want for t, want in zip(r["tokens"], local) if t is not None)})
            print(f"  served x{s}: {rows[-1]['tokens_per_s']:.1f} tokens/s", flush=True)

    print(f"\ngreedy generation, {n_prompts} prompts x {args.prompt_len} tokens, up to {max_new} new "
          f"({threads} intra-op thread(s))")
    print(f"{'mode':>10} {'streams':>7} {'tokens':>6} {'wall_s':>7} {'tok/s':>7} {'ttft_p50':>8} {'ttft_p90':>8} "
          f"{'errors':>6} {'mismatch':>8}")
    for r in rows:
        ms = (lambda v: f"{v:8.1f}" if v is not None else f"{'-':>8}")
        print(f"{r['mode']:>10} {r['streams']:>7} {r['new_tokens']:>6} {r['wall_s']:>7.2f} {r['tokens_per_s']:>7.1f} "
              f"{ms(r['first_token_p50_ms'])} {ms(r['first_token_p90_ms'])} {r['errors']:>6} {r['mismatches']:>8}")
    _common.save("serve_generate", args, {"threads": threads, "prompt_len": args.prompt_len,
                                          "max_new_tokens": max_new, "rows": rows}, describe_machine())


if __name__ == "__main__":
    main()
