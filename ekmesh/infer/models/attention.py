"""Grouped-query attention with a KV cache, and the rotary embedding it applies.

Responsibilities: ``Attention`` (q/k/v projections, optional qk-norm, clipping, sinks and a sliding window, the
optional fused q/k/v projection), ``attend``/``attend_grouped`` (attention over a step's cache, also used by
DeepSeek's MLA) and the RoPE runtime helpers (the cos/sin tables from positions, their application, fused with
Qwen3's per-head norm and, in the fused decode step over a static cache, with the write of k and v into the cache's
buffers: compiled, the cache write costs no kernels of its own). Numerics match Hugging Face transformers: RoPE
computed in fp32 from positions, half-split layout. Not responsible for: the rotary parameters read from config.json
(``common.RopeSpec``), the cache itself (``cache.KVCache``/``Step``), the decoder skeleton (``common.DecoderLayer``).
Depends on ``norms`` and ``cache`` only, never on ``common``, so ``common`` imports it without a cycle.

Shapes: B batch, T new tokens, S cached + new tokens, H heads, Hkv kv heads, d head dim, D hidden.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ekmesh.infer import decode_attention, fusion
from ekmesh.infer.fusion import fusable
from ekmesh.infer.models.cache import KVCache, Step
from ekmesh.infer.models.norms import RMSNorm, plain_rms_norm

# ---------------------------------------------------------------------------------------------------- rope


def rope_cos_sin(inv_freq: torch.Tensor, scale: float, positions: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, dim]
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


@fusable
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, dim] rotated by cos/sin [T, dim] (half-split layout)."""
    return _rope(x, cos, sin)


@fusable
def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rope`` of q and of k in one fused call."""
    return _rope(q, cos, sin), _rope(k, cos, sin)


def _head_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                    cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q = plain_rms_norm(q, q_weight, eps).transpose(1, 2)  # [B, H, T, d]
    k = plain_rms_norm(k, k_weight, eps).transpose(1, 2)  # [B, Hkv, T, d]
    return _rope(q, cos, sin), _rope(k, cos, sin)


@fusable
def head_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                   cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's per-head q/k RMSNorm, the move of heads before tokens, then RoPE, in one fused call:
    q [B, T, H, d], k [B, T, Hkv, d] -> q [B, H, T, d], k [B, Hkv, T, d]."""
    return _head_norm_rope(q, k, q_weight, k_weight, eps, cos, sin)


def _store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              positions: torch.Tensor) -> None:
    """k, v [B, Hkv, T, d] into the static buffers [B, Hkv, S, d] at ``positions`` [T], as ``KVCache.update`` does.
    In place when compiled too: inductor turns the (functionalised) index_copy_ of a graph input into a store to that
    input from the kernel that computes k, with no copy of the buffers (the generated code is checked by
    tests/infer/test_cache_store.py on CPU and tests/infer/test_cuda_kernels.py in Triton)."""
    k_cache.index_copy_(2, positions, k)
    v_cache.index_copy_(2, positions, v)


@fusable
def head_norm_rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                         k_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``head_norm_rope`` whose k, and v [B, Hkv, T, d], go into a static cache's buffers k_cache, v_cache
    [B, Hkv, S, d] at ``positions`` [T] in the same fused call (the decode step's cache write without kernels of
    its own); returns q [B, H, T, d]."""
    q, k = _head_norm_rope(q, k, q_weight, k_weight, eps, cos, sin)
    _store_kv(k, v, k_cache, v_cache, positions)
    return q


@fusable
def rope_qk_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``rope_qk`` whose k, and v [B, Hkv, T, d], go into the static buffers as in ``head_norm_rope_store``;
    returns q [B, H, T, d]."""
    _store_kv(_rope(k, cos, sin), v, k_cache, v_cache, positions)
    return _rope(q, cos, sin)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float,
           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, T, dk], k [B, Hkv, S, dk], v [B, Hkv, S, dv] -> [B, T, H*dv]."""
    b, h, t, _ = q.shape
    if sinks is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling,
                                             enable_gqa=k.shape[1] != h)  # [B, H, T, dv]
    else:
        rep = h // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)  # [B, H, S, dk]
        v = v.repeat_interleave(rep, dim=1)  # [B, H, S, dv]
        scores = torch.matmul(q, k.transpose(2, 3)) * scaling  # [B, H, T, S]
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        sink = sinks.reshape(1, h, 1, 1).expand(b, h, t, 1).to(scores.dtype)  # [B, H, T, 1]
        combined = torch.cat([scores, sink], dim=-1)  # [B, H, T, S+1]
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = torch.softmax(combined, dim=-1)[..., :-1]  # [B, H, T, S]
        out = torch.matmul(probs, v)  # [B, H, T, dv]
    return out.transpose(1, 2).reshape(b, t, -1)  # [B, T, H*dv]


def attend_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_rows: torch.Tensor, scaling: float
                   ) -> torch.Tensor:
    """``attend`` for grouped-query attention with a mask and no sinks, computed as plain attention over the Hkv
    key-value heads whose queries are the rep = H / Hkv query heads of each (rows (r, i): head kv*rep + r, token i),
    so a masked fused kernel takes it without copying the keys and values rep times (as GQA with a mask would).
    ``mask_rows`` [rep*T, S] is the [T, S] mask repeated rep times (``Step.mask(..., rep)``)."""
    b, h, t, dk = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, h // hkv * t, dk)  # [B, Hkv, rep*T, dk]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask_rows, scale=scaling)  # [B, Hkv, rep*T, dv]
    # SDPA's CUDA kernels may return [B, Hkv, rep*T, dv] in a transposed layout: reshape, not view
    return out.reshape(b, h, t, -1).transpose(1, 2).reshape(b, t, -1)  # [B, T, H*dv]


# ---------------------------------------------------------------------------------------------------- modules


@dataclass(frozen=True)
class AttentionSpec:
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None  # None | "head" (per head, Qwen3) | "full" (whole projection, OLMoE)
    rms_eps: float = 1e-6
    clip_qkv: float | None = None
    sinks: bool = False


class Attention(nn.Module):
    """Grouped-query attention with RoPE, optional qk-norm, clipping, sinks and a sliding window."""

    def __init__(self, spec: AttentionSpec, layer: int, window: int | None) -> None:
        super().__init__()
        s = spec
        self.spec, self.layer, self.window = s, layer, window
        self.q_proj = nn.Linear(s.hidden, s.num_heads * s.head_dim, bias=s.qkv_bias)
        self.k_proj = nn.Linear(s.hidden, s.num_kv_heads * s.head_dim, bias=s.qkv_bias)
        self.v_proj = nn.Linear(s.hidden, s.num_kv_heads * s.head_dim, bias=s.qkv_bias)
        self.o_proj = nn.Linear(s.num_heads * s.head_dim, s.hidden, bias=s.o_bias)
        if s.qk_norm == "head":
            self.q_norm = RMSNorm(s.head_dim, s.rms_eps)
            self.k_norm = RMSNorm(s.head_dim, s.rms_eps)
        elif s.qk_norm == "full":
            self.q_norm = RMSNorm(s.num_heads * s.head_dim, s.rms_eps)
            self.k_norm = RMSNorm(s.num_kv_heads * s.head_dim, s.rms_eps)
        if s.sinks:
            self.sinks = nn.Parameter(torch.zeros(s.num_heads))
        self._qkv: tuple[torch.Tensor, torch.Tensor | None, list[int]] | None = None  # fuse_projections()

    def fuse_projections(self) -> None:
        """The q, k and v projections as one matmul from now on: their weights (and biases) become views of one
        [H*d + 2*Hkv*d, D] tensor, so nothing is kept twice. The same function, one launch instead of three (the
        CUDA-graph decoder's "all" fusion level: used where ``fusion.kernels()``). Parameters assigned anew later are
        noticed and used unfused."""
        if self._qkv is not None and self._qkv_current():
            return
        projs = (self.q_proj, self.k_proj, self.v_proj)
        sizes = [p.weight.shape[0] for p in projs]
        with torch.no_grad():
            weight = torch.cat([p.weight for p in projs])  # [H*d + 2*Hkv*d, D]
            bias = torch.cat([p.bias for p in projs]) if self.spec.qkv_bias else None
        for p, w in zip(projs, weight.split(sizes), strict=True):
            p.weight = nn.Parameter(w, requires_grad=False)
        if bias is not None:
            for p, b in zip(projs, bias.split(sizes), strict=True):
                p.bias = nn.Parameter(b, requires_grad=False)
        self._qkv = (weight, bias, sizes)

    def _qkv_current(self) -> bool:
        """Whether the fused projection still holds the module's q/k/v weights (none was assigned anew)."""
        if self._qkv is None:
            return False
        weight, bias, sizes = self._qkv
        views = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
        offsets = [0, sizes[0], sizes[0] + sizes[1]]
        row = weight.stride(0) * weight.element_size()
        same = all(v.data_ptr() == weight.data_ptr() + o * row for v, o in zip(views, offsets, strict=True))
        if bias is not None:
            same = same and self.q_proj.bias is not None and self.q_proj.bias.data_ptr() == bias.data_ptr()
        return same

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        stored = step.cache.static and fusion.kernels()  # the fused decode step: the cache write joins norm/RoPE
        q, k, v = self._project(x, *step.rope["main"], step.cache if stored else None)
        return self.o_proj(self._attend(q, k, v, step, stored))

    def forward_many(self, x: torch.Tensor, lens: Sequence[int], steps: Sequence[Step]) -> torch.Tensor:
        """x [1, sum T_i, D]: the new tokens of several sequences, each step over its own cache -> [1, sum T_i, D].

        Projections, norms and RoPE are per token, so they run once over every sequence's tokens (each weight read
        once per batch step, not once per sequence); only the cache write and attention itself run per sequence."""
        cos = torch.cat([st.rope["main"][0] for st in steps])  # [sum T_i, dim]
        sin = torch.cat([st.rope["main"][1] for st in steps])
        q, k, v = self._project(x, cos, sin)  # [1, H(kv), sum T_i, d]
        parts = zip(q.split(lens, 2), k.split(lens, 2), v.split(lens, 2), steps, strict=True)
        return self.o_proj(torch.cat([self._attend(qi, ki, vi, st) for qi, ki, vi, st in parts], dim=1))

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q [B, H, T, d], k and v [B, Hkv, T, d], normed and rotated as the spec says. Given a static
        ``cache``, k and v are written into its buffers at its positions by the call that norms and rotates k, and
        the buffers [B, Hkv, S, d] (what ``cache.update`` would return) come back in their place."""
        s = self.spec
        b, t, _ = x.shape
        if self._qkv is not None and fusion.kernels() and self._qkv_current():
            weight, bias, sizes = self._qkv
            q, k, v = F.linear(x, weight, bias).split(sizes, dim=-1)  # [B, T, H*d], [B, T, Hkv*d] x2
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, H*d], [B, T, Hkv*d] x2
        if s.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if s.clip_qkv is not None:
            q, k, v = (z.clamp(-s.clip_qkv, s.clip_qkv) for z in (q, k, v))
        q = q.view(b, t, -1, s.head_dim)  # [B, T, H, d]
        k = k.view(b, t, -1, s.head_dim)  # [B, T, Hkv, d]
        v = v.view(b, t, -1, s.head_dim).transpose(1, 2)  # [B, Hkv, T, d]
        if cache is not None:
            # the keys' dtype once normed and rotated (a buffer made now must take them as update's would)
            parts = (k, self.k_norm.weight, cos, sin) if s.qk_norm == "head" else (k, cos, sin)
            k_dtype = functools.reduce(torch.promote_types, (p.dtype for p in parts))
            kbuf, vbuf = cache.static_buffers(self.layer, k.transpose(1, 2), v, k_dtype)  # [B, Hkv, S, d]
            assert cache.positions is not None
            if s.qk_norm == "head":
                q = head_norm_rope_store(q, k, v, self.q_norm.weight, self.k_norm.weight, s.rms_eps, cos, sin,
                                         kbuf, vbuf, cache.positions)  # [B, H, T, d]
            else:
                q = rope_qk_store(q.transpose(1, 2), k.transpose(1, 2), v, cos, sin, kbuf, vbuf, cache.positions)
            return q, kbuf, vbuf
        if s.qk_norm == "head":  # -> [B, H, T, d], [B, Hkv, T, d]
            q, k = head_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, s.rms_eps, cos, sin)
            return q, k, v
        q, k = rope_qk(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [B, H, T, d], [B, Hkv, T, d]
        return q, k, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step, stored: bool = False
                ) -> torch.Tensor:
        """This step's q, k, v (as ``_project`` gives them; ``stored``: k and v are the cache's buffers, the step
        already written into them) over the step's cache -> [B, T, H*d]."""
        if not stored:
            k, v = step.cache.update(self.layer, k, v)  # [B, Hkv, S, d]
        sinks = self.sinks if self.spec.sinks else None
        scaling = self.spec.head_dim ** -0.5
        if fusion.kernels() and step.cache.static and decode_attention.supports(q, k, v, sinks):
            # the captured decode step: flash-decoding over the visible keys of the static cache (key j in slot j)
            return fusion.checked(
                lambda: decode_attention.attend(q, k, v, step.positions, self.window, scaling, sinks),
                lambda: attend(q, k, v, step.mask(k.shape[2], self.window), scaling, sinks),
                ("attend", q.shape, k.shape, v.shape, q.dtype, self.window, sinks is not None))
        mask = step.mask(k.shape[2], self.window)
        rep = self.spec.num_heads // self.spec.num_kv_heads
        if mask is not None and rep > 1 and not self.spec.sinks and q.is_cuda and fusion.kernels():
            rows = step.mask(k.shape[2], self.window, rep)
            assert rows is not None
            return attend_grouped(q, k, v, rows, scaling)
        return attend(q, k, v, mask, scaling, sinks)
