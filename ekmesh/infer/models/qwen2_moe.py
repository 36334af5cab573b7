"""Qwen2-MoE (Qwen2MoeForCausalLM): GQA with q/k/v biases, softmax top-k routing, and a shared expert whose
output is scaled by ``sigmoid(shared_expert_gate(x))`` and added to the routed sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ekmesh.infer.expert import ExpertSpec, ExpertWeights
from ekmesh.infer.models.attention import AttentionSpec
from ekmesh.infer.models.common import CausalLM, SoftmaxMoE
from ekmesh.infer.models.family import ExpertReader
from ekmesh.infer.models.standard import StandardConfig, build_decoder, sparse_step_layers, standard_fields

ARCHITECTURES = ("Qwen2MoeForCausalLM",)
MODEL_TYPES = ("qwen2_moe",)
KEEP_FP32 = ()  # every parameter loads in the model dtype


@dataclass(frozen=True)
class Config(StandardConfig):
    norm_topk_prob: bool = False
    qkv_bias: bool = True
    shared_expert_intermediate_size: int = 0

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> Config:
        f = standard_fields(hf, "qwen2_moe", num_experts_key="num_experts",
                            moe_intermediate_key="moe_intermediate_size")
        f["moe_layers"] = sparse_step_layers(hf, f["num_layers"])
        return cls(**f, norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                   qkv_bias=bool(hf.get("qkv_bias", True)),
                   shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0))

    def expert_spec(self) -> ExpertSpec:
        return ExpertSpec(self.hidden_size, self.moe_intermediate_size, self.num_experts)


def build(cfg: Config) -> CausalLM:
    spec = AttentionSpec(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, qkv_bias=cfg.qkv_bias,
                         rms_eps=cfg.rms_eps)
    return build_decoder(cfg, spec, lambda i: SoftmaxMoE(
        i, cfg.hidden_size, cfg.num_experts, cfg.top_k, cfg.norm_topk_prob,
        shared_intermediate=cfg.shared_expert_intermediate_size))

def checkpoint_names(name: str) -> list[str]:
    return [name]


def read_expert(reader: ExpertReader, cfg: Config, layer: int, expert: int) -> ExpertWeights:
    return reader.swiglu_expert(f"model.layers.{layer}.mlp.experts", expert, cfg.expert_spec())
