"""``smlp generate``: text from a checkpoint (PyTorch), an export's decode.onnx (ONNX Runtime), or a
Triton server's ``<name>_generate`` model (``--server``)."""
from __future__ import annotations

import click

from .options import FiniteFloat, allow_pickle_option, json_flag, seed_option


@click.command("generate")
@click.argument("source", required=False, default=None, metavar="[CKPT|OUT]")
@click.option("--backend", type=click.Choice(["auto", "torch", "ort", "torch-full"]), default="auto", show_default=True,
              help="auto: an export made with `smlp export --decode` runs its exported decode graph on ONNX "
                   "Runtime, anything else (a checkpoint, an export without a decode graph) PyTorch; "
                   "torch: PyTorch with the spatial-state cache on a checkpoint (default: the embedded model; "
                   "an export: its checkpoint); ort: ONNX Runtime on an export's decode.onnx; "
                   "torch-full: PyTorch recomputing the whole prefix every token (slow reference). "
                   "The last line says which runtime generated.")
@click.option("--prompt", required=True, help="Prompt text (UTF-8; byte-level tokens).")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1), help="Tokens to generate at most.")
@click.option("--temperature", default=0.0, show_default=True, type=FiniteFloat(0),
              help="0: greedy; > 0: sample from softmax(logits / T).")
@click.option("--top-k", default=None, type=click.IntRange(1), help="Sample only among the k most likely tokens.")
@seed_option
@click.option("--no-stop-on-eos", "no_eos", is_flag=True, help="Keep generating after the end-of-sequence token.")
@click.option("--threads", default=None, type=click.IntRange(1),
              help="Intra-op threads. Default: ONNX Runtime's own choice for ort; 1 for torch (a decode step "
                   "is many tiny ops, and torch's thread pool made it 14x slower on a busy 2-core machine).")
@click.option("--server", default=None, metavar="HOST:PORT",
              help="Generate on a Triton server (its gRPC address) serving a `smlp deploy --backend python` "
                   "repository, streaming tokens from its <name>_generate model (docs/serving-generate.md).")
@click.option("--model", "served_model", default="smlp_generate", show_default=True,
              help="With --server: the served generate model's name.")
@allow_pickle_option
@json_flag
def generate(source, backend, prompt, max_new_tokens, temperature, top_k, seed, no_eos, threads, server,
             served_model, allow_pickle, as_json) -> None:
    """Generate text after --prompt, streaming tokens as they come, then report tokens/s.

    Stops at the end-of-sequence token, after --max-new-tokens, or when the sequence fills the
    model's max_seq_len (the message says which). A vocabulary without EOS (e.g. converted from
    g-mlp-pytorch) stops only on length.
    """
    import codecs
    import json
    import sys

    import numpy as np

    from smlp_export.decode.runtime import OrtGenerator, TorchFullGenerator, TorchGenerator
    from smlp_export.errors import InputError
    from smlp_export.tokenizer import ByteTokenizer

    # every option is checked before anything heavy runs or anything is printed
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # argv bytes that are not UTF-8 arrive as surrogate escapes
        bad = prompt[e.start]
        what = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"character U+{ord(bad):04X}"
        raise InputError(f"--prompt is not valid UTF-8 ({what} at position {e.start}); "
                         "give the prompt as UTF-8 text") from None
    if not prompt:
        raise InputError("--prompt is empty")
    if server is not None:
        from click.core import ParameterSource

        ctx = click.get_current_context()
        if (source is not None or ctx.get_parameter_source("backend") != ParameterSource.DEFAULT
                or threads is not None or allow_pickle):
            raise click.UsageError("--server generates on the server: [CKPT|OUT], --backend, --threads and "
                                   "--allow-pickle do not apply")
        _generate_on_server(server, served_model, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, seed=seed, stop_on_eos=not no_eos, as_json=as_json)
        return
    backend, note = _resolve_backend(source, backend)
    if note:
        click.echo(note, err=True)
    if backend == "ort":
        if source is None:
            raise click.UsageError("--backend ort needs the export directory OUT (made with `smlp export --decode`)")
        gen = OrtGenerator(source, threads=threads)
        ran = f"ONNX Runtime on the export's {gen.decoder.path.name}"
        lim = gen.limits
        tok = ByteTokenizer(vocab_size=lim.vocab_size, eos_token_id=lim.eos_token_id)  # None: no EOS in the vocabulary
    else:
        import torch

        from smlp_export import load_checkpoint
        from smlp_export.artifacts import is_export_dir
        from smlp_export.model import load_checkpoint_of_export

        torch.set_num_threads(threads or 1)
        if source is not None and is_export_dir(source):  # an export: PyTorch runs its checkpoint
            model, ckpt = load_checkpoint_of_export(source, allow_pickle=allow_pickle)
            click.echo(f"[{backend}] {source} is an export: running its checkpoint {ckpt}", err=True)
            ran = f"PyTorch on the export's checkpoint {ckpt}, not the exported graph"
        else:
            model = load_checkpoint(source, allow_pickle=allow_pickle)
            ran = f"PyTorch on the checkpoint {source or 'default'}"
        gen = TorchGenerator(model) if backend == "torch" else TorchFullGenerator(model)
        tok = model.tokenizer
    ids = tok.encode(prompt)
    if not ids:
        raise InputError("--prompt is empty")
    gen.check_prompt(np.asarray([ids], dtype=np.int64))  # fail before anything is streamed

    gen.warmup()  # keep one-time start-up cost out of the reported tokens/s
    stream = not as_json
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def on_token(i: int, nxt) -> None:
        t = int(nxt[0])
        if stream and t < 256:
            sys.stdout.write(dec.decode(bytes([t])))
            sys.stdout.flush()

    if stream:
        sys.stdout.write(prompt)
        sys.stdout.flush()
    res = gen.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                       stop_on_eos=not no_eos, on_token=on_token)
    new = res.tokens[0]
    if as_json:
        d = res.to_dict()
        d.update(backend=backend, runtime=ran, source=str(source) if source else "default", prompt=prompt, threads=threads,
                 text=tok.decode(new), temperature=temperature, top_k=top_k, seed=seed)
        d["tokens"] = new
        click.echo(json.dumps(d, indent=2))
        return
    sys.stdout.write(dec.decode(b"", final=True) + "\n")
    click.echo(f"[{backend}] {res.n_new} tokens, {res.tokens_per_s:.1f} tokens/s "
               f"(prefill {res.prompt_len} tokens {res.prefill_s * 1e3:.1f} ms, "
               f"decode {res.decode_tokens_per_s:.1f} tokens/s); {res.stop_message}; generated by {ran}", err=True)


def _resolve_backend(source: str | None, backend: str) -> tuple[str, str | None]:
    """--backend auto: an export's decode graph when it has one, else PyTorch (with a note saying why)."""
    if backend != "auto":
        return backend, None
    from smlp_export.artifacts import Manifest, is_export_dir
    from smlp_export.errors import SMLPError

    if source is None or not is_export_dir(source):
        return "torch", None
    try:
        has_decode = bool(Manifest.read(source, required=()).decode)
    except SMLPError:
        has_decode = False  # the torch path names what is wrong with the manifest
    if has_decode:
        return "ort", None
    return "torch", (f"[torch] {source} has no decode graph, so its checkpoint runs on PyTorch: export with "
                     "`smlp export ... --decode` to generate from the exported graph")


def _generate_on_server(server: str, model: str, prompt: str, *, max_new_tokens: int, temperature: float,
                        top_k: int | None, seed: int, stop_on_eos: bool, as_json: bool) -> None:
    """--server: stream from a served generate model; same output as a local run."""
    import codecs
    import json
    import sys
    import time

    from smlp_export.decode.runtime import STOP_MESSAGES
    from smlp_export.deploy.client import served_limits, stream_tokens
    from smlp_export.errors import SMLPError
    from smlp_export.tokenizer import ByteTokenizer

    lim = served_limits(server, model)
    tok = ByteTokenizer(vocab_size=lim.vocab_size, eos_token_id=lim.eos_token_id)
    ids = tok.encode(prompt)
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tokens: list[int] = []
    reason, first_s = "", None
    t0 = time.perf_counter()
    # every option is sent, so the server runs exactly what a local `smlp generate` would
    for t, stop in stream_tokens(server, ids, model=model, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k, seed=seed, stop_on_eos=stop_on_eos):
        if first_s is None:  # the prompt is echoed only once the server accepted the request
            first_s = time.perf_counter() - t0
            if not as_json:
                sys.stdout.write(prompt)
        tokens.append(t)
        reason = stop or reason
        if not as_json and t < 256:
            sys.stdout.write(dec.decode(bytes([t])))
            sys.stdout.flush()
    total = time.perf_counter() - t0
    if reason not in STOP_MESSAGES:
        raise SMLPError(f"{server}: {model}'s stream ended without a stop reason")
    message = STOP_MESSAGES[reason].format(n=lim.max_seq_len)
    if as_json:
        click.echo(json.dumps({"backend": "server", "server": server, "model": model, "prompt": prompt,
                               "prompt_tokens": len(ids), "new_tokens": len(tokens), "tokens": tokens,
                               "text": tok.decode(tokens), "stop_reason": reason, "stop_message": message,
                               "first_token_s": first_s, "total_s": total, "tokens_per_s": len(tokens) / total,
                               "temperature": temperature, "top_k": top_k, "seed": seed}, indent=2))
        return
    sys.stdout.write(dec.decode(b"", final=True) + "\n")
    click.echo(f"[server {server} {model}] {len(tokens)} tokens, {len(tokens) / total:.1f} tokens/s "
               f"(first token after {first_s * 1e3:.1f} ms); {message}", err=True)
