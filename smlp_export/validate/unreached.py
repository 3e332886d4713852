"""Token experts that no validation input reaches, verified by driving them directly.

An expert no text routes to is a property of the model (random init, or a trained MoE with a dead
expert), not of the export; its weights must still be checked. For each such (layer, expert):

1. synthetic hidden states that the router sends to that expert: with the centroids C [E, d],
   ``x = pinv(C) t + (I - pinv(C) C) r`` gives router logits ``x C^T = t`` exactly (E <= d, C of
   full rank), where ``t`` puts the expert ``margin`` above every other, and ``r`` (random, in the
   null space of C) gives each token different content for the LayerNorm and the FFN;
2. the export's own tMoE computation on them: the sub-graph of ``model.onnx`` from the block's
   input tensor (``smlp.probes``: ``embed`` or ``blocks.{i-1}.out``) to the tMoE output and the
   router output, written next to the published graph (it shares ``model.onnx.data``: ONNX Runtime
   loads only that layer's weights), run at 4 tokens (the ``ort`` target's fused branch) and at
   ``LONG`` tokens (the loop branch);
3. the float32 PyTorch tMoE on the same states; the runtime's router must pick the expert for every
   token and its output must agree within the dtype's bound (``max_abs_err_rel``).

parity.json's ``coverage.unreached`` records, per layer and expert, the method, the router check
and the error. Spatial experts with partial routing cannot be driven this way (their router sees
a channel's first positions after two LayerNorms); an unreached one stays a failure.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

METHOD = "synthetic hidden states routed to the expert (tMoE sub-graph vs PyTorch)"
LENGTHS = (4, 16)  # <= 4 tokens: the ort target's fused com.microsoft.MoE branch; above: the loop
MARGIN = 8.0  # router logit of the expert above every other (far outside any dtype's tie noise)
SEED = 20261


def hidden_states(centroids: np.ndarray, expert: int, tokens: int, seed: int = SEED) -> np.ndarray | None:
    """[tokens, d] float32 states whose router logits put ``expert`` MARGIN above the rest, or
    None when the centroids cannot single it out (more experts than dimensions, or degenerate)."""
    C = centroids.astype(np.float64)
    E, d = C.shape
    rng = np.random.default_rng(seed + expert)
    t = rng.standard_normal((tokens, E))
    t[:, expert] = t.max(axis=1) + MARGIN
    pinv = np.linalg.pinv(C)  # [d, E]
    null = np.eye(d) - pinv @ C
    r = rng.standard_normal((tokens, d)) * np.sqrt(1.0)
    x = t @ pinv.T + r @ null.T
    got = x @ C.T
    if not (np.argmax(got, axis=1) == expert).all():
        return None
    return x.astype(np.float32)


def _outer_refs(g) -> set[str]:
    """Names a subgraph reads from its enclosing scope."""
    made = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
    used = set()
    for n in g.node:
        used |= set(n.input)
        for a in n.attribute:
            for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                used |= _outer_refs(sg)
    return used - made - {""}


def sub_graph(proto, inputs: list[tuple[str, int]], outputs: list[str]):
    """A copy of ``proto`` computing ``outputs`` (each cast to float32, named ``sub.<name>``) from
    ``inputs`` [(tensor, element type)], with only the nodes and initializers they need (also those
    that If branches read from the outer scope, which onnx.utils.Extractor misses)."""
    import onnx
    from onnx import helper

    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    stop = {name for name, _ in inputs}
    keep, seen, todo = set(), set(), list(outputs)
    while todo:
        t = todo.pop()
        if t in seen or t in stop:
            continue
        seen.add(t)
        n = producer.get(t)
        if n is None:
            continue
        keep.add(id(n))
        todo += list(n.input)
        for a in n.attribute:
            for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                todo += list(_outer_refs(sg))
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    del m.graph.node[:], m.graph.input[:], m.graph.output[:], m.graph.initializer[:], m.graph.value_info[:]
    m.graph.node.extend(n for n in g.node if id(n) in keep)
    m.graph.initializer.extend(t for t in g.initializer if t.name in seen)
    m.graph.input.extend(helper.make_tensor_value_info(name, elem, None) for name, elem in inputs)
    for o in outputs:
        m.graph.node.append(helper.make_node("Cast", [o], [f"sub.{o}"], to=onnx.TensorProto.FLOAT, name=f"sub_cast_{o}"))
        m.graph.output.append(helper.make_tensor_value_info(f"sub.{o}", onnx.TensorProto.FLOAT, None))
    return m


def verify(export_dir: Path, model, missing: dict[str, list[int]], tol, dtype: str,
           providers: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """{layer: {expert: record}} for every unreached expert; record["ok"] says whether it passed.

    model: the float32 reference (``SMLPForCausalLM``, streamed or whole)."""
    import onnx

    from smlp_export.artifacts import MODEL_FILE
    from smlp_export.export.probes import read_probes
    from smlp_export.runners.ort_session import LARGE_MODEL_OPTIONS, create_session

    src = export_dir / MODEL_FILE
    proto = onnx.load(str(src), load_external_data=False)  # weights stay on disk
    probes = {p["name"]: p["tensor"] for p in (read_probes(proto) or [])}
    elem = {"fp32": onnx.TensorProto.FLOAT, "fp16": onnx.TensorProto.FLOAT16,
            "bf16": onnx.TensorProto.BFLOAT16}[dtype]
    np_dtype = {"fp32": np.float32, "fp16": np.float16}.get(dtype)
    out: dict[str, dict[str, Any]] = {}
    for layer, experts in missing.items():
        rec: dict[str, Any] = {}
        out[layer] = rec
        _, i, kind = layer.split(".")
        i = int(i)
        if kind != "tmoe":
            for e in experts:
                rec[str(e)] = {"method": None, "ok": False,
                               "reason": "spatial experts with partial routing cannot be driven directly"}
            continue
        x_name = probes.get("embed" if i == 0 else f"blocks.{i - 1}.out")
        y_name, r_name = probes.get(layer), f"router.{layer}"
        if x_name is None or y_name is None or np_dtype is None:
            why = ("the graph records no block probes (export it again)" if np_dtype is not None
                   else f"ONNX Runtime cannot feed {dtype} inputs")
            for e in experts:
                rec[str(e)] = {"method": None, "ok": False, "reason": why}
            continue
        sub = sub_graph(proto, [(x_name, elem), ("input_ids", onnx.TensorProto.INT64)], [y_name, r_name])
        # next to the published graph: ORT refuses external data outside the model's folder
        path = export_dir / f".unreached-{i}.smlp-{os.getpid()}.onnx"
        onnx.save_model(sub, str(path))
        try:
            sess = create_session(path, providers=providers, **LARGE_MODEL_OPTIONS)
            feeds_of = {i.name for i in sess.get_inputs()}
            tmoe = model.blocks[i].tmoe
            centroids = _tensor(model, f"blocks.{i}.tmoe.centroids")
            for e in experts:
                rec[str(e)] = _drive(sess, feeds_of, tmoe, centroids, e, x_name, y_name, r_name, np_dtype, tol,
                                     model.config)
            del sess
        finally:
            path.unlink(missing_ok=True)
    return out


def _tensor(model, name: str) -> np.ndarray:
    """A parameter's float32 values, from the checkpoint for a streamed reference."""
    src = getattr(model, "weight_source", None)
    if getattr(model, "streamed", False) and src is not None:
        return src.get(name).float().numpy()
    return dict(model.named_parameters())[name].detach().float().numpy()


def _drive(sess, feeds_of: set[str], tmoe, centroids: np.ndarray, e: int, x_name: str, y_name: str,
           r_name: str, np_dtype, tol, cfg) -> dict[str, Any]:
    import torch

    from .compare import decisions

    rows = []
    ok = True
    for T in LENGTHS:
        x = hidden_states(centroids, e, T)
        if x is None:
            return {"method": None, "ok": False,
                    "reason": f"the router's centroids cannot single out expert {e} (E > d or degenerate)"}
        xq = x.astype(np_dtype)[None]  # [1, T, d] in the graph's dtype; PyTorch gets the same values
        feeds = {x_name: xq}
        if "input_ids" in feeds_of:
            feeds["input_ids"] = np.zeros((1, T), dtype=np.int64)
        got_y, got_r = sess.run([f"sub.{y_name}", f"sub.{r_name}"], {k: v for k, v in feeds.items() if k in feeds_of})
        with torch.inference_mode():
            ref = tmoe(torch.from_numpy(xq.astype(np.float32)), None, "").float().numpy()
        k = cfg.top_k if cfg.token_routing == "topk" else 1
        routed = bool((decisions(got_r, k).chosen == e).any(axis=1).all())
        scale = float(np.abs(ref).max()) or 1.0
        err = float(np.abs(got_y.astype(np.float64) - ref).max()) if got_y.shape == ref.shape else float("inf")
        rel = err / scale
        case_ok = routed and np.isfinite(got_y).all() and rel <= tol.max_abs_err_rel
        ok &= bool(case_ok)
        rows.append({"tokens": T, "routed_to_expert": routed, "max_abs_err_rel": rel, "scale": scale,
                     "ok": bool(case_ok)})
    return {"method": METHOD, "ok": ok, "cases": rows, "limit": tol.max_abs_err_rel}
