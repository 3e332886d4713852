"""Describe the machine a benchmark ran on: CPU model, cores, memory, load, library versions.

Figures without the machine they came from cannot be compared, so every JSON report embeds this.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import os
import platform
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "onnx", "onnxscript", "onnxruntime-gpu", "onnxruntime", "numpy", "tensorrt", "triton")


def cpu_model(cpuinfo: str | None = None) -> str:
    """The 'model name' line of /proc/cpuinfo (Linux), else platform.processor() or 'unknown'."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that change the figures (missing ones are left out)."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = _md.version(name)
        except _md.PackageNotFoundError:
            continue
    return out


def describe_machine() -> dict[str, Any]:
    """A JSON-ready description: host, CPU model, logical cores usable by this process, memory,
    load averages at the time of the call, Python / OS, library versions, torch thread count."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        load = None
    desc: dict[str, Any] = {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "mem_total_gib": _mem_total_gib(),
        "load_avg_1_5_15m": load,
        "os": platform.platform(),
        "python": platform.python_version(),
        "libraries": library_versions(),
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import torch

        desc["torch_threads"] = torch.get_num_threads()
        desc["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return desc


def short_description(desc: dict[str, Any]) -> str:
    """One line for tables and READMEs: 'CPU model, N cores, load X'."""
    load = desc.get("load_avg_1_5_15m")
    parts = [str(desc.get("cpu_model", "unknown CPU")), f"{desc.get('usable_cores')} cores"]
    if desc.get("cuda_device"):
        parts.append(str(desc["cuda_device"]))
    if load:
        parts.append(f"load avg {load[0]}")
    libs = desc.get("libraries", {})
    ort = libs.get("onnxruntime-gpu") or libs.get("onnxruntime")
    parts.append(f"torch {libs.get('torch', '?')}, onnxruntime {ort or '?'}")
    return ", ".join(parts)
