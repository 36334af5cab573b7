"""How many bytes a model's parts take, from its config alone: the one home of the size formulas.

Role: the formulas that ``ekmesh plan`` (``ekmesh.registry.plan``), the importer and status share, so a routed
expert has one size in every format wherever it is counted. This module reads shapes and a config dict; it never
reads a tensor, never allocates one (the dense part is counted on the meta device), and knows nothing of stores,
peers or placement.

Formats of a routed expert (``FORMATS``). An expert is a gate_up weight ``[2I, D]`` and a down weight ``[D, I]``
(``ekmesh.infer.experts``: out x in, ``y = x @ W.T``), plus, when its spec has biases, ``[2I]`` and ``[D]``, counted
as float32 in every format (4 bytes each). For one weight of O output rows and I_in input columns:

- ``bf16``: ``2 * O * I_in``.
- ``fp8`` (DeepSeek-V3 block FP8, the checkpoint's own): one byte per weight plus one float32 ``weight_scale_inv``
  per ``bo x bi`` block (default 128 x 128), partial blocks counted whole: ``O * I_in + 4 * ceil(O / bo) *
  ceil(I_in / bi)``. The checkpoint keeps gate and up as two ``[I, D]`` tensors, so they are counted apart (the
  same as one ``[2I, D]`` when bo divides I).
- ``mxfp4`` (gpt-oss, the checkpoint's own): half a byte per weight plus one E8M0 scale byte per 32 input columns:
  ``O * ceil(I_in / 32) * (16 + 1)``, i.e. ``O * I_in / 2 + O * I_in / 32`` when 32 divides I_in.
- ``q8``: int8 weights and one float32 scale per output row: ``O * I_in + 4 * O``.
- ``q4``: 4-bit codes and a float16 scale and a float16 zero per group of G input columns of each row:
  ``O * I_in / 2 + 4 * O * I_in / G``, G the largest of ``Q4_GROUPS`` (128, 64, 32) that divides I_in. A weight
  whose I_in none of them divides cannot be q4: it is counted at its q8 size and named in ``ExpertBytes.q8_kept``
  (an estimate for the plan; ``ekmesh import --quantize q4`` refuses such a model).

The dense part (``dense_sizes``): its exact parameter count, from the family's own ``build(cfg)`` on the meta
device (tied embeddings counted once), at 2 bytes a parameter (bf16, what an attention host holds), and its size as
the checkpoint stores it: a block-FP8 checkpoint stores every ``nn.Linear`` weight but ``lm_head`` in FP8 (the rule
above; DeepSeek-V3's embeddings, norms and routers stay 16-bit), any other parameter takes the width of the config's
``torch_dtype`` (2 bytes when it names none; gpt-oss stores its dense part in bf16).

Invariants: every function is exact integer arithmetic on shapes; no torch at import time (``dense_sizes`` imports
it when called), so a torch-free caller can size experts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ekmesh.core.errors import ConfigError

if TYPE_CHECKING:
    from ekmesh.infer.models.family import Family, ModelConfig

BF16, FP8, MXFP4, Q8, Q4 = "bf16", "fp8", "mxfp4", "q8", "q4"
FORMATS = (BF16, FP8, MXFP4, Q8, Q4)
QUANTIZE = (Q8, Q4)  # what an import can produce from any checkpoint
Q4_GROUPS = (128, 64, 32)  # q4 group sizes, tried largest first
FP8_BLOCK = (128, 128)  # DeepSeek-V3's weight_block_size, transformers' default
MXFP4_BLOCK = 32  # weights per E8M0 scale
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def bf16_bytes(out: int, inp: int) -> int:
    """A ``[out, inp]`` weight in bf16: ``2 * out * inp``."""
    return 2 * out * inp


def fp8_block_bytes(out: int, inp: int, block: tuple[int, int] = FP8_BLOCK) -> int:
    """A ``[out, inp]`` block-FP8 weight and its float32 scales: ``out * inp + 4 * ceil(out/bo) * ceil(inp/bi)``."""
    bo, bi = block
    return out * inp + 4 * _ceil(out, bo) * _ceil(inp, bi)


def mxfp4_bytes(out: int, inp: int) -> int:
    """A ``[out, inp]`` MXFP4 weight: per row, ``ceil(inp/32)`` blocks of 16 code bytes and 1 E8M0 scale byte."""
    return out * _ceil(inp, MXFP4_BLOCK) * (MXFP4_BLOCK // 2 + 1)


def q8_bytes(out: int, inp: int) -> int:
    """A ``[out, inp]`` q8 weight: int8 codes and one float32 scale per output row: ``out * inp + 4 * out``."""
    return out * inp + 4 * out


def q4_group(inp: int) -> int | None:
    """The q4 group size for a weight with ``inp`` input columns: the largest of ``Q4_GROUPS`` dividing it, or None."""
    return next((g for g in Q4_GROUPS if inp % g == 0), None)


def q4_bytes(out: int, inp: int) -> int | None:
    """A ``[out, inp]`` q4 weight: ``out * inp / 2`` code bytes plus a float16 scale and zero (4 bytes) per group of
    G input columns of each row, ``4 * out * inp / G``; None when no group size divides ``inp`` (see ``q4_group``)."""
    g = q4_group(inp)
    if g is None:
        return None
    return out * inp // 2 + 4 * out * inp // g


class ExpertShape(Protocol):
    """What the formulas read of an expert spec (``ekmesh.infer.experts.ExpertSpec`` is one)."""

    @property
    def hidden(self) -> int: ...
    @property
    def intermediate(self) -> int: ...
    @property
    def bias(self) -> bool: ...


@dataclass(frozen=True)
class ExpertBytes:
    """One routed expert in one format: ``bytes`` in all, and which weights stayed q8 in a q4 expert."""

    format: str
    bytes: int
    q8_kept: tuple[str, ...] = ()


def expert_weights(spec: ExpertShape) -> list[tuple[str, int, int]]:
    """The expert's weights as ``(name, out, in)``: gate_up ``[2I, D]`` and down ``[D, I]``."""
    d, i = spec.hidden, spec.intermediate
    return [("gate_up", 2 * i, d), ("down", d, i)]


def expert_params(spec: ExpertShape) -> int:
    """Parameters of one routed expert, biases included."""
    d, i = spec.hidden, spec.intermediate
    return 3 * d * i + ((2 * i + d) if spec.bias else 0)


def expert_bytes(spec: ExpertShape, fmt: str, fp8_block: tuple[int, int] = FP8_BLOCK) -> ExpertBytes:
    """One routed expert of ``spec`` in format ``fmt`` (one of ``FORMATS``; formulas in the module docstring)."""
    d, i = spec.hidden, spec.intermediate
    bias = 4 * (2 * i + d) if spec.bias else 0
    if fmt == FP8:  # gate and up are two [I, D] tensors in the checkpoint, each with its own scale blocks
        return ExpertBytes(fmt, 2 * fp8_block_bytes(i, d, fp8_block) + fp8_block_bytes(d, i, fp8_block) + bias)
    total, kept = bias, []
    for name, out, inp in expert_weights(spec):
        if fmt == BF16:
            total += bf16_bytes(out, inp)
        elif fmt == MXFP4:
            total += mxfp4_bytes(out, inp)
        elif fmt == Q8:
            total += q8_bytes(out, inp)
        elif fmt == Q4:
            n = q4_bytes(out, inp)
            if n is None:
                kept.append(name)
                n = q8_bytes(out, inp)
            total += n
        else:
            raise ConfigError(f"unknown expert format {fmt!r} (known: {', '.join(FORMATS)})")
    return ExpertBytes(fmt, total, tuple(kept))


def checkpoint_format(hf: Mapping[str, Any]) -> str | None:
    """The experts' format as a config.json says the checkpoint stores them, when it is quantized: ``fp8`` (block
    FP8) or ``mxfp4``; None for a plain float checkpoint (or a quantization ekmesh does not size)."""
    quant = hf.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, Mapping) else None
    return method if method in (FP8, MXFP4) else None


def dtype_bytes(hf: Mapping[str, Any]) -> int:
    """Bytes per parameter of the config's ``torch_dtype`` (or ``dtype``); 2 when it names none or another one."""
    name = hf.get("torch_dtype") or hf.get("dtype")
    return _DTYPE_BYTES.get(str(name).removeprefix("torch."), 2)


@dataclass(frozen=True)
class DenseSizes:
    """The dense part: parameters, bytes in bf16, bytes as the checkpoint stores it."""

    params: int
    bytes: int
    stored_bytes: int


def dense_sizes(family: Family[Any], cfg: ModelConfig, fp8_block: tuple[int, int] | None = None,
                width: int = 2) -> DenseSizes:
    """The dense part of ``family.build(cfg)``, counted on the meta device (nothing is allocated).

    ``fp8_block``: the checkpoint's FP8 block when it is block-FP8 (its ``nn.Linear`` weights but ``lm_head`` are
    stored in FP8), else None; ``width``: bytes per parameter of everything else as stored (``dtype_bytes``).
    """
    import torch
    from torch import nn

    with torch.device("meta"):
        model = family.build(cfg)
    model.tie_weights()
    fp8: dict[int, int] = {}
    if fp8_block is not None:
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and name != "lm_head":
                out, inp = mod.weight.shape
                fp8[id(mod.weight)] = fp8_block_bytes(int(out), int(inp), fp8_block)
    params = stored = 0
    for p in model.parameters():  # each shared (tied) parameter once
        params += p.numel()
        stored += fp8.get(id(p), width * p.numel())
    return DenseSizes(params, 2 * params, stored)
