"""Qwen3 dense (Qwen3ForCausalLM): GQA with per-head q/k RMSNorm, a dense SwiGLU MLP in every layer.

The family without routed experts: ``num_experts`` is 0, ``moe_layers`` all False, so the whole model is the dense
part that ``CausalLM`` holds, and it runs with ``experts=None`` (or an empty ``LocalExperts``). Its role in ekmesh is
a small draft model with the target's tokenizer, run on the attention host for speculative decoding.

Invariants: attention is qwen3_moe's (same ``AttentionSpec``); sliding windows follow ``layer_types``, else Qwen3's
older fields (``use_sliding_window``: layers from ``max_window_layers`` on slide); ``expert_spec()`` describes no
expert (``num_experts`` 0, ``intermediate`` 0), and ``read_expert`` is a ``ConfigError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ekmesh.core.errors import ConfigError
from ekmesh.infer.expert import ExpertSpec, ExpertWeights
from ekmesh.infer.models.attention import AttentionSpec
from ekmesh.infer.models.common import CausalLM, layer_windows
from ekmesh.infer.models.family import ExpertReader
from ekmesh.infer.models.standard import StandardConfig, build_decoder, dense_fields

ARCHITECTURES = ("Qwen3ForCausalLM",)
MODEL_TYPES = ("qwen3",)
KEEP_FP32 = ()  # every parameter loads in the model dtype


def qwen3_windows(hf: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding window: ``layer_types`` when given, else transformers' Qwen3Config rule."""
    if hf.get("layer_types") is None and hf.get("use_sliding_window") and hf.get("sliding_window"):
        mwl = int(hf.get("max_window_layers", num_layers))
        hf = {**hf, "layer_types": ["sliding_attention" if i >= mwl else "full_attention"
                                    for i in range(num_layers)]}
    return layer_windows(hf, num_layers)


@dataclass(frozen=True)
class Config(StandardConfig):
    attention_bias: bool = False

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> Config:
        f = dense_fields(hf, "qwen3")
        if f["intermediate_size"] <= 0:
            raise ConfigError("config.json lacks required field(s): intermediate_size")
        f["windows"] = qwen3_windows(hf, f["num_layers"])
        return cls(**f, attention_bias=bool(hf.get("attention_bias", False)))

    def expert_spec(self) -> ExpertSpec:
        return ExpertSpec(self.hidden_size, 0, 0)  # no routed expert


def _no_moe(layer: int) -> nn.Module:
    raise AssertionError(f"qwen3 layer {layer} asked for a MoE block; every layer is dense")


def build(cfg: Config) -> CausalLM:
    spec = AttentionSpec(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         qkv_bias=cfg.attention_bias, o_bias=cfg.attention_bias, qk_norm="head",
                         rms_eps=cfg.rms_eps)
    return build_decoder(cfg, spec, _no_moe)


def checkpoint_names(name: str) -> list[str]:
    return [name]


def read_expert(reader: ExpertReader, cfg: Config, layer: int, expert: int) -> ExpertWeights:
    raise ConfigError(f"(layer={layer}, expert={expert}) is not a routed expert: {cfg.architecture} is a dense "
                      "model without routed experts")
