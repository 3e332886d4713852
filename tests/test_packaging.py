"""Packaging guards: every subpackage is listed for non-editable installs; the CLI answers --help."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "smlp_export").rglob("__init__.py")}
    found |= {"smlp_cli"} if (ROOT / "cli" / "__init__.py").exists() else set()
    found |= {".".join(("smlp_plugins", *p.parent.relative_to(ROOT / "plugins").parts))
              for p in (ROOT / "plugins").rglob("__init__.py")}
    assert found <= listed, f"add to pyproject [tool.setuptools].packages: {sorted(found - listed)}"


def test_cli_help_lists_commands_fast_and_without_heavy_imports():
    code = ("import sys; from smlp_cli.main import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'triton', 'tensorrt') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    for cmd in ("init", "train", "inspect", "generate", "export", "validate", "bench", "deploy", "build-engine"):
        assert f"  {cmd} " in r.stdout, cmd
    assert "HEAVY []" in r.stdout, r.stdout


def test_plugins_import_from_an_installed_wheel(tmp_path):
    """The top-level plugins/ folder ships as the ``smlp_plugins`` package with every plugin folder and
    its README: build the wheel, unpack it as an install target, import the plugins from there (not
    from this checkout, which the editable install would otherwise find)."""
    import shutil
    import zipfile

    # Build from a copy: setuptools caches files under build/ in the source tree, which would let a
    # file the package list no longer names slip into the wheel (and would litter the checkout).
    src, wheels, target = tmp_path / "src", tmp_path / "wheels", tmp_path / "site"
    junk = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("smlp_export", "cli", "plugins"):
        shutil.copytree(ROOT / name, src / name, ignore=junk)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("smlp_export-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(target)
    folders = sorted(p.parent.name for p in (ROOT / "plugins").glob("*/plugin.py"))
    assert folders, "no plugin folders in plugins/"
    for folder in folders:
        for f in ("__init__.py", "plugin.py", "README.md"):
            assert f"smlp_plugins/{folder}/{f}" in names, f"{folder}/{f} missing from the wheel"
    code = ("import importlib, smlp_plugins, smlp_plugins.build_engine as b\n"
            "mods = [importlib.import_module(f'smlp_plugins.{n}.plugin') for n in b.PLUGIN_DIRS]\n"
            "print(smlp_plugins.__file__); print(sorted(m.OP_TYPE for m in mods))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(target)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    where, op_types = r.stdout.splitlines()
    assert Path(where).is_relative_to(target), where
    assert op_types == str(sorted(["SMLPSpatialMoE", "SMLPSpatialMoEPartial", "SMLPGroupedExpertGemm"]))
