"""The served ``<name>_generate`` model (Triton python backend, decoupled) against local generation.

One real tritonserver (nvidia-pytriton's) per module serves the generate models of four micro
exports: ``base`` (strongly mixing spatial weights, max_seq_len 64, so a wrong position or a foreign
state changes the tokens), ``part`` (partial-prediction routing, p = 7), ``eos`` (EOS is the argmax
everywhere) and ``long`` (as base with max_seq_len 512: streams that last long enough to overlap and
to be cancelled mid-way). The oracle is ``OrtGenerator`` on the same export in-process (``smlp generate OUT
--backend ort``).
"""
from __future__ import annotations

import ast
import json
import shutil
import sys
import threading
import time

import numpy as np
import pytest
import torch

from smlp_export import SMLPError, save_checkpoint
from smlp_export.decode.runtime import STOP_EOS, STOP_MAX_NEW, STOP_MAX_SEQ, OrtGenerator
from smlp_export.deploy import write_triton_repository

from .conftest import micro_model, mixing_model



def _eos_model():
    m = micro_model(2)
    with torch.no_grad():  # logits = lm_head(ones): EOS wins everywhere (as in test_decode.test_stop_reasons)
        m.norm_f.weight.zero_()
        m.norm_f.bias.fill_(1.0)
        m.lm_head.weight.zero_()
        m.lm_head.weight[m.config.eos_token_id] = 1.0
    return m


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """name -> (export dir, its repository written by smlp deploy --backend python)."""
    from smlp_export.export.pipeline import export_model

    tmp = tmp_path_factory.mktemp("gen")
    made = {"base": mixing_model(0, max_seq_len=64), "part": mixing_model(1, spatial_routing="partial"),
            "eos": _eos_model(), "long": mixing_model(3, max_seq_len=512)}
    out = {}
    for name, m in made.items():
        ckpt = save_checkpoint(m, tmp / f"{name}-ckpt")
        export_model(str(ckpt), tmp / f"{name}-out", target="ort", validate=False, decode=True)
        write_triton_repository(tmp / f"{name}-out", tmp / f"{name}-repo", backend="python", name=name)
        out[name] = (tmp / f"{name}-out", tmp / f"{name}-repo")
    return out


@pytest.fixture(scope="module")
def served(exports, tmp_path_factory):
    """One server for the module: the four *_generate models in one repository."""
    pytest.importorskip("pytriton", reason="needs the serve extra (nvidia-pytriton) for a local tritonserver")
    from smlp_export.deploy.server import local_tritonserver

    repo = tmp_path_factory.mktemp("served")
    for name, (_, r) in exports.items():
        shutil.copytree(r / f"{name}_generate", repo / f"{name}_generate")
    with local_tritonserver(repo) as srv:
        yield srv


@pytest.fixture(scope="module")
def server(served):
    return served.grpc_url


@pytest.fixture(scope="module")
def local(exports):
    return {name: OrtGenerator(d) for name, (d, _) in exports.items()}


def _served(url, name, prompt, **kw):
    from smlp_export.deploy.client import generate

    return generate(url, prompt, model=f"{name}_generate", **kw)


def _local(gen, prompt, max_new_tokens=64, **kw):
    r = gen.generate(prompt, max_new_tokens, **kw)
    return r.tokens[0], r.stop_reason


def _prompt(T, seed=0):
    return np.random.default_rng(seed).integers(0, 256, T).tolist()


# ---- the repository (no server) ------------------------------------------------------------------
ALLOWED_IMPORTS = {"numpy", "onnxruntime", "triton_python_backend_utils", "__future__"} | set(sys.stdlib_module_names)


def _imports(path):
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            mods.add(node.module.split(".")[0])
    return mods


def test_generate_model_is_self_contained(exports):
    from smlp_export import sampling
    from smlp_export.deploy.generate_model import MODEL_SOURCE  # the model.py source (not importable here)

    d, repo = exports["part"]
    v = repo / "part_generate" / "1"
    assert sorted(p.name for p in v.iterdir()) == ["decode.onnx", "model.py", "smlp_generate.json", "smlp_sampling.py"]
    assert (v / "decode.onnx").read_bytes() == (d / "decode.onnx").read_bytes()
    assert (v / "smlp_sampling.py").read_text() == open(sampling.__file__).read()  # one implementation
    assert (v / "model.py").read_text() == MODEL_SOURCE.read_text()
    for f in ("model.py", "smlp_sampling.py"):  # runs where smlp_export is not installed
        assert _imports(v / f) <= ALLOWED_IMPORTS | {"smlp_sampling"}, f
    spec = json.loads((v / "smlp_generate.json").read_text())
    sec = json.loads((d / "manifest.json").read_text())["decode"]
    assert (spec["vocab_size"], spec["max_seq_len"], spec["eos_token_id"], spec["min_prompt_tokens"]) == \
        (sec["vocab_size"], sec["max_seq_len"], sec["eos_token_id"], sec["min_prompt_tokens"]) == (257, 32, 256, 7)
    assert spec["file"] == "decode.onnx" and "/" not in json.dumps(spec)  # nothing outside the folder
    from smlp_export.deploy.model_config import parse_config

    cfg = parse_config((repo / "part_generate" / "config.pbtxt").read_text())
    assert cfg.backend == "python" and cfg.model_transaction_policy.decoupled
    assert [t.name for t in cfg.input if t.optional] == ["max_new_tokens", "temperature", "top_k", "seed", "stop_on_eos"]
    rec = json.loads((repo / "smlp_deploy.json").read_text())
    gen = [m for m in rec["models"] if m["name"] == "part_generate"]
    files = {f["name"]: f["sha256"] for f in json.loads((d / "manifest.json").read_text())["files"]}
    assert len(gen) == 1 and gen[0]["file"] == "decode.onnx" and gen[0]["sha256"] == files["decode.onnx"]


def test_onnxruntime_backend_writes_no_generate_model(exports, tmp_path):
    d, _ = exports["eos"]
    rec = write_triton_repository(d, tmp_path / "r", backend="onnxruntime", name="e")
    assert "e_generate" not in [m["name"] for m in rec["models"]] and not (tmp_path / "r" / "e_generate").exists()


# ---- served == local -----------------------------------------------------------------------------
@pytest.mark.serving
def test_greedy_equals_local(server, local):
    g = local["base"]
    for T, new in [(1, 12), (5, 20), (31, 9)]:
        p = _prompt(T, seed=T)
        assert _served(server, "base", p, max_new_tokens=new, temperature=0.0) == _local(g, p, new), T
    # defaults (64 new tokens, greedy, seed 0) until the window is full: stops at max_seq_len
    p = _prompt(6, seed=1)
    toks, reason = _served(server, "base", p)
    assert (toks, reason) == _local(g, p, 64) and reason == STOP_MAX_SEQ and len(toks) == 64 - 6
    # a prompt one short of the window: one token, then max_seq_len
    p = _prompt(63, seed=2)
    assert _served(server, "base", p, max_new_tokens=5) == _local(g, p, 5) and len(_local(g, p, 5)[0]) == 1


@pytest.mark.serving
def test_sampled_equals_local(server, local):
    g = local["base"]
    p = _prompt(9, seed=3)
    runs = [dict(temperature=0.8, top_k=20, seed=3), dict(temperature=1.3, seed=11), dict(temperature=0.8, top_k=20, seed=4),
            dict(temperature=2.0, top_k=3, seed=5, stop_on_eos=False)]
    got = []
    for kw in runs:
        served = _served(server, "base", p, max_new_tokens=24, **kw)
        assert served == _local(g, p, 24, **kw), kw
        got.append(served[0])
    assert got[0] != got[2]  # the seed reaches the server
    assert len(got[3]) == 24  # stop_on_eos=False: all 24, whatever was drawn


@pytest.mark.serving
def test_partial_routing_export(server, local):
    g = local["part"]
    for T, kw in [(7, {}), (12, {"temperature": 0.9, "seed": 7}), (20, {"temperature": 0.7, "top_k": 5, "seed": 1})]:
        p = _prompt(T, seed=T)
        assert _served(server, "part", p, max_new_tokens=40, **kw) == _local(g, p, 40, **kw), (T, kw)
    with pytest.raises(SMLPError, match=r"prompt has 6 tokens but this partial-prediction model .* p = 7"):
        _served(server, "part", _prompt(6))


@pytest.mark.serving
def test_eos_stop(server, local):
    assert _served(server, "eos", [65, 66]) == ([256], STOP_EOS) == _local(local["eos"], [65, 66], 64)
    kw = dict(max_new_tokens=3, stop_on_eos=False)
    assert _served(server, "eos", [65, 66], **kw) == ([256] * 3, STOP_MAX_NEW) == _local(local["eos"], [65, 66], **kw)


@pytest.mark.serving
def test_check_generate_model(server, exports):
    """The check `smlp deploy --check` can run on a generate model passes on its own export and
    fails against another export's model."""
    from smlp_export.deploy.generate_model import check_generate_model

    res = check_generate_model(server, exports["part"][0], "part_generate", n_prompts=2, max_new_tokens=8)
    assert res["passed"] and len(res["cases"]) == 4 and all(c["tokens"] == 8 for c in res["cases"]), res
    wrong = check_generate_model(server, exports["base"][0], "long_generate", n_prompts=2, max_new_tokens=8)
    assert not wrong["passed"] and not any(c["equal"] for c in wrong["cases"]), wrong


# ---- bad input -----------------------------------------------------------------------------------
BAD = [
    ("base", dict(prompt=[]), "input_ids is empty"),
    ("base", dict(prompt=_prompt(64)), "prompt has 64 tokens: max_seq_len 64 leaves no room"),
    ("base", dict(prompt=_prompt(80)), "prompt has 80 tokens: max_seq_len 64 leaves no room"),
    ("base", dict(prompt=[1, 257, 3]), r"token id 257 outside the vocabulary \[0, 257\)"),
    ("base", dict(prompt=[1, -4]), r"token id -4 outside the vocabulary"),
    ("part", dict(prompt=[1, 2, 3]), "prompt has 3 tokens but this partial-prediction model"),
    ("base", dict(prompt=[1], temperature=-0.5), "temperature must be a finite number >= 0, got -0.5"),
    ("base", dict(prompt=[1], temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
    ("base", dict(prompt=[1], top_k=0), "top_k must be an integer >= 1, got 0"),
    ("base", dict(prompt=[1], seed=-1), "seed must be an integer >= 0, got -1"),
    ("base", dict(prompt=[1], max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
]


@pytest.mark.serving
def test_bad_requests_get_one_error_and_the_server_keeps_serving(server, local):
    for name, kw, msg in BAD:
        kw = dict(kw)
        with pytest.raises(SMLPError, match=f"^{name}_generate: {msg}") as e:
            _served(server, name, kw.pop("prompt"), **kw)
        assert "\n" not in str(e.value)
        p = _prompt(4, seed=len(msg))  # the next request on the same server is served normally
        assert _served(server, "base", p, max_new_tokens=6) == _local(local["base"], p, 6)


@pytest.mark.serving
def test_a_bad_request_gets_exactly_one_response(server):
    """Raw stream: the only response to a bad request is one error (no tokens, no second error)."""
    import queue

    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server)
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    ids = grpcclient.InferInput("input_ids", [2], "INT64")
    ids.set_data_from_numpy(np.array([5, 999], dtype=np.int64))
    client.async_stream_infer("base_generate", [ids], enable_empty_final_response=True)
    result, error = got.get(timeout=30)
    assert result is None and "token id 999 outside the vocabulary" in error.message()
    time.sleep(1.0)  # anything else the server sends for this request would arrive by now
    client.stop_stream()
    client.close()
    assert got.empty()


# ---- concurrency ---------------------------------------------------------------------------------
@pytest.mark.serving
def test_concurrent_streams_equal_alone(server, local):
    """Four 300-token streams at once on one model instance give each the tokens it gets alone."""
    from smlp_export.deploy.client import stream_tokens

    jobs = [(_prompt(3, seed=20), {}), (_prompt(5, seed=21), {}),  # all 300 tokens long: no EOS stop
            (_prompt(4, seed=22), dict(temperature=0.9, seed=2)), (_prompt(8, seed=23), dict(temperature=1.1, top_k=9, seed=3))]
    jobs = [(p, dict(kw, stop_on_eos=False)) for p, kw in jobs]
    want = [_local(local["long"], p, 300, **kw) for p, kw in jobs]
    got: list = [None] * len(jobs)
    spans: list = [None] * len(jobs)
    errors: list = []
    start = threading.Barrier(len(jobs))

    def run(i):
        try:
            p, kw = jobs[i]
            start.wait()
            toks, reason, times = [], None, []
            for t, stop in stream_tokens(server, p, model="long_generate", max_new_tokens=300, **kw):
                times.append(time.perf_counter())
                toks.append(t)
                reason = stop or reason
            got[i], spans[i] = (toks, reason), (times[0], times[-1])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert got == want
    # the streams really ran at the same time (else this test could not catch shared state)
    assert max(s[0] for s in spans) < min(s[1] for s in spans), spans


@pytest.mark.serving
def test_closing_a_stream_cancels_its_generation(served, local):
    from smlp_export.deploy.client import stream_tokens

    p = _prompt(3, seed=30)
    want = _local(local["long"], p, 500, stop_on_eos=False)[0]
    it = stream_tokens(served.grpc_url, p, model="long_generate", max_new_tokens=500, stop_on_eos=False)
    assert next(it) == (want[0], None)
    it.close()  # after 1 of 500 tokens (~0.1 ms each in-process)
    deadline = time.time() + 10
    while "request cancelled by the client" not in served.log_path.read_text() and time.time() < deadline:
        time.sleep(0.1)
    line = next(ln for ln in served.log_path.read_text().splitlines() if "request cancelled by the client" in ln)
    assert int(line.split("after ")[1].split(" ")[0]) < 500
    q = _prompt(5, seed=31)  # and the model goes on serving
    assert _served(served.grpc_url, "base", q, max_new_tokens=8) == _local(local["base"], q, 8)


# ---- CLI -----------------------------------------------------------------------------------------
def _cli(argv, capsys):
    from smlp_cli.main import main

    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


@pytest.mark.serving
def test_cli_generate_server_equals_local_ort(server, exports, capsys):
    d, _ = exports["base"]
    args = ["--prompt", "def f(x):", "--max-new-tokens", "10", "--temperature", "0.7", "--seed", "2", "--json"]
    code, out, err = _cli(["generate", "--server", server, "--model", "base_generate"] + args, capsys)
    assert code == 0, err
    remote = json.loads(out)
    code, out, err = _cli(["generate", str(d), "--backend", "ort"] + args, capsys)
    assert code == 0, err
    here = json.loads(out)
    assert remote["tokens"] == here["tokens"] and len(here["tokens"]) == 10
    assert remote["text"] == here["text"] and remote["stop_reason"] == here["stop_reason"] == STOP_MAX_NEW
    code, out, err = _cli(["generate", "--server", server, "--model", "base_generate", "--prompt", "def f(x):",
                           "--max-new-tokens", "10", "--temperature", "0.7", "--seed", "2"], capsys)
    assert code == 0 and out == "def f(x):" + here["text"] + "\n", err
    assert "10 tokens" in err and "stopped after --max-new-tokens" in err
    code, out, err = _cli(["generate", "--server", server, "--model", "base_generate", "--prompt", "x" * 64], capsys)
    assert code == 1 and out == ""
    assert err.strip() == "error: base_generate: prompt has 64 tokens: max_seq_len 64 leaves no room to generate"
    code, out, err = _cli(["generate", str(d), "--server", server, "--prompt", "x"], capsys)
    assert code != 0 and "--server generates on the server" in err


def test_cli_server_unreachable_is_one_error_line(capsys):
    pytest.importorskip("tritonclient.grpc", reason="needs the serve extra (tritonclient[grpc])")
    from smlp_export.deploy.server import _free_port

    port = _free_port()  # nothing listens there
    code, out, err = _cli(["generate", "--server", f"127.0.0.1:{port}", "--prompt", "x"], capsys)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: 127.0.0.1:{port}: failed to connect"), err


@pytest.mark.serving
def test_cli_server_unknown_model(server, capsys):
    code, out, err = _cli(["generate", "--server", server, "--model", "nope", "--prompt", "x"], capsys)
    assert code == 1 and out == ""
    assert err.strip() == f"error: {server}: model 'nope' is not ready (is it in the repository?)", err
