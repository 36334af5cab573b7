"""DeepSeek-V2/V3 multi-head latent attention (MLA) and its latent KV cache.

MLA projects each token to one compressed latent ``c`` (``kv_lora_rank`` r values, RMS-normed) and one rotary key
``k_rot`` (``qk_rope_head_dim`` dr values) shared by all H heads; ``kv_b_proj`` (weight [H*(dn+dv), r]) expands the
latent into per-head keys ``k_nope = W_UK c`` (W_UK [H, dn, r]) and values ``v = W_UV c`` (W_UV [H, dv, r]).

The cache (``mla_cache="latent"``, the default) holds ``cat(c, rotated k_rot)`` [B, 1, S, r+dr] per layer in
``KVCache.update_single``: r+dr values per token and layer, where the expanded keys and values take H*(dn+dr+dv)
(DeepSeek-V3: 576 against 40,960, 71x). Over it, attention runs one of two ways, equal up to rounding:
- absorbed (DeepSeek's reference inference): ``q_lat = W_UK^T q_nope`` [B, H, T, r] puts each head's query in
  latent space, scores are ``cat(q_lat, q_rot) . cat(c, k_rot)``, the probabilities weight the latents, and the
  result goes out through W_UV. Per head and token it costs O(S*(2r+dr)) and reads the cache once, nothing
  expanded: the way for decode steps and short verification steps over a long cache.
- expanded: ``kv_b_proj`` over the S cached latents, then ordinary attention. It pays S*r*H*(dn+dv) to expand,
  then O(S*(dn+dr+dv)) per head and token: cheaper for prefill, when the new tokens are many.
``mla_absorb="auto"`` picks, per forward, the one with fewer multiply-adds for its T new tokens over S positions
(``absorb_pays``; with DeepSeek-V3's dims absorbed wins below ~170 new tokens); "always" / "never" force one.
``mla_cache="expanded"`` keeps the per-head k [B, H, S, dn+dr] and v [B, H, S, dv] instead (the old cache; kept
for comparison tests and the benchmark).

Numerics follow transformers (see ``deepseek``'s docstring): q from ``q_proj`` or the q LoRA path; latent norm eps
1e-6; RoPE interleaved or half-split on q_rot and k_rot alike; softmax scale from the config. Invariant: whatever
the cache kind and path, a position's cached entry is written once by the forward that feeds it, so
``KVCache.truncate`` and the static (CUDA-graph) cache work unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ekmesh.core.errors import ConfigError
from ekmesh.infer.models.attention import apply_rope, attend
from ekmesh.infer.models.cache import Step
from ekmesh.infer.models.norms import RMSNorm

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm are built without the config's eps
MLA_CACHES = ("latent", "expanded")
MLA_ABSORB = ("auto", "always", "never")


@dataclass(frozen=True, kw_only=True)
class MLASpec:
    """The dimensions and settings of one MLA layer, named as in the family's ``deepseek.Config``, which extends
    this spec (so a Config is what an ``MLAttention`` is built from; the fields are declared once)."""

    hidden_size: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    attention_bias: bool
    rope_interleave: bool
    softmax_scale: float
    mla_cache: str = "latent"  # not from config.json: what the KV cache holds (MLA_CACHES)
    mla_absorb: str = "auto"  # how attention runs over the latent cache (MLA_ABSORB)

    def __post_init__(self) -> None:
        if self.mla_cache not in MLA_CACHES:
            raise ConfigError(f"mla_cache must be one of {', '.join(MLA_CACHES)}, got {self.mla_cache!r}")
        if self.mla_absorb not in MLA_ABSORB:
            raise ConfigError(f"mla_absorb must be one of {', '.join(MLA_ABSORB)}, got {self.mla_absorb!r}")

    def cached_values_per_token(self) -> int:
        """Values one token takes in one layer's cache."""
        if self.mla_cache == "latent":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return self.num_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim)


def absorb_pays(spec: MLASpec, t: int, s: int) -> bool:
    """Whether T new queries over S cached latents cost fewer multiply-adds absorbed than expanded (per head)."""
    r, dn, dr, dv = spec.kv_lora_rank, spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim
    expanded = s * r * (dn + dv) + t * s * (dn + dr + dv)  # kv_b_proj over the cache, then attention
    absorbed = t * r * (dn + dv) + t * s * (2 * r + dr)  # W_UK / W_UV on the queries, attention in latent space
    return absorbed <= expanded


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, dim] whose pairs (x0, x1), (x2, x3), ... rotate by one frequency each; cos/sin [T, dim] are
    ``cat(freqs, freqs)``. Returns the rotated evens then the rotated odds (transformers' V3 layout)."""
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]  # [T, dim/2]
    x1, x2 = x[..., 0::2], x[..., 1::2]  # [B, H, T, dim/2] each
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)  # [B, H, T, dim]


class MLAttention(nn.Module):
    """Multi-head latent attention (see the module docstring). H heads, dn/dr/dv the nope/rope/v head dims, r the
    latent rank. Parameter names are the checkpoint's."""

    def __init__(self, spec: MLASpec, layer: int) -> None:
        super().__init__()
        self.spec, self.layer = spec, layer
        s = spec
        d, h, bias = s.hidden_size, s.num_heads, s.attention_bias
        qk_head_dim = s.qk_nope_head_dim + s.qk_rope_head_dim
        if s.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, s.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(s.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(s.q_lora_rank, h * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, s.kv_lora_rank + s.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(s.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(s.kv_lora_rank, h * (s.qk_nope_head_dim + s.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * s.v_head_dim, d, bias=bias)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        return self.o_proj(self._attend(*self._project(x, *step.rope["main"]), step))  # [B, T, D]

    def forward_many(self, x: torch.Tensor, lens: Sequence[int], steps: Sequence[Step]) -> torch.Tensor:
        """x [1, sum T_i, D]: the new tokens of several sequences, each step over its own cache -> [1, sum T_i, D].
        The projections, the latent's norm and RoPE run once over every sequence's tokens; the cache write and
        attention per sequence."""
        cos = torch.cat([st.rope["main"][0] for st in steps])  # [sum T_i, dim]
        sin = torch.cat([st.rope["main"][1] for st in steps])
        q_nope, q_rot, latent, k_rot = (p.split(lens, dim=2) for p in self._project(x, cos, sin))  # per sequence
        outs = [self._attend(qn, qr, c, kr, st) for qn, qr, c, kr, st in zip(q_nope, q_rot, latent, k_rot, steps,
                                                                                strict=True)]
        return self.o_proj(torch.cat(outs, dim=1))

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q_nope [B, H, T, dn], q_rot [B, H, T, dr] (rotated), the normed latent [B, 1, T, r] and
        k_rot [B, 1, T, dr] (rotated): everything of a layer that works token by token."""
        s = self.spec
        b, t, _ = x.shape
        h, dn, dr = s.num_heads, s.qk_nope_head_dim, s.qk_rope_head_dim
        q = (self.q_proj(x) if s.q_lora_rank is None
             else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))))  # [B, T, H*(dn+dr)]
        q = q.view(b, t, h, dn + dr).transpose(1, 2)  # [B, H, T, dn+dr]
        q_nope, q_rot = torch.split(q, [dn, dr], dim=-1)  # [B, H, T, dn], [B, H, T, dr]
        latent, k_rot = torch.split(self.kv_a_proj_with_mqa(x), [s.kv_lora_rank, dr], dim=-1)  # [B, T, r], [B, T, dr]
        latent = self.kv_a_layernorm(latent).unsqueeze(1)  # [B, 1, T, r]
        rope = apply_rope_interleaved if s.rope_interleave else apply_rope
        return q_nope, rope(q_rot, cos, sin), latent, rope(k_rot.view(b, 1, t, dr), cos, sin)

    def _attend(self, q_nope: torch.Tensor, q_rot: torch.Tensor, latent: torch.Tensor, k_rot: torch.Tensor,
                step: Step) -> torch.Tensor:
        """One sequence's step (as ``_project`` gives it) over its cache -> [B, T, H*dv] (before ``o_proj``)."""
        s = self.spec
        b, h, t, _ = q_nope.shape
        dr = s.qk_rope_head_dim
        if s.mla_cache == "expanded":
            k_nope, v = self._expand(latent.squeeze(1))  # [B, H, T, dn], [B, H, T, dv]
            k = torch.cat([k_nope, k_rot.expand(b, h, t, dr)], dim=-1)  # [B, H, T, dn+dr]
            k, v = step.cache.update(self.layer, k, v.contiguous())  # [B, H, S, dn+dr], [B, H, S, dv]
            return attend(torch.cat([q_nope, q_rot], dim=-1), k, v, step.mask(k.shape[2], None), s.softmax_scale)
        cached = step.cache.update_single(self.layer, torch.cat([latent, k_rot], dim=-1))  # [B, 1, S, r+dr]
        n = cached.shape[2]
        mask = step.mask(n, None)
        if s.mla_absorb == "always" or (s.mla_absorb == "auto" and absorb_pays(s, t, n)):
            return self._absorbed(q_nope, q_rot, cached, mask)
        c_all, k_rot_all = torch.split(cached.squeeze(1), [s.kv_lora_rank, dr], dim=-1)  # [B, S, r], [B, S, dr]
        k_nope, v = self._expand(c_all)  # [B, H, S, dn], [B, H, S, dv]
        k = torch.cat([k_nope, k_rot_all.unsqueeze(1).expand(b, h, n, dr)], dim=-1)  # [B, H, S, dn+dr]
        return attend(torch.cat([q_nope, q_rot], dim=-1), k, v, mask, s.softmax_scale)

    def _expand(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normed latents [B, S, r] -> per-head k_nope [B, H, S, dn] and v [B, H, S, dv] (``kv_b_proj``)."""
        s = self.spec
        b, n, _ = latent.shape
        kv = self.kv_b_proj(latent).view(b, n, s.num_heads, -1).transpose(1, 2)  # [B, H, S, dn+dv]
        k_nope, v = torch.split(kv, [s.qk_nope_head_dim, s.v_head_dim], dim=-1)
        return k_nope, v

    def _absorbed(self, q_nope: torch.Tensor, q_rot: torch.Tensor, cached: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
        """q_nope [B, H, T, dn], q_rot [B, H, T, dr] over the latent cache [B, 1, S, r+dr] -> [B, T, H*dv].

        The heads share the one cached latent, so they fold into the query rows of one matmul per sequence
        ([B, H*T, r+dr] x [B, r+dr, S]): the cache is read as it lies, never copied per head."""
        s = self.spec
        b, h, t, _ = q_nope.shape
        r, dn = s.kv_lora_rank, s.qk_nope_head_dim
        w = self.kv_b_proj.weight.view(h, dn + s.v_head_dim, r)  # [H, dn+dv, r]
        w_uk, w_uv = w[:, :dn], w[:, dn:]  # [H, dn, r], [H, dv, r]
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # [B, H, T, r]
        query = torch.cat([q_lat, q_rot], dim=-1).reshape(b, h * t, -1) * s.softmax_scale  # [B, H*T, r+dr]
        keys = cached.squeeze(1)  # [B, S, r+dr]
        n = keys.shape[1]
        scores = torch.bmm(query, keys.transpose(1, 2)).view(b, h, t, n)  # [B, H, T, S]
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # [B, H, T, S]
        o_lat = torch.bmm(probs.view(b, h * t, n), keys[..., :r]).view(b, h, t, r)  # [B, H, T, r]
        out = torch.einsum("bhtr,hdr->bthd", o_lat, w_uv)  # [B, T, H, dv]
        return out.reshape(b, t, h * s.v_head_dim)  # [B, T, H*dv]
