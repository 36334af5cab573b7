"""Float weights put into the checkpoints' own formats, as a checkpoint in that format would hold them: DeepSeek's
block FP8 (``test_deepseek``'s quantizer) and gpt-oss's MXFP4 (``test_gpt_oss``'s), as ``QuantizedTensor``s. For
tests and benchmarks: ekmesh itself keeps these formats and never makes them."""

from __future__ import annotations

import torch

from ekmesh.infer.expert import ExpertWeights, quantize_expert
from ekmesh.infer.qtensor import QuantizedTensor
from tests.infer.test_deepseek import _quantize_fp8
from tests.infer.test_gpt_oss import quantize_mxfp4

NATIVE = ("fp8", "mxfp4")


def to_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> QuantizedTensor:
    q, scale = _quantize_fp8(w.detach().float().cpu(), block)
    return QuantizedTensor.fp8(q, scale, block)


def to_mxfp4(w: torch.Tensor) -> QuantizedTensor:
    blocks, scales, _ = quantize_mxfp4(w.detach().float().cpu())
    return QuantizedTensor.mxfp4(blocks, scales)


def in_format(w: ExpertWeights, fmt: str, block: tuple[int, int] = (128, 128)) -> ExpertWeights:
    """``w`` in ``fmt``: q8 / q4 as ``ekmesh import --quantize`` makes them, fp8 / mxfp4 as a checkpoint holds
    them."""
    if fmt not in NATIVE:
        return quantize_expert(w, fmt)
    assert isinstance(w.gate_up, torch.Tensor) and isinstance(w.down, torch.Tensor)
    if fmt == "fp8":
        return ExpertWeights(to_fp8(w.gate_up, block), to_fp8(w.down, block), w.gate_up_bias, w.down_bias)
    return ExpertWeights(to_mxfp4(w.gate_up), to_mxfp4(w.down), w.gate_up_bias, w.down_bias)
