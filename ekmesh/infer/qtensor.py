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

Kernels (``pack`` picks one per weight; ``PackedWeight.kernel`` says which):

    cpu_int8   CPU, bf16 activations: ``torch._weight_int8pack_mm(x, int8 [O, I], ones [O])`` then ``* scale``
               (fp32), so the stored fp32 scale is applied exactly.
    cpu_int4   CPU, bf16 activations, O % 16 == 0: ``aten._convert_weight_to_int4pack_for_cpu(codes [O, I], 1)``
               (a uint8 [O, I/2] layout of torch's own, specific to the CPU's vector width) and
               ``aten._weight_int4pack_mm_for_cpu(x, packed, G, scales_and_zeros [I/G, O, 2])``.
    cuda_int4  CUDA, bf16 activations, O % 8 == 0, I % 32 == 0: ``torch._convert_weight_to_int4pack`` (nibbles
               swapped to its high-first order; ``inner_k_tiles`` 8, 4 or 2, the largest with I % (16 * it) == 0)
               and ``torch._weight_int4pack_mm``.
    cuda_int8  CUDA, bf16 activations: ``F.linear(x, int8 [O, I].to(bf16)) * scale`` (the int8 -> bf16 cast is
               exact; the fp32 scale is applied to the output). ``torch._weight_int8pack_mm`` does run on CUDA in
               torch 2.11 but was 4x slower on an H100 (below).
    dequant    anything else: the canonical tensors on the device, ``F.linear(x, dequantize(x.dtype), bias)`` per
               call (the reference path itself; slower, still stored quantized).

CUDA, measured (H100, torch 2.11, bf16, inside a CUDA graph, [1536, 2048] / [2048, 768], one row): bf16
``F.linear`` 4.9 / 3.4 us, tinygemm q4 3.3 / 2.8 us, ``_weight_int8pack_mm`` 64 / 32 us, int8 cast + ``F.linear``
16.6 / 12.5 us. A whole decode step's routed experts at Qwen3-30B-A3B (48 layers, k = 8, captured in a CUDA
graph, H100): bf16 float experts (``_grouped_mm``) 5.2 ms, q4 6.9 ms, q8 23.4 ms. On CUDA, quantized experts save
memory (q4: 3.8x less than bf16), not time: they run pair by pair, a kernel at a time.

The int4 kernels take scale and zero in the activation dtype: they see the fp16 values rounded to bf16
(a relative change of at most 2^-9 each), which is inside the tolerance stated against the reference path.

Activation dtype on the CPU, measured (2-core AMD EPYC, AVX512 with avx512_bf16, torch 2.13, one thread, median
of 40, Qwen3-30B-A3B expert shapes, G = 128; error = max |kernel - (dequantize + F.linear in fp32)| / max |ref|):

    weight [O, I]   rows  fp32 F.linear   q8 fp32 / bf16 / fp16 x        q4 fp32 / bf16 / fp16 x
    [1536, 2048]    1     330 us          2617 / 189 / 4261 us           5400 / 186 / 8641 us
    [1536, 2048]    17    2278 us         - / 1548 / 55194 us            - / 1544 / 179700 us
    [2048, 768]     1     162 us          1359 / 107 / 2216 us           2724 / 95 / 4377 us
    error (rows 1)                        1e-6 / 4e-3 / 3e-4             2e-6 / 4e-3 / 4e-4

Only bf16 activations take the vectorized kernels (fp32 and fp16 run a scalar loop, 14 to 45 times slower), so
the quantized CPU path runs in bf16 whatever the backend's dtype, at about 4e-3 relative error per projection
(rounding of x and of the output), far below the quantization error itself. The weight-only kernels cost time
per row; from about 25 rows per weight, a dequantize + bf16 ``F.linear`` would be faster (prefill), which is
not done here: there they cost about what today's fp32 path costs. A whole decode step's routed experts at
Qwen3-30B-A3B (48 layers, k = 8; ``benchmarks/local_decode.py --quantize q8 q4``, 2 threads, same box): fp32
454 ms, q8 135 ms (3.4x), q4 70 ms (6.5x); all three stream their weights from memory at 13 to 15 GB/s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ekmesh.core.errors import CheckpointError, ConfigError, MissingTensorError, TensorShapeError

QFORMATS = ("q8", "q4")
Q4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 kernels accept
DEFAULT_Q4_GROUP_SIZES = (128, 64, 32)  # the first that divides I is the default
Q8_MAX = 127
Q4_MID = 8  # code - 8: the tinygemm convention
FP16_MAX = 65504.0
KERNELS = ("cpu_int8", "cpu_int4", "cuda_int4", "cuda_int8", "dequant")

_Spec = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def expert_prefix(layer: int, expert: int) -> str:
    """The name prefix of one routed expert's stored tensors: ``experts.<layer>.<expert>``."""
    return f"experts.{layer}.{expert}"


def tensor_names(fmt: str, prefix: str) -> tuple[str, ...]:
    """The names of the stored tensors of one quantized weight (what ``to_tensors`` writes)."""
    return tuple(f"{prefix}.{s}" for s in _suffixes(fmt, prefix))


def _suffixes(fmt: str, name: str) -> tuple[str, ...]:
    if fmt == "q8":
        return ("qweight", "scale")
    if fmt == "q4":
        return ("qweight", "scale", "zero")
    raise ConfigError(f"{name}: unknown quantization format {fmt!r} (known: {', '.join(QFORMATS)})")


def _layout(fmt: str, shape: Sequence[int], group_size: int, name: str) -> _Spec:
    """{suffix: (dtype, shape)} of each stored tensor; ConfigError for a format or group size that is not allowed."""
    _suffixes(fmt, name)
    if len(shape) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        raise ConfigError(f"{name}: a quantized weight needs a shape of two positive ints, got {tuple(shape)!r}")
    o, i = shape
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

    fmt: str  # "q8" | "q4"
    shape: tuple[int, int]  # (O, I) of the float weight it stands for
    group_size: int  # q4: one of Q4_GROUP_SIZES, divides I; q8: == I
    qweight: torch.Tensor  # q8: int8 [O, I]; q4: uint8 [O, I/2]
    scale: torch.Tensor  # q8: float32 [O]; q4: float16 [O, I/G]
    zero: torch.Tensor | None  # q4: float16 [O, I/G]; q8: None

    def __post_init__(self) -> None:
        name = f"<{self.fmt} weight {self.shape}>"
        _check(_layout(self.fmt, self.shape, self.group_size, name),
               {"qweight": self.qweight, "scale": self.scale, "zero": self.zero}, name)
        if self.fmt == "q8" and self.zero is not None:
            raise ConfigError(f"{name}: q8 has no zero tensor")

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """The same weight with its tensors on ``device`` (nothing is converted)."""
        z = None if self.zero is None else self.zero.to(device)
        return dataclasses.replace(self, qweight=self.qweight.to(device), scale=self.scale.to(device), zero=z)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [O, I] it stands for, computed in float32 on its device, then cast to ``dtype``."""
        if self.fmt == "q8":
            w = self.qweight.to(torch.float32) * self.scale.to(torch.float32)[:, None]  # [O, I]
        else:
            assert self.zero is not None
            w = _dequantize_q4(self.qweight, self.scale, self.zero, self.group_size)
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
        use. Errors name the full tensor name (see the module docstring)."""
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


def _unpack_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [O, I/2] -> uint8 codes [O, I]: column 2j from the low nibble, 2j+1 from the high one."""
    o, half = qweight.shape
    return torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).view(o, 2 * half)  # [O, I/2, 2] -> [O, I]


def _dequantize_q4(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    o, g = scale.shape
    codes = _unpack_nibbles(qweight).to(torch.float32).view(o, g, group_size)  # [O, I/G, G]
    w = (codes - Q4_MID) * scale.to(torch.float32)[..., None] + zero.to(torch.float32)[..., None]
    return w.view(o, g * group_size)  # [O, I]


def quantize(w: torch.Tensor, fmt: str, group_size: int | None = None, name: str = "weight") -> QuantizedTensor:
    """Quantizes a float weight [O, I] (any float dtype, any device) to ``fmt``; the result is on the CPU.
    ``group_size`` None: ``default_group_size``. ``name`` is used in errors."""
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


# ---------------------------------------------------------------------------------------------------- kernels


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A ``QuantizedTensor`` in the layout of one kernel on one device (see the module docstring's kernel table).

    ``weight``, ``scale`` and ``aux`` are the kernel's operands; with ``stacked`` they carry a leading [n] axis of
    several same-shaped weights (a layer's experts), and ``select`` / ``gather`` give one of them.
        cpu_int8: weight int8 [O, I], scale float32 [O], aux ones [O] in ``act_dtype``
        cuda_int8: weight int8 [O, I], scale float32 [O], aux None
        cpu_int4 / cuda_int4: weight (the kernel's packed layout), scale = scales_and_zeros [I/G, O, 2] in
            ``act_dtype``, aux None
        dequant: weight / scale / aux = the canonical qweight / scale / zero (None for q8)
    """

    kernel: str
    fmt: str
    shape: tuple[int, int]
    group_size: int
    act_dtype: torch.dtype  # x is cast to this for the kernel; the result comes back in x's dtype
    weight: torch.Tensor
    scale: torch.Tensor
    aux: torch.Tensor | None
    stacked: bool = False

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight, self.scale] + ([] if self.aux is None else [self.aux])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def select(self, i: int) -> PackedWeight:
        """Weight ``i`` of a stack (views, no copy)."""
        assert self.stacked
        aux = None if self.aux is None else self.aux[i]
        return dataclasses.replace(self, weight=self.weight[i], scale=self.scale[i], aux=aux, stacked=False)

    def gather(self, index: torch.Tensor) -> PackedWeight:
        """The stack of weights ``index`` [N] (long, on the device) of a stack: chosen on the device, no host sync,
        so a CUDA graph can capture it. Copies those weights' quantized bytes."""
        assert self.stacked
        aux = None if self.aux is None else self.aux.index_select(0, index)
        return dataclasses.replace(self, weight=self.weight.index_select(0, index),
                                   scale=self.scale.index_select(0, index), aux=aux)


def stack_packed(ws: Sequence[PackedWeight]) -> PackedWeight:
    """Several packed weights of one kernel, shape and group size as one stack [n, ...] (a copy)."""
    first = ws[0]
    key = (first.kernel, first.fmt, first.shape, first.group_size, first.act_dtype)
    for w in ws:
        if (w.kernel, w.fmt, w.shape, w.group_size, w.act_dtype) != key or w.stacked:
            raise ConfigError(f"cannot stack packed weights of different kinds: {key} and "
                              f"{(w.kernel, w.fmt, w.shape, w.group_size, w.act_dtype)}")
    aux = None if first.aux is None else torch.stack([w.aux for w in ws if w.aux is not None])
    return dataclasses.replace(first, weight=torch.stack([w.weight for w in ws]),
                               scale=torch.stack([w.scale for w in ws]), aux=aux, stacked=True)


def kernel_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """The activation dtype ``pack`` should be given for a backend of ``device`` / ``dtype``: bf16 on the CPU
    (the only dtype with vectorized CPU kernels, see the module docstring) and on CUDA (tinygemm takes bf16
    only); elsewhere ``dtype`` (the dequant path)."""
    return torch.bfloat16 if torch.device(device).type in ("cpu", "cuda") else dtype


def _inner_k_tiles(i: int) -> int | None:
    return next((k for k in (8, 4, 2) if i % (16 * k) == 0), None)


def choose_kernel(qt: QuantizedTensor, device: torch.device | str, act_dtype: torch.dtype) -> str:
    """Which kernel ``pack`` uses for this weight on ``device`` with ``act_dtype`` activations."""
    dev = torch.device(device)
    o, i = qt.shape
    if act_dtype != torch.bfloat16 or dev.type not in ("cpu", "cuda"):
        return "dequant"
    if dev.type == "cpu":
        if qt.fmt == "q8":
            return "cpu_int8"
        return "cpu_int4" if o % 16 == 0 else "dequant"
    if qt.fmt == "q4":
        return "cuda_int4" if o % 8 == 0 and _inner_k_tiles(i) is not None else "dequant"
    return "cuda_int8"


def pack(qt: QuantizedTensor, device: torch.device | str, act_dtype: torch.dtype) -> PackedWeight:
    """The kernel layout of ``qt`` on ``device`` for activations in ``act_dtype`` (see ``choose_kernel``).
    Temporaries are the size of the quantized weight (int32 codes for the CPU int4 layout: 4 bytes a value)."""
    dev = torch.device(device)
    kernel = choose_kernel(qt, dev, act_dtype)
    q = qt.qweight.to(dev)
    base = PackedWeight(kernel, qt.fmt, qt.shape, qt.group_size, act_dtype, q, qt.scale.to(dev), None)
    if kernel == "dequant":
        return dataclasses.replace(base, aux=None if qt.zero is None else qt.zero.to(dev))
    if kernel == "cuda_int8":
        return base
    if kernel == "cpu_int8":
        ones = torch.ones(qt.shape[0], dtype=act_dtype, device=dev)
        return dataclasses.replace(base, aux=ones)
    assert qt.zero is not None
    scales_and_zeros = torch.stack([qt.scale.to(dev).t(), qt.zero.to(dev).t()], dim=-1)  # [I/G, O, 2]
    sz = scales_and_zeros.to(act_dtype).contiguous()
    if kernel == "cpu_int4":
        codes = _unpack_nibbles(q).to(torch.int32)  # [O, I]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    else:
        swapped = ((q & 0x0F) << 4) | (q >> 4)  # tinygemm wants column 2j in the HIGH nibble
        tiles = _inner_k_tiles(qt.shape[1])
        assert tiles is not None
        packed = torch._convert_weight_to_int4pack(swapped.contiguous(), tiles)
    return dataclasses.replace(base, weight=packed, scale=sz)


def qlinear(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [N, I] @ W.T + bias`` -> [N, O] in x's dtype, with ``W`` the quantized weight ``w`` stands for."""
    kernel = w.kernel
    if kernel == "dequant":
        if w.fmt == "q8":
            wf = w.weight.to(torch.float32) * w.scale.to(torch.float32)[:, None]  # [O, I]
        else:
            assert w.aux is not None
            wf = _dequantize_q4(w.weight, w.scale, w.aux, w.group_size)  # [O, I]
        return F.linear(x, wf if wf.dtype is x.dtype else wf.to(x.dtype), bias)
    xa = x if x.dtype is w.act_dtype else x.to(w.act_dtype)
    if kernel == "cpu_int4":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xa, w.weight, w.group_size, w.scale)  # [N, O]
    elif kernel == "cuda_int4":
        y = torch._weight_int4pack_mm(xa, w.weight, w.group_size, w.scale)  # [N, O]
    elif kernel == "cuda_int8":  # exact int8 -> bf16, cuBLAS, then the stored fp32 scale per output
        y = F.linear(xa, w.weight.to(w.act_dtype)) * w.scale  # [N, O] fp32
    else:  # cpu_int8: unit scales in the kernel, the fp32 scale applied after (exactly the stored one)
        assert w.aux is not None
        y = torch._weight_int8pack_mm(xa, w.weight, w.aux) * w.scale  # [N, O] fp32
    if bias is not None:
        y = y + bias
    return y if y.dtype is x.dtype else y.to(x.dtype)
