"""Small helpers shared by the kernel launchers."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels on CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_needs_upcast(dtype: torch.dtype) -> bool:
    """Triton 3.9's interpreter computes ``tl.dot`` on bf16 operands as raw 16-bit integers (numpy has
    no bfloat16), giving garbage. Upcasting the operands to fp32 there is exact (a bf16 x bf16
    product fits fp32, and the GPU accumulates in fp32 too), so results match the GPU's semantics.
    """
    return interpreting() and dtype == torch.bfloat16
