"""The ``<name>_generate`` model of a Triton repository: token streaming on the server.

Written by ``write_triton_repository(..., backend="python")`` for an export with ``decode.onnx``::

    REPO/<name>_generate/config.pbtxt              python backend, decoupled (one response per token)
    REPO/<name>_generate/1/model.py                smlp_export/deploy/triton_generate.py, verbatim
    REPO/<name>_generate/1/smlp_sampling.py        smlp_export/sampling.py, verbatim
    REPO/<name>_generate/1/decode.onnx             the export's decode graph, byte-identical
    REPO/<name>_generate/1/smlp_generate.json      limits from manifest["decode"] + request defaults

Everything the served model needs lies inside its own folder, so the repository runs in a Triton
container without smlp_export. Protocol: docs/serving-generate.md; client: ``deploy.client``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..artifacts import DECODE_FILE, MANIFEST_FILE, export_path
from ..errors import SMLPError
from ..fsutil import copy_file
from . import model_config as mc
from .model_config import write_config

MODEL_SOURCE = Path(__file__).with_name("triton_generate.py")
SAMPLING_SOURCE = Path(__file__).parent.parent / "sampling.py"
SPEC_FILE = "smlp_generate.json"
DEFAULT_MAX_NEW_TOKENS = 64  # as `smlp generate`

# name, Triton type, dims, optional
INPUTS = [("input_ids", "TYPE_INT64", "-1", False),        # the prompt's token ids [T]
          ("max_new_tokens", "TYPE_INT64", "1", True),     # default 64
          ("temperature", "TYPE_FP64", "1", True),         # default 0 (greedy); fp64: the value the local run divides by
          ("top_k", "TYPE_INT64", "1", True),              # default: none
          ("seed", "TYPE_INT64", "1", True),               # default 0
          ("stop_on_eos", "TYPE_BOOL", "1", True)]         # default true
OUTPUTS = [("token_id", "TYPE_INT64", "1"), ("stop_reason", "TYPE_STRING", "1")]


def generate_config(name: str, *, instances: int, kind: str, intra_op_threads: int, max_streams: int,
                    limits: dict[str, Any]) -> Any:
    """Triton ``ModelConfig`` (protobuf) of the streaming model (decoupled transaction policy)."""
    cfg = mc.new_config(name, backend="python", max_batch_size=0)
    cfg.model_transaction_policy.decoupled = True
    for n, t, d, o in INPUTS:
        mc.add_tensor(cfg.input, n, t, [int(d)], **({"optional": True} if o else {}))
    for n, t, d in OUTPUTS:
        mc.add_tensor(cfg.output, n, t, [int(d)])
    mc.add_instances(cfg, instances, kind)
    # vocab_size / eos_token_id / max_seq_len are informational (clients build their tokenizer from them);
    # the model itself reads smlp_generate.json
    mc.set_parameters(cfg, {"intra_op_thread_count": intra_op_threads, "max_streams": max_streams,
                            "vocab_size": limits["vocab_size"], "max_seq_len": limits["max_seq_len"],
                            "eos_token_id": "" if limits["eos_token_id"] is None else limits["eos_token_id"]})
    return cfg


def generate_spec(section: dict[str, Any]) -> dict[str, Any]:
    """smlp_generate.json from manifest["decode"]: what the served model checks and runs."""
    try:
        spec = {"file": DECODE_FILE,
                "vocab_size": int(section["vocab_size"]), "max_seq_len": int(section["max_seq_len"]),
                "eos_token_id": None if section.get("eos_token_id") is None else int(section["eos_token_id"]),
                "min_prompt_tokens": int(section.get("min_prompt_tokens", 1)),
                "state_inputs": list(section["inputs"]["states"]),
                "state_outputs": list(section["outputs"]["states"]),
                "state_shape": [1, int(section["state_shape"][1]), int(section["state_shape"][2])],
                "state_dtype": str(section["state_dtype"])}
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise SMLPError(f"{MANIFEST_FILE}: the decode section is incomplete ({type(e).__name__}: {e})") from None
    spec["defaults"] = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "temperature": 0.0, "top_k": None, "seed": 0,
                        "stop_on_eos": True}
    return spec


def write_generate_model(export_dir: Path, model_dir: Path, manifest: dict[str, Any], digest: str, *,
                         instances: int, kind: str, intra_op_threads: int, max_streams: int = 8) -> dict[str, Any]:
    """Write ``model_dir`` (inside the caller's temporary repository); returns its record entry."""
    section = manifest.get("decode") or {}
    if not section:
        raise SMLPError(f"{export_dir / MANIFEST_FILE} has no decode section: re-export with `smlp export ... --decode`")
    spec = generate_spec(section)
    version = model_dir / "1"
    version.mkdir(parents=True)
    src = export_path(export_dir, section.get("file", DECODE_FILE))
    copy_file(src, version / DECODE_FILE)
    if section.get("data_file"):  # external weights: the graph names this file, keep its name
        copy_file(export_path(export_dir, section["data_file"]), version / section["data_file"])
    copy_file(MODEL_SOURCE, version / "model.py")
    copy_file(SAMPLING_SOURCE, version / "smlp_sampling.py")
    (version / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    write_config(model_dir, generate_config(
        model_dir.name, instances=instances, kind=kind, intra_op_threads=intra_op_threads,
        max_streams=max_streams, limits=spec))
    return {"name": model_dir.name, "file": src.name, "sha256": digest, "kind": "generate", "max_batch_size": 0,
            "inputs": [{"name": n, "data_type": t, "dims": [int(d)], "optional": o} for n, t, d, o in INPUTS],
            "outputs": [{"name": n, "data_type": t, "dims": [int(d)]} for n, t, d in OUTPUTS]}


def check_generate_model(grpc_url: str, export_dir: str | Path, model: str, *, n_prompts: int = 3,
                         max_new_tokens: int = 16) -> dict[str, Any]:
    """Served generation vs the same export in-process (``OrtGenerator``), token for token.

    ``n_prompts`` held-out prompts, each run greedy and sampled (T 0.8, top-k 40, seed = prompt
    index) through ``model`` on a running server (``grpc_url``, HOST:PORT). Returns ``{"passed",
    "cases": [{prompt_tokens, temperature, top_k, seed, tokens, stop_reason, equal}]}``."""
    from ..data import heldout_windows
    from ..decode.runtime import OrtGenerator
    from .client import generate

    gen = OrtGenerator(export_dir)
    lim = gen.limits
    T = max(lim.min_prompt_tokens, min(16, lim.max_seq_len // 4))
    prompts = heldout_windows(n_prompts, T, offset=11, vocab_size=lim.vocab_size).numpy()
    cases = []
    for i, p in enumerate(prompts):
        for opts in ({"temperature": 0.0, "top_k": None, "seed": 0}, {"temperature": 0.8, "top_k": 40, "seed": i}):
            want = gen.generate(p, max_new_tokens, **opts)
            got, reason = generate(grpc_url, p, model=model, max_new_tokens=max_new_tokens, **opts)
            cases.append({"prompt_tokens": T, **opts, "tokens": len(got), "stop_reason": reason,
                          "equal": got == want.tokens[0] and reason == want.stop_reason})
    return {"passed": all(c["equal"] for c in cases), "cases": cases}
