"""Ahead-of-time kernel for a plugin's ``@aot_impl``: compiled for the build GPU, checked launchable."""
from __future__ import annotations

from smlp_plugins import _common


def check_no_scratch(ck: object, op_type: str) -> None:
    """TensorRT's AOT launch passes only the inputs, the extra int32 args and the outputs; Triton's
    two appended scratch pointers then hold whatever follows. Fine only while the kernel needs no
    scratch memory: fail the build otherwise instead of letting the kernel read a garbage pointer."""
    need = {"global_scratch_size": ck.global_scratch, "profile_scratch_size": ck.profile_scratch}
    if any(v != 0 for v in need.values()):
        raise RuntimeError(f"{op_type}: kernel {ck.name} needs Triton scratch memory {need}; an AOT plugin "
                           "cannot provide it")


def aot_compile(op_type: str, kernel: str, dtype: object, constexprs: dict[str, int], num_warps: int,
                num_stages: int | None = None):
    """PTX of a plugin kernel for the build GPU (``smlp_export.kernels.aot``), checked scratch-free.
    ``num_stages``: software-pipelining depth (None: ``compile_ptx``'s default)."""
    from smlp_export.kernels.aot import compile_ptx

    stages = {} if num_stages is None else {"num_stages": num_stages}
    ck = compile_ptx(kernel, _common.trt_dtype_name(dtype), arch=_common.gpu_arch(), constexprs=constexprs,
                     num_warps=num_warps, **stages)
    check_no_scratch(ck, op_type)
    return ck
