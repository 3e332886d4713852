"""Small helpers shared by the kernel launchers."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels on CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interp_bf16(dtype: torch.dtype) -> bool:
    """True for bf16 under the interpreter, where Triton 3.9 has two bf16 defects (numpy has no
    bfloat16; bf16 is stored as uint16):
    - ``tl.dot`` on bf16 operands multiplies the raw 16-bit integers (garbage). The kernels upcast the
      operands to fp32 first, which is exact (a bf16 x bf16 product fits fp32; the GPU accumulates in
      fp32 too);
    - fp32 -> bf16 casts truncate (the GPU rounds to nearest even). The kernels round by hand on the
      bits first (``grouped_moe._to_io``).
    With both, the CPU tests see the GPU's bf16 semantics. On a GPU the flag is False.
    """
    return interpreting() and dtype == torch.bfloat16
