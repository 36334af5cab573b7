"""Building blocks shared by the model families: norms, RoPE, attention with a KV cache, dense MLP, the decoder
skeleton and the softmax top-k MoE block.

Responsibilities: numerics that match Hugging Face transformers (fp32 norms, fp32 router softmax, RoPE computed
in fp32 from positions), and the seam to the experts backend (a MoE block never holds routed expert weights).
Not responsible for: reading checkpoints (``ekmesh.infer.loader``), sampling (``ekmesh.infer.generate``).

Parameter names mirror the Hugging Face checkpoint names (``model.layers.N.self_attn.q_proj.weight``) so loading
is a name lookup. Shapes: B batch, T new tokens, S cached + new tokens, H heads, Hkv kv heads, d head dim,
D hidden, E experts, k experts per token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from ekmesh.core.errors import ConfigError
from ekmesh.infer import fusion
from ekmesh.infer.expert import ExpertSpec
from ekmesh.infer.experts import ExpertsBackend
from ekmesh.infer.fusion import fusable
from ekmesh.infer.models.cache import KVCache, Step

# ---------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters: ``inv_freq`` and the cos/sin scale (``attention_factor``, YaRN's mscale)."""

    dim: int
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], dim: int) -> RopeSpec:
        params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        if rope_type not in ("default", "linear", "yarn"):
            raise ConfigError(f"unsupported rope_type {rope_type!r} (supported: default, linear, yarn)")
        partial = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
        return cls(
            dim=int(dim * partial),
            theta=theta,
            rope_type=rope_type,
            factor=float(params.get("factor") or 1.0),
            original_max_position_embeddings=params.get(
                "original_max_position_embeddings", hf.get("max_position_embeddings")),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
        )

    def inv_freq(self) -> tuple[torch.Tensor, float]:
        """[dim/2] inverse frequencies (fp32, CPU) and the cos/sin scale, as transformers computes them."""
        dim, base = self.dim, self.theta
        pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim)  # [dim/2]
        if self.rope_type == "default":
            return 1.0 / pos_freqs, 1.0
        if self.rope_type == "linear":
            return 1.0 / pos_freqs / self.factor, 1.0
        factor = self.factor

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn = self.attention_factor
        if attn is None:
            if self.mscale and self.mscale_all_dim:
                attn = get_mscale(factor, self.mscale) / get_mscale(factor, self.mscale_all_dim)
            else:
                attn = get_mscale(factor)
        omax = self.original_max_position_embeddings or 4096

        def corr_dim(rot: float) -> float:
            return (dim * math.log(omax / (rot * 2 * math.pi))) / (2 * math.log(base))

        low, high = corr_dim(self.beta_fast), corr_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extra = 1 - ramp
        inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
        return inv, float(attn)


def layer_windows(hf: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Sliding window per layer from ``layer_types`` (transformers v5) or the older use_sliding_window fields."""
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    if types is None:
        if hf.get("use_sliding_window") and window:
            mwl = hf.get("max_window_layers", num_layers)
            types = ["sliding_attention" if (i + 1) % 2 and i < mwl else "full_attention" for i in range(num_layers)]
        else:
            types = ["full_attention"] * num_layers
    if len(types) != num_layers:
        raise ConfigError(f"layer_types has {len(types)} entries for {num_layers} layers")
    return tuple(int(window) if t == "sliding_attention" and window else None for t in types)


def require(hf: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if k not in hf]
    if missing:
        raise ConfigError(f"config.json lacks required field(s): {', '.join(missing)}")


# ---------------------------------------------------------------------------------------------------- runtime


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


@fusable
def head_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                   cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's per-head q/k RMSNorm, the move of heads before tokens, then RoPE, in one fused call:
    q [B, T, H, d], k [B, T, Hkv, d] -> q [B, H, T, d], k [B, Hkv, T, d]."""
    q = _rms_norm(q, q_weight, eps).transpose(1, 2)  # [B, H, T, d]
    k = _rms_norm(k, k_weight, eps).transpose(1, 2)  # [B, Hkv, T, d]
    return _rope(q, cos, sin), _rope(k, cos, sin)


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
    return out.view(b, h, t, -1).transpose(1, 2).reshape(b, t, -1)  # [B, T, H*dv]


# ---------------------------------------------------------------------------------------------------- modules


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


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


@fusable
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: normalise in fp32, cast back, then scale."""
    return _rms_norm(x, weight, eps)


@fusable
def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual sum x + y and its RMSNorm, in one fused call."""
    s = x + y
    return s, _rms_norm(s, weight, eps)


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
        return self.o_proj(self._attend(*self._project(x, *step.rope["main"]), step))

    def forward_many(self, x: torch.Tensor, lens: Sequence[int], steps: Sequence[Step]) -> torch.Tensor:
        """x [1, sum T_i, D]: the new tokens of several sequences, each step over its own cache -> [1, sum T_i, D].

        Projections, norms and RoPE are per token, so they run once over every sequence's tokens (each weight read
        once per batch step, not once per sequence); only the cache write and attention itself run per sequence."""
        cos = torch.cat([st.rope["main"][0] for st in steps])  # [sum T_i, dim]
        sin = torch.cat([st.rope["main"][1] for st in steps])
        q, k, v = self._project(x, cos, sin)  # [1, H(kv), sum T_i, d]
        parts = zip(q.split(lens, 2), k.split(lens, 2), v.split(lens, 2), steps, strict=True)
        return self.o_proj(torch.cat([self._attend(qi, ki, vi, st) for qi, ki, vi, st in parts], dim=1))

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q [B, H, T, d], k and v [B, Hkv, T, d], normed and rotated as the spec says."""
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
        if s.qk_norm == "head":  # -> [B, H, T, d], [B, Hkv, T, d]
            q, k = head_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, s.rms_eps, cos, sin)
            return q, k, v
        q, k = rope_qk(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [B, H, T, d], [B, Hkv, T, d]
        return q, k, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        """This step's q, k, v (as ``_project`` gives them) over the step's cache -> [B, T, H*d]."""
        k, v = step.cache.update(self.layer, k, v)  # [B, Hkv, S, d]
        mask = step.mask(k.shape[2], self.window)
        rep = self.spec.num_heads // self.spec.num_kv_heads
        if mask is not None and rep > 1 and not self.spec.sinks and q.is_cuda and fusion.kernels():
            rows = step.mask(k.shape[2], self.window, rep)
            assert rows is not None
            return attend_grouped(q, k, v, rows, self.spec.head_dim ** -0.5)
        return attend(q, k, v, mask, self.spec.head_dim ** -0.5, self.sinks if self.spec.sinks else None)


class DenseMLP(nn.Module):
    """SwiGLU MLP with HF names gate_proj / up_proj / down_proj (dense layers and shared experts)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor, step: Step | None = None) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@fusable
def softmax_topk(logits: torch.Tensor, k: int, normalize: bool, dtype: torch.dtype = torch.float32
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] computed in fp32, returned in ``dtype``; expert ids [T, k]) as
    transformers' softmax routers."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
    w, ids = torch.topk(probs, k, dim=-1)  # [T, k]
    if normalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w.to(dtype), ids


def call_experts(step: Step, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if step.experts is None:
        raise ConfigError(f"layer {layer} is a MoE layer but no experts backend was given")
    return step.experts(layer, x, ids, w)


class SoftmaxMoE(nn.Module):
    """Softmax top-k router + routed experts (through the backend) + optional sigmoid-gated shared expert."""

    def __init__(self, layer: int, hidden: int, num_experts: int, top_k: int, normalize: bool,
                 shared_intermediate: int = 0) -> None:
        super().__init__()
        self.layer, self.top_k, self.normalize = layer, top_k, normalize
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        if shared_intermediate:
            self.shared_expert = DenseMLP(hidden, shared_intermediate)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        self.has_shared = bool(shared_intermediate)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        b, t, d = x.shape
        x2 = x.reshape(-1, d)  # [B*T, D]
        w, ids = softmax_topk(self.gate(x2), self.top_k, self.normalize, x.dtype)  # [B*T, k]
        out = call_experts(step, self.layer, x2, ids, w)  # [B*T, D]
        if self.has_shared:
            out = out + torch.sigmoid(self.shared_expert_gate(x2)) * self.shared_expert(x2)
        return out.view(b, t, d)


class SequenceAttention(Protocol):
    """What a decoder layer's attention offers (``Attention``, DeepSeek's ``MLAttention``): a step over one cache,
    and ``forward_many``, the steps of several sequences whose per-token work runs once over all their tokens."""

    def __call__(self, x: torch.Tensor, step: Step) -> torch.Tensor: ...

    def forward_many(self, x: torch.Tensor, lens: Sequence[int], steps: Sequence[Step]) -> torch.Tensor: ...


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden: int, eps: float) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        x, h = self.post_attention_layernorm.add_norm(x, self.self_attn(self.input_layernorm(x), step))
        return x + self.mlp(h, step)

    def forward_chained(self, x: torch.Tensor, h: torch.Tensor, step: Step, next_norm: RMSNorm
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` given h = input_layernorm(x) already, returning (the layer's output, ``next_norm`` of it):
        each residual sum and the norm after it in one fused call (the fused decode step chains layers so)."""
        x, h = self.post_attention_layernorm.add_norm(x, self.self_attn(h, step))
        return next_norm.add_norm(x, self.mlp(h, step))


class _Body(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: Sequence[nn.Module], eps: float) -> None:
        super().__init__()
        # (an explicit weight skips the random init: on the meta device that init imports torch._dynamo, ~1.5 s)
        self.embed_tokens = nn.Embedding(vocab, hidden, _weight=torch.empty(vocab, hidden))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hidden, eps)


class CausalLM(nn.Module):
    """embed -> decoder layers -> norm -> lm_head. ``ropes`` maps a name to (inv_freq, scale) used by layers."""

    def __init__(self, config: Any, layers: Sequence[nn.Module], ropes: dict[str, RopeSpec]) -> None:
        super().__init__()
        self.config = config
        self.model = _Body(config.vocab_size, config.hidden_size, layers, config.rms_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope_specs = ropes
        self._rope_cache: dict[tuple[str, torch.device], tuple[torch.Tensor, float]] = {}

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(self, max_len: int | None = None) -> KVCache:
        return KVCache(len(self.model.layers), max_len)

    def forward(self, input_ids: torch.Tensor, cache: KVCache, experts: ExpertsBackend | None,
                last_only: bool = False, positions: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] continuing the cache -> logits [B, T, V] (or [B, 1, V] with last_only).

        ``positions`` [T] (a device tensor) defaults to the next T positions of the cache; a CUDA-graph caller
        passes its own static tensor.
        """
        t = input_ids.shape[1]
        x, step = self._begin(input_ids, cache, experts, positions)  # [B, T, D]
        chain = [m for m in self.model.layers if isinstance(m, DecoderLayer)]
        if fusion.kernels() and len(chain) == len(self.model.layers):
            # each layer's last residual sum fused with the next layer's input norm (the final norm for the last)
            h = chain[0].input_layernorm(x)
            nexts = [m.input_layernorm for m in chain[1:]] + [self.model.norm]
            for m, nxt in zip(chain, nexts, strict=True):
                x, h = m.forward_chained(x, h, step, nxt)
            cache.length += t
            return self.lm_head(h[:, -1:] if last_only else h)
        for layer in self.model.layers:
            x = layer(x, step)
        cache.length += t
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))

    def _begin(self, input_ids: torch.Tensor, cache: KVCache, experts: ExpertsBackend | None,
               positions: torch.Tensor | None) -> tuple[torch.Tensor, Step]:
        """(embeddings [B, T, D], the step: positions, cache, rotary tables) of a forward over ``input_ids``."""
        t = input_ids.shape[1]
        device = input_ids.device
        if positions is None:
            positions = torch.arange(cache.length, cache.length + t, device=device)  # [T]
        cache.positions = positions
        x = self.model.embed_tokens(input_ids)  # [B, T, D]
        step = Step(positions, cache, experts)
        for name, spec in self.rope_specs.items():
            key = (name, device)
            if key not in self._rope_cache:  # kept on the device: no host copy inside a CUDA graph
                inv, scale = spec.inv_freq()
                self._rope_cache[key] = (inv.to(device), scale)
            inv, scale = self._rope_cache[key]
            step.rope[name] = rope_cos_sin(inv, scale, positions, x.dtype)
        return x, step

    def forward_many(self, inputs: Sequence[tuple[torch.Tensor, KVCache]], experts: ExpertsBackend | None,
                     last_only: Sequence[bool] | None = None) -> list[torch.Tensor]:
        """Several sequences as one step: ``inputs`` [(input_ids [1, T_i], its cache)] -> logits [T_i or 1, V] each.

        Attention runs per sequence over its own cache; everything after it in a layer (norm, router, routed and
        shared experts, dense MLP) works token by token, so it runs once over the new tokens of every sequence
        together: one experts call per MoE layer for the whole batch (one frame per peer on a mesh). Each sequence
        gets the logits it would get alone, up to the rounding of differently sized matmuls."""
        started = [self._begin(ids, cache, experts, None) for ids, cache in inputs]
        steps = [step for _, step in started]
        lens = [x.shape[1] for x, _ in started]
        x = torch.cat([x for x, _ in started], dim=1)  # [1, sum T_i, D]
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)
            h = layer.input_layernorm(x)
            x = x + cast(SequenceAttention, layer.self_attn).forward_many(h, lens, steps)
            x = x + layer.mlp(layer.post_attention_layernorm(x), steps[0])  # (the MLP uses only the experts backend)
        for (_, cache), n in zip(inputs, lens, strict=True):
            cache.length += n
        xs = list(x.split(lens, dim=1))  # [1, T_i, D] each
        keep = [x[:, -1:] if last_only is not None and last_only[i] else x for i, x in enumerate(xs)]
        logits = self.lm_head(self.model.norm(torch.cat(keep, dim=1)))[0]  # [sum kept, V]
        return list(logits.split([k.shape[1] for k in keep]))

    def expert_spec(self) -> ExpertSpec:
        return self.config.expert_spec()
