"""OLMoE (OlmoeForCausalLM): GQA with RMSNorm over the whole q and k projections (before the head split),
optional ``clip_qkv`` clamping, softmax top-k routing (``norm_topk_prob``), no shared expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ekmesh.infer.expert import ExpertSpec, ExpertWeights
from ekmesh.infer.models.attention import AttentionSpec
from ekmesh.infer.models.common import CausalLM, SoftmaxMoE
from ekmesh.infer.models.family import ExpertReader
from ekmesh.infer.models.standard import StandardConfig, build_decoder, standard_fields

ARCHITECTURES = ("OlmoeForCausalLM",)
MODEL_TYPES = ("olmoe",)
KEEP_FP32 = ()  # every parameter loads in the model dtype


@dataclass(frozen=True)
class Config(StandardConfig):
    norm_topk_prob: bool = False
    attention_bias: bool = False
    clip_qkv: float | None = None

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> Config:
        f = standard_fields(hf, "olmoe", num_experts_key="num_experts", moe_intermediate_key="intermediate_size")
        clip = hf.get("clip_qkv")
        return cls(**f, norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                   attention_bias=bool(hf.get("attention_bias", False)),
                   clip_qkv=None if clip is None else float(clip))

    def expert_spec(self) -> ExpertSpec:
        return ExpertSpec(self.hidden_size, self.moe_intermediate_size, self.num_experts)


def build(cfg: Config) -> CausalLM:
    spec = AttentionSpec(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         qkv_bias=cfg.attention_bias, o_bias=cfg.attention_bias, qk_norm="full",
                         rms_eps=cfg.rms_eps, clip_qkv=cfg.clip_qkv)
    return build_decoder(cfg, spec, lambda i: SoftmaxMoE(i, cfg.hidden_size, cfg.num_experts, cfg.top_k,
                                                         cfg.norm_topk_prob))

def checkpoint_names(name: str) -> list[str]:
    return [name]


def read_expert(reader: ExpertReader, cfg: Config, layer: int, expert: int) -> ExpertWeights:
    return reader.swiglu_expert(f"model.layers.{layer}.mlp.experts", expert, cfg.expert_spec())
