"""Probe points: which ONNX tensor holds each block's output (for ``smlp validate --bisect``).

The dynamo exporter tags every node it emits with the module path it came from (node metadata
``pkg.torch.onnx.name_scopes``, e.g. ``['', 'model', 'model.blocks.1', 'model.blocks.1.tmoe',
'view_2']``). The export strips that metadata (stack traces make files irreproducible), so before
it does, ``find_probes`` reads it and ``attach_probes`` records the result in the model's
``metadata_props`` under ``smlp.probes`` (JSON, deterministic): a list of
``{"name": "blocks.1.tmoe", "tensor": "view_2"}`` in execution order.

A module's output is the tensor produced inside that module's scope that a node of *another*
known scope consumes (or that is a graph output), the last such one in graph order: a module
returns what it computes last; router logits, also read outside (graph outputs), come earlier.
Nodes without scope (inlined function bodies, the tensorrt routing, the ort ``If``) are ignored as
consumers: they are inside a module whose boundary tensors are scoped.
Names: ``embed``, ``blocks.N.out`` (block output), ``blocks.N.tmoe`` / ``blocks.N.smoe`` (MoE
layer outputs inside sparse blocks).
"""
from __future__ import annotations

import ast
import json
import re

import onnx

SCOPE_KEY = "pkg.torch.onnx.name_scopes"
PROBES_KEY = "smlp.probes"
_MODULE = re.compile(r"(?:^|\.)(embed|blocks\.(\d+)(?:\.(tmoe|smoe))?)$")


def _scopes(node: onnx.NodeProto) -> list[str] | None:
    for p in node.metadata_props:
        if p.key == SCOPE_KEY:
            try:
                v = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return None
            return [str(s) for s in v] if isinstance(v, (list, tuple)) else None
    return None


def _probe_name(module_path: str) -> str | None:
    m = _MODULE.search(module_path)
    if m is None:
        return None
    if m.group(1) == "embed":
        return "embed"
    return f"blocks.{m.group(2)}.{m.group(3)}" if m.group(3) else f"blocks.{m.group(2)}.out"


def _order_key(name: str) -> tuple[int, int]:
    """embed, then per block: tmoe, smoe, out."""
    if name == "embed":
        return (-1, 0)
    _, i, part = name.split(".")
    return (int(i), {"tmoe": 0, "smoe": 1, "out": 2}[part])


def find_probes(model: onnx.ModelProto) -> list[dict[str, str]]:
    """[{name, tensor}] for every embed / block / tMoE / sMoE module found in the node scopes."""
    g = model.graph
    scopes = [_scopes(n) for n in g.node]
    # module path (as the exporter wrote it) -> probe name, per node
    members: list[set[str]] = []
    for sc in scopes:
        mods = set()
        for path in (sc or [])[:-1]:  # the last entry is the FX node's own name
            name = _probe_name(path)
            if name is not None:
                mods.add(name)
        members.append(mods)
    producer: dict[str, int] = {}
    for i, n in enumerate(g.node):
        for o in n.output:
            if o:
                producer[o] = i
    graph_outputs = {o.name for o in g.output}
    best: dict[str, tuple[int, str]] = {}  # probe -> (producer index, tensor)

    def offer(tensor: str, outside_of: set[str] | None) -> None:
        i = producer.get(tensor)
        if i is None:
            return
        for name in members[i]:
            if outside_of is not None and name in outside_of:
                continue
            if name not in best or i > best[name][0]:
                best[name] = (i, tensor)

    for j, n in enumerate(g.node):
        if scopes[j] is None:
            continue
        for t in n.input:
            if t in producer:
                offer(t, members[j])
    for t in graph_outputs:
        if not t.startswith("router."):  # router outputs are compared as such, not as module outputs
            offer(t, None)
    return [{"name": k, "tensor": best[k][1]} for k in sorted(best, key=_order_key)]


def attach_probes(model: onnx.ModelProto, probes: list[dict[str, str]]) -> None:
    """Record ``probes`` in ``model.metadata_props`` (replacing an earlier entry)."""
    keep = [p for p in model.metadata_props if p.key != PROBES_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    p = model.metadata_props.add()
    p.key, p.value = PROBES_KEY, json.dumps(probes, separators=(",", ":"))


def read_probes(model: onnx.ModelProto) -> list[dict[str, str]] | None:
    """The recorded probes, or None if the file has none (exported before probes existed)."""
    for p in model.metadata_props:
        if p.key == PROBES_KEY:
            return json.loads(p.value)
    return None
