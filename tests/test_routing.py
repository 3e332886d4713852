"""smlp_export.routing sits below ops/ and kernels/: neither package imports the other at module level."""
from __future__ import annotations

import ast
from pathlib import Path

import smlp_export
from smlp_export import ops, routing

PKG = Path(smlp_export.__file__).resolve().parent


def _module_level_imports(path: Path) -> set[str]:
    """Absolute or relative (as '..name') module names imported at the top level of a file."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = "." * node.level + (node.module or "")
            names.add(mod)
            names.update(f"{mod}.{a.name}" if node.module else f"{mod}{a.name}" for a in node.names)
    return names


def _refers_to(name: str, pkg: str) -> bool:
    """True when import ``name``, written in a subpackage of smlp_export, targets ``smlp_export.<pkg>``."""
    return (name == f"smlp_export.{pkg}" or name.startswith(f"smlp_export.{pkg}.")
            or name == f"..{pkg}" or name.startswith(f"..{pkg}."))


def test_kernels_do_not_import_ops():
    for f in sorted((PKG / "kernels").glob("*.py")):
        bad = [n for n in _module_level_imports(f) if _refers_to(n, "ops")]
        assert not bad, f"{f.name} imports the ops package: {bad}"


def test_ops_do_not_import_kernels_at_module_level():
    """The ops dispatch to the kernels lazily, inside the op body, for CUDA tensors only."""
    for f in sorted((PKG / "ops").glob("*.py")):
        bad = [n for n in _module_level_imports(f) if _refers_to(n, "kernels")]
        assert not bad, f"{f.name} imports the kernels package: {bad}"


def test_routing_has_no_project_imports():
    names = _module_level_imports(PKG / "routing.py")
    assert not [n for n in names if n.startswith(".") or n.startswith("smlp_export")]


def test_ops_reexport_the_routing_helpers():
    from smlp_export.ops.spatial_moe import route_channels
    from smlp_export.ops.token_moe import route_tokens

    assert ops.route_tokens is routing.route_tokens is route_tokens
    assert ops.route_channels is routing.route_channels is route_channels
