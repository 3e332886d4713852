"""ONNX ``metadata_props`` that say what made a graph: source checkpoint sha256, config, producer.

Written after the exporter's own metadata is stripped, from values that do not change between
runs (no times, no paths), sorted by key, so that exports stay byte-identical.
"""
from __future__ import annotations

import json

import onnx

KEYS = ("smlp.checkpoint_sha256", "smlp.config", "smlp.producer_version")


def attach_metadata(proto: onnx.ModelProto, model) -> None:
    """Add the keys of ``KEYS`` (replacing earlier ones) and keep all entries sorted by key."""
    import smlp_export

    info = getattr(model, "checkpoint_info", None) or {}
    values = {"smlp.checkpoint_sha256": info.get("weights_sha256") or "",
              "smlp.config": json.dumps(model.config.to_dict(), sort_keys=True, separators=(",", ":")),
              "smlp.producer_version": f"smlp-export {smlp_export.__version__}"}
    entries = {p.key: p.value for p in proto.metadata_props if p.key not in values}
    entries.update(values)
    del proto.metadata_props[:]
    for k in sorted(entries):
        p = proto.metadata_props.add()
        p.key, p.value = k, entries[k]
