"""`smlp init` / `inspect` / `train` through the real entry point (one-line errors, exit codes)."""
from __future__ import annotations

import json

import pytest

from smlp_cli.main import main


def run(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_init_then_inspect_json(tmp_path, capsys):
    d = tmp_path / "c"
    code, out, err = run(capsys, "init", "--preset", "micro", "--set", "n_token_experts=6",
                         "--set", "token_routing=topk", "--set", "top_k=2", "-o", str(d))
    assert code == 0 and "parameters" in out
    code, out, _ = run(capsys, "inspect", str(d), "--json", "--windows", "2")
    info = json.loads(out)
    assert code == 0
    assert info["config"]["n_token_experts"] == 6 and info["config"]["top_k"] == 2
    assert info["parameters"]["active_per_token"] < info["parameters"]["total"]
    assert [b["kind"] for b in info["blocks"]] == ["dense", "sparse", "sparse"]
    loads = info["heldout_eval"]["expert_load"]
    assert set(loads) == {"blocks.1.tmoe", "blocks.2.tmoe"} and all(abs(sum(v) - 1) < 1e-3 for v in loads.values())


@pytest.mark.parametrize("argv, message", [
    (["init", "--preset", "micro", "--set", "n_spatial_experts=5", "-o", "{tmp}/x"], "not divisible by n_spatial_experts = 5"),
    (["init", "--preset", "huge", "-o", "{tmp}/x"], "unknown preset 'huge'"),
    (["init", "--preset", "micro", "--set", "nonsense", "-o", "{tmp}/x"], "--set expects key=value"),
    (["init", "--preset", "micro", "--set", "colour=1", "-o", "{tmp}/x"], "unexpected keyword|unknown field|colour"),
    (["inspect", "{tmp}/missing"], "does not exist"),
    (["train", "--preset", "micro", "--corpus", "{tmp}/nope", "--steps", "1", "-o", "{tmp}/t"], "corpus .* does not exist"),
])
def test_one_line_errors(tmp_path, capsys, argv, message):
    import re

    code, _, err = run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), err
    assert not (tmp_path / "x").exists() and not (tmp_path / "t").exists()


def test_train_on_a_text_file(tmp_path, capsys):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 200)
    code, out, _ = run(capsys, "train", "--preset", "micro", "--corpus", str(corpus), "--steps", "4",
                       "--batch-size", "2", "--eval-every", "2", "--threads", "1", "-o", str(tmp_path / "t"))
    assert code == 0
    assert json.loads(out)["steps"] == 4
