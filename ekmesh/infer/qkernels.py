"""The kernels that compute with quantized weights: ``pack`` lays a ``QuantizedTensor`` out for one kernel on one
device (still quantized in memory, never a float copy) and ``qlinear`` computes ``x @ W.T + bias`` with it.

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
    cpu_fp8 / cpu_mxfp4  the checkpoint formats on the CPU: compiled fused kernels, see ``qnative.py``.
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
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ekmesh.core.errors import ConfigError
from ekmesh.infer import qnative
from ekmesh.infer.qnative import NATIVE_FORMATS
from ekmesh.infer.qtensor import QuantizedTensor, dequantize_q4, unpack_nibbles

KERNELS = ("cpu_int8", "cpu_int4", "cuda_int4", "cuda_int8", "cpu_fp8", "cpu_mxfp4", "dequant")


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
        fp8 / mxfp4 (any kernel): weight = the stored bytes as uint8 (fp8's bits), scale as stored, aux None
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
    block_rows: int = 1  # fp8's scale block rows (see QuantizedTensor)

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
    key = (first.kernel, first.fmt, first.shape, first.group_size, first.act_dtype, first.block_rows)
    for w in ws:
        if (w.kernel, w.fmt, w.shape, w.group_size, w.act_dtype, w.block_rows) != key or w.stacked:
            raise ConfigError(f"cannot stack packed weights of different kinds: {key} and "
                              f"{(w.kernel, w.fmt, w.shape, w.group_size, w.act_dtype, w.block_rows)}")
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
    if qt.fmt in NATIVE_FORMATS:
        return qnative.choose_kernel(qt.fmt, qt.shape, qt.group_size, qt.block_rows, dev)
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
    base = PackedWeight(kernel, qt.fmt, qt.shape, qt.group_size, act_dtype, q, qt.scale.to(dev), None,
                        block_rows=qt.block_rows)
    if qt.fmt in NATIVE_FORMATS:  # the stored bytes as they are, fp8 as its uint8 bits (every op takes uint8)
        base = dataclasses.replace(base, weight=q.view(torch.uint8))
        if kernel != "dequant" and qnative.kernels_for(kernel, base.weight, base.scale) != kernel:
            base = dataclasses.replace(base, kernel="dequant")  # compiling failed (logged): the reference path
        return base
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
        codes = unpack_nibbles(q).to(torch.int32)  # [O, I]
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
    if kernel in ("cpu_fp8", "cpu_mxfp4"):
        return qnative.qlinear_native(kernel, x, w.weight, w.scale, w.shape, bias)
    if kernel == "dequant":
        if w.fmt in NATIVE_FORMATS:  # fp8 packed as uint8 bits
            q = w.weight.view(torch.float8_e4m3fn) if w.fmt == "fp8" else w.weight
            wf = qnative.dequantize(w.fmt, q, w.scale, w.shape, w.group_size, w.block_rows)
        elif w.fmt == "q8":
            wf = w.weight.to(torch.float32) * w.scale.to(torch.float32)[:, None]  # [O, I]
        else:
            assert w.aux is not None
            wf = dequantize_q4(w.weight, w.scale, w.aux, w.group_size)  # [O, I]
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
