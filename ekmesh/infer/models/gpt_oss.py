"""gpt-oss (GptOssForCausalLM, model_type ``gpt_oss``): GQA with q/k/v/o biases and per-head attention sinks,
sliding-window and full layers alternating per ``layer_types``, YaRN RoPE, a biased top-k router and clamped-SwiGLU
experts with biases.

Numerics follow transformers' ``modeling_gpt_oss``:
- router: ``logits = x @ W.T + b``; top-k on the raw logits, then a softmax over the k chosen logits only, in the
  activations' dtype (not fp32);
- RMSNorm multiplies the fp32 normalised activations by its weight before casting back (one rounding in bf16);
- a sliding window of W lets a query see itself and the W-1 keys before it; sinks are one logit per head that
  joins the softmax and is then dropped (``attention.attend``);
- experts (computed by the experts backend, never here): ``gate_up = x @ Wgu + bgu``; gate is clamped above at
  ``limit``, up on both sides; ``(up + 1) * gate * sigmoid(alpha * gate)``; then ``@ Wd + bd``.

Checkpoint expert layouts read by ``read_expert`` (only the one expert's rows of each fused tensor are read):
- float, as ``save_pretrained`` writes it: ``mlp.experts.gate_up_proj [E, D, 2I]`` (``x @ W`` layout, gate/up
  INTERLEAVED on the last axis: gate = ``[..., 0::2]``, up = ``[..., 1::2]``), ``gate_up_proj_bias [E, 2I]``
  (interleaved), ``down_proj [E, I, D]``, ``down_proj_bias [E, D]``;
- MXFP4, as released (``quantization_config.quant_method == "mxfp4"``): ``gate_up_proj_blocks [E, 2I, D/32, 16]``
  + ``gate_up_proj_scales [E, 2I, D/32]`` (Linear layout, interleaved rows), ``down_proj_blocks [E, D, I/32, 16]``
  + ``down_proj_scales [E, D, I/32]``, plus the float biases above.
Both are returned in ekmesh's linear, de-interleaved layout (``ekmesh.infer.experts``): ``gate_up [2I, D]`` with
gate rows first, ``down [D, I]``, ``gate_up_bias [2I]`` in the same order, ``down_bias [D]``. MXFP4 weights stay
MXFP4 (``QuantizedTensor`` of ``qtensor``, rows reordered as stored: nothing is expanded); a gpt-oss checkpoint in
block FP8 is expanded to float (its row blocks would not survive the de-interleave).

Parameter names equal the checkpoint names (``model.layers.N.mlp.router.weight``, ``self_attn.sinks``), so
``checkpoint_names`` is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ekmesh.core.errors import ConfigError, MissingTensorError, TensorShapeError
from ekmesh.infer.expert import ExpertSpec, ExpertWeights
from ekmesh.infer.models.attention import Attention, AttentionSpec
from ekmesh.infer.models.cache import Step
from ekmesh.infer.models.common import CausalLM, DecoderLayer, call_experts
from ekmesh.infer.models.family import ExpertReader
from ekmesh.infer.models.norms import RMSNorm
from ekmesh.infer.models.standard import StandardConfig, standard_fields
from ekmesh.infer.qtensor import QuantizedTensor, take_rows
from ekmesh.infer.quant import MXFP4_BLOCK

ARCHITECTURES = ("GptOssForCausalLM",)
MODEL_TYPES = ("gpt_oss",)
KEEP_FP32 = ()  # every parameter loads in the model dtype

# transformers' GptOssConfig defaults, applied when config.json leaves a field out.
_DEFAULT_ROPE: dict[str, Any] = {
    "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
    "original_max_position_embeddings": 4096,
}
_DEFAULT_THETA = 150000.0
_QUANT_METHODS = (None, "mxfp4", "fp8")


@dataclass(frozen=True)
class Config(StandardConfig):
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attention_bias: bool = True
    quant_method: str | None = None

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> Config:
        hf = dict(hf)
        if not (hf.get("rope_parameters") or hf.get("rope_scaling")):
            hf["rope_parameters"] = dict(_DEFAULT_ROPE)
        params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if "rope_theta" not in params and "rope_theta" not in hf:
            hf["rope_theta"] = _DEFAULT_THETA
        hf.setdefault("max_position_embeddings", 131072)
        hf.setdefault("rms_norm_eps", 1e-5)
        hf.setdefault("sliding_window", 128)
        n_layers = int(hf.get("num_hidden_layers", 0))
        if not hf.get("layer_types"):
            hf["layer_types"] = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
        quant = hf.get("quantization_config") or {}
        if not isinstance(quant, dict):
            raise ConfigError("quantization_config must be an object")
        method = quant.get("quant_method")
        if method not in _QUANT_METHODS:
            raise ConfigError(f"gpt-oss: unsupported quant_method {method!r} (supported: mxfp4, fp8, none)")
        f = standard_fields(hf, "gpt_oss", num_experts_key="num_local_experts",
                            moe_intermediate_key="intermediate_size")
        f["intermediate_size"] = 0  # every layer is MoE; there is no dense MLP
        return cls(**f, swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
                   swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
                   attention_bias=bool(hf.get("attention_bias", True)), quant_method=method)

    def expert_spec(self) -> ExpertSpec:
        return ExpertSpec(self.hidden_size, self.moe_intermediate_size, self.num_experts, activation="gptoss",
                          bias=True, alpha=self.swiglu_alpha, limit=self.swiglu_limit)


class GptOssRMSNorm(RMSNorm):
    """RMSNorm that multiplies by its weight in fp32 and casts once, as transformers' gpt-oss norm does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(torch.float32) * x32).to(x.dtype)

    def add_norm(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = x + y
        return s, self(s)


class GptOssMoE(nn.Module):
    """Biased linear router, top-k over logits, softmax over the k chosen; routed experts through the backend."""

    def __init__(self, layer: int, hidden: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.layer, self.top_k = layer, top_k
        self.router = nn.Linear(hidden, num_experts, bias=True)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        b, t, d = x.shape
        x2 = x.reshape(-1, d)  # [B*T, D]
        logits = self.router(x2)  # [B*T, E]
        top, ids = torch.topk(logits, self.top_k, dim=-1)  # [B*T, k]
        w = torch.softmax(top, dim=-1, dtype=top.dtype)  # [B*T, k], in the activations' dtype like transformers
        out = call_experts(step, self.layer, x2, ids, w)  # [B*T, D]
        return out.view(b, t, d)  # [B, T, D]


def build(cfg: Config) -> CausalLM:
    spec = AttentionSpec(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         qkv_bias=cfg.attention_bias, o_bias=cfg.attention_bias, rms_eps=cfg.rms_eps, sinks=True)
    layers = []
    for i in range(cfg.num_layers):
        layer = DecoderLayer(Attention(spec, i, cfg.windows[i]),
                             GptOssMoE(i, cfg.hidden_size, cfg.num_experts, cfg.top_k), cfg.hidden_size, cfg.rms_eps)
        layer.input_layernorm = GptOssRMSNorm(cfg.hidden_size, cfg.rms_eps)
        layer.post_attention_layernorm = GptOssRMSNorm(cfg.hidden_size, cfg.rms_eps)
        layers.append(layer)
    model = CausalLM(cfg, layers, {"main": cfg.rope})
    model.model.norm = GptOssRMSNorm(cfg.hidden_size, cfg.rms_eps)
    return model


def checkpoint_names(name: str) -> list[str]:
    return [name]


# ---------------------------------------------------------------------------------------------------- experts


def _check_shape(reader: ExpertReader, name: str, expected: tuple[int, ...]) -> None:
    got = tuple(reader.shape(name))
    if got != expected:
        raise TensorShapeError(name, list(expected), list(got))


def _mxfp4_weight(reader: ExpertReader, name: str, num_experts: int, rows: int, cols: int,
                  expert: int) -> QuantizedTensor:
    """One expert's ``[rows, cols]`` Linear-layout weight from ``{name}_blocks`` / ``{name}_scales``."""
    groups, rem = divmod(cols, MXFP4_BLOCK)
    if rem:
        raise TensorShapeError(f"{name}_blocks", f"an input size divisible by {MXFP4_BLOCK}", f"input size {cols}")
    _check_shape(reader, f"{name}_blocks", (num_experts, rows, groups, MXFP4_BLOCK // 2))
    _check_shape(reader, f"{name}_scales", (num_experts, rows, groups))
    blocks = reader.raw(f"{name}_blocks", index=expert)  # [rows, G, 16]
    scales = reader.raw(f"{name}_scales", index=expert)  # [rows, G]
    return QuantizedTensor.mxfp4(blocks, scales, name)  # [rows, G*32], kept as stored


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """[2I, ...] rows gate0, up0, gate1, up1, ... -> [2I, ...] all gate rows, then all up rows."""
    return torch.cat([t[0::2], t[1::2]], dim=0)  # [2I, ...]


def _deinterleave_q(t: QuantizedTensor) -> QuantizedTensor:
    """``_deinterleave`` of a weight kept as stored: its rows reordered, nothing dequantized."""
    n = t.shape[0]
    return take_rows(t, torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)]))  # [2I, D]


def read_expert(reader: ExpertReader, cfg: Config, layer: int, expert: int) -> ExpertWeights:
    """One expert of one layer, in the linear de-interleaved layout (see the module docstring)."""
    spec = cfg.expert_spec()
    e, d, i = spec.num_experts, spec.hidden, spec.intermediate
    if not 0 <= expert < e:
        raise ConfigError(f"expert id {expert} out of range [0, {e})")
    p = f"model.layers.{layer}.mlp.experts"
    gate_up: torch.Tensor | QuantizedTensor
    down: torch.Tensor | QuantizedTensor
    if reader.has(f"{p}.gate_up_proj_blocks"):
        gate_up = _deinterleave_q(_mxfp4_weight(reader, f"{p}.gate_up_proj", e, 2 * i, d, expert))  # [2I, D]
        down = _mxfp4_weight(reader, f"{p}.down_proj", e, d, i, expert)  # [D, I]
    elif reader.has(f"{p}.gate_up_proj"):
        _check_shape(reader, f"{p}.gate_up_proj", (e, d, 2 * i))
        _check_shape(reader, f"{p}.down_proj", (e, i, d))
        gate_up = _deinterleave(reader.get(f"{p}.gate_up_proj", expert).t()).contiguous()  # [D, 2I] -> [2I, D]
        down = reader.get(f"{p}.down_proj", expert).t().contiguous()  # [I, D] -> [D, I]
    else:
        raise MissingTensorError(f"{p}.gate_up_proj", f"nor MXFP4 {p}.gate_up_proj_blocks")
    _check_shape(reader, f"{p}.gate_up_proj_bias", (e, 2 * i))
    _check_shape(reader, f"{p}.down_proj_bias", (e, d))
    w = ExpertWeights(
        gate_up=gate_up,  # [2I, D], gate rows first
        down=down,  # [D, I]
        gate_up_bias=_deinterleave(reader.get(f"{p}.gate_up_proj_bias", expert)),  # [2I]
        down_bias=reader.get(f"{p}.down_proj_bias", expert),  # [D]
    )
    w.check(spec, f"{p}.{expert}")
    return w
