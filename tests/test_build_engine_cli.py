"""`smlp build-engine`: refuses non-tensorrt exports; without TensorRT, one clear line."""
from __future__ import annotations

import importlib.util

import pytest

from smlp_cli.main import main
from smlp_export import save_checkpoint

from .conftest import micro_model


def _run(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
        raise SystemExit(0)
    return e.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from smlp_export.export.pipeline import export_model

    tmp = tmp_path_factory.mktemp("be")
    ck = save_checkpoint(micro_model(), tmp / "ck")
    for target in ("ort", "tensorrt"):
        export_model(str(ck), tmp / target, target=target, validate=False)
    return tmp


def test_refuses_non_tensorrt_export(exports, capsys):
    code, err = _run(capsys, "build-engine", str(exports / "ort"))
    assert code == 1 and "need --target tensorrt" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_without_tensorrt_one_line(exports, capsys):
    code, err = _run(capsys, "build-engine", str(exports / "tensorrt"))
    assert code == 1 and err.startswith("error: TensorRT not installed") and len(err.strip().splitlines()) == 1
    assert not (exports / "tensorrt" / "model.engine").exists()
