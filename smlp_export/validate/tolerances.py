"""The one per-dtype tolerance table of parity validation (see docs/validation.md).

All error bounds are *relative to the scale of what is compared*: a logit error of 1e-3 is
nothing when logits are in the hundreds and everything when they are 1e-2. ``scale`` is the
largest magnitude of the PyTorch reference values in the case being compared (logits: of the
case's logits; token router: of that layer's router logits; channel router: probabilities,
scale 1).

Noise and ties: two values whose gap is below ``noise(scale) = tie_ulps * eps * scale`` cannot be
ordered reliably at that precision (``eps`` is the dtype's machine epsilon). A routing decision
or a top-1 token whose PyTorch margin is below the noise is a *tie*: a flip there is reported
with its margin but does not fail. fp32: the noise sits just above the largest logit error the
table accepts, so a flip outside a tie implies an error beyond the tolerance. fp16: the noise is
4 ulps, below the 16-ulp error bound, so that routing stays strict where fp16 errors are small.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    dtype: str
    eps: float  # machine epsilon of the dtype the backend computes in
    max_abs_err_rel: float  # max |logits_backend - logits_torch| / scale(logits)
    top1_min: float  # top-1 agreement required on positions outside ties
    ppl_rel_delta: float  # |ppl_backend - ppl_torch| / ppl_torch
    tie_ulps: float  # noise = tie_ulps * eps * scale
    atol: float = 0.0  # absolute allowance on logits errors: only from --atol (validate/overrides.py)

    def noise(self, scale: float) -> float:
        """Smallest gap that the dtype orders reliably, for values of magnitude ``scale``."""
        return self.tie_ulps * self.eps * float(scale)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["noise_rel"] = self.tie_ulps * self.eps
        return d


TOLERANCES: dict[str, Tolerance] = {
    # fp32: 1e-4 of scale is ~840 ulps; exports here measure ~1e-7..1e-6. Noise 2^10 ulps = 1.2e-4.
    "fp32": Tolerance("fp32", float(np.finfo(np.float32).eps), 1e-4, 1.0, 1e-4, 1024.0),
    # fp16: eps 2^-10. Logits through ~10 normalised layers carry a few ulps each; 16 ulps of the
    # scale (1.6e-2) bounds that. The tie noise is tighter (4 ulps, 3.9e-3): the default model
    # measures 0.8-1.9e-3 (logits) and <= 1.3e-3 (router logits), and a 16-ulp noise would wave
    # through a fifth of all decisions as "ties". Top-1 may move on near-ties (99.5 % required).
    "fp16": Tolerance("fp16", float(np.finfo(np.float16).eps), 16 * float(np.finfo(np.float16).eps),
                      0.995, 5e-3, 4.0),
    # bf16: eps 2^-7 (8 mantissa bits, fp32's exponent range). Same derivation in ulps as fp16:
    # the error bound is 16 ulps of the scale (1.25e-1) and the tie noise 4 ulps (3.1e-2); the
    # default model measures ~1.2 ulps (logits) per case (docs/validation.md). The perplexity
    # bound scales with eps like the errors do: fp16's 5e-3 times eps_bf16 / eps_fp16 = 8 -> 4e-2.
    "bf16": Tolerance("bf16", 2.0 ** -7, 16 * 2.0 ** -7, 0.995, 4e-2, 4.0),
}


def tolerance_for(dtype: str) -> Tolerance:
    from smlp_export.errors import InputError

    if dtype not in TOLERANCES:
        raise InputError(f"no tolerances for dtype {dtype!r}; known: {', '.join(TOLERANCES)}")
    return TOLERANCES[dtype]
