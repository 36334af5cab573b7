"""Optional kernel fusion of small elementwise hot spots (norms, RoPE, router softmax, expert activation).

At batch 1 a decode step is bound by the number of kernels, not by arithmetic: an fp32 RMSNorm alone is eight
kernels. Functions decorated with ``@fusable`` run as written (the reference numerics) unless fusion is enabled
and their first tensor argument is on CUDA; then they run through ``torch.compile``, which fuses each into one or
two kernels. The CUDA-graph decoder enables it; nothing else does, so CPU runs and tests use the plain code.
Invariant: a fused function computes the same function as its plain body (same dtype rules).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

_enabled = False


def enable(on: bool = True) -> None:
    global _enabled
    if on and not _enabled:
        log.info("kernel fusion (torch.compile) enabled for CUDA hot paths")
    _enabled = on


def enabled() -> bool:
    return _enabled


def fusable(fn: F) -> F:
    compiled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _enabled and isinstance(args[0], torch.Tensor) and args[0].is_cuda:
            if not compiled:
                compiled.append(torch.compile(fn, fullgraph=True, dynamic=False))
            return compiled[0](*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
