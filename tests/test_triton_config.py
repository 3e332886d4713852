"""config.pbtxt is Triton's ModelConfig protobuf: each model kind's config is semantically the one the
earlier f-string writers produced (tests/data/triton_configs/*.pbtxt, written by those writers at main
f6758b9 from the cases below), and the written text parses back to the same message."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc", reason="needs tritonclient (the serve extra) for Triton's config schema")

from smlp_export import SMLPError  # noqa: E402
from smlp_export.deploy import model_config as mc  # noqa: E402
from smlp_export.deploy.generate_model import generate_config  # noqa: E402
from smlp_export.deploy.sequence_model import sequence_config  # noqa: E402
from smlp_export.deploy.triton import full_model_config  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "data" / "triton_configs"
IDS = {"name": "input_ids", "data_type": "TYPE_INT64", "dims": [-1, -1]}
LOGITS = {"name": "logits", "data_type": "TYPE_FP16", "dims": [-1, -1, 257]}
POS = {"name": "position", "data_type": "TYPE_INT64", "dims": []}
ST = [{"name": f"state.blocks.{i}", "data_type": "TYPE_FP32", "dims": [-1, 64, 32]} for i in range(2)]
NST = [{"name": f"new_state.blocks.{i}", "data_type": "TYPE_FP32", "dims": [-1, 64, 32]} for i in range(2)]
SEQ_IN = [IDS, {"name": "position", "data_type": "TYPE_INT64", "dims": [-1, 1]}, *ST,
          {"name": "start", "data_type": "TYPE_INT32", "dims": [-1, 1]}]
SEQ_OUT = [LOGITS, {"name": "new_position", "data_type": "TYPE_INT64", "dims": [-1, 1]}, *NST]
SECTION = {"file": "decode_seq.onnx",
           "inputs": {"input_ids": "input_ids", "position": "position", "states": [s["name"] for s in ST],
                      "start": "start"},
           "outputs": {"logits": "logits", "position": "new_position", "states": [s["name"] for s in NST]}}


def _sequence(backend: str):
    return sequence_config("smlp_sequence", SECTION, SEQ_IN, SEQ_OUT, instances=3, kind="KIND_CPU", intra_op_threads=2,
                           options={"max_batch_size": 4, "max_sequence_idle_us": 5_000_000}, backend=backend,
                           min_prompt_tokens=3)


CASES = {
    "full_onnxruntime": lambda: full_model_config("smlp", [IDS], [LOGITS], instances=2, kind="KIND_CPU",
                                                  intra_op_threads=4, max_batch_size=8, preferred_batch_sizes=(2, 4, 8),
                                                  queue_delay_us=100),
    "full_python": lambda: full_model_config("m.1", [IDS], [LOGITS], instances=1, kind="KIND_GPU", intra_op_threads=0,
                                             backend="python", max_batch_size=16, preferred_batch_sizes=(),
                                             queue_delay_us=0, ragged_inputs=("input_ids",)),
    "decode_python": lambda: full_model_config("smlp_decode", [IDS, POS, *ST], [LOGITS, *NST], instances=1,
                                               kind="KIND_CPU", intra_op_threads=1, backend="python"),
    "sequence_onnxruntime": lambda: _sequence("onnxruntime"),
    "sequence_python": lambda: _sequence("python"),
    "generate": lambda: generate_config("smlp_generate", instances=1, kind="KIND_CPU", intra_op_threads=2,
                                        max_streams=8, limits={"vocab_size": 257, "max_seq_len": 128,
                                                               "eos_token_id": 256}),
    "generate_no_eos": lambda: generate_config("g", instances=2, kind="KIND_GPU", intra_op_threads=0, max_streams=1,
                                               limits={"vocab_size": 300, "max_seq_len": 64, "eos_token_id": None}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_equals_the_f_string_writers(case):
    want = mc.parse_config((GOLDEN / f"{case}.pbtxt").read_text())
    got = CASES[case]()
    assert got == want, f"{case}: differs from the earlier writer's config"
    text = mc.config_text(got)
    assert mc.parse_config(text) == want


def test_every_golden_config_is_checked():
    assert sorted(p.stem for p in GOLDEN.glob("*.pbtxt")) == sorted(CASES)


def test_missing_tritonclient_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)  # import of it now raises ImportError
    with pytest.raises(SMLPError, match=r"needs tritonclient: pip install 'tritonclient\[grpc\]'"):
        CASES["full_onnxruntime"]()
    assert mc.parse_config("name: 'x'", optional=True) is None
