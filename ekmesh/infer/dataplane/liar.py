"""TEST ONLY: makes this process's expert server lie, so that tests and fault benchmarks can show verification
(``verify.py``) catching a member that returns wrong expert results.

Off unless the environment variable ``EKMESH_TEST_LIAR`` is exactly ``perturb-expert-outputs:SCALE`` (SCALE a
finite number > 0): every answer's vector y then becomes ``y + SCALE·‖y‖/√D·n`` with n standard normal noise per
element, a relative error of about SCALE. Any other value of that variable is refused with ``ConfigError`` (a
typo must not leave a test's liar honest), and an unset or empty one is off. The server logs a WARNING when it lies.
No CLI option, config field or advert can turn it on.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping

import torch

from ekmesh.core.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "EKMESH_TEST_LIAR"
MODE = "perturb-expert-outputs:"

Lie = Callable[[torch.Tensor], torch.Tensor]


def from_env(environ: Mapping[str, str] = os.environ) -> Lie | None:
    """The perturbation the environment asks for, or None (honest: the variable is unset or empty)."""
    value = environ.get(ENV, "")
    if not value:
        return None
    scale = math.nan
    if value.startswith(MODE):
        try:
            scale = float(value[len(MODE):])
        except ValueError:
            pass
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"{ENV} must be '{MODE}SCALE' with SCALE > 0 (a test hook), got {value!r}")
    log.warning("%s is set: this expert server returns WRONG results (relative noise %g); for tests only", ENV, scale)
    gen = torch.Generator().manual_seed(0)

    def lie(y: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, D], same dtype and device
        f = y.float()
        noise = torch.randn(f.shape, generator=gen).to(f.device)
        size = f.norm(dim=-1, keepdim=True) / math.sqrt(f.shape[-1])  # [T, 1] rms of each row
        return (f + scale * size * noise).to(y.dtype)

    return lie
