"""Mixtral (MixtralForCausalLM): GQA, optional sliding window, softmax top-k routing with the top-k weights always
renormalised, no shared expert.

Checkpoints name the MoE block ``block_sparse_moe`` with experts ``w1`` (gate), ``w3`` (up), ``w2`` (down);
transformers v5 state dicts name it ``mlp`` with fused ``gate_up_proj`` / ``down_proj``. Both load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ekmesh.infer.expert import ExpertSpec, ExpertWeights
from ekmesh.infer.models.attention import AttentionSpec
from ekmesh.infer.models.common import CausalLM, SoftmaxMoE
from ekmesh.infer.models.family import ExpertReader
from ekmesh.infer.models.standard import StandardConfig, build_decoder, standard_fields

ARCHITECTURES = ("MixtralForCausalLM",)
MODEL_TYPES = ("mixtral",)
KEEP_FP32 = ()  # every parameter loads in the model dtype


@dataclass(frozen=True)
class Config(StandardConfig):
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> Config:
        hf = dict(hf)
        if hf.get("sliding_window") and not hf.get("layer_types"):
            hf["layer_types"] = ["sliding_attention"] * int(hf["num_hidden_layers"])
        f = standard_fields(hf, "mixtral", num_experts_key="num_local_experts",
                            moe_intermediate_key="intermediate_size")
        return cls(**f)

    def expert_spec(self) -> ExpertSpec:
        return ExpertSpec(self.hidden_size, self.moe_intermediate_size, self.num_experts)


def build(cfg: Config) -> CausalLM:
    spec = AttentionSpec(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rms_eps=cfg.rms_eps)
    return build_decoder(cfg, spec, lambda i: SoftmaxMoE(i, cfg.hidden_size, cfg.num_experts, cfg.top_k,
                                                         normalize=True))

def checkpoint_names(name: str) -> list[str]:
    if ".mlp.gate." in name:
        return [name.replace(".mlp.", ".block_sparse_moe."), name]
    return [name]


def read_expert(reader: ExpertReader, cfg: Config, layer: int, expert: int) -> ExpertWeights:
    spec = cfg.expert_spec()
    prefix = f"model.layers.{layer}.block_sparse_moe.experts"
    if reader.has(f"{prefix}.{expert}.w1.weight"):
        return reader.swiglu_expert(prefix, expert, spec, names=("w1", "w3", "w2"))
    return reader.swiglu_expert(f"model.layers.{layer}.mlp.experts", expert, spec)
