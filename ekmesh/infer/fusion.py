"""Optional kernel fusion of small elementwise hot spots (norms, RoPE, router softmax, expert activation).

At batch 1 a decode step is bound by the number of kernels, not by arithmetic: an fp32 RMSNorm alone is eight
kernels. Functions decorated with ``@fusable`` run as written (the reference numerics) unless fusion is enabled
and their first tensor argument is on CUDA; then they run through ``torch.compile``, which fuses each into one or
two kernels. The CUDA-graph decoder enables it while it captures its decode step; nothing else does, so prefill,
CPU runs and CPU tests use the plain code.
Invariant: a fused function computes the same function as its plain body (same dtype rules).

Levels (``fused(level)``): ``"compile"`` compiles the ``@fusable`` functions; ``"all"`` (the decoder's default)
also turns on, where they apply (``kernels()``), the hand-written decode kernels (``decode_experts``: routed
experts and softmax router; ``decode_attention``: attention over the static cache) and the rewiring that saves
launches: q/k/v as one matmul, residual sums chained into the next norm, masked grouped-query attention over the
key-value heads; ``"off"`` is the plain code. Benchmarks compare the levels in one run. ``checked`` runs a
hand-written kernel in place of the plain code only once it has agreed with it; ``triton_available`` and ``pow2``
are what the kernels' launchers share.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
from collections.abc import Callable, Hashable, Iterator
from typing import ParamSpec, TypeVar

import torch

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

LEVELS = ("off", "compile", "all")
_level = "off"


@contextlib.contextmanager
def fused(level: str = "all") -> Iterator[None]:
    """Within this block, ``@fusable`` functions called on CUDA tensors run compiled, and at level ``"all"`` the
    decode kernels run where they apply (used around a graph capture, so only the captured decode step is fused and
    prefill keeps the reference code)."""
    global _level
    if level not in LEVELS:
        raise ValueError(f"fusion level {level!r} is not one of {', '.join(LEVELS)}")
    before, _level = _level, level
    try:
        yield
    finally:
        _level = before


def enabled() -> bool:
    """Whether ``@fusable`` functions run compiled."""
    return _level != "off"


def kernels() -> bool:
    """Whether the hand-written decode kernels may run."""
    return _level == "all"


def _allow_specialisations() -> None:
    """Each fused function is specialised per shape and dtype (a decode step has fixed shapes); dynamo's default
    limit of 8 specialisations per function is too low for a process that serves several models, or for tests."""
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 256)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)


def fusable(fn: Callable[P, R]) -> Callable[P, R]:
    compiled: list[Callable[P, R]] = []

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if _level != "off" and isinstance(args[0], torch.Tensor) and args[0].is_cuda:
            if not compiled:
                _allow_specialisations()
                compiled.append(torch.compile(fn, fullgraph=True, dynamic=False))
            return compiled[0](*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (it ships with CUDA builds of torch): the hand-written kernels need it."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def pow2(n: int, least: int = 1) -> int:
    """The least power of two >= max(n, least): a kernel's block size (Triton blocks are powers of two)."""
    return max(least, 1 << (n - 1).bit_length())


CHECK_TOL = 2e-2  # max |kernels - plain path| / max |plain path| accepted on a kind's first call (bf16 rounding)
_verdicts: dict[Hashable, bool] = {}  # kind of call -> the kernels agreed with the plain path on its first call


def relative_difference(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|."""
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def checked(kernels: Callable[[], R], reference: Callable[[], R], kind: Hashable,
            difference: Callable[[R, R], float] = relative_difference) -> R:  # type: ignore[assignment]
    """``kernels()``, checked once per ``kind`` of call (shapes, formats, tokens) against ``reference()`` (the
    plain path on the same inputs) on the first call outside a CUDA-graph capture (the decoder's warm-up): if they
    fail to build or ``difference(got, reference)`` exceeds ``CHECK_TOL``, a warning is logged and that kind runs
    the reference path from then on. So a Triton or driver that misbehaves costs speed, never a wrong answer."""
    verdict = _verdicts.get(kind)
    if verdict is None and not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        ref = reference()
        try:
            got = kernels()
            diff = difference(got, ref)
            verdict = diff <= CHECK_TOL
            problem = f"differ from the plain path by {diff:.3g} of its magnitude"
        except Exception as exc:  # a kernel that does not build or launch here (Triton, driver): noted below
            verdict, problem = False, f"failed: {type(exc).__name__}: {exc}"
        _verdicts[kind] = verdict
        if not verdict:
            log.warning("decode kernels %s for %s; using the plain path for these calls", problem, kind)
        return got if verdict else ref
    return kernels() if verdict is not False else reference()
