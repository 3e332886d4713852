"""decode_seq.onnx (one position per batch row) and its Triton sequence-batcher deployment.

The new case over decode.onnx: one batch whose rows belong to different sequences, each at its own
position, with the position and the spatial states carried between requests as Triton's implicit
state. Oracles: the PyTorch full forward (logits) and OrtGenerator on decode.onnx (tokens).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from smlp_export import InputError, SMLPError, save_checkpoint
from smlp_export.decode.export import export_decode_graph
from smlp_export.decode.runtime import OrtGenerator
from smlp_export.decode.sequence import step_rows
from smlp_export.decode.sequence_export import export_sequence_graph
from smlp_export.decode.sequence_validate import validate_sequence
from smlp_export.decode.state import init_states
from smlp_export.decode.validate import validate_decode

from .conftest import ROUTING_MODES, micro_model, mixing_model


def _ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 257, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- the PyTorch twin ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", sorted(ROUTING_MODES))
def test_step_rows_at_different_positions_equal_full_forward(mode):
    """Rows prefilled alone to different lengths, then stepped together (2 tokens, then 1 at a time),
    plus a row that STARTs inside the mixed batch with a stale position: every logit equals the
    full forward of its own sequence (fp64, summation order only)."""
    m = mixing_model(**ROUTING_MODES[mode]).double()
    n, p = m.config.max_seq_len, m.config.prefix_len
    x = _ids(4, n, seed=3)
    with torch.no_grad():
        full = m(x)
    lens = [max(p, 2), max(p, 2) + 5, max(p, 2) + 11]
    parts = []
    for b, L in enumerate(lens):  # each row's first request alone
        lg, pos, st = step_rows(m, x[b:b + 1, :L], [0], init_states(m, 1), start=[True])
        torch.testing.assert_close(lg, full[b:b + 1, :L], rtol=0, atol=1e-12)
        assert pos.tolist() == [L]
        parts.append(st)
    states = [torch.cat([s[i] for s in parts]) for i in range(len(parts[0]))]
    pos = torch.tensor(lens)
    S = 2
    for _ in range(6):
        tok = torch.stack([x[b, pos[b]:pos[b] + S] for b in range(3)])
        lg, new_pos, states = step_rows(m, tok, pos, states)
        for b in range(3):
            torch.testing.assert_close(lg[b], full[b, pos[b]:pos[b] + S], rtol=0, atol=1e-12)
        assert (new_pos == pos + S).all()
        pos, S = new_pos, 1
    # a new sequence (row 3) starts inside a batch of continuing rows: same S, stale position 21
    S = max(p, 2)
    states = [torch.cat([s, torch.zeros_like(s[:1])]) for s in states]
    tok = torch.stack([x[b, pos[b]:pos[b] + S] for b in range(3)] + [x[3, :S]])
    lg, new_pos, _ = step_rows(m, tok, pos.tolist() + [21], states, start=[False, False, False, True])
    torch.testing.assert_close(lg[3], full[3, :S], rtol=0, atol=1e-12)
    for b in range(3):
        torch.testing.assert_close(lg[b], full[b, pos[b]:pos[b] + S], rtol=0, atol=1e-12)
    assert new_pos.tolist() == [int(pos[b]) + S for b in range(3)] + [S]


def test_step_rows_refuses_bad_rows():
    m = micro_model(**ROUTING_MODES["partial"])
    p, n = m.config.prefix_len, m.config.max_seq_len
    st = init_states(m, 2)
    with pytest.raises(InputError, match=f"at least {p}"):  # row 1's first step does not cover [0, p)
        step_rows(m, _ids(2, p - 1), [p, 0], st, start=[False, True])
    with pytest.raises(InputError, match="exceeds max_seq_len"):
        step_rows(m, _ids(2, 2), [p, n - 1], st)
    with pytest.raises(InputError, match="one position and one start flag per batch row"):
        step_rows(m, _ids(2, p), [0], st)


# ---- decode_seq.onnx -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seq_exports(tmp_path_factory):
    """mode -> (model, dir with decode_seq.onnx (+ decode.onnx and a manifest holding the decode
    section for base-deterministic), section), every routing mode, spatial weights that mix tokens."""
    out = {}
    for mode in sorted(ROUTING_MODES):
        m = mixing_model(**ROUTING_MODES[mode])
        d = tmp_path_factory.mktemp(mode)
        section = {"sequence": export_sequence_graph(m, d / "decode_seq.onnx", target="ort")}
        if mode == "base-deterministic":
            section = {**export_decode_graph(m, d / "decode.onnx", target="ort"), **section}
            (d / "manifest.json").write_text(json.dumps({"decode": section}))
        out[mode] = (m, d, section)
    return out


def test_graph_contract(seq_exports):
    import onnx

    _, d, section = seq_exports["topk2-partial"]
    seq = section["sequence"]
    assert seq["file"] == "decode_seq.onnx" and seq["inputs"]["start"] == "START"
    g = onnx.load(str(d / "decode_seq.onnx")).graph

    def shape(v):
        return [x.dim_param or x.dim_value for x in v.type.tensor_type.shape.dim]

    assert [(i.name, shape(i)) for i in g.input][:3] == [("input_ids", ["batch", "new"]), ("position", ["batch", 1]),
                                                        ("START", ["batch", 1])]
    assert [i.name for i in g.input][3:] == seq["inputs"]["states"]
    assert [(o.name, shape(o)) for o in g.output][:2] == [("logits", ["batch", "new", 257]), ("new_position", ["batch", 1])]
    assert [o.name for o in g.output][2:] == seq["outputs"]["states"]
    # as in decode.onnx: each state is read only by the ScatterND whose output is the new state
    for i_name, o_name in zip(seq["inputs"]["states"], seq["outputs"]["states"]):
        readers = [n for n in g.node if i_name in n.input and n.op_type != "Shape"]
        assert [n.op_type for n in readers] == ["ScatterND"] and list(readers[0].output) == [o_name]


@pytest.mark.parametrize("mode", sorted(ROUTING_MODES))
def test_graph_equals_torch_twin_on_a_mixed_batch(seq_exports, mode):
    """decode_seq.onnx vs ``step_rows`` on one batch: random (finite) states, rows at positions
    p, p + 9 and 20, and a START row whose stale position (13) must be ignored; logits, new
    positions and every new state (the oracle for the graph's per-row semantics; the twin itself is
    checked against the full forward above)."""
    import onnxruntime as ort

    m, d, section = seq_exports[mode]
    p = max(m.config.prefix_len, 1)
    g = torch.Generator().manual_seed(7)
    states = [torch.randn(4, 32, 32, generator=g) for _ in range(3)]
    states[0][3].zero_()  # a starting row comes with zero states (Triton's initial_state)
    states[1][3].zero_()
    states[2][3].zero_()
    S = max(p, 3)  # the START row's first step must cover [0, p)
    ids, pos, start = _ids(4, S, seed=9), [p, p + 9, 20, 13], [0, 0, 0, 1]
    lg, new_pos, new_states = step_rows(m, ids, pos, states, start=start)
    sess = ort.InferenceSession(str(d / "decode_seq.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input_ids": ids.numpy(), "position": np.array(pos, np.int64)[:, None],
                          "START": np.array(start, np.int32)[:, None],
                          **{f"state.blocks.{i}": s.numpy() for i, s in enumerate(states)}})
    np.testing.assert_allclose(out[0], lg.numpy(), rtol=0, atol=2e-5 * float(lg.abs().max()))
    assert out[1][:, 0].tolist() == new_pos.tolist() == [p + S, p + 9 + S, 20 + S, S]
    for got, want in zip(out[2:], new_states):
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", sorted(ROUTING_MODES))
def test_validate_sequence_every_mode(seq_exports, mode):
    """ORT, rows at different positions in one batch, fed back from the graph's own outputs, every
    position of every row against the PyTorch full forward."""
    m, d, section = seq_exports[mode]
    rep = validate_sequence(d, m, section["sequence"])
    assert rep["passed"], rep["checks"]
    assert rep["max_distinct_positions"] == 4 and rep["last_positions"] == [31] * 4
    assert rep["max_abs_err_rel"] < 1e-5


def test_validate_decode_fails_on_a_corrupted_sequence_graph(seq_exports, tmp_path):
    """validate_decode checks decode_seq.onnx too: 1 % on its largest weight (decode.onnx untouched) fails it."""
    import shutil

    import onnx
    from onnx import numpy_helper

    m, d, _ = seq_exports["base-deterministic"]
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    good = validate_decode(bad, m, quick=True)
    assert good["passed"] and good["sequence"]["passed"]
    g = onnx.load(str(bad / "decode_seq.onnx"))
    init = max(g.graph.initializer, key=lambda t: int(np.prod(t.dims)) if t.data_type == 1 else 0)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))
    onnx.save(g, str(bad / "decode_seq.onnx"))
    rep = validate_decode(bad, m, quick=True)
    assert not rep["passed"] and not rep["sequence"]["passed"]
    assert [c["name"] for c in rep["checks"] if not c["ok"]] == ["sequence_max_abs_err_rel"]


# ---- deployment: config + the sequence batcher's implicit-state rules ---------------------------------
@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """mode -> (export dir, repo with <name>_sequence); real exports (manifest, checksums) of mixing models."""
    from smlp_export.deploy import write_triton_repository
    from smlp_export.export.pipeline import export_model

    out = {}
    for mode, opts in [("base-deterministic", None), ("topk2-partial", {"max_batch_size": 3,
                                                                       "max_candidate_sequences": 6})]:
        tmp = tmp_path_factory.mktemp(f"dep-{mode}")
        ckpt = save_checkpoint(mixing_model(**ROUTING_MODES[mode]), tmp / "ckpt")
        export_model(str(ckpt), tmp / "out", target="ort", validate=False, decode=True)
        rec = write_triton_repository(tmp / "out", tmp / "repo", name="m", sequence=opts)
        out[mode] = (tmp / "out", tmp / "repo", rec)
    return out


def test_sequence_repository_config(deployed):
    pytest.importorskip("tritonclient", reason="needs the serve extra (tritonclient) for Triton's config schema")
    from smlp_export.deploy.sequence_model import parse_config

    out, repo, rec = deployed["topk2-partial"]
    assert [m["name"] for m in rec["models"]] == ["m", "m_sequence"] and not any("decode" in w for w in rec["warnings"])
    assert (repo / "m_sequence" / "1" / "model.onnx").read_bytes() == (out / "decode_seq.onnx").read_bytes()
    cfg = parse_config((repo / "m_sequence" / "config.pbtxt").read_text())
    assert cfg.backend == "onnxruntime" and cfg.max_batch_size == 3
    sb = cfg.sequence_batching
    assert sb.HasField("oldest") and sb.oldest.max_candidate_sequences == 6
    assert list(sb.oldest.preferred_batch_size) == [3]  # default: half (1: no preference) and all of the batch
    kind = type(sb).Control.Kind.Name
    assert [(c.name, [kind(k.kind) for k in c.control], list(c.control[0].int32_false_true)) for c in sb.control_input] == \
        [("START", ["CONTROL_SEQUENCE_START"], [0, 1])]
    states = {s.input_name: (s.output_name, list(s.dims), s.initial_state[0].zero_data, list(s.initial_state[0].dims))
              for s in sb.state}
    assert states.pop("position") == ("new_position", [1], True, [1])
    assert states == {f"state.blocks.{i}": (f"new_state.blocks.{i}", [32, 32], True, [32, 32]) for i in range(3)}
    assert [(t.name, list(t.dims)) for t in cfg.input] == [("input_ids", [-1])]  # batch axis left out
    assert [(t.name, list(t.dims)) for t in cfg.output] == [("logits", [-1, 257])]


def test_config_schema_catches_a_misspelled_field(deployed):
    pytest.importorskip("tritonclient", reason="needs the serve extra (tritonclient) for Triton's config schema")
    from smlp_export.deploy.sequence_model import parse_config

    text = (deployed["base-deterministic"][1] / "m_sequence" / "config.pbtxt").read_text()
    parse_config(text)
    for wrong in (text.replace("max_candidate_sequences", "max_candidate_sequence"),
                  text.replace("zero_data: true", "zero_date: true", 1),
                  text.replace("kind: KIND_CPU", "kind: KIND_CPUS")):
        with pytest.raises(SMLPError, match="does not parse as Triton's ModelConfig"):
            parse_config(wrong)


def test_bad_sequence_options_are_refused(deployed, tmp_path):
    from smlp_export.deploy import write_triton_repository

    out = deployed["base-deterministic"][0]
    with pytest.raises(SMLPError, match="max_candidate_sequences"):
        write_triton_repository(out, tmp_path / "r", sequence={"max_batch_size": 8, "max_candidate_sequences": 4})
    with pytest.raises(SMLPError, match=r"preferred batch sizes must lie in \[1, max_batch_size 8\]"):
        write_triton_repository(out, tmp_path / "r", sequence={"preferred_batch_sizes": [4, 16]})
    with pytest.raises(SMLPError, match="unknown sequence batching option"):
        write_triton_repository(out, tmp_path / "r", sequence={"max_batch": 8})
    assert not (tmp_path / "r").exists()


def _prompts(p: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 257, max(p, L)).tolist() for L in lengths]


# lengths, arrivals, distinct positions expected in one batch: two equal prompts arriving together
# (a batched prefill), later arrivals join live sequences; for the deterministic model (p = 0)
# one-token prompts START inside decode batches; the partial model's repository allows batches of 3
# only (5 live sequences: split batches)
CASES = {"base-deterministic": ([1, 6, 6, 1, 9, 3], [0, 0, 0, 2, 3, 5], 4),
         "topk2-partial": ([7, 9, 7, 12, 7], [0, 0, 0, 2, 4], 2)}


@pytest.mark.parametrize("mode", sorted(CASES))
def test_simulated_sequence_batcher_equals_local_generation(deployed, mode):
    from smlp_export.deploy.sequence_model import simulate_generation

    out, repo, _ = deployed[mode]
    p = json.loads((out / "manifest.json").read_text())["decode"]["min_prompt_tokens"]
    lengths, arrivals, distinct = CASES[mode]
    prompts = _prompts(p, lengths)
    gen = OrtGenerator(out)
    want = [gen.generate(pr, 14, stop_on_eos=False).tokens[0] for pr in prompts]
    got, sim = simulate_generation(repo / "m_sequence", prompts, 14, arrivals=arrivals, min_prompt_tokens=p)
    assert got == want
    # the case is the one meant: batches mixed different positions, a START slot rode with others
    assert max(len(set(e["positions"])) for e in sim.log if e["batch_size"] > 1) >= distinct
    assert any(e["batch_size"] > 1 and e["shape"]["input_ids"][1] > 1 for e in sim.log)  # batched prefill
    assert max(e["batch_size"] for e in sim.log) == min(sim.max_batch, len(prompts))
    assert not sim.store and not sim.active  # END released every sequence's state
    if mode == "base-deterministic":
        assert any(e["batch_size"] > 1 and e["shape"]["input_ids"][1] == 1 and 0 in e["positions"]
                   and len(set(e["positions"])) > 1 for e in sim.log)


class _WrongSlotSim:
    """Planted batcher bug: every non-starting slot gets the state of the next slot's sequence."""

    def _state_for(self, req, slot, batch):
        other = batch[(slot + 1) % len(batch)]
        return super()._state_for(other if not other.start and not req.start else req, slot, batch)


class _SharedPositionSim:
    """Planted batcher bug: every slot gets the position state of the batch's first slot."""

    def _state_for(self, req, slot, batch):
        st = dict(super()._state_for(req, slot, batch))
        st["position"] = super()._state_for(batch[0], 0, batch)["position"]
        return st


@pytest.mark.parametrize("bug", [_WrongSlotSim, _SharedPositionSim], ids=["wrong-slot-state", "shared-position"])
def test_planted_batcher_bugs_change_the_tokens(deployed, bug):
    """Negative control: the comparison above notices a batcher that mixes up slots or positions."""
    from smlp_export.deploy.sequence_model import SequenceBatcherSim, simulate_generation

    out, repo, _ = deployed["base-deterministic"]
    prompts = _prompts(0, [4, 6, 9])
    gen = OrtGenerator(out)
    want = [gen.generate(pr, 10, stop_on_eos=False).tokens[0] for pr in prompts]
    sim = type("Buggy", (bug, SequenceBatcherSim), {})(repo / "m_sequence")
    got, _ = simulate_generation(repo / "m_sequence", prompts, 10, sim=sim)
    assert got != want


def test_simulated_batcher_refuses_what_triton_refuses(deployed):
    from smlp_export.deploy.sequence_model import Request, SequenceBatcherSim

    sim = SequenceBatcherSim(deployed["base-deterministic"][1] / "m_sequence")
    ids = np.array([[5, 6]], dtype=np.int64)
    assert "must specify the START flag" in sim.enqueue(Request(7, {"input_ids": ids})).error
    assert "batch-size 1" in sim.enqueue(Request(8, {"input_ids": np.zeros((2, 2), np.int64)}, start=True)).error
    r = sim.enqueue(Request(9, {"input_ids": np.array([[5, 31]], dtype=np.int64)}, start=True))
    assert r.error is None and sim.execute() == [r] and r.outputs["logits"].shape == (1, 2, 257)
    # past max_seq_len the Gather/ScatterND index is out of range: an error response, not a wrong answer
    sim.store[9]["position"][:] = 31
    r2 = sim.enqueue(Request(9, {"input_ids": ids}))
    assert sim.execute() == [r2] and "out of data bounds" in r2.error and r2.outputs is None
    r3 = sim.enqueue(Request(10, {"input_ids": np.array([[257, 5]], dtype=np.int64)}, start=True, end=True))
    assert sim.execute() == [r3] and "out of data bounds" in r3.error  # token id == vocab_size


def test_cli_deploy_sequence_options(deployed, tmp_path, capsys):
    from smlp_cli.main import main
    from smlp_export.deploy.model_config import parse_config

    out = deployed["base-deterministic"][0]
    with pytest.raises(SystemExit) as e:
        main(["deploy", str(out), "-o", str(tmp_path / "repo"), "--sequence-batch", "4", "--sequence-candidates", "16"])
        raise SystemExit(0)
    assert e.value.code == 0 and "m_sequence" not in capsys.readouterr().out  # default name: smlp
    cfg = parse_config((tmp_path / "repo" / "smlp_sequence" / "config.pbtxt").read_text())
    assert cfg.max_batch_size == 4 and cfg.sequence_batching.oldest.max_candidate_sequences == 16
    assert list(cfg.sequence_batching.oldest.preferred_batch_size) == [2, 4]
    with pytest.raises(SystemExit) as e:
        main(["deploy", str(out), "-o", str(tmp_path / "r2"), "--sequence-batch", "32", "--sequence-candidates", "16"])
    assert e.value.code == 1 and "max_candidate_sequences (16)" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()


@pytest.mark.serving
def test_real_tritonserver_sequence_batcher_python_backend(deployed, tmp_path):
    """The real local tritonserver (nvidia-pytriton's, python backend only): <name>_sequence under
    Triton's own sequence batcher (oldest strategy; START / END / CORRID delivered by Triton), 6
    concurrent client sequences of different prompt lengths: tokens equal local generation, and
    Triton did hand several sequences to one execution, which ran them as one ONNX Runtime batch."""
    pytest.importorskip("pytriton", reason="needs the serve extra (nvidia-pytriton) for a local tritonserver")
    import threading

    import tritonclient.grpc as gc

    from smlp_export.deploy import write_triton_repository
    from smlp_export.deploy.server import local_tritonserver

    out = deployed["topk2-partial"][0]
    rec = write_triton_repository(out, tmp_path / "repo", backend="python", name="m",
                                  sequence={"max_batch_size": 4, "max_queue_delay_us": 20000})
    assert [m["name"] for m in rec["models"]] == ["m", "m_decode", "m_sequence", "m_generate"]
    p = json.loads((out / "manifest.json").read_text())["decode"]["min_prompt_tokens"]
    prompts = _prompts(p, [7, 10, 7, 12, 8, 7], seed=4)
    n_new = 10
    gen = OrtGenerator(out)
    want = [gen.generate(pr, n_new, stop_on_eos=False).tokens[0] for pr in prompts]
    got: list = [None] * len(prompts)
    rows: list[int] = []
    errors: list[str] = []

    def request(client, ids, seq, start, end):
        x = gc.InferInput("input_ids", list(ids.shape), "INT64")
        x.set_data_from_numpy(ids)
        return client.infer("m_sequence", [x], outputs=[gc.InferRequestedOutput("logits"),
                                                       gc.InferRequestedOutput("batch_rows")],
                            sequence_id=seq, sequence_start=start, sequence_end=end)

    with local_tritonserver(tmp_path / "repo") as srv:
        def client(i: int) -> None:
            try:
                c = gc.InferenceServerClient(srv.grpc_url)
                ids, toks = np.asarray(prompts[i], np.int64)[None], []
                for k in range(n_new):
                    r = request(c, ids, i + 1, k == 0, k == n_new - 1)
                    toks.append(int(r.as_numpy("logits")[0, -1].argmax()))
                    rows.append(int(r.as_numpy("batch_rows")[0, 0]))
                    ids = np.array([[toks[-1]]], np.int64)
                got[i] = toks
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        c = gc.InferenceServerClient(srv.grpc_url)
        stats = c.get_inference_statistics("m_sequence", as_json=True)["model_stats"][0]
        # bad requests: one clear error each, and the server keeps serving
        for ids, start, msg in [([[300]], True, "outside the vocabulary"), ([[3]], True, f"at least {p} tokens"),
                                ([[3]], False, "must specify the START flag")]:
            with pytest.raises(Exception, match=msg):
                request(c, np.array(ids, np.int64), 99, start, True)
        r = request(c, np.asarray(prompts[0], np.int64)[None], 100, True, True)
        assert int(r.as_numpy("logits")[0, -1].argmax()) == want[0][0]
    assert not errors, errors
    assert got == want
    assert int(stats["inference_count"]) == len(prompts) * n_new
    assert int(stats["execution_count"]) < int(stats["inference_count"]) and max(rows) > 1


@pytest.mark.parametrize("target, dtype", [("tensorrt", "fp32"), ("portable", "fp32"), ("ort", "fp16")])
def test_other_targets_sequence_graph(tmp_path, target, dtype):
    """tensorrt (plugin nodes + fallback functions, run by ORT here), portable, and an fp16 graph
    (float16 states, the fp16 tolerance row): the same mixed-position parity; the tensorrt graph's
    plugin fields match the config, as decode.onnx's."""
    from smlp_export.validate.plugin_attrs import check_plugin_nodes

    m = mixing_model(**ROUTING_MODES["topk2-partial"])
    section = export_sequence_graph(m, tmp_path / "decode_seq.onnx", target=target, dtype=dtype)
    rep = validate_sequence(tmp_path, m, section, rows=3)
    assert rep["passed"], rep["checks"]
    if target == "tensorrt":
        pa = check_plugin_nodes(tmp_path / "decode_seq.onnx", m.config, decode=True)
        assert pa["passed"] and pa["checked"] > 0, pa["failures"]


@pytest.mark.serving
def test_real_tritonserver_validates_the_onnxruntime_sequence_config(deployed, tmp_path):
    """The local tritonserver (2.51) has no onnxruntime backend, but its repository manager validates
    every config.pbtxt before looking for the backend: <name>_sequence as written gets past that
    validation (it fails only for the missing backend), a planted config error does not."""
    pytest.importorskip("pytriton", reason="needs the serve extra (nvidia-pytriton) for a local tritonserver")
    import os
    import shutil
    import subprocess
    import sysconfig

    from smlp_export.deploy.server import find_pytriton

    root = find_pytriton()
    backends = tmp_path / "backends"
    shutil.copytree(root / "backends", backends)
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join([sysconfig.get_config_var("LIBDIR"),
                                                             str(root.parent.parent / "nvidia_pytriton.libs")]))
    src = deployed["base-deterministic"][1] / "m_sequence"

    def load_error(edit) -> str:
        repo = tmp_path / f"repo{len(list(tmp_path.iterdir()))}"
        shutil.copytree(src, repo / "m_sequence")
        cfg = repo / "m_sequence" / "config.pbtxt"
        cfg.write_text(edit(cfg.read_text()))
        r = subprocess.run([str(root / "bin" / "tritonserver"), "--model-repository", str(repo),
                            "--backend-directory", str(backends), "--allow-http=false", "--allow-grpc=false",
                            "--allow-metrics=false"], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0
        return next(line for line in (r.stdout + r.stderr).splitlines() if "m_sequence" in line and line.startswith("E"))

    assert "unable to find backend library for backend 'onnxruntime'" in load_error(lambda t: t)
    assert "preferred batch size must be <= max batch size" in load_error(
        lambda t: t.replace("preferred_batch_size: 8", "preferred_batch_size: 16"))
    assert "must have exactly 2 entries for CONTROL_SEQUENCE_START" in load_error(
        lambda t: t.replace("int32_false_true: 0\n", "", 1))  # START's [0, 1] -> [1]


@pytest.mark.serving
def test_python_sequence_model_drops_abandoned_sequences(deployed, tmp_path):
    """Clients that vanish without sequence_end: after Triton's idle timeout their state is dropped
    (logged by the model), and a late request of such a sequence gets an error, not a stale state."""
    pytest.importorskip("pytriton", reason="needs the serve extra (nvidia-pytriton) for a local tritonserver")
    import time

    import tritonclient.grpc as gc

    from smlp_export.deploy import write_triton_repository
    from smlp_export.deploy.server import local_tritonserver

    out = deployed["topk2-partial"][0]
    write_triton_repository(out, tmp_path / "repo", backend="python", name="m",
                            sequence={"max_sequence_idle_us": 300_000})
    p = json.loads((out / "manifest.json").read_text())["decode"]["min_prompt_tokens"]
    prompt = np.asarray(_prompts(p, [p], seed=2)[0], np.int64)[None]

    def request(c, ids, seq, start, end=False):
        x = gc.InferInput("input_ids", list(ids.shape), "INT64")
        x.set_data_from_numpy(ids)
        return c.infer("m_sequence", [x], sequence_id=seq, sequence_start=start, sequence_end=end)

    with local_tritonserver(tmp_path / "repo") as srv:
        c = gc.InferenceServerClient(srv.grpc_url)
        for seq in range(1, 6):  # five sequences started, never ended
            request(c, prompt, seq, True)
        time.sleep(1.0)
        request(c, prompt, 99, True, True)  # any later execution drops the idle ones
        with pytest.raises(Exception):  # Triton or the model refuses: the sequence must START again
            request(c, np.array([[1]], np.int64), 3, False)
        log = srv.log_path.read_text()
    assert "dropped the state of 5 sequence(s) idle for more than 0.3 s" in log, log[-2000:]


@pytest.mark.serving
def test_abandoned_sequences_do_not_starve_new_ones(deployed, tmp_path):
    """Every candidate slot held by a sequence opened without END: a new sequence is served once the
    idle timeout (default 5 s) evicts the abandoned ones, not after a minute."""
    pytest.importorskip("pytriton", reason="needs the serve extra (nvidia-pytriton) for a local tritonserver")
    import time

    import tritonclient.grpc as gc

    from smlp_export.deploy import write_triton_repository
    from smlp_export.deploy.server import local_tritonserver

    out = deployed["base-deterministic"][0]
    write_triton_repository(out, tmp_path / "repo", backend="python", name="m",
                            sequence={"max_batch_size": 2, "max_candidate_sequences": 2})
    prompt = np.array([[5, 6, 7]], np.int64)

    def request(c, seq, start, end=False):
        x = gc.InferInput("input_ids", list(prompt.shape), "INT64")
        x.set_data_from_numpy(prompt)
        return c.infer("m_sequence", [x], sequence_id=seq, sequence_start=start, sequence_end=end,
                       client_timeout=30)

    with local_tritonserver(tmp_path / "repo") as srv:
        c = gc.InferenceServerClient(srv.grpc_url)
        for seq in (1, 2):  # both slots held, never ended
            request(c, seq, True)
        t0 = time.monotonic()
        request(c, 3, True, True)  # waits for an evicted slot; the old 60 s default timed out here
        waited = time.monotonic() - t0
    assert waited < 20, f"a new sequence waited {waited:.1f} s for a slot"
