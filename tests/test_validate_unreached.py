"""Experts no validation input reaches are verified by driving them directly (issue 21): an honest
export passes and says how each was checked; a corrupted unreached expert still fails."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from smlp_export import save_checkpoint
from smlp_export.export.pipeline import export_model
from smlp_export.validate import run_validation
from smlp_export.validate.unreached import hidden_states

from .conftest import micro_model, rehash_manifest

DEAD = 2  # the expert of blocks.1.tmoe no text reaches


def _dead_expert_model():
    """Every token's state at block 1 has x . u ~ 0.5 (a shared embedding offset), and expert DEAD's
    centroid is expert 0's minus 40 u: it loses to expert 0 on every real input."""
    m = micro_model(seed=3)
    u = torch.randn(m.config.d_model, generator=torch.Generator().manual_seed(0))
    u /= u.norm()
    with torch.no_grad():
        m.embed.weight += 0.5 * u
        c = m.blocks[1].tmoe.centroids
        c[DEAD] = c[0] - 40 * u
    return m


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    d = tmp_path_factory.mktemp("unreached")
    save_checkpoint(_dead_expert_model(), d / "ck")
    export_model(str(d / "ck"), d / "out", target="ort", validate=False)
    return d / "out"


@pytest.mark.slow
def test_unreached_expert_is_verified_and_a_corrupted_one_fails(export, tmp_path) -> None:
    report = run_validation(export, "ort", quick=True, write=False)
    missing = report.coverage["experts"]["missing"]
    assert DEAD in missing["blocks.1.tmoe"]  # the premise: no held-out or synthetic text reaches it
    assert report.passed, report.failures
    rec = report.coverage["unreached"]["blocks.1.tmoe"][str(DEAD)]
    assert rec["ok"] and rec["method"].startswith("synthetic hidden states")
    assert [c["tokens"] for c in rec["cases"]] == [4, 16] and all(c["routed_to_expert"] for c in rec["cases"])
    cov = next(c for c in report.checks if c["name"] == "expert_coverage")
    assert "verified directly" in cov["value"] and cov["ok"]

    bad = tmp_path / "bad"
    shutil.copytree(export, bad)
    (tmp_path / "ck").symlink_to(export.parent / "ck")  # the manifest records "../ck"
    m = onnx.load(str(bad / "model.onnx"))
    w1 = next(t for t in m.graph.initializer if t.name == "model.blocks.1.tmoe.w1")
    a = numpy_helper.to_array(w1).copy()
    a[DEAD] *= 1.5  # an exporter bug confined to the expert nothing routes to
    w1.CopyFrom(numpy_helper.from_array(a, w1.name))
    onnx.save(m, str(bad / "model.onnx"))
    rehash_manifest(bad)
    report = run_validation(bad, "ort", quick=True, write=False)
    assert DEAD in report.coverage["experts"]["missing"]["blocks.1.tmoe"]
    assert not report.passed
    assert not report.coverage["unreached"]["blocks.1.tmoe"][str(DEAD)]["ok"]
    assert any(f.startswith("expert_coverage") and "'blocks.1.tmoe': [2]" in f for f in report.failures), \
        report.failures
    # only the verification saw it: every routed comparison passed
    assert all(c["ok"] for c in report.checks if "coverage" not in c["name"]), report.checks


def test_hidden_states_route_to_the_expert() -> None:
    rng = np.random.default_rng(0)
    C = rng.standard_normal((8, 32)).astype(np.float32) * 0.02
    for e in range(8):
        x = hidden_states(C, e, 5)
        assert x is not None and (np.argmax(x @ C.T, axis=1) == e).all()
    # more experts than dimensions, one inside the others' hull: cannot be singled out
    C2 = np.concatenate([np.eye(2), -np.eye(2), np.zeros((1, 2))]).astype(np.float32)
    assert hidden_states(C2, 4, 3) is None
