"""The package's shape: no import circle, layers that only look down, export file names defined once.

The import graph is built from the sources with ``ast``: every ``import`` / ``from ... import``,
including those inside functions (lazy imports are real dependencies) and ``from . import x``
(an edge to the submodule ``x``). Importing ``a.b.c`` is an edge to ``a.b.c`` only: a package's
``__init__`` runs first, but that is Python's order, not a dependency of ``c``.
The layer table below is the one in docs/architecture.md; keep them together.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# import name -> folder (pyproject.toml's package-dir): the CLI and the TensorRT plugins ship as their own packages
PACKAGES = {"smlp_export": "smlp_export", "smlp_cli": "cli", "smlp_plugins": "plugins"}

# Low to high. A module may import from its own layer or any layer below, never from one above.
# A module belongs to the layer of the longest prefix that names it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("smlp_export.errors", "smlp_export.fsutil", "smlp_export.config", "smlp_export.tokenizer",
              "smlp_export.artifacts", "smlp_export.memory", "smlp_export.shapes", "smlp_export.init_weights",
              "smlp_export.export.contract", "smlp_export.safe_load", "smlp_export.flops", "smlp_export.sampling")),
    ("ops", ("smlp_export.ops", "smlp_export.kernels", "smlp_export.permutation", "smlp_export.precision",
             "smlp_export.routing")),
    ("checkpoint", ("smlp_export.checkpoint", "smlp_export.hub")),
    ("model", ("smlp_export.model",)),
    ("tools", ("smlp_export.data", "smlp_export.convert", "smlp_export.train", "smlp_export.inspect",
               "smlp_export.__init__")),
    ("graph", ("smlp_export.export", "smlp_export.decode", "smlp_export.engine_plan", "smlp_export.quantize")),
    ("runtime", ("smlp_export.runners", "smlp_export.decode.runtime", "smlp_export.decode.sampling",
                 "smlp_plugins")),
    ("validate", ("smlp_export.validate", "smlp_export.decode.validate", "smlp_export.decode.sequence_validate",
                  "smlp_export.inspect_export")),
    ("orchestration", ("smlp_export.export.pipeline", "smlp_export.export.__init__")),
    ("serve", ("smlp_export.deploy", "smlp_export.bench")),
    ("cli", ("smlp_cli",)),
)


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """{dotted module name: file}; a package's ``__init__`` is named ``pkg.__init__``."""
    out = {}
    for name, folder in packages.items():
        for p in sorted((root / folder).rglob("*.py")) if (root / folder).is_dir() else []:
            out[".".join((name, *p.relative_to(root / folder).with_suffix("").parts))] = p
    return out


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """{module: the intra-project modules it imports (anywhere in its body)}."""
    files = module_files(root, packages)
    names = set(files)

    def resolve(dotted: str) -> str | None:
        while dotted:
            for cand in (dotted, dotted + ".__init__"):
                if cand in names:
                    return cand
            dotted = dotted.rpartition(".")[0]
        return None

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        pkg = mod.split(".")[:-1]  # the package holding mod (for __init__: the package itself)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(pkg[:len(pkg) - node.level + 1]) if node.level else ""
                src = ".".join(x for x in (base, node.module or "") if x)
                # `from pkg import x`: x may be a submodule (the edge goes to it) or a name in pkg
                targets = [f"{src}.{a.name}" if resolve(f"{src}.{a.name}") in (f"{src}.{a.name}",
                           f"{src}.{a.name}.__init__") else src for a in node.names]
            for t in targets:
                r = resolve(t)
                if r is not None and r != mod:
                    deps.add(r)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def layer_of(mod: str, layers=LAYERS) -> int | None:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(layers):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    return level


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    out = []
    for mod, deps in sorted(graph.items()):
        for d in sorted(deps):
            lm, ld = layer_of(mod, layers), layer_of(d, layers)
            if lm is not None and ld is not None and ld > lm:
                out.append(f"{mod} ({layers[lm][0]}) imports {d} ({layers[ld][0]})")
    return out


def file_name_literals(root: Path, packages=PACKAGES, scripts: str = "benchmarks") -> list[str]:
    """String constants equal to an export file name outside smlp_export/artifacts.py, in the
    packages and the ``scripts`` folder (docstrings and the sources copied into Triton
    repositories, which run without the package, excepted)."""
    from smlp_export.artifacts import FILE_NAMES, STANDALONE_SOURCES

    hits = []
    files = list(module_files(root, packages).values()) + sorted((root / scripts).glob("*.py"))
    for path in files:
        rel = path.relative_to(root).as_posix()
        if rel == "smlp_export/artifacts.py" or rel in STANDALONE_SOURCES:
            continue
        tree = ast.parse(path.read_text(), rel)
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for n in ast.walk(tree):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
                if n.value in FILE_NAMES:
                    hits.append(f"{rel}:{n.lineno}: {n.value!r}")
    return hits


# ---- the project ---------------------------------------------------------------------------------
def test_every_module_has_a_layer() -> None:
    missing = [m for m in import_graph(REPO) if layer_of(m) is None]
    assert not missing, f"add these modules to LAYERS (and docs/architecture.md): {missing}"


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph(REPO))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_layers_only_look_down() -> None:
    up = upward_imports(import_graph(REPO))
    assert not up, "imports from a layer above:\n" + "\n".join(up)


def test_export_file_names_are_defined_once() -> None:
    hits = file_name_literals(REPO)
    assert not hits, "use the names in smlp_export/artifacts.py instead of literals:\n" + "\n".join(hits)


# ---- the checks can fail -------------------------------------------------------------------------
def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_planted_cycle_and_upward_import_are_found(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "pk/__init__.py": "",
        "pk/low.py": "def f():\n    from . import high  # a lazy import still counts\n",
        "pk/high.py": "from .low import f\n",
        "pk/sub/__init__.py": "",
        "pk/sub/mid.py": "from .. import low\nimport pk.high\n",
    })
    graph = import_graph(root, {"pk": "pk"})
    assert graph["pk.low"] == {"pk.high"} and graph["pk.sub.mid"] == {"pk.low", "pk.high"}
    assert find_cycle(graph) == ["pk.high", "pk.low", "pk.high"]
    layers = (("low", ("pk.low",)), ("mid", ("pk.sub",)), ("high", ("pk.high", "pk")))
    assert upward_imports(graph, layers) == ["pk.low (low) imports pk.high (high)",
                                             "pk.sub.mid (mid) imports pk.high (high)"]
    del graph["pk.low"]
    assert find_cycle(graph) is None


def test_planted_file_name_literal_is_found(tmp_path: Path) -> None:
    from smlp_export.artifacts import MANIFEST_FILE

    root = _tree(tmp_path, {"smlp_export/x.py": f'"""Reads {MANIFEST_FILE}."""\nNAME = "{MANIFEST_FILE}"\n',
                            "smlp_export/artifacts.py": f'MANIFEST_FILE = "{MANIFEST_FILE}"\n',
                            "benchmarks/b.py": f'p = out / "{MANIFEST_FILE}"\n'})
    assert file_name_literals(root) == [f"smlp_export/x.py:2: '{MANIFEST_FILE}'", f"benchmarks/b.py:1: '{MANIFEST_FILE}'"]


@pytest.mark.parametrize("mod,layer", [("smlp_export.export.pipeline", "orchestration"),
                                       ("smlp_export.export.graph", "graph"), ("smlp_cli.cmd_export", "cli"),
                                       ("smlp_export.artifacts", "base")])
def test_layer_table(mod: str, layer: str) -> None:
    assert LAYERS[layer_of(mod)][0] == layer
