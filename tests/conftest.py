from __future__ import annotations

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel module is imported (at collection, by whichever test
# file imports it first): without a GPU the interpreter is the only way to run the kernels, so set
# it here, before any test module, not only in the kernel test files.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from smlp_export import SMLPConfig, SMLPForCausalLM, preset

# Every routing mode the model supports, on the seconds-fast "micro" shape.
ROUTING_MODES = {
    "base-deterministic": {},
    "topk1": {"token_routing": "topk", "top_k": 1},
    "topk2": {"token_routing": "topk", "top_k": 2},
    "partial": {"spatial_routing": "partial"},
    "topk2-partial": {"token_routing": "topk", "top_k": 2, "spatial_routing": "partial"},
}


def micro_model(seed: int = 0, **overrides) -> SMLPForCausalLM:
    torch.manual_seed(seed)
    m = SMLPForCausalLM(preset("micro", **overrides)).eval()
    # Random init leaves routers near ties; scale them up so routing decisions are meaningful.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("centroids") or name.endswith("router"):
                p.mul_(50)
    return m


@pytest.fixture(params=sorted(ROUTING_MODES), ids=sorted(ROUTING_MODES))
def routed_model(request) -> SMLPForCausalLM:
    return micro_model(**ROUTING_MODES[request.param])


@pytest.fixture
def micro_cfg() -> SMLPConfig:
    return preset("micro")


def rehash_manifest(export_dir) -> None:
    """Record the current size and sha256 of every file listed in export_dir/manifest.json.

    For tests that plant an *exporter* bug (a wrong weight written with a consistent manifest):
    validation refuses files whose checksum differs from the manifest, so such a test re-records it.
    """
    import hashlib
    import json
    from pathlib import Path

    man = Path(export_dir) / "manifest.json"
    m = json.loads(man.read_text())
    for f in m["files"]:
        p = Path(export_dir) / f["name"]
        f["bytes"] = p.stat().st_size
        f["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    man.write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")


def mixing_model(seed: int = 0, **overrides) -> SMLPForCausalLM:
    """micro_model whose spatial weights mix tokens strongly: W ~ N(0, 1/n) on every causal row
    (random init is U(-eps/n, eps/n): almost no mixing, so a stale, foreign or corrupted state row
    barely shows in the logits)."""
    m = micro_model(seed, **overrides)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("spatial.weight") or name.endswith("smoe.weight"):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return m


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the real `smlp` entry point."""
    from smlp_cli.main import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
        raise SystemExit(0)
    got = capsys.readouterr()
    return e.value.code, got.out, got.err


def one_error_line(err: str) -> str:
    """The single `error: ...` line a refused command prints (no traceback, nothing else)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]
