"""What an export is: ``smlp inspect OUT`` (an export folder or one .onnx file).

I/O with symbolic dims, opsets and custom domains, plugin nodes (``smlp`` domain) with their
attributes, initializer bytes, external data files, the graph's metadata_props, and for a folder
the manifest and parity.json summaries. Reads the graph without loading external weights.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import Manifest, is_export_dir, read_parity
from .errors import InputError


def is_export(path: str | Path | None) -> bool:
    """True for an export folder (manifest.json + model.onnx) or a .onnx file."""
    if path is None:
        return False
    p = Path(path)
    return (p.is_file() and p.suffix == ".onnx") or is_export_dir(p)


def _io(vis) -> list[dict[str, Any]]:
    import onnx

    out = []
    for v in vis:
        tt = v.type.tensor_type
        out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
                    if tt.elem_type else None,
                    "shape": [d.dim_param or int(d.dim_value) for d in tt.shape.dim]})
    return out


def describe_onnx(path: Path) -> dict[str, Any]:
    import onnx

    from .export import contract
    from .quantize.summary import quantized_summary, tensor_bytes

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf errors carry no useful type
        raise InputError(f"{path} is not a readable ONNX file ({type(e).__name__}: {e})") from None
    if not m.HasField("graph") or not m.opset_import:  # e.g. a 0-byte file parses as an empty ModelProto
        raise InputError(f"{path} is not an ONNX model ({path.stat().st_size} bytes, no graph or opset)")
    g = m.graph
    ext: dict[str, int] = {}
    inline = 0
    for t in g.initializer:
        # tensor bytes from dims x element size: the same figure whether the data is inline or not
        n = tensor_bytes(t)  # int4 packs two values per byte
        if t.data_location == t.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location", "?")
            ext[loc] = ext.get(loc, 0) + n
        else:
            inline += n
    plugins = []
    for n in g.node:
        if n.domain == contract.DOMAIN:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
            plugins.append({"name": n.name, "op_type": n.op_type, "domain": n.domain, "attributes": attrs})
    counts: dict[str, int] = {}
    for n in g.node:
        key = f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        counts[key] = counts.get(key, 0) + 1
    meta = {p.key: p.value for p in m.metadata_props}
    for key in ("smlp.config", "smlp.probes"):
        if key in meta:
            try:
                meta[key] = json.loads(meta[key])
            except (ValueError, RecursionError):
                raise InputError(f"{path}: metadata {key!r} is not valid JSON") from None
    return {
        "file": str(path), "bytes": path.stat().st_size, "ir_version": int(m.ir_version),
        "producer": f"{m.producer_name} {m.producer_version}".strip(),
        "opsets": {(o.domain or "ai.onnx"): int(o.version) for o in m.opset_import},
        # ai.onnx.ml is a standard ONNX domain (the exporter may import it unused)
        "custom_domains": sorted({o.domain for o in m.opset_import if o.domain not in ("", "ai.onnx", "ai.onnx.ml")}),
        "inputs": _io(g.input), "outputs": _io(g.output),
        "nodes": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "functions": [f"{f.domain}::{f.name}" for f in m.functions],
        "plugin_nodes": plugins,
        "initializers": {"count": len(g.initializer), "inline_bytes": inline,
                         "external_bytes": sum(ext.values())},
        "external_data": [{"file": k, "bytes": v, "present": (path.parent / k).is_file()} for k, v in sorted(ext.items())],
        "metadata_props": meta,
        "quantized": quantized_summary(g),  # None unless weights are stored in int8 / int4
    }


def describe_export(path: str | Path) -> dict[str, Any]:
    """JSON-able description of an export folder (every .onnx in it) or of one .onnx file."""
    p = Path(path)
    if p.is_file():
        return {"path": str(p), "graphs": {p.name: describe_onnx(p)}}
    out: dict[str, Any] = {"path": str(p), "graphs": {}}
    for f in sorted(p.glob("*.onnx")):
        out["graphs"][f.name] = describe_onnx(f)
    if is_export_dir(p):
        m = Manifest.read(p).to_dict()
        out["manifest"] = {k: m.get(k) for k in ("target", "dtype", "opset", "ort_moe", "ir_version",
                                                 "custom_domains", "checkpoint", "tool_versions", "files")}
        out["manifest"]["decode"] = bool(m.get("decode"))
        out["manifest"]["quantization"] = m.get("quantization")
    r = read_parity(p)
    if r is not None:
        mt = r.get("metrics") if isinstance(r.get("metrics"), dict) else {}
        out["parity"] = {"passed": r.get("passed"), "backend": r.get("backend"), "quick": r.get("quick"),
                         "max_abs_err_rel": mt.get("max_abs_err_rel"),
                         "max_abs_err_rel_limit": (r.get("tolerances") or {}).get("max_abs_err_rel"),
                         "top1_agreement": mt.get("top1_agreement"),
                         "ppl_rel_delta": mt.get("ppl_rel_delta"), "failures": r.get("failures"),
                         "first_divergence": (r.get("bisect") if isinstance(r.get("bisect"), dict) else {}).get("first_divergence")}
    return out


def export_lines(d: dict[str, Any]) -> list[str]:
    lines = [f"export  {d['path']}"]
    if "manifest" in d:
        m = d["manifest"]
        ck = m.get("checkpoint") or {}
        lines.append(f"target  {m['target']} / {m['dtype']}, opset {m['opset']}, IR {m['ir_version']}, "
                     f"decode graph: {'yes' if m['decode'] else 'no'}")
        lines.append(f"source  {ck.get('name')} sha256 {str(ck.get('weights_sha256'))[:16]}...")
        q = m.get("quantization")
        if q:
            lines.append(f"quant   {q['method']} weight-only, block {q['block_size']} (experts: "
                         f"{'per channel' if not q['expert_block'] else 'block ' + str(q['expert_block'])}), "
                         f"symmetric; {q['quantized_weights']:,} weights in {q['quantized_bytes']:,} B = "
                         f"{q['bits_per_weight']} bits/weight; {q['float_weights']:,} weights stay float")
    for name, g in d["graphs"].items():
        lines.append(f"{name}  {g['bytes']:,} bytes; initializers {g['initializers']['count']} "
                     f"({g['initializers']['inline_bytes']:,} B inline, {g['initializers']['external_bytes']:,} B external)")
        lines.append("  opsets  " + ", ".join(f"{k} {v}" for k, v in g["opsets"].items()))
        for io in ("inputs", "outputs"):
            for v in g[io]:
                lines.append(f"  {io[:-1]:<6s} {v['name']}: {v['dtype']} [{', '.join(map(str, v['shape']))}]")
        qs = g.get("quantized")
        if qs:
            lines.append(f"  quantized  {qs['weights']:,} weights in {qs['bytes']:,} B ({qs['bits_per_weight']} bits/weight) "
                         "via " + ", ".join(f"{k} x{v}" for k, v in sorted(qs["by_op"].items())))
        for e in g["external_data"]:
            lines.append(f"  external {e['file']} {e['bytes']:,} B{'' if e['present'] else ' (MISSING)'}")
        for pn in g["plugin_nodes"]:
            lines.append(f"  plugin {pn['domain']}::{pn['op_type']} {pn['name']}: "
                         + ", ".join(f"{k}={v}" for k, v in sorted(pn["attributes"].items())))
        meta = g["metadata_props"]
        if meta:
            lines.append(f"  metadata  producer {meta.get('smlp.producer_version', '-')}, checkpoint sha256 "
                         f"{str(meta.get('smlp.checkpoint_sha256', '-'))[:16]}..., probes "
                         f"{len(meta.get('smlp.probes') or [])}")
    if "parity" in d:
        p = d["parity"]
        err = p["max_abs_err_rel"]
        err = f"{err:.3g}" if isinstance(err, (int, float)) else str(err)
        lim = p.get("max_abs_err_rel_limit")
        lim = f" (limit {lim:.3g})" if isinstance(lim, (int, float)) else ""
        lines.append(f"parity  {'passed' if p['passed'] else 'FAILED'} ({p['backend']}{', quick' if p['quick'] else ''}); "
                     f"largest logits error / logits scale {err}{lim}; first divergence {p['first_divergence'] or '-'}")
    return lines
