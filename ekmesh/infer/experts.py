"""The experts seam: where the model hands routed tokens to whoever holds the experts.

A MoE layer computes its router and top-k itself, then calls an ``ExpertsBackend`` with
``(layer, hidden [T, D], expert_ids [T, k], weights [T, k])`` and gets back ``[T, D]``: for every token the sum
over its k chosen experts of ``weight * expert(hidden)``. The model never sees expert weights; the backend may
compute locally (``LocalExperts``, this module), on remote peers, or both. ``layer`` is the global decoder layer
index; ``expert_ids`` are global expert indices of that layer.

Invariants of ``LocalExperts``:
- expert weights (``expert.ExpertWeights``) are in linear layout: ``gate_up [2I, D]`` (gate rows first, then up
  rows), ``down [D, I]``, optional biases ``gate_up_bias [2I]`` and ``down_bias [D]``;
- compute is grouped: tokens are sorted by expert and each present expert runs once over all its tokens
  (one ``torch._grouped_mm`` for all experts of a layer on CUDA, a loop over present experts elsewhere); inside a
  fused CUDA decode step (``fusion.kernels()``) a few pairs of float, q8 or FP8 experts go instead through the two
  kernels of ``decode_experts`` (no sort or scatter);
- asking for an expert that is not loaded raises ``ExpertNotLoadedError`` naming (layer, expert).

Quantized experts (``qtensor.py``): ``gate_up`` / ``down`` of an ``ExpertWeights`` may be ``QuantizedTensor``s
(biases stay float). ``LocalExperts.add`` keeps them quantized on its device, in a kernel's layout
(``qkernels.pack``; no float copy), and computes them with ``qkernels.qlinear`` (bf16 activations on CPU and
CUDA, results in the backend's dtype). One backend holds one kind of expert: float, or one quantized format and
group sizes (fixed by the first expert added); anything else is refused with ``ConfigError``. A quantized layer
runs pair by pair (``_few``), per present expert (``qexperts.grouped_loop_q``, CUDA included) or, in CUDA-graph
mode, per pair with the experts' packed weights gathered on the device (``qexperts.gathered_q``); never through
``_grouped_mm`` or the float gathers. Its results equal those of a float backend holding
``QuantizedTensor.dequantize()`` weights within the bf16 rounding of the activations (tests: 3e-2 of the output's
largest magnitude).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ekmesh.core.errors import ConfigError, ExpertNotLoadedError, TensorShapeError
from ekmesh.infer import decode_experts, fusion
from ekmesh.infer.expert import ExpertSpec, ExpertWeights, expert_activation
from ekmesh.infer.qexperts import QExpert, QLayerPack, build_qpack, gathered_q, grouped_loop_q, pair_q, stack_present
from ekmesh.infer.qkernels import kernel_dtype, pack
from ekmesh.infer.qtensor import QuantizedTensor

SMALL_PAIRS = 8  # up to this many (token, expert) pairs, the CPU path computes pair by pair (``_few``)


class ExpertsBackend(Protocol):
    """Computes routed experts for one MoE layer. See the module docstring for the contract."""

    def __call__(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor: ...



@dataclass
class _LayerPack:
    slot_of: torch.Tensor  # [E] long: slot index of each global expert id, -1 where absent
    experts: list[int]  # global expert id of each slot
    gate_up: torch.Tensor  # [n, 2I, D]
    down: torch.Tensor  # [n, D, I]
    gate_up_bias: torch.Tensor | None  # [n, 2I]
    down_bias: torch.Tensor | None  # [n, D]

    def __post_init__(self) -> None:
        self.index = {e: s for s, e in enumerate(self.experts)}  # global expert id -> slot, without a torch call
        # per slot: views of its weights (gate_up [2I, D], down [D, I], biases or None), made once here so that
        # a decode step does not index the stacks (a torch call each) on every pair
        gb, db = self.gate_up_bias, self.down_bias
        self.rows = [(self.gate_up[s], self.down[s], None if gb is None else gb[s], None if db is None else db[s])
                     for s in range(len(self.experts))]


_Pack = _LayerPack | QLayerPack
_Held = ExpertWeights | QExpert  # what ``_pending`` holds per expert: float tensors or packed ones


def _tensor_bytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _kind_text(kind: str | tuple[str, int, int]) -> str:
    if isinstance(kind, str):
        return kind
    fmt, g_gate_up, g_down = kind
    return fmt if fmt == "q8" else f"{fmt} (group sizes {g_gate_up}/{g_down})"


class LocalExperts:
    """Holds any set of (layer, expert) weights on one device and computes them grouped."""

    def __init__(self, spec: ExpertSpec, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype
        self._pending: dict[int, dict[int, _Held]] = {}
        self._packs: dict[int, _Pack] = {}
        # what this backend holds: "float" or (fmt, gate_up group size, down group size), set by the first expert
        self._kind: str | tuple[str, int, int] | None = None
        # Set by a CUDA-graph caller (which has verified ``holds_all``) while it warms up and captures a step:
        # no host syncs (no missing-expert check, no per-expert loop) and the same code path in both phases.
        self.graph_mode = False
        # Guards the two dicts: a node loads and drops experts while its expert server and attention host compute.
        # A computation uses the pack it took under the lock; packs are never mutated, only replaced.
        self._lock = threading.RLock()

    def add(self, layer: int, expert: int, weights: ExpertWeights) -> None:
        """Adds (or replaces) one expert. Tensors are validated, cast and moved to this backend's device; quantized
        projections are packed for its kernels (see the module docstring)."""
        if not 0 <= expert < self.spec.num_experts:
            raise ConfigError(f"expert id {expert} out of range [0, {self.spec.num_experts})")
        name = f"layer {layer} expert {expert}"
        weights.check(self.spec, name)
        q = weights.quantization()
        gu, d = weights.gate_up, weights.down

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(self.device, self.dtype)

        moved: _Held
        if isinstance(gu, QuantizedTensor) and isinstance(d, QuantizedTensor):
            kind: str | tuple[str, int, int] = (gu.fmt, gu.group_size, d.group_size)
            act = kernel_dtype(self.device, self.dtype)
            moved = QExpert(pack(gu, self.device, act), pack(d, self.device, act), move(weights.gate_up_bias),
                             move(weights.down_bias))
        else:
            assert q is None and isinstance(gu, torch.Tensor) and isinstance(d, torch.Tensor)
            kind = "float"
            moved = ExpertWeights(gu.to(self.device, self.dtype), d.to(self.device, self.dtype),
                                  move(weights.gate_up_bias), move(weights.down_bias))
        with self._lock:
            self._claim_kind(kind, name)
            current = self._unpack(layer)
            current[expert] = moved
            self._pending[layer] = current
            self._packs.pop(layer, None)

    def set_layer(self, layer: int, experts: list[int], gate_up: torch.Tensor, down: torch.Tensor,
                  gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None) -> None:
        """Installs stacked weights of several experts of one layer at once (no per-expert copies when the
        tensors already have this backend's device and dtype): gate_up [n, 2I, D], down [n, D, I]."""
        n, spec = len(experts), self.spec
        if tuple(gate_up.shape) != (n, 2 * spec.intermediate, spec.hidden):
            raise TensorShapeError(f"layer {layer} gate_up", (n, 2 * spec.intermediate, spec.hidden),
                                   tuple(gate_up.shape))
        if tuple(down.shape) != (n, spec.hidden, spec.intermediate):
            raise TensorShapeError(f"layer {layer} down", (n, spec.hidden, spec.intermediate), tuple(down.shape))
        if len(set(experts)) != n or not all(0 <= e < spec.num_experts for e in experts):
            raise ConfigError(f"layer {layer}: expert ids must be distinct and in [0, {spec.num_experts})")
        order = sorted(range(n), key=lambda i: experts[i])
        if order != list(range(n)):
            idx = torch.tensor(order, device=gate_up.device)
            gate_up, down = gate_up[idx], down[idx]
            gate_up_bias = None if gate_up_bias is None else gate_up_bias[idx]
            down_bias = None if down_bias is None else down_bias[idx]
        ids = sorted(experts)
        slot_of = torch.full((spec.num_experts,), -1, dtype=torch.long, device=self.device)
        slot_of[torch.tensor(ids, device=self.device)] = torch.arange(n, device=self.device)

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(self.device, self.dtype)

        pack = _LayerPack(slot_of, ids, gate_up.to(self.device, self.dtype), down.to(self.device, self.dtype),
                          cast(gate_up_bias), cast(down_bias))
        with self._lock:
            self._claim_kind("float", f"layer {layer}")
            self._pending.pop(layer, None)
            self._packs[layer] = pack

    def _claim_kind(self, kind: str | tuple[str, int, int], name: str) -> None:
        """(Under the lock.) Fixes what this backend holds on its first expert; refuses a different kind after."""
        if self._kind is None:
            self._kind = kind
        elif kind != self._kind:
            raise ConfigError(f"{name}: this backend holds {_kind_text(self._kind)} experts and cannot also hold "
                              f"{_kind_text(kind)} ones (one kind of expert per backend)")

    def remove(self, layer: int, expert: int) -> None:
        with self._lock:
            current = self._unpack(layer)
            current.pop(expert, None)
            self._pending[layer] = current
            self._packs.pop(layer, None)

    def has(self, layer: int, expert: int) -> bool:
        pack = self._packs.get(layer)  # a built pack is replaced whole, never changed: no lock (the hot path)
        if pack is not None:
            return expert in pack.index
        with self._lock:
            pack = self._packs.get(layer)
            if pack is not None:
                return expert in pack.index
            return expert in self._pending.get(layer, {})

    def held(self) -> dict[int, list[int]]:
        """{layer: sorted expert ids} of everything this backend holds."""
        out: dict[int, list[int]] = {}
        with self._lock:
            for layer in sorted(set(self._pending) | set(self._packs)):
                ids = sorted(self._packs[layer].experts) if layer in self._packs else sorted(self._pending[layer])
                if ids:
                    out[layer] = ids
        return out

    def holds_all(self, layers: list[int]) -> bool:
        """True when every expert of every given layer is loaded."""
        held = self.held()
        return all(len(held.get(layer, [])) == self.spec.num_experts for layer in layers)

    def nbytes(self) -> int:
        """Bytes of the weights held, as held (quantized experts: their packed bytes and biases). Counted without
        building a layer's pack (``ekmesh status`` asks while experts are still being added)."""
        total = 0
        with self._lock:
            packs = list(self._packs.values())
            pending = [w for layer in self._pending.values() for w in layer.values()]
        for built in packs:
            if isinstance(built, QLayerPack):
                total += built.nbytes()
            else:
                total += _tensor_bytes(built.gate_up, built.down, built.gate_up_bias, built.down_bias)
        for w in pending:
            if isinstance(w, QExpert):
                total += w.gate_up.nbytes() + w.down.nbytes() + _tensor_bytes(w.gate_up_bias, w.down_bias)
            else:
                assert isinstance(w.gate_up, torch.Tensor) and isinstance(w.down, torch.Tensor)
                total += _tensor_bytes(w.gate_up, w.down, w.gate_up_bias, w.down_bias)
        return total

    def _unpack(self, layer: int) -> dict[int, _Held]:
        if layer in self._pending:
            return dict(self._pending[layer])
        pack = self._packs.get(layer)
        if pack is None:
            return {}
        if isinstance(pack, QLayerPack):
            return {e: pack.rows[s] for s, e in enumerate(pack.experts)}  # views into the stacks
        return {
            e: ExpertWeights(
                pack.gate_up[s], pack.down[s],
                None if pack.gate_up_bias is None else pack.gate_up_bias[s],
                None if pack.down_bias is None else pack.down_bias[s],
            )
            for s, e in enumerate(pack.experts)
        }

    def _pack(self, layer: int) -> _Pack:
        pack = self._packs.get(layer)
        if pack is not None:
            return pack
        with self._lock:
            return self._build_pack(layer)

    def _build_pack(self, layer: int) -> _Pack:
        pack = self._packs.get(layer)
        if pack is not None:
            return pack
        experts = self._pending.pop(layer, {})
        ids = sorted(experts)
        slot_of = torch.full((self.spec.num_experts,), -1, dtype=torch.long, device=self.device)
        if ids:
            slot_of[torch.tensor(ids, device=self.device)] = torch.arange(len(ids), device=self.device)
        qs = [experts[e] for e in ids]
        if qs and isinstance(qs[0], QExpert):
            qpack = build_qpack(self.spec, layer, slot_of, ids, [q for q in qs if isinstance(q, QExpert)])
            self._packs[layer] = qpack
            return qpack
        ws = [w for w in qs if isinstance(w, ExpertWeights)]
        gus = [w.gate_up for w in ws if isinstance(w.gate_up, torch.Tensor)]
        downs = [w.down for w in ws if isinstance(w.down, torch.Tensor)]
        assert len(gus) == len(downs) == len(qs)  # one kind per backend (_claim_kind)
        empty = (0,)
        gate_up = torch.stack(gus) if ws else torch.empty(
            empty + (2 * self.spec.intermediate, self.spec.hidden), device=self.device, dtype=self.dtype)
        down = torch.stack(downs) if ws else torch.empty(
            empty + (self.spec.hidden, self.spec.intermediate), device=self.device, dtype=self.dtype)
        gub = db = None
        if ws and self.spec.bias:
            gub = stack_present([w.gate_up_bias for w in ws], f"layer {layer} gate_up_bias")  # [n, 2I]
            db = stack_present([w.down_bias for w in ws], f"layer {layer} down_bias")  # [n, D]
        pack = _LayerPack(slot_of, ids, gate_up, down, gub, db)
        self._packs[layer] = pack
        return pack

    def __call__(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        pack = self._pack(layer)
        t, k = expert_ids.shape
        if self.pair_by_pair(t * k, hidden):
            return self._few(layer, pack, hidden, expert_ids.tolist(), weights)
        flat = expert_ids.reshape(-1)  # [T*k]
        slots = None  # [T*k] each pair's slot, looked up once; not in a captured step whose kernels do it
        if not self.graph_mode:
            slots = pack.slot_of[flat]
            missing = slots < 0
            if bool(missing.any()):
                raise ExpertNotLoadedError(layer, int(flat[missing][0]))
        if fusion.kernels() and decode_experts.supports(hidden, pack.gate_up, pack.down, t * k):
            sp = self.spec  # a decode step in the fused (captured) path: two kernels, no sort or scatter
            return fusion.checked(  # the kernels look each pair's slot up themselves
                lambda: decode_experts.moe(hidden, expert_ids, weights, pack.gate_up, pack.down,
                                           pack.gate_up_bias, pack.down_bias, sp.activation, sp.alpha, sp.limit,
                                           table=pack.slot_of),
                lambda: self._grouped(pack, hidden, pack.slot_of[flat], weights, k),
                (sp, hidden.dtype, pack.gate_up.dtype if isinstance(pack, _LayerPack) else pack.gate_up.kernel, t, k))
        return self._grouped(pack, hidden, pack.slot_of[flat] if slots is None else slots, weights, k)

    def _grouped(self, pack: _Pack, hidden: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
                 k: int) -> torch.Tensor:
        """The grouped path over ``slots`` [T*k] (each pair's slot in ``pack``) -> [T, D]."""
        t = hidden.shape[0]
        order = torch.argsort(slots, stable=True)  # [T*k], pairs grouped by slot
        token_of = order // k  # [T*k] token index of each sorted pair
        x = hidden[token_of]  # [T*k, D]
        n = len(pack.experts)
        counts = torch.zeros(n, dtype=torch.long, device=slots.device)
        counts.scatter_add_(0, slots, torch.ones_like(slots))  # [n] pairs per slot, no host sync
        if isinstance(pack, QLayerPack):  # never _grouped_mm or the float gathers: packed weights
            if self.graph_mode:
                y = gathered_q(self.spec, pack, x, slots[order])
            else:
                y = grouped_loop_q(self.spec, pack, x, counts)
        elif (hidden.is_cuda and hidden.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
              and self.spec.hidden % 8 == 0 and self.spec.intermediate % 8 == 0):  # its rows: 16-byte multiples
            y = self._grouped_cuda(pack, x, counts)
        elif self.graph_mode:
            y = self._gathered(pack, x, slots[order])  # no host sync: capturable in a CUDA graph
        else:
            y = self._grouped_loop(pack, x, counts)
        # weighting and the sum over the k choices in fp32, in a fixed order (index_add_ would be
        # non-deterministic on CUDA and is very slow on CPU)
        y = y.float() * weights.reshape(-1)[order, None].float()  # [T*k, D] in slot order
        unsorted = torch.empty_like(y)
        unsorted[order] = y  # [T*k, D] back in (token, choice) order
        return unsorted.view(t, k, -1).sum(dim=1).to(hidden.dtype)  # [T, D]

    def pair_by_pair(self, n_pairs: int, hidden: torch.Tensor) -> bool:
        """Whether a call with ``n_pairs`` (token, expert) pairs over ``hidden`` computes them one by one
        (``_few``: a few pairs on the CPU, outside CUDA-graph mode); then ``few`` gives the same result."""
        return n_pairs <= SMALL_PAIRS and not self.graph_mode and not hidden.is_cuda

    def few(self, layer: int, hidden: torch.Tensor, expert_rows: list[list[int]],
            weights: torch.Tensor) -> torch.Tensor:
        """What ``__call__`` returns where ``pair_by_pair`` holds, with the expert ids of each token as Python
        lists (an expert server has them so: no tensor round trip)."""
        return self._few(layer, self._pack(layer), hidden, expert_rows, weights)

    def _few(self, layer: int, pack: _Pack, hidden: torch.Tensor, expert_rows: list[list[int]],
             weights: torch.Tensor) -> torch.Tensor:
        """A decode step on CPU (a few pairs): each pair's expert on its token row, without the sort, gathers and
        scatters of the grouped path (half the time at the built-in model's shape). An expert chosen by one pair
        gets the same ``F.linear`` calls on the same row as in ``_grouped_loop``, so decode results are bitwise
        those of the grouped path; the weighting and the sum over k are the same ops. Casts that would not
        change the dtype are skipped (each is a torch call, and they return their input unchanged)."""
        t, k = len(expert_rows), len(expert_rows[0])
        spec = self.spec
        if isinstance(pack, QLayerPack):
            qrows = pack.rows

            def pair(x: torch.Tensor, s: int) -> torch.Tensor:
                return pair_q(spec, qrows[s], x)
        else:
            rows = pack.rows

            def pair(x: torch.Tensor, s: int) -> torch.Tensor:
                gate_up, down, gate_up_bias, down_bias = rows[s]
                a = expert_activation(spec, F.linear(x, gate_up, gate_up_bias))  # [1, I]
                return F.linear(a, down, down_bias)  # [1, D]
        ys = []
        index = pack.index
        for i, row in enumerate(expert_rows):
            x = hidden if t == 1 else hidden[i:i + 1]  # [1, D]
            for e in row:
                s = index.get(e)
                if s is None:
                    raise ExpertNotLoadedError(layer, e)
                ys.append(pair(x, s))
        y = torch.cat(ys)  # [T*k, D] in (token, choice) order
        w = weights.reshape(-1, 1)  # [T*k, 1]
        y = (y if y.dtype is torch.float32 else y.float()) * (w if w.dtype is torch.float32 else w.float())
        out = y.view(t, k, -1).sum(dim=1)  # [T, D] fp32
        return out if out.dtype is hidden.dtype else out.to(hidden.dtype)

    def _gathered(self, pack: _LayerPack, x: torch.Tensor, slot_sorted: torch.Tensor) -> torch.Tensor:
        """Per pair, gathers its expert's weights and runs a batched matmul (few pairs: decode steps)."""
        h = torch.bmm(pack.gate_up[slot_sorted], x[:, :, None])[..., 0]  # [N, 2I]
        if pack.gate_up_bias is not None:
            h = h + pack.gate_up_bias[slot_sorted]
        a = expert_activation(self.spec, h)  # [N, I]
        y = torch.bmm(pack.down[slot_sorted], a[:, :, None])[..., 0]  # [N, D]
        if pack.down_bias is not None:
            y = y + pack.down_bias[slot_sorted]
        return y

    def _grouped_loop(self, pack: _LayerPack, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        y = torch.empty_like(x)
        start = 0
        for slot, c in enumerate(counts.tolist()):
            if c == 0:
                continue
            end = start + c
            h = F.linear(x[start:end], pack.gate_up[slot],
                         None if pack.gate_up_bias is None else pack.gate_up_bias[slot])  # [c, 2I]
            a = expert_activation(self.spec, h)  # [c, I]
            y[start:end] = F.linear(a, pack.down[slot], None if pack.down_bias is None else pack.down_bias[slot])
            start = end
        return y

    def _grouped_cuda(self, pack: _LayerPack, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts, 0, dtype=torch.int32)  # [n] end offset of each group
        h = torch._grouped_mm(x, pack.gate_up.transpose(-2, -1), offs=offs)  # [T*k, 2I]
        slot_sorted = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts,
                                              output_size=x.shape[0])  # [T*k]
        if pack.gate_up_bias is not None:
            h = h + pack.gate_up_bias[slot_sorted]
        a = expert_activation(self.spec, h)  # [T*k, I]
        y = torch._grouped_mm(a, pack.down.transpose(-2, -1), offs=offs)  # [T*k, D]
        if pack.down_bias is not None:
            y = y + pack.down_bias[slot_sorted]
        return y
