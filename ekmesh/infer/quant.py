"""Dequantization of quantized checkpoint tensors into plain floating-point weights.

Role: turn the two quantized formats ekmesh can load into ordinary dense tensors, in plain torch on any device.
This module does not know tensor names or checkpoint layouts beyond the two formats below; the loader pairs each
weight with its scales and calls one function. It never quantizes, and it does not run quantized matmuls.

DeepSeek-V3 block FP8 (``quantization_config = {"quant_method": "fp8", "weight_block_size": [bo, bi], ...}``)
    ``<name>.weight`` is ``float8_e4m3fn [..., O, I]`` and ``<name>.weight_scale_inv`` is
    ``float32 [..., ceil(O / bo), ceil(I / bi)]``. Element ``(o, i)`` dequantizes to
    ``weight[o, i] * scale_inv[o // bo, i // bi]``; the last block row/column may be partial when ``O`` or ``I`` is
    not a multiple of the block (DeepSeek-V3's ``kv_a_proj_with_mqa`` has O = 576). ``scale_inv`` is the
    multiplier, despite its name. The result is bit-identical to transformers' ``_dequantize_fp8_weight`` in fp32.

gpt-oss MXFP4 (``quantization_config = {"quant_method": "mxfp4", ...}``)
    ``<name>_blocks`` is ``uint8 [..., G, 16]``: 16 bytes hold the 32 FP4 (e2m1) values of one block, the LOW
    nibble of each byte first. ``<name>_scales`` is ``uint8 [..., G]``: one E8M0 exponent per 32-value block,
    biased by 127. Value = ``FP4_VALUES[nibble] * 2 ** (scale - 127)``.
    ``dequant_mxfp4`` returns ``[..., G * 32]``: the block axis is flattened into the last axis and NOTHING is
    transposed. For gpt-oss, ``mlp.experts.gate_up_proj_blocks [E, 2I, D/32, 16]`` therefore becomes
    ``[E, 2I, D]``, i.e. per expert an ``nn.Linear`` weight ``[out=2I, in=D]`` (``y = x @ W.T``), whose output rows
    interleave gate and up: gate = rows ``0::2``, up = rows ``1::2``. ``down_proj_blocks [E, D, I/32, 16]`` becomes
    ``[E, D, I]``, a Linear weight ``[out=D, in=I]``. transformers' ``convert_moe_packed_tensors`` returns the
    transpose of this (``[E, D, 2I]``, the ``x @ W`` layout of its ``GptOssExperts``): ours ``.transpose(1, 2)``
    equals theirs exactly.

Invariants: inputs are validated (dtype and shape) before anything is allocated, failures raise
``TensorShapeError`` naming the tensor; dequantization is exact (every FP8/FP4 value times a power of two, or
times an fp32 scale, is computed in fp32 with one rounding at most); MXFP4 is processed in bounded row chunks so
the int64 index temporaries never exceed ``rows_per_chunk * 16`` elements.
"""

from __future__ import annotations

import math

import torch

from ekmesh.core.errors import ConfigError, TensorShapeError

# e2m1 code -> value; bit 3 is the sign. Same table as transformers.integrations.mxfp4.FP4_VALUES.
FP4_VALUES: tuple[float, ...] = (
    +0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip

MXFP4_BLOCK = 32  # values per scale
_MXFP4_BYTES = MXFP4_BLOCK // 2  # two values per byte

_DEFAULT_FP8_BLOCK = (128, 128)  # transformers' FineGrainedFP8Config default when weight_block_size is absent


def _fp8_scale_dtypes() -> frozenset[torch.dtype]:
    # float8_e8m0fnu (DeepSeek-V4 "ue8m0" scales) only exists in newer torch; every listed dtype converts to fp32
    # exactly, so the result does not depend on which one the checkpoint used.
    dtypes = {torch.float32, torch.bfloat16, torch.float16}
    e8m0 = getattr(torch, "float8_e8m0fnu", None)
    if e8m0 is not None:
        dtypes.add(e8m0)
    return frozenset(dtypes)


def fp8_block_size(quantization_config: dict | None) -> tuple[int, int] | None:
    """The ``(block_out, block_in)`` of a block-FP8 checkpoint, or None when it is not block-FP8.

    Reads a model config's ``quantization_config``. Returns None when it is None or its ``quant_method`` is not
    ``"fp8"``. A missing ``weight_block_size`` means ``(128, 128)``, transformers' default. An explicit null
    (per-tensor FP8) or a malformed value raises ``ConfigError``: returning None there would make the loader
    treat scaled FP8 weights as unscaled.
    """
    if quantization_config is None:
        return None
    if not isinstance(quantization_config, dict):
        raise ConfigError(f"quantization_config must be an object, got {type(quantization_config).__name__}")
    if quantization_config.get("quant_method") != "fp8":
        return None
    if "weight_block_size" not in quantization_config:
        return _DEFAULT_FP8_BLOCK
    block = quantization_config["weight_block_size"]
    if block is None:
        raise ConfigError("quantization_config: per-tensor FP8 (weight_block_size null) is not supported")
    if (
        not isinstance(block, (list, tuple))
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ConfigError(
            f"quantization_config.weight_block_size must be two positive integers, got {block!r}"
        )
    return (block[0], block[1])


def dequant_fp8_block(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = _DEFAULT_FP8_BLOCK,
    name: str = "",
) -> torch.Tensor:
    """Dequantize a block-scaled FP8 weight ``[..., O, I]`` to float32 ``[..., O, I]``.

    ``scale_inv`` must be ``[..., ceil(O / block[0]), ceil(I / block[1])]`` with the same leading dims as
    ``weight``. ``name`` is the checkpoint name used in errors.
    """
    bo, bi = block
    if bo <= 0 or bi <= 0:
        raise ConfigError(f"FP8 block size must be positive, got {block!r}")
    if weight.dtype != torch.float8_e4m3fn:
        raise TensorShapeError(name, "dtype torch.float8_e4m3fn", f"dtype {weight.dtype}")
    if scale_inv.dtype not in _fp8_scale_dtypes():
        raise TensorShapeError(f"{name}_scale_inv", "a float32 scale tensor", f"dtype {scale_inv.dtype}")
    if weight.dim() < 2:
        raise TensorShapeError(name, "[..., O, I]", list(weight.shape))
    rows, cols = weight.shape[-2:]
    expected = [*weight.shape[:-2], math.ceil(rows / bo), math.ceil(cols / bi)]
    if list(scale_inv.shape) != expected:
        raise TensorShapeError(f"{name}_scale_inv", expected, list(scale_inv.shape))

    out = weight.to(torch.float32)
    scale = scale_inv.to(torch.float32)
    # Expand the scales over rows only ([..., O, nI], small) and broadcast them over each column block through a
    # view of the output, so no second weight-sized tensor is materialized.
    scale = scale.repeat_interleave(bo, dim=-2)[..., :rows, :]  # [..., O, nI]
    full, rem = divmod(cols, bi)
    if full:
        out[..., : full * bi].unflatten(-1, (full, bi)).mul_(scale[..., :full, None])  # [..., O, full, bi]
    if rem:
        out[..., full * bi :].mul_(scale[..., full:])  # [..., O, rem] * [..., O, 1]
    return out


def dequant_mxfp4(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    name: str = "",
    *,
    dtype: torch.dtype = torch.float32,
    rows_per_chunk: int = 1 << 16,
) -> torch.Tensor:
    """Dequantize gpt-oss MXFP4 ``blocks [..., G, 16]`` / ``scales [..., G]`` to ``[..., G * 32]``.

    Low nibble first within each byte; no transpose (see the module docstring for how this maps to a Linear
    weight). ``dtype`` may be float32 (default) or bfloat16: every MXFP4 value is a 2-bit mantissa times a power
    of two inside the fp32/bf16 exponent range, so both are exact (scale 255, E8M0's NaN, gives inf like
    transformers). ``rows_per_chunk`` bounds the temporaries: rows of 16 bytes decoded at once.
    """
    if blocks.dtype != torch.uint8:
        raise TensorShapeError(f"{name}_blocks", "dtype torch.uint8", f"dtype {blocks.dtype}")
    if scales.dtype != torch.uint8:
        raise TensorShapeError(f"{name}_scales", "dtype torch.uint8", f"dtype {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != _MXFP4_BYTES:
        raise TensorShapeError(f"{name}_blocks", f"[..., G, {_MXFP4_BYTES}]", list(blocks.shape))
    if scales.shape != blocks.shape[:-1]:
        raise TensorShapeError(f"{name}_scales", list(blocks.shape[:-1]), list(scales.shape))
    if dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"dequant_mxfp4 produces float32 or bfloat16, not {dtype}")
    if rows_per_chunk <= 0:
        raise ConfigError(f"rows_per_chunk must be positive, got {rows_per_chunk}")

    *lead, groups, _ = blocks.shape
    rows = math.prod(lead) * groups
    flat_blocks = blocks.reshape(rows, _MXFP4_BYTES)  # [R, 16]
    flat_exp = scales.reshape(rows, 1).to(torch.int32) - 127  # [R, 1]
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    out = torch.empty(rows, MXFP4_BLOCK, dtype=dtype, device=blocks.device)  # [R, 32]
    for r0 in range(0, rows, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, rows)
        chunk = flat_blocks[r0:r1]  # [r, 16]
        sub = out[r0:r1]  # [r, 32]
        sub[:, 0::2] = lut[(chunk & 0x0F).long()]
        sub[:, 1::2] = lut[(chunk >> 4).long()]
        torch.ldexp(sub, flat_exp[r0:r1], out=sub)
    return out.reshape(*lead, groups * MXFP4_BLOCK)  # [..., G*32]
