"""One routed expert: its shape (``ExpertSpec``), its weights (``ExpertWeights``, float or quantized), its
activation and forward pass (the reference every backend path agrees with), and the quantization and storage of one
expert's weights.

Weights are in linear layout (``y = x @ W.T``): ``gate_up [2I, D]`` (gate rows first, then up rows), ``down [D, I]``,
optional biases ``gate_up_bias [2I]`` and ``down_bias [D]``. ``gate_up`` / ``down`` may be ``qtensor.QuantizedTensor``s
(biases stay float).

Serialisation of one quantized expert (``expert_tensors`` / ``expert_from_tensors``): ``{p}.gate_up.qweight``,
``{p}.gate_up.scale`` (and ``.zero`` for q4), the same under ``{p}.down``, and, for a biased spec,
``{p}.gate_up_bias`` float32 [2I] and ``{p}.down_bias`` float32 [D].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ekmesh.core.errors import ConfigError, MissingTensorError, TensorShapeError
from ekmesh.infer.fusion import fusable
from ekmesh.infer.qkernels import kernel_dtype, pack, qlinear
from ekmesh.infer.qnative import NATIVE_FORMATS
from ekmesh.infer.qtensor import QuantizedTensor, quantize, stored_group_size


@dataclass(frozen=True)
class ExpertSpec:
    """Shape and activation of one routed expert of a model (the same for every MoE layer)."""

    hidden: int
    intermediate: int
    num_experts: int
    activation: str = "silu"  # "silu": down(silu(gate) * up); "gptoss": clamped SwiGLU with alpha and limit
    bias: bool = False
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        if self.activation not in ("silu", "gptoss"):
            raise ConfigError(f"unsupported expert activation {self.activation!r} (supported: silu, gptoss)")


@dataclass
class ExpertWeights:
    """The tensors of one routed expert in linear layout (see module docstring); the two projections may be
    quantized (both or neither)."""

    gate_up: torch.Tensor | QuantizedTensor  # [2I, D]
    down: torch.Tensor | QuantizedTensor  # [D, I]
    gate_up_bias: torch.Tensor | None = None  # [2I]
    down_bias: torch.Tensor | None = None  # [D]

    def quantization(self) -> str | None:
        """The format of a quantized expert, None for a float one; ``ConfigError`` where the two projections are
        not both float or both of one format."""
        gu, d = self.gate_up, self.down
        if not isinstance(gu, QuantizedTensor) and not isinstance(d, QuantizedTensor):
            return None
        if not isinstance(gu, QuantizedTensor) or not isinstance(d, QuantizedTensor) or gu.fmt != d.fmt:
            raise ConfigError("an expert's gate_up and down must be both float or both of one quantized format")
        return gu.fmt

    def check(self, spec: ExpertSpec, name: str) -> None:
        expect: dict[str, tuple[int, ...]] = {
            "gate_up": (2 * spec.intermediate, spec.hidden),
            "down": (spec.hidden, spec.intermediate),
        }
        if spec.bias:
            expect["gate_up_bias"] = (2 * spec.intermediate,)
            expect["down_bias"] = (spec.hidden,)
        for field, shape in expect.items():
            t = getattr(self, field)
            if t is None:
                raise TensorShapeError(f"{name}.{field}", shape, None)
            if tuple(t.shape) != shape:
                raise TensorShapeError(f"{name}.{field}", shape, tuple(t.shape))


def expert_activation(spec: ExpertSpec, gate_up: torch.Tensor) -> torch.Tensor:
    """[N, 2I] gate/up projections -> [N, I] activations, per the spec's activation."""
    if spec.activation == "silu":
        return _silu_glu(gate_up)
    return _clamped_glu(gate_up, spec.alpha, spec.limit)


@fusable
def _silu_glu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)  # [N, I] each
    return F.silu(gate) * up


@fusable
def _clamped_glu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)  # [N, I] each
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    glu = gate * torch.sigmoid(gate * alpha)
    return (up + 1) * glu


def _linear(x: torch.Tensor, w: torch.Tensor | QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(w, QuantizedTensor):  # packed per call: a reference helper, not a hot path
        return qlinear(x, pack(w, x.device, kernel_dtype(x.device, x.dtype)), bias)
    return F.linear(x, w, bias)


def expert_forward(spec: ExpertSpec, x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """One expert over [N, D] tokens -> [N, D]. The reference the grouped paths must agree with (quantized
    weights: the kernel ``LocalExperts`` would use on x's device)."""
    h = _linear(x, w.gate_up, w.gate_up_bias)  # [N, 2I]
    return _linear(expert_activation(spec, h), w.down, w.down_bias)  # [N, D]


def quantize_expert(w: ExpertWeights, fmt: str, group_size: int | None = None) -> ExpertWeights:
    """``w`` with both projections quantized to ``fmt`` (biases kept as they are); an expert in a checkpoint's
    FP8 / MXFP4 is dequantized (exactly) first. q4: ``group_size`` for both
    projections, or None for each its own default (the first of 128, 64, 32 dividing its input size). q8 has one
    scale per output row and takes no group size (None)."""
    if w.quantization() in NATIVE_FORMATS:  # a checkpoint's FP8 / MXFP4: quantized from its exact float values
        assert isinstance(w.gate_up, QuantizedTensor) and isinstance(w.down, QuantizedTensor)
        w = ExpertWeights(w.gate_up.dequantize(), w.down.dequantize(), w.gate_up_bias, w.down_bias)
    if isinstance(w.gate_up, QuantizedTensor) or isinstance(w.down, QuantizedTensor):
        raise ConfigError("quantize_expert: the expert is already quantized")
    if fmt == "q8" and group_size is not None:
        raise ConfigError(f"q8 has one scale per output row: no group size ({group_size} given)")
    return ExpertWeights(quantize(w.gate_up, fmt, group_size, "gate_up"), quantize(w.down, fmt, group_size, "down"),
                         w.gate_up_bias, w.down_bias)


def expert_tensors(w: ExpertWeights, prefix: str) -> dict[str, torch.Tensor]:
    """The canonical stored tensors of one quantized expert (names in the module docstring); biases float32."""
    if not isinstance(w.gate_up, QuantizedTensor) or not isinstance(w.down, QuantizedTensor):
        raise ConfigError(f"{prefix}: expert_tensors stores quantized experts; quantize_expert it first")
    w.quantization()  # both of one format
    out = w.gate_up.to_tensors(f"{prefix}.gate_up") | w.down.to_tensors(f"{prefix}.down")
    for field in ("gate_up_bias", "down_bias"):
        b = getattr(w, field)
        if b is not None:
            out[f"{prefix}.{field}"] = b.detach().to(torch.float32).contiguous()
    return out


def expert_from_tensors(tensors: Mapping[str, torch.Tensor], prefix: str, spec: ExpertSpec, fmt: str,
                        group_size: int | None = None) -> ExpertWeights:
    """One quantized expert read back from ``expert_tensors``' names, every tensor validated (dtype and shape from
    ``spec``) before use; errors name the tensor. ``group_size``: q4's, for both projections, or None to read each
    projection's from its scale's shape (``stored_group_size``); q8 ignores it (one scale per row: each
    projection's group size is its own I)."""
    d, i = spec.hidden, spec.intermediate
    weights = []
    for proj, shape in (("gate_up", (2 * i, d)), ("down", (d, i))):
        name = f"{prefix}.{proj}"
        g = shape[1] if fmt == "q8" else group_size
        if g is None:
            g = stored_group_size(fmt, shape, tensors, name)
        weights.append(QuantizedTensor.from_tensors(fmt, shape, g, tensors, name))
    gu, dn = weights
    biases: dict[str, torch.Tensor | None] = {"gate_up_bias": None, "down_bias": None}
    if spec.bias:
        for field, bshape in (("gate_up_bias", (2 * i,)), ("down_bias", (d,))):
            name = f"{prefix}.{field}"
            b = tensors.get(name)
            if b is None:
                raise MissingTensorError(name)
            if b.dtype != torch.float32:
                raise TensorShapeError(name, "dtype torch.float32", f"dtype {b.dtype}")
            if tuple(b.shape) != bshape:
                raise TensorShapeError(name, bshape, tuple(b.shape))
            biases[field] = b
    return ExpertWeights(gu, dn, biases["gate_up_bias"], biases["down_bias"])
