"""Quantized experts as ``LocalExperts`` holds and computes them: each projection packed for its device's kernel
(``qkernels``), a layer's experts stacked, and the three ways a layer of them is computed.

Responsibilities: ``QExpert`` / ``QLayerPack`` (the quantized counterparts of ``experts.ExpertWeights`` and
``experts._LayerPack``), ``build_qpack`` (stacking), and the compute paths: pair by pair (``pair_q``, for
``LocalExperts._few``), per present expert (``grouped_loop_q``, CUDA included) and, in CUDA-graph mode, per pair with
the experts' packed weights gathered on the device (``gathered_q``). Never ``_grouped_mm`` or the float gathers.
Not responsible for: which path a call takes, the weighting and sum over k, refusing a second kind of expert
(``experts.LocalExperts``).

Invariants: an expert chosen by one pair gets the same ``qlinear`` calls on the same row from ``pair_q`` as from
``grouped_loop_q`` (decode results are bitwise those of the grouped path); results equal a float backend's on
``QuantizedTensor.dequantize()`` weights within the bf16 rounding of the activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ekmesh.core.errors import TensorShapeError
from ekmesh.infer.expert import ExpertSpec, expert_activation
from ekmesh.infer.qkernels import PackedWeight, qlinear, stack_packed


def stack_present(ts: list[torch.Tensor | None], name: str) -> torch.Tensor:
    """``torch.stack`` of one tensor per expert, each present: ``add`` checks biases against a biased spec, but
    ``set_layer`` may have installed experts without them."""
    present = [t for t in ts if t is not None]
    if len(present) != len(ts):
        raise TensorShapeError(name, "a tensor for every expert", None)
    return torch.stack(present)


@dataclass
class QExpert:
    """One quantized expert as a backend holds it: both projections packed for its device's kernel."""

    gate_up: PackedWeight  # [2I, D]
    down: PackedWeight  # [D, I]
    gate_up_bias: torch.Tensor | None  # [2I]
    down_bias: torch.Tensor | None  # [D]


@dataclass
class QLayerPack:
    """A layer of quantized experts: ``experts._LayerPack``'s fields with stacked packed weights."""

    slot_of: torch.Tensor  # [E] long: slot index of each global expert id, -1 where absent
    experts: list[int]  # global expert id of each slot
    gate_up: PackedWeight  # stacked [n, ...]
    down: PackedWeight  # stacked [n, ...]
    gate_up_bias: torch.Tensor | None  # [n, 2I]
    down_bias: torch.Tensor | None  # [n, D]

    def __post_init__(self) -> None:
        self.index = {e: s for s, e in enumerate(self.experts)}
        gb, db = self.gate_up_bias, self.down_bias
        self.rows = [QExpert(self.gate_up.select(s), self.down.select(s), None if gb is None else gb[s],
                              None if db is None else db[s]) for s in range(len(self.experts))]

    def nbytes(self) -> int:
        extra = [t for t in (self.gate_up_bias, self.down_bias) if t is not None]
        return self.gate_up.nbytes() + self.down.nbytes() + sum(t.numel() * t.element_size() for t in extra)


def build_qpack(spec: ExpertSpec, layer: int, slot_of: torch.Tensor, ids: list[int], qs: list[QExpert]) -> QLayerPack:
    assert len(qs) == len(ids)
    gub = db = None
    if spec.bias:
        gub = stack_present([q.gate_up_bias for q in qs], f"layer {layer} gate_up_bias")  # [n, 2I]
        db = stack_present([q.down_bias for q in qs], f"layer {layer} down_bias")  # [n, D]
    return QLayerPack(slot_of, ids, stack_packed([q.gate_up for q in qs]), stack_packed([q.down for q in qs]),
                       gub, db)


def pair_q(spec: ExpertSpec, q: QExpert, x: torch.Tensor) -> torch.Tensor:
    """One quantized expert on one row x [1, D] -> [1, D] (``LocalExperts._few``'s step for a quantized pack): the
    same ``qlinear`` calls on the same row as ``grouped_loop_q`` makes for an expert chosen once."""
    a = expert_activation(spec, qlinear(x, q.gate_up, q.gate_up_bias))  # [1, I]
    return qlinear(a, q.down, q.down_bias)  # [1, D]

def grouped_loop_q(spec: ExpertSpec, pack: QLayerPack, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``LocalExperts._grouped_loop`` for quantized experts: each present expert's kernels over its rows of
    x [T*k, D]."""
    y = torch.empty_like(x)
    start = 0
    for slot, c in enumerate(counts.tolist()):
        if c == 0:
            continue
        end = start + c
        q = pack.rows[slot]
        a = expert_activation(spec, qlinear(x[start:end], q.gate_up, q.gate_up_bias))  # [c, I]
        y[start:end] = qlinear(a, q.down, q.down_bias)  # [c, D]
        start = end
    return y

def gathered_q(spec: ExpertSpec, pack: QLayerPack, x: torch.Tensor, slot_sorted: torch.Tensor) -> torch.Tensor:
    """CUDA-graph mode for quantized experts: each pair's packed weights are gathered on the device (one
    ``index_select`` per tensor: no host sync, capturable), then ``qlinear`` runs pair by pair, a loop whose
    length is fixed in a captured step (decode: k); biases and the activation run once over all pairs."""
    n = x.shape[0]
    gate_up, down = pack.gate_up.gather(slot_sorted), pack.down.gather(slot_sorted)  # [N, ...] stacks
    h = torch.cat([qlinear(x[j:j + 1], gate_up.select(j)) for j in range(n)])  # [N, 2I]
    if pack.gate_up_bias is not None:
        h = h + pack.gate_up_bias[slot_sorted]
    a = expert_activation(spec, h)  # [N, I]
    y = torch.cat([qlinear(a[j:j + 1], down.select(j)) for j in range(n)])  # [N, D]
    if pack.down_bias is not None:
        y = y + pack.down_bias[slot_sorted]
    return y
