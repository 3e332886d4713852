"""Packaging guards: every subpackage is listed for non-editable installs; the CLI answers --help."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "smlp_export").rglob("__init__.py")}
    found |= {"smlp_cli"} if (ROOT / "cli" / "__init__.py").exists() else set()
    assert found <= listed, f"add to pyproject [tool.setuptools].packages: {sorted(found - listed)}"


def test_cli_help_lists_commands_fast_and_without_heavy_imports():
    code = ("import sys; from smlp_cli.main import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'triton', 'tensorrt') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    for cmd in ("init", "train", "inspect", "generate", "export", "validate", "bench", "deploy", "build-engine"):
        assert f"  {cmd} " in r.stdout, cmd
    assert "HEAVY []" in r.stdout, r.stdout
