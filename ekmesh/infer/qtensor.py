"""Weight-only quantized Linear weights: the stored 8-bit and 4-bit formats, and the kernels that compute with them.

Role: a ``QuantizedTensor`` stands for one 2-D Linear weight ``W [O, I]`` (``y = x @ W.T``) in a canonical format
that is stored, shipped and hashed as is; ``quantize`` makes one from a float weight, ``from_tensors`` reads one
back from named tensors (validated) and ``dequantize`` is the plain reference path. ``pack`` turns one into a
``PackedWeight``: the same numbers in the layout of a device's kernel (still quantized in memory, never a float
copy), and ``qlinear`` computes ``x @ W.T + bias`` with it. Of experts it knows only the name prefix of a
stored expert's tensors (``expert_prefix``); ``experts.py`` builds on it.

Canonical (stored) formats, ``{p}`` being the prefix given to ``to_tensors`` / ``from_tensors``:

    q8  ``{p}.qweight`` int8 [O, I], ``{p}.scale`` float32 [O]; ``group_size == I``.
        Symmetric per output row: ``scale = max|w_row| / 127``, ``code = clamp(round(w / scale), -127, 127)``,
        ``w ~= code * scale``. A row of zeros gets scale 1.0 and codes 0, which dequantize to exactly 0.
    q4  ``{p}.qweight`` uint8 [O, I/2], ``{p}.scale`` float16 [O, I/G], ``{p}.zero`` float16 [O, I/G];
        ``G = group_size`` in ``Q4_GROUP_SIZES`` and divides I. Column 2j is the LOW nibble of byte j of its row,
        column 2j+1 the HIGH nibble; codes are unsigned 0..15. Asymmetric per group of G consecutive input columns:
        ``w[o, i] ~= (code - 8) * scale[o, i // G] + zero[o, i // G]`` (the convention of torch's int4 "tinygemm"
        kernels). From the group's min/max: ``scale = fp16((max - min) / 15)``, ``zero = fp16(min + 8 * scale)``,
        both rounded to fp16 FIRST, then ``code = clamp(round((w - zero) / scale) + 8, 0, 15)`` from the rounded
        values, so the codes are the best ones for the stored scale and zero. A constant group (max == min, or a
        spread too small for an fp16 scale) gets scale 1.0 and zero = fp16(min), and code 8.

The checkpoints' own formats, ``fp8`` (DeepSeek block FP8) and ``mxfp4`` (gpt-oss), are ``QuantizedTensor``s too
(made by ``QuantizedTensor.fp8`` / ``.mxfp4`` from the checkpoint's tensors, laid out and computed in
``qnative.py``), so a loaded expert keeps its checkpoint bytes; ekmesh never quantizes to them, and they are not
stored through ``to_tensors`` (their blobs are the checkpoint's own tensors). ``cat_rows`` / ``take_rows`` join
and reorder output rows of any format as stored (gate and up into gate_up; gpt-oss's interleaved rows).

Invariants:
- ``quantize`` works in float32 on the CPU whatever the input's dtype and device, and is deterministic
  (``torch.round`` rounds half to even; min/max/abs are exact), so the same weight gives the same bytes.
- Error bounds (up to float32 rounding of the product): q8 ``|w - deq| <= scale/2`` per element; q4
  ``|w - deq| <= scale/2`` per group whenever the fp16 zero is finer than the step (``ulp16(zero) <= scale``,
  i.e. ``|zero| <~ 1000 * scale``, true of zero-centred weights); otherwise it may exceed that by half an fp16
  ulp of ``zero`` at most.
- A ``QuantizedTensor`` is validated at construction (dtypes and shapes of every tensor); ``from_tensors`` checks
  each named tensor before touching it and raises ``MissingTensorError`` / ``TensorShapeError`` naming it, or
  ``ConfigError`` for an unknown format or a group size that is not allowed or does not divide I.

The kernels that compute with these weights, and their measurements, are in ``qkernels.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ekmesh.core.errors import CheckpointError, ConfigError, MissingTensorError, TensorShapeError
from ekmesh.infer import qnative
from ekmesh.infer.qnative import NATIVE_FORMATS

QFORMATS = ("q8", "q4")  # what ekmesh quantizes to; NATIVE_FORMATS (fp8, mxfp4) are kept from checkpoints
Q4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 kernels accept
DEFAULT_Q4_GROUP_SIZES = (128, 64, 32)  # the first that divides I is the default
Q8_MAX = 127
Q4_MID = 8  # code - 8: the tinygemm convention
FP16_MAX = 65504.0

_Spec = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def expert_prefix(layer: int, expert: int) -> str:
    """The name prefix of one routed expert's stored tensors: ``experts.<layer>.<expert>``."""
    return f"experts.{layer}.{expert}"


def tensor_names(fmt: str, prefix: str) -> tuple[str, ...]:
    """The names of the stored tensors of one quantized weight (what ``to_tensors`` writes)."""
    return tuple(f"{prefix}.{s}" for s in _suffixes(fmt, prefix))


def _suffixes(fmt: str, name: str) -> tuple[str, ...]:
    if fmt == "q8" or fmt in NATIVE_FORMATS:
        return ("qweight", "scale")
    if fmt == "q4":
        return ("qweight", "scale", "zero")
    raise ConfigError(f"{name}: unknown quantization format {fmt!r} (known: {', '.join(QFORMATS + NATIVE_FORMATS)})")


def _layout(fmt: str, shape: Sequence[int], group_size: int, name: str, block_rows: int = 1) -> _Spec:
    """{suffix: (dtype, shape)} of each stored tensor; ConfigError for a format or group size that is not allowed."""
    _suffixes(fmt, name)
    if len(shape) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        raise ConfigError(f"{name}: a quantized weight needs a shape of two positive ints, got {tuple(shape)!r}")
    o, i = shape
    if fmt in NATIVE_FORMATS:
        return qnative.layout(fmt, (o, i), group_size, block_rows, name)
    if block_rows != 1:
        raise ConfigError(f"{name}: {fmt} has no row blocks (block_rows {block_rows})")
    if fmt == "q8":
        if group_size != i:
            raise ConfigError(f"{name}: q8 has one scale per output row, so group_size must be I = {i}, "
                              f"got {group_size}")
        return {"qweight": (torch.int8, (o, i)), "scale": (torch.float32, (o,))}
    if group_size not in Q4_GROUP_SIZES or i % group_size:
        raise ConfigError(f"{name}: q4 group size {group_size} is not one of {Q4_GROUP_SIZES} dividing I = {i}")
    g = i // group_size
    return {"qweight": (torch.uint8, (o, i // 2)), "scale": (torch.float16, (o, g)), "zero": (torch.float16, (o, g))}


def _check(spec: _Spec, tensors: Mapping[str, torch.Tensor | None], prefix: str) -> None:
    for suffix, (dtype, shape) in spec.items():
        name = f"{prefix}.{suffix}"
        t = tensors.get(suffix)
        if t is None:
            raise MissingTensorError(name)
        if t.dtype != dtype:
            raise TensorShapeError(name, f"dtype {dtype}", f"dtype {t.dtype}")
        if tuple(t.shape) != shape:
            raise TensorShapeError(name, shape, tuple(t.shape))


def default_group_size(fmt: str, *in_features: int) -> int:
    """The group size ``quantize`` uses when none is given: I for q8; for q4 the first of 128, 64, 32 that divides
    every given I (one group size can then serve all projections of an expert)."""
    if fmt not in QFORMATS:
        raise ConfigError(f"{fmt!r} is not a format ekmesh quantizes to ({', '.join(QFORMATS)})")
    if fmt == "q8":
        if len(in_features) != 1:
            raise ConfigError("q8's group size is the weight's own I: give exactly one")
        return in_features[0]
    _suffixes(fmt, "group size")
    for g in DEFAULT_Q4_GROUP_SIZES:
        if all(i % g == 0 for i in in_features):
            return g
    raise ConfigError(f"q4 needs input sizes divisible by 32, got {in_features}")


def stored_group_size(fmt: str, shape: tuple[int, int], tensors: Mapping[str, torch.Tensor], prefix: str) -> int:
    """The group size of a stored weight, read from its tensors: I for q8; for q4 I divided by the number of columns
    of ``{prefix}.scale``, which is validated first (``MissingTensorError`` / ``TensorShapeError`` naming it)."""
    _suffixes(fmt, prefix)
    o, i = shape
    if fmt == "q8":
        return i
    name = f"{prefix}.scale"
    scale = tensors.get(name)
    if scale is None:
        raise MissingTensorError(name)
    expected = f"[{o}, {i}/G] with G one of {Q4_GROUP_SIZES}"
    if scale.dim() != 2 or scale.shape[0] != o or scale.shape[1] == 0 or i % scale.shape[1]:
        raise TensorShapeError(name, expected, tuple(scale.shape))
    g = i // scale.shape[1]
    if g not in Q4_GROUP_SIZES:
        raise TensorShapeError(name, expected, tuple(scale.shape))
    return g


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """One Linear weight [O, I] in a canonical quantized format (see the module docstring)."""

    fmt: str  # "q8" | "q4" | "fp8" | "mxfp4"
    shape: tuple[int, int]  # (O, I) of the float weight it stands for
    group_size: int  # q4: one of Q4_GROUP_SIZES, divides I; q8: == I; fp8: the block's columns; mxfp4: 32
    qweight: torch.Tensor  # q8: int8 [O, I]; q4, mxfp4: uint8 [O, I/2]; fp8: float8_e4m3fn [O, I]
    scale: torch.Tensor  # q8: float32 [O]; q4: float16 [O, I/G]; fp8: float32 [O/bo, I/G]; mxfp4: uint8 [O, I/32]
    zero: torch.Tensor | None  # q4: float16 [O, I/G]; others: None
    block_rows: int = 1  # fp8: rows of a scale block (bo, or 1 after a concatenation bo does not tile); others 1

    def __post_init__(self) -> None:
        name = f"<{self.fmt} weight {self.shape}>"
        _check(_layout(self.fmt, self.shape, self.group_size, name, self.block_rows),
               {"qweight": self.qweight, "scale": self.scale, "zero": self.zero}, name)
        if self.fmt != "q4" and self.zero is not None:
            raise ConfigError(f"{name}: {self.fmt} has no zero tensor")

    @classmethod
    def fp8(cls, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
            name: str = "weight") -> QuantizedTensor:
        """A block-FP8 checkpoint weight kept as stored: ``weight`` float8_e4m3fn [O, I], ``scale_inv``
        [ceil(O / bo), ceil(I / bi)] in any of the checkpoint scale dtypes (converted to float32, exactly).
        ``TensorShapeError`` names the tensor."""
        if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
            raise TensorShapeError(name, "float8_e4m3fn [O, I]", f"{weight.dtype} {tuple(weight.shape)}")
        o, i = (int(n) for n in weight.shape)
        expect = (math.ceil(o / block[0]), math.ceil(i / block[1]))
        if tuple(scale_inv.shape) != expect or not scale_inv.is_floating_point():
            raise TensorShapeError(f"{name}_scale_inv", f"float {list(expect)}",
                                   f"{scale_inv.dtype} {list(scale_inv.shape)}")
        scale = scale_inv.to(torch.float32)
        if scale.device.type != "meta" and not bool(torch.isfinite(scale).all()):
            raise CheckpointError(f"tensor {name + '_scale_inv'!r} has non-finite values")
        return cls("fp8", (o, i), block[1], weight, scale, None, block[0])

    @classmethod
    def mxfp4(cls, blocks: torch.Tensor, scales: torch.Tensor, name: str = "weight") -> QuantizedTensor:
        """An MXFP4 checkpoint weight kept as stored: ``blocks`` uint8 [O, I/32, 16], ``scales`` uint8 [O, I/32].
        ``TensorShapeError`` names the tensor."""
        half = qnative.MXFP4_GROUP // 2
        if blocks.dtype != torch.uint8 or blocks.dim() != 3 or blocks.shape[-1] != half:
            raise TensorShapeError(f"{name}_blocks", f"uint8 [O, G, {half}]", f"{blocks.dtype} {list(blocks.shape)}")
        if scales.dtype != torch.uint8 or tuple(scales.shape) != tuple(blocks.shape[:2]):
            raise TensorShapeError(f"{name}_scales", f"uint8 {list(blocks.shape[:2])}",
                                   f"{scales.dtype} {list(scales.shape)}")
        o, g = int(blocks.shape[0]), int(blocks.shape[1])
        return cls("mxfp4", (o, g * qnative.MXFP4_GROUP), qnative.MXFP4_GROUP, blocks.reshape(o, g * half),
                   scales, None)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """The same weight with its tensors on ``device`` (nothing is converted)."""
        z = None if self.zero is None else self.zero.to(device)
        return dataclasses.replace(self, qweight=self.qweight.to(device), scale=self.scale.to(device), zero=z)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [O, I] it stands for, computed in float32 on its device, then cast to ``dtype``."""
        if self.fmt in NATIVE_FORMATS:
            w = qnative.dequantize(self.fmt, self.qweight, self.scale, self.shape, self.group_size, self.block_rows)
        elif self.fmt == "q8":
            w = self.qweight.to(torch.float32) * self.scale.to(torch.float32)[:, None]  # [O, I]
        else:
            assert self.zero is not None
            w = dequantize_q4(self.qweight, self.scale, self.zero, self.group_size)
        return w if w.dtype is dtype else w.to(dtype)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The stored tensors, named ``{prefix}.qweight`` etc. (contiguous; on this weight's device)."""
        out = {f"{prefix}.qweight": self.qweight.contiguous(), f"{prefix}.scale": self.scale.contiguous()}
        if self.zero is not None:
            out[f"{prefix}.zero"] = self.zero.contiguous()
        return out

    @classmethod
    def from_tensors(cls, fmt: str, shape: tuple[int, int], group_size: int,
                     tensors: Mapping[str, torch.Tensor], prefix: str) -> QuantizedTensor:
        """Reads ``{prefix}.qweight`` etc. from ``tensors``, each validated (dtype, shape, finite scales) before
        use. Errors name the full tensor name (see the module docstring). Only ekmesh's own formats (q8, q4) are
        stored this way; the checkpoint formats are read where the checkpoint holds them (``fp8``, ``mxfp4``)."""
        if fmt in NATIVE_FORMATS:
            raise ConfigError(f"{prefix}: {fmt} weights are read from their checkpoint tensors, not stored as "
                              f"{' or '.join(QFORMATS)} are")
        spec = _layout(fmt, tuple(shape), group_size, prefix)
        got = {s: tensors.get(f"{prefix}.{s}") for s in spec}
        _check(spec, got, prefix)
        for s in ("scale", "zero"):
            t = got.get(s)
            if t is not None and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"tensor {f'{prefix}.{s}'!r} has non-finite values")
        q, sc, z = got["qweight"], got["scale"], got.get("zero")
        assert q is not None and sc is not None
        return cls(fmt, (int(shape[0]), int(shape[1])), group_size, q, sc, z)

    def nbytes(self) -> int:
        """Bytes of qweight + scale + zero."""
        ts = [self.qweight, self.scale] + ([] if self.zero is None else [self.zero])
        return sum(t.numel() * t.element_size() for t in ts)


def unpack_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [O, I/2] -> uint8 codes [O, I]: column 2j from the low nibble, 2j+1 from the high one."""
    o, half = qweight.shape
    return torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).view(o, 2 * half)  # [O, I/2, 2] -> [O, I]


def dequantize_q4(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    o, g = scale.shape
    codes = unpack_nibbles(qweight).to(torch.float32).view(o, g, group_size)  # [O, I/G, G]
    w = (codes - Q4_MID) * scale.to(torch.float32)[..., None] + zero.to(torch.float32)[..., None]
    return w.view(o, g * group_size)  # [O, I]


def quantize(w: torch.Tensor, fmt: str, group_size: int | None = None, name: str = "weight") -> QuantizedTensor:
    """Quantizes a float weight [O, I] (any float dtype, any device) to ``fmt``; the result is on the CPU.
    ``group_size`` None: ``default_group_size``. ``name`` is used in errors."""
    if fmt not in QFORMATS:
        raise ConfigError(f"{name}: unknown quantization format {fmt!r} (ekmesh quantizes to "
                          f"{' or '.join(QFORMATS)})")
    if w.dim() != 2 or not w.is_floating_point():
        raise TensorShapeError(name, "a floating-point [O, I] weight", f"{w.dtype} {tuple(w.shape)}")
    o, i = (int(n) for n in w.shape)
    g = default_group_size(fmt, i) if group_size is None else group_size
    _layout(fmt, (o, i), g, name)
    x = w.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise CheckpointError(f"cannot quantize {name!r}: it has non-finite values")
    if fmt == "q8":
        scale = x.abs().amax(dim=1) / Q8_MAX  # [O]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a zero row: codes 0, exactly 0
        codes = torch.round(x / scale[:, None]).clamp_(-Q8_MAX, Q8_MAX).to(torch.int8)  # [O, I]
        return QuantizedTensor(fmt, (o, i), g, codes, scale, None)
    if float(x.abs().max()) > FP16_MAX:
        raise ConfigError(f"cannot quantize {name!r} to q4: values beyond +-{FP16_MAX:g} do not fit its fp16 scales")
    xg = x.view(o, i // g, g)  # [O, I/G, G]
    lo, hi = xg.amin(dim=-1), xg.amax(dim=-1)  # [O, I/G]
    scale16 = ((hi - lo) / (2 * Q4_MID - 1)).to(torch.float16)
    flat = scale16 == 0  # constant group, or a spread below fp16's smallest step
    scale16 = torch.where(flat, torch.ones_like(scale16), scale16)
    scale = scale16.to(torch.float32)
    zero16 = torch.where(flat, lo, lo + Q4_MID * scale).to(torch.float16)
    codes = torch.round((xg - zero16.to(torch.float32)[..., None]) / scale[..., None]) + Q4_MID
    c = codes.clamp_(0, 2 * Q4_MID - 1).to(torch.uint8).view(o, i)  # [O, I]
    packed = c[:, 0::2] | (c[:, 1::2] << 4)  # [O, I/2]: even column low, odd column high
    return QuantizedTensor(fmt, (o, i), g, packed, scale16, zero16)


def _row_scaled(qt: QuantizedTensor) -> QuantizedTensor:
    """``qt`` with a scale per row (fp8 blocks of ``bo`` rows repeated to one row each; others as they are)."""
    if qt.block_rows == 1:
        return qt
    scale = qt.scale.repeat_interleave(qt.block_rows, dim=0)[: qt.shape[0]].contiguous()  # [O, I/G]
    return dataclasses.replace(qt, scale=scale, block_rows=1)


def cat_rows(parts: Sequence[QuantizedTensor], name: str = "weight") -> QuantizedTensor:
    """The weights ``parts`` (one format, group size and input size) stacked along their output rows, as stored
    (e.g. an expert's gate and up projections into gate_up). FP8 blocks stay whole where every part's rows are a
    multiple of the block's; otherwise the scales become per row (``block_rows`` 1)."""
    first = parts[0]
    for p in parts:
        if (p.fmt, p.group_size, p.shape[1], p.block_rows) != (first.fmt, first.group_size, first.shape[1],
                                                               first.block_rows):
            raise ConfigError(f"{name}: cannot concatenate {p.fmt} {p.shape} (group {p.group_size}) with "
                              f"{first.fmt} {first.shape} (group {first.group_size})")
    if any(p.shape[0] % p.block_rows for p in parts):
        parts = [_row_scaled(p) for p in parts]
    z = None if first.zero is None else torch.cat([p.zero for p in parts if p.zero is not None])
    return dataclasses.replace(parts[0], shape=(sum(p.shape[0] for p in parts), first.shape[1]),
                               qweight=torch.cat([p.qweight for p in parts]),
                               scale=torch.cat([p.scale for p in parts]), zero=z)


def take_rows(qt: QuantizedTensor, index: torch.Tensor) -> QuantizedTensor:
    """The weight made of rows ``index`` [O'] (long) of ``qt``, as stored (e.g. gpt-oss's interleaved gate/up rows
    put in order); FP8 row blocks become per-row scales."""
    q = _row_scaled(qt)
    z = None if q.zero is None else q.zero.index_select(0, index)
    return dataclasses.replace(q, shape=(int(index.numel()), q.shape[1]), qweight=q.qweight.index_select(0, index),
                               scale=q.scale.index_select(0, index), zero=z)
