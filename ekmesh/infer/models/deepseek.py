"""DeepSeek-V2 and DeepSeek-V3 (DeepseekV2ForCausalLM, DeepseekV3ForCausalLM): multi-head latent attention (MLA),
grouped routers, a shared expert, and dense MLPs in the first ``first_k_dense_replace`` layers.

Numerics follow transformers 5.23 ``modeling_deepseek_v2.py`` / ``modeling_deepseek_v3.py``:
- MLA: q = ``q_proj(x)``, or ``q_b_proj(q_a_layernorm(q_a_proj(x)))`` when ``q_lora_rank`` is set; the latent
  ``kv_a_proj_with_mqa(x)`` splits into ``kv_lora_rank`` (normed, then ``kv_b_proj`` -> per-head k_nope and v) and
  one shared ``qk_rope_head_dim`` k_rot. RoPE rotates only the rope part. ``q_a_layernorm`` / ``kv_a_layernorm``
  use eps 1e-6 whatever ``rms_norm_eps`` says (as transformers and DeepSeek's own code do).
- RoPE layout: V2 always rotates interleaved pairs (transformers' complex form); V3 does so when
  ``rope_interleave`` (default true), else the half-split layout. Both q and k get the same layout, so the
  pairs-to-halves permutation of the interleaved form does not change any score.
- Softmax scale ``qk_head_dim ** -0.5``, times ``yarn_get_mscale(factor, mscale_all_dim) ** 2`` when the rope
  type is not "default" and ``mscale_all_dim`` is set; cos/sin also carry YaRN's attention factor (RopeSpec).
- Routers run in fp32. V2: softmax scores, top-k ("greedy") or top-k inside the ``topk_group`` groups with the
  highest max score ("group_limited_greedy"); weights are the raw scores times ``routed_scaling_factor`` and are
  never renormalised (transformers ignores V2's ``norm_topk_prob``). V3 ("noaux_tc", whatever ``topk_method``
  says): sigmoid scores; ``scores + e_score_correction_bias`` picks the ``topk_group`` groups by the sum of their
  top-2 and the top-k experts inside them; weights are the unbiased scores, renormalised when ``norm_topk_prob``,
  times ``routed_scaling_factor``.
- The shared expert (width ``moe_intermediate_size * n_shared_experts``) is added without a gate.
- Layer i is MoE when ``i >= first_k_dense_replace`` and ``i % moe_layer_freq == 0`` (DeepSeek's rule;
  transformers ignores ``moe_layer_freq``, which is 1 in every released checkpoint).

Invariants: the KV cache holds MLA's normed latent and rotary key per token, one copy for all heads, and decode
absorbs the up projections (``deepseek_mla``; ``mla_cache="expanded"`` keeps per-head keys and values instead).
``num_key_value_heads`` is ignored: MLA has one latent shared by all heads. Parameters beyond ``num_hidden_layers``
(V3's multi-token-prediction layer ``model.layers.{num_hidden_layers}.*``) are never built, so the loader never reads
them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ekmesh.core.errors import ConfigError
from ekmesh.infer import decode_experts, fusion
from ekmesh.infer.expert import ExpertSpec, ExpertWeights
from ekmesh.infer.models.cache import Step
from ekmesh.infer.models.common import CausalLM, DecoderLayer, DenseMLP, RopeSpec, call_experts, require
from ekmesh.infer.models.deepseek_mla import MLASpec, MLAttention
from ekmesh.infer.models.family import ExpertReader

ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
# parameters kept in fp32 whatever the model dtype (transformers does the same: expert choice is sensitive to it)
KEEP_FP32 = ("e_score_correction_bias",)

TOPK_METHODS = {2: ("greedy", "group_limited_greedy"), 3: ("noaux_tc",)}

# transformers' config defaults for the fields that differ between the two versions or that real configs omit
_DEFAULTS: dict[int, dict[str, Any]] = {
    2: dict(first_k_dense_replace=0, n_shared_experts=2, n_routed_experts=64, routed_scaling_factor=1.0,
            topk_method="greedy", n_group=None, topk_group=None, norm_topk_prob=False, moe_intermediate_size=1407,
            num_experts_per_tok=None, rope_interleave=True),
    3: dict(first_k_dense_replace=3, n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5,
            topk_method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=True, moe_intermediate_size=2048,
            num_experts_per_tok=8, rope_interleave=True),
}
_SHARED_DEFAULTS: dict[str, Any] = dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                                        qk_rope_head_dim=64, v_head_dim=128, moe_layer_freq=1)


def _version(hf: dict[str, Any]) -> int:
    archs = hf.get("architectures") or []
    if "DeepseekV3ForCausalLM" in archs:
        return 3
    if "DeepseekV2ForCausalLM" in archs:
        return 2
    return 3 if hf.get("model_type") == "deepseek_v3" else 2


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True, kw_only=True)
class Config(MLASpec):
    """MLA's dimensions and settings (``MLASpec``: hidden_size, num_heads, the LoRA ranks and head dims,
    attention_bias, rope_interleave, softmax_scale, mla_cache, mla_absorb), then the rest of the model."""

    architecture: str
    version: int  # 2 or 3
    vocab_size: int
    num_layers: int
    rms_eps: float
    rope: RopeSpec
    tie_word_embeddings: bool
    intermediate_size: int  # dense MLP layers
    moe_intermediate_size: int
    num_experts: int
    top_k: int
    n_shared_experts: int
    topk_method: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    moe_layers: tuple[bool, ...]

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    def expert_spec(self) -> ExpertSpec:
        return ExpertSpec(self.hidden_size, self.moe_intermediate_size, self.num_experts)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> Config:
        require(hf, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        version = _version(hf)
        defaults = {**_SHARED_DEFAULTS, **_DEFAULTS[version]}
        hf = dict(hf)
        if "n_routed_experts" not in hf and "num_local_experts" in hf:  # transformers' attribute_map alias
            hf["n_routed_experts"] = hf["num_local_experts"]

        def get(key: str) -> Any:
            return hf.get(key, defaults.get(key))

        arch = f"deepseek_v{version}"
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"unsupported hidden_act {act!r} for {arch} (supported: silu)")
        if hf.get("mlp_bias"):
            raise ConfigError(f"mlp_bias=true is not supported for {arch}")
        n_layers = int(hf["num_hidden_layers"])
        num_experts, top_k = int(get("n_routed_experts") or 0), int(get("num_experts_per_tok") or 0)
        if not 0 < top_k <= num_experts:
            raise ConfigError(f"num_experts_per_tok={top_k} must be in [1, n_routed_experts={num_experts}]")
        method = str(get("topk_method")) if version == 2 else "noaux_tc"
        if method not in TOPK_METHODS[version]:
            raise ConfigError(f"unsupported topk_method {method!r} for {arch} "
                              f"(supported: {', '.join(TOPK_METHODS[version])})")
        n_group, topk_group = int(get("n_group") or 1), int(get("topk_group") or 1)
        if method != "greedy":
            if num_experts % n_group or not 0 < topk_group <= n_group:
                raise ConfigError(f"n_group={n_group}, topk_group={topk_group} do not fit "
                                  f"n_routed_experts={num_experts}")
            if method == "noaux_tc" and num_experts // n_group < 2:
                raise ConfigError(f"noaux_tc routing needs at least 2 experts per group, got "
                                  f"{num_experts}/{n_group}")
        freq = int(get("moe_layer_freq") or 1)
        first_dense = int(get("first_k_dense_replace") or 0)
        rope_dim = int(get("qk_rope_head_dim"))
        if rope_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even, got {rope_dim}")
        rope = RopeSpec.from_hf_config(hf, rope_dim)
        qk_head_dim = int(get("qk_nope_head_dim")) + rope_dim
        scale = qk_head_dim ** -0.5
        if rope.rope_type != "default" and rope.mscale_all_dim:
            scale *= _yarn_mscale(rope.factor, float(rope.mscale_all_dim)) ** 2
        q_lora = get("q_lora_rank")
        return cls(
            architecture=arch,
            version=version,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            num_layers=n_layers,
            num_heads=int(hf["num_attention_heads"]),
            q_lora_rank=None if q_lora is None else int(q_lora),
            kv_lora_rank=int(get("kv_lora_rank")),
            qk_nope_head_dim=int(get("qk_nope_head_dim")),
            qk_rope_head_dim=rope_dim,
            v_head_dim=int(get("v_head_dim")),
            attention_bias=bool(hf.get("attention_bias", False)),
            rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=rope,
            rope_interleave=True if version == 2 else bool(get("rope_interleave")),
            softmax_scale=scale,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            intermediate_size=int(hf["intermediate_size"]),
            moe_intermediate_size=int(get("moe_intermediate_size")),
            num_experts=num_experts,
            top_k=top_k,
            n_shared_experts=int(get("n_shared_experts") or 0),
            topk_method=method,
            n_group=n_group,
            topk_group=topk_group,
            norm_topk_prob=bool(get("norm_topk_prob")),
            routed_scaling_factor=float(get("routed_scaling_factor")),
            moe_layers=tuple(i >= first_dense and i % freq == 0 for i in range(n_layers)),
        )


# ---------------------------------------------------------------------------------------------------- MoE


class Router(nn.Module):
    """The fp32 router: hidden [T, D] -> (weights [T, k] fp32, expert ids [T, k]). Checkpoint name ``mlp.gate``.
    Everything after the gate's matmul is ``route``: one compiled function in the captured decode step."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))
        if cfg.version == 3:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.num_experts))
        self.rule = (cfg.version, cfg.topk_method, cfg.n_group, cfg.topk_group, cfg.top_k, cfg.norm_topk_prob,
                     cfg.routed_scaling_factor)  # route's arguments after the logits and the bias

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.to(torch.float32), self.weight.to(torch.float32))  # [T, E]
        bias = self.e_score_correction_bias.to(torch.float32) if self.cfg.version == 3 else None
        rule = self.rule
        if fusion.enabled() and logits.is_cuda:  # the captured decode step: compiled, once checked against the plain
            return fusion.checked(lambda: route(logits, bias, *rule), lambda: _route(logits, bias, *rule),
                                  ("deepseek-route", logits.shape, *rule), decode_experts.route_difference)
        return route(logits, bias, *rule)


def _group_mask(group_scores: torch.Tensor, topk_group: int, per_group: int) -> torch.Tensor:
    """group_scores [T, G] -> bool [T, E], True on the experts of each token's ``topk_group`` best groups."""
    idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    mask = torch.zeros_like(group_scores).scatter_(1, idx, 1)  # [T, G]
    g = group_scores.shape[1]
    return mask.unsqueeze(-1).expand(-1, g, per_group).reshape(-1, g * per_group).bool()  # [T, E]


def _route(logits: torch.Tensor, bias: torch.Tensor | None, version: int, method: str, n_group: int, topk_group: int,
           top_k: int, normalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] fp32 -> (weights [T, k] fp32, expert ids [T, k]) by the module docstring's rules (V2:
    softmax, greedy or group-limited; V3: sigmoid, ``bias`` picks groups and experts). ``route`` is its ``@fusable``
    form: in the captured decode step the scores, group limits, top-k and renormalisation compile into a few
    kernels instead of ~20 (checked once against this plain body, ``fusion.checked``)."""
    per_group = logits.shape[1] // n_group
    if version == 2:
        scores = logits.softmax(dim=-1, dtype=torch.float32)  # [T, E]
        if method == "group_limited_greedy":
            group_max = scores.view(-1, n_group, per_group).max(dim=-1).values  # [T, G]
            scores = scores.masked_fill(~_group_mask(group_max, topk_group, per_group), 0.0)
        w, ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)  # [T, k]
    else:
        assert bias is not None
        scores = logits.sigmoid()  # [T, E]
        choice = scores + bias  # [T, E]
        group_top2 = choice.view(-1, n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
        choice = choice.masked_fill(~_group_mask(group_top2, topk_group, per_group), float("-inf"))
        ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]  # [T, k]
        w = scores.gather(1, ids)  # [T, k]
        if normalize:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * scaling, ids


route = fusion.fusable(_route)


class DeepseekMoE(nn.Module):
    """Router + routed experts (through the backend) + an ungated shared expert."""

    def __init__(self, cfg: Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.gate = Router(cfg)
        self.shared_experts = (DenseMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        b, t, d = x.shape
        x2 = x.reshape(-1, d)  # [B*T, D]
        w, ids = self.gate(x2)  # [B*T, k]
        out = call_experts(step, self.layer, x2, ids, w.to(x.dtype))  # [B*T, D]
        if self.shared_experts is not None:
            out = out + self.shared_experts(x2)
        return out.view(b, t, d)  # [B, T, D]


# ---------------------------------------------------------------------------------------------------- family API


def build(cfg: Config) -> CausalLM:
    layers = []
    for i in range(cfg.num_layers):
        mlp: nn.Module = DeepseekMoE(cfg, i) if cfg.moe_layers[i] else DenseMLP(cfg.hidden_size,
                                                                                 cfg.intermediate_size)
        layers.append(DecoderLayer(MLAttention(cfg, i), mlp, cfg.hidden_size, cfg.rms_eps))
    return CausalLM(cfg, layers, {"main": cfg.rope})


def checkpoint_names(name: str) -> list[str]:
    return [name]


def read_expert(reader: ExpertReader, cfg: Config, layer: int, expert: int) -> ExpertWeights:
    return reader.swiglu_expert(f"model.layers.{layer}.mlp.experts", expert, cfg.expert_spec())
