"""The dense hyper-parameters shared by the "standard" MoE families (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, gpt-oss):
GQA attention + RoPE + RMSNorm, routed experts of one SwiGLU shape; and by the dense Qwen3 (``dense_fields``: no
routed experts, every layer a dense SwiGLU MLP).

Each family file owns a frozen config dataclass built by ``from_hf_config(dict)``; this module holds the part of
that translation they have in common, so a field is read from config.json the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ekmesh.core.errors import ConfigError
from ekmesh.infer.models.attention import Attention, AttentionSpec
from ekmesh.infer.models.common import CausalLM, DecoderLayer, DenseMLP, RopeSpec, layer_windows, require


@dataclass(frozen=True)
class StandardConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rope: RopeSpec
    tie_word_embeddings: bool
    windows: tuple[int | None, ...]
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    intermediate_size: int  # dense MLP layers (0 when every layer is MoE)
    moe_layers: tuple[bool, ...]

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)


def standard_fields(hf: dict[str, Any], architecture: str, *, num_experts_key: str,
                    moe_intermediate_key: str) -> dict[str, Any]:
    """Reads the common fields; the family adds or overrides the rest.

    ``num_experts_key`` is the family's field; transformers v5 also writes ``num_local_experts`` for some families.
    """
    if num_experts_key not in hf and "num_local_experts" in hf:
        num_experts_key = "num_local_experts"
    require(hf, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", num_experts_key,
            "num_experts_per_tok")
    f = dense_fields(hf, architecture)
    num_experts = int(hf[num_experts_key])
    top_k = int(hf["num_experts_per_tok"])
    if not 0 < top_k <= num_experts:
        raise ConfigError(f"num_experts_per_tok={top_k} must be in [1, {num_experts}]")
    f.update(num_experts=num_experts, top_k=top_k,
             moe_intermediate_size=int(hf.get(moe_intermediate_key) or hf.get("intermediate_size") or 0),
             moe_layers=tuple([True] * f["num_layers"]))
    return f


def dense_fields(hf: dict[str, Any], architecture: str) -> dict[str, Any]:
    """The fields of a model without routed experts (``num_experts`` 0, every layer a dense SwiGLU MLP); a MoE
    family's ``standard_fields`` starts from these."""
    require(hf, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or hidden // heads)
    n_layers = int(hf["num_hidden_layers"])
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"unsupported hidden_act {act!r} for {architecture} (supported: silu)")
    return dict(
        architecture=architecture,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=RopeSpec.from_hf_config(hf, head_dim),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        windows=layer_windows(hf, n_layers),
        num_experts=0,
        top_k=0,
        moe_intermediate_size=0,
        intermediate_size=int(hf.get("intermediate_size") or 0),
        moe_layers=tuple([False] * n_layers),
    )


def sparse_step_layers(hf: dict[str, Any], n_layers: int) -> tuple[bool, ...]:
    """Qwen-style MoE layer choice: ``decoder_sparse_step`` and ``mlp_only_layers``."""
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    only = set(hf.get("mlp_only_layers") or [])
    return tuple((i not in only) and (i + 1) % step == 0 for i in range(n_layers))


def build_decoder(cfg: StandardConfig, spec: AttentionSpec, moe: Callable[[int], nn.Module]) -> CausalLM:
    """The standard stack: per layer GQA attention (window from ``cfg.windows``) and either ``moe(layer)`` or a
    dense SwiGLU MLP of ``cfg.intermediate_size``, per ``cfg.moe_layers``."""
    layers = []
    for i in range(cfg.num_layers):
        mlp = moe(i) if cfg.moe_layers[i] else DenseMLP(cfg.hidden_size, cfg.intermediate_size)
        layers.append(DecoderLayer(Attention(spec, i, cfg.windows[i]), mlp, cfg.hidden_size, cfg.rms_eps))
    return CausalLM(cfg, layers, {"main": cfg.rope})
