"""Building blocks shared by the model families: the config helpers (``RopeSpec``, sliding windows), dense MLP,
the softmax top-k MoE block, the decoder skeleton and the causal LM around it.

Responsibilities: numerics that match Hugging Face transformers (fp32 router softmax, RoPE tables computed in fp32
from positions once per step), and the seam to the experts backend (a MoE block never holds routed expert weights).
Not responsible for: attention and the RoPE runtime (``ekmesh.infer.models.attention``), norms
(``ekmesh.infer.models.norms``), reading checkpoints (``ekmesh.infer.loader``), sampling
(``ekmesh.infer.generate``).

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
from ekmesh.infer import decode_experts, fusion
from ekmesh.infer.expert import ExpertSpec
from ekmesh.infer.experts import ExpertsBackend
from ekmesh.infer.fusion import fusable
from ekmesh.infer.models.attention import rope_cos_sin
from ekmesh.infer.models.cache import KVCache, Step
from ekmesh.infer.models.norms import RMSNorm

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


# ---------------------------------------------------------------------------------------------------- modules


class DenseMLP(nn.Module):
    """SwiGLU MLP with HF names gate_proj / up_proj / down_proj (dense layers and shared experts)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor, step: Step | None = None) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def softmax_topk(logits: torch.Tensor, k: int, normalize: bool, dtype: torch.dtype = torch.float32
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] computed in fp32, returned in ``dtype``; expert ids [T, k]) as
    transformers' softmax routers."""
    if fusion.kernels() and decode_experts.routes(logits, k):  # the captured decode step: one kernel
        return fusion.checked(
            lambda: decode_experts.route(logits, k, normalize, dtype),
            lambda: _softmax_topk(logits, k, normalize, dtype),
            ("route", logits.shape, logits.dtype, k, normalize, dtype), decode_experts.route_difference)
    return _softmax_topk(logits, k, normalize, dtype)


@fusable
def _softmax_topk(logits: torch.Tensor, k: int, normalize: bool, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
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
        chain = [m for m in self.model.layers if isinstance(m, DecoderLayer)] if fusion.kernels() else []
        if chain and len(chain) == len(self.model.layers):
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
