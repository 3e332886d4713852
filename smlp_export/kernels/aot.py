"""Ahead-of-time compilation of the plugin kernels to PTX (no GPU needed).

``compile_ptx("spatial_moe", dtype="float16", arch=90, constexprs={...})`` returns an
:class:`AotKernel` with the PTX text, its entry name, the launch facts (warps, shared memory) and
the number of ``.param`` entries (user arguments + the 2 ``.u64`` scratch pointers Triton 3.9
appends). ``triton.compile`` needs an explicit ``GPUTarget`` on a machine without a driver.

Under ``TRITON_INTERPRET=1`` (tests), ``@triton.jit`` returns interpreter objects that cannot be
compiled, so the compilation then runs in a fresh Python process with the interpreter switched off.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

# Triton type strings per torch dtype name.
TRITON_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

# kernel key -> (module attribute, pointer args (in order), int32 scalar args, output pointer args)
PLUGIN_KERNELS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "spatial_moe": ("spatial_moe_plugin_kernel", ("z2_ptr", "w_ptr", "bias_ptr"), ("T", "c", "n"), ("out_ptr",)),
    "spatial_moe_partial": ("spatial_moe_partial_plugin_kernel", ("z2_ptr", "w_ptr", "bias_ptr", "router_ptr"),
                            ("T", "c", "n"), ("out_ptr",)),
    "grouped_expert_gemm": ("grouped_expert_gemm_plugin_kernel", ("x_ptr", "offsets_ptr", "w_ptr", "b_ptr"), ("M",),
                            ("out_ptr",)),
}
# Pointer arguments whose element type does not follow the kernel's dtype.
FIXED_PTR_TYPES: dict[str, dict[str, str]] = {"grouped_expert_gemm": {"offsets_ptr": "*i32"}}
SCRATCH_PARAMS = 2  # Triton >= 3.x appends global + profile scratch pointers to every kernel


@dataclass(frozen=True)
class AotKernel:
    name: str  # PTX entry name
    ptx: str
    num_warps: int
    shared: int  # bytes of dynamic shared memory the launch needs
    num_params: int  # .param count in the entry (user args + scratch)
    arch: int
    global_scratch: int  # bytes of Triton global scratch per program (TensorRT's AOT launch gives none)
    profile_scratch: int  # bytes of Triton profiler scratch (likewise)

    @property
    def block_x(self) -> int:
        return 32 * self.num_warps


def signature(kernel: str, dtype: str, constexprs: dict[str, int]) -> dict[str, str]:
    """Triton signature of a plugin kernel: pointers in ``dtype`` (except ``FIXED_PTR_TYPES``, e.g. the
    grouped GEMM's int32 offsets), scalars i32, then constexprs."""
    _, ptrs, scalars, outs = PLUGIN_KERNELS[kernel]
    ty = TRITON_DTYPES[dtype]
    fixed = FIXED_PTR_TYPES.get(kernel, {})
    sig = {p: fixed.get(p, f"*{ty}") for p in ptrs}
    sig.update({s: "i32" for s in scalars})
    sig.update({o: f"*{ty}" for o in outs})
    sig.update({k: "constexpr" for k in constexprs})
    sig["INTERP_BF16"] = "constexpr"  # interpreter-only bf16 fixes, always off in compiled code
    return sig


def count_params(ptx: str, entry: str) -> int:
    """Number of ``.param`` declarations of ``.entry entry(...)`` in a PTX text."""
    m = re.search(r"\.entry\s+" + re.escape(entry) + r"\s*\((.*?)\)", ptx, re.S)
    if not m:
        raise ValueError(f"entry {entry!r} not found in PTX")
    return len(re.findall(r"\.param\s", m.group(1)))


def _compile_spec(spec: dict) -> AotKernel:
    """spec: module (under smlp_export.kernels), kernel (attribute), signature, constexprs, arch,
    num_warps, num_stages, ptx_version. Must run with the interpreter off."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = importlib.import_module(f"smlp_export.kernels.{spec['module']}")
    fn = getattr(mod, spec["kernel"])
    sig = dict(spec["signature"])
    sig.update({k: "constexpr" for k in spec["constexprs"]})
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(spec["constexprs"]))
    options: dict[str, int] = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)}
    if spec.get("ptx_version") is not None:
        options["ptx_version"] = spec["ptx_version"]
    ck = triton.compile(src, target=GPUTarget("cuda", spec["arch"], 32), options=options)
    ptx = ck.asm["ptx"]
    name = ck.metadata.name
    return AotKernel(name=name, ptx=ptx, num_warps=ck.metadata.num_warps, shared=ck.metadata.shared,
                     num_params=count_params(ptx, name), arch=spec["arch"],
                     global_scratch=int(ck.metadata.global_scratch_size),
                     profile_scratch=int(ck.metadata.profile_scratch_size))


def compile_specs(specs: list[dict]) -> list[AotKernel]:
    """Compile several kernels (see :func:`_compile_spec`); under ``TRITON_INTERPRET=1`` all of them
    in ONE fresh interpreter-off Python process."""
    from ._util import interpreting

    if not interpreting():
        return [_compile_spec(s) for s in specs]
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, set to silence its warning
    code = ("import json,sys; from dataclasses import asdict; "
            "from smlp_export.kernels.aot import _compile_spec; "
            "print(json.dumps([asdict(_compile_spec(s)) for s in json.loads(sys.stdin.read())]))")
    res = subprocess.run([sys.executable, "-c", code], input=json.dumps(specs), env=env,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"AOT compile failed:\n{res.stderr[-3000:]}")
    return [AotKernel(**d) for d in json.loads(res.stdout.strip().splitlines()[-1])]


def compile_ptx(kernel: str, dtype: str, arch: int, constexprs: dict[str, int], num_warps: int = 4,
                ptx_version: int | None = 80, num_stages: int = 3) -> AotKernel:
    """Compile a plugin kernel for ``sm_<arch>``. ``ptx_version=80`` keeps the PTX loadable by
    CUDA 12.0+ drivers (the bundled ptxas default, 9.x, needs a very new driver)."""
    return compile_specs([plugin_spec(kernel, dtype, arch, constexprs, num_warps, ptx_version, num_stages)])[0]


def plugin_spec(kernel: str, dtype: str, arch: int, constexprs: dict[str, int], num_warps: int = 4,
                ptx_version: int | None = 80, num_stages: int = 3) -> dict:
    """The :func:`compile_specs` entry of a plugin kernel (several can then share one subprocess)."""
    if kernel not in PLUGIN_KERNELS:
        raise KeyError(f"unknown plugin kernel {kernel!r}; expected one of {sorted(PLUGIN_KERNELS)}")
    if dtype not in TRITON_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(TRITON_DTYPES)}")
    sig = {k: v for k, v in signature(kernel, dtype, constexprs).items() if v != "constexpr"}
    return dict(module="plugin_kernels", kernel=PLUGIN_KERNELS[kernel][0], signature=sig,
                constexprs={**constexprs, "INTERP_BF16": False}, arch=arch, num_warps=num_warps,
                num_stages=num_stages, ptx_version=ptx_version)


__all__ = ["AotKernel", "compile_ptx", "compile_specs", "count_params", "signature", "PLUGIN_KERNELS", "SCRATCH_PARAMS",
           "TRITON_DTYPES", "FIXED_PTR_TYPES", "plugin_spec"]
