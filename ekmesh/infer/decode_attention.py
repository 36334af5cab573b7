"""Attention of a decode step over the static KV cache on CUDA, as flash-decoding in two Triton kernels.

In the captured decode step (batch 1, one token) a fused attention kernel gets one program per few KV heads and each
walks the whole static cache (its max length; the slots beyond the position are masked): ~4 programs busy on a GPU
of 132 SMs, whatever the real context. Here the first kernel splits the visible keys of each (batch, KV head) over
many programs, each an online softmax over its share (partial sums, maxima and weighted values in fp32); the second
merges the shares (and gpt-oss's sinks) and writes [B, T, H*dv]. The visible range [lo, hi) is read from the
positions on the device, so the work scales with the real context, not with the cache's length, and nothing depends
on a tensor's values on the host: capturable in a CUDA graph (``cuda_graph.GraphDecoder``).

Responsible for: grouped-query attention of a few query tokens (rep*T <= ``MAX_ROWS`` rows per KV head) over a
static cache laid out as ``cache.KVCache.update`` returns it (any strides, rows contiguous), causal and optionally
windowed, with or without sinks, fp32 / bf16 / fp16. Not for: prefill-sized steps (the fused kernels are faster),
arbitrary masks, the CPU.

Invariant: ``attend`` computes what ``attention.attend(q, k, v, attention_mask(positions, S, window, always=True),
scaling, sinks)`` computes, within rounding: key j is visible to token i iff j <= positions[i] and (no window or
j > positions[i] - window); scores, softmax and sums in fp32, fp32 inputs multiplied in true fp32 (never tf32),
bf16/fp16 probabilities rounded to the values' dtype before their product (as flash attention does). The launch
grid and the scratch buffers depend on shapes only. Triton is imported on first use only (CPU installs lack it).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch

from ekmesh.infer import fusion

MAX_ROWS = 128  # query rows per KV head (rep * T); beyond, a step is prefill-sized
MAX_HEAD_DIM = 256
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PROGRAMS_PER_SM = 1  # kernel 1 launches about this many programs per SM (H100, Qwen3 shape: 1 beat 2 and 4)
CPU_SMS = 8  # the SM count assumed off CUDA (the Triton interpreter)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None = None) -> bool:
    """Whether ``attend`` can take q [B, H, T, dk] over k [B, Hkv, S, dk], v [B, Hkv, S, dv] (and sinks [H]) here."""
    tensors = (q, k, v) if sinks is None else (q, k, v, sinks)
    return (all(x.is_cuda and x.device == q.device for x in tensors) and fits(q, k, v, sinks)
            and fusion.triton_available())


def fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None = None) -> bool:
    """Whether the shapes, dtypes and layouts are ones the kernels take, whatever the device (``supports``)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    b, h, t, dk = q.shape
    hkv, s = k.shape[1], k.shape[2]
    return (q.dtype in DTYPES and k.dtype == v.dtype == q.dtype
            and k.shape[0] == v.shape[0] == b and v.shape[1] == hkv and v.shape[2] == s and k.shape[3] == dk
            and hkv > 0 and h % hkv == 0 and 0 < h // hkv * t <= MAX_ROWS and s > 0
            and 0 < dk <= MAX_HEAD_DIM and 0 < v.shape[3] <= MAX_HEAD_DIM
            and all(x.stride(-1) == 1 for x in (q, k, v))
            and (sinks is None or tuple(sinks.shape) == (h,)))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, window: int | None,
           scaling: float, sinks: torch.Tensor | None = None, splits: int | None = None) -> torch.Tensor:
    """q [B, H, T, dk], k [B, Hkv, S, dk], v [B, Hkv, S, dv] (the static cache), positions [T] (int64, on q's
    device), window None or a number of keys, sinks None or [H] -> [B, T, H*dv] in q's dtype. ``splits`` (key
    shares per KV head) defaults to a choice from the shapes (``_splits``). Check ``supports`` first."""
    return _launch(q, k, v, positions, window, scaling, sinks, splits)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_SMS
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def _block_n(dk: int, dv: int, element_size: int) -> int:
    """Keys per block: a [block, d] tile of keys and one of values in registers stay within ~64 KiB."""
    return 64 if max(dk, dv) * element_size <= 256 else 32


def _splits(batch_heads: int, s: int, block_n: int, device: torch.device) -> int:
    """How many shares kernel 1 splits each (batch, KV head)'s keys into: enough programs for about
    ``PROGRAMS_PER_SM`` per SM, never more shares than the cache has key blocks."""
    want = max(1, round(PROGRAMS_PER_SM * _sm_count(device) / batch_heads))
    return min(want, -(-s // block_n))


def _build() -> Any:
    return importlib.import_module("ekmesh.infer.triton_attention")  # imports triton


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, window: int | None,
            scaling: float, sinks: torch.Tensor | None, splits: int | None = None, num_warps: int = 4
            ) -> torch.Tensor:
    """The two kernels on any tensors Triton takes (CUDA, or CPU under ``TRITON_INTERPRET=1``); see ``attend``."""
    kern = _build()
    b, h, t, dk = q.shape
    hkv, s, dv = k.shape[1], k.shape[2], v.shape[3]
    rep = h // hkv
    n_rows = rep * t
    block_n = _block_n(dk, dv, q.element_size())
    n_splits = splits or _splits(b * hkv, s, block_n, q.device)
    f32 = torch.float32
    acc = torch.empty(b * hkv, n_splits, n_rows, dv, device=q.device, dtype=f32)  # weighted values of each share
    maxes = torch.empty(b * hkv, n_splits, n_rows, device=q.device, dtype=f32)  # their scores' maxima
    sums = torch.empty(b * hkv, n_splits, n_rows, device=q.device, dtype=f32)  # their exp sums
    out = torch.empty(b, t, h * dv, device=q.device, dtype=q.dtype)  # [B, T, H*dv]
    rows, dv_pad = fusion.pow2(n_rows, 16), fusion.pow2(dv, 16)
    kern.split_attend[(b * hkv, n_splits)](
        q, k, v, positions.contiguous(), acc, maxes, sums,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        hkv, t, rep, n_rows, dk, dv, window or 0, float(scaling), n_splits,
        has_window=window is not None, ieee=q.dtype == torch.float32, rows=rows, t_pad=fusion.pow2(t, 1),
        block_n=block_n, dk_pad=fusion.pow2(dk, 16), dv_pad=dv_pad, num_warps=num_warps)
    kern.combine[(b * hkv, n_rows)](
        acc, maxes, sums, q if sinks is None else sinks.contiguous(), out, hkv, t, rep, n_rows, dv, h, n_splits,
        has_sinks=sinks is not None, block_s=min(32, fusion.pow2(n_splits, 2)), dv_pad=dv_pad, num_warps=num_warps)
    return out
