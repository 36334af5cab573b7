"""RMSNorm as Hugging Face transformers computes it (normalise in fp32, cast back, then scale), alone and fused
with the residual sum before it.

Responsibilities: the norm module every family's decoder layers, attention qk-norms and final norm use, and the two
fusable functions behind it. Not responsible for: which norm a layer uses where (``common.DecoderLayer``,
``attention.Attention``). Kept apart from ``common.py`` and ``attention.py`` so both import it and neither imports
the other's internals (no import cycle). Shapes: D the normalised (last) dimension.
"""

from __future__ import annotations

import torch
from torch import nn

from ekmesh.infer.fusion import fusable


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_norm(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + y, this norm of it): a residual sum and the norm that reads it, one fused call where fusion is on.
        A subclass with another formula overrides ``forward`` and this."""
        return add_rms_norm(x, y, self.weight, self.eps)


def plain_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm formula, never compiled itself: for use inside other fusable functions."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


@fusable
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: normalise in fp32, cast back, then scale."""
    return plain_rms_norm(x, weight, eps)


@fusable
def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual sum x + y and its RMSNorm, in one fused call."""
    s = x + y
    return s, plain_rms_norm(s, weight, eps)
