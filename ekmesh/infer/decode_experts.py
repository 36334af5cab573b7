"""The routed experts of a decode step on CUDA in two Triton kernels, and its softmax router in one.

At batch 1 a MoE layer's k (token, expert) pairs through the grouped path (sort the pairs by expert, gather the
tokens, two grouped matmuls, the activation, scatter back, the weighted sum over k) are ~20 kernel launches, most of
them tiny. Here the first kernel reads each pair's gate and up rows straight from the layer's stacked weights (the
pair's slot looked up on the device) and applies the activation; the second reads the down rows of a token's k
experts and sums them weighted by the router. A layer's experts are two launches that stream the chosen experts'
bytes once, with no host sync: capturable in a CUDA graph (``cuda_graph.GraphDecoder`` uses them in its captured
step). ``route`` replaces the router's softmax, top-k (a sort), renormalisation and cast (four kernels) with one.

Responsible for: float experts (bf16 / fp16 weights), q8 experts (int8 codes, a scale per row: ``qkernels``'
``cuda_int8`` layout) and FP8 block-scaled experts (DeepSeek's, kept as stored), of both activations (SwiGLU;
gpt-oss's clamped one), with or without biases, for a few pairs (``MAX_PAIRS``: a decode step, a few drafted
tokens). Not for: prefill-sized batches (the grouped path is faster there), q4 and MXFP4 (their layouts go through
``qkernels``), the CPU.

Invariant: computes what ``LocalExperts``' grouped path computes within the weights' rounding: products and sums
in fp32, each projection's output rounded to the activations' dtype (as a matmul's output is) before the activation
and before the weighted sum; the sum over k in fp32, in choice order. A pair whose slot is negative (an expert not
held) contributes zeros, never reads out of bounds. Triton is imported on first use only (CPU installs lack it).
Each kind of call is checked once against the grouped path before it is trusted (``fusion.checked``).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F

from ekmesh.infer import fusion
from ekmesh.infer.qkernels import PackedWeight

MAX_PAIRS = 64  # up to this many (token, expert) pairs per call; beyond, the grouped path is faster


def _kind(w: torch.Tensor | PackedWeight) -> int | None:
    """The kernels' weight kind of a stacked weight (``triton_kernels``' ``w_kind``), None where they cannot take it."""
    if isinstance(w, torch.Tensor):
        return 0 if w.dtype in (torch.bfloat16, torch.float16) and w.stride(-1) == 1 else None
    if not w.stacked:
        return None
    if w.kernel == "cuda_int8":
        return 1
    if w.fmt == "fp8" and w.group_size >= 16 and w.group_size & (w.group_size - 1) == 0 and w.scale.dim() == 3:
        return 2
    return None


def supports(hidden: torch.Tensor, gate_up: torch.Tensor | PackedWeight, down: torch.Tensor | PackedWeight,
             n_pairs: int) -> bool:
    """Whether a call over ``hidden`` with a layer's stacked weights and ``n_pairs`` pairs can run here."""
    if isinstance(gate_up, PackedWeight) and isinstance(down, PackedWeight):
        tensors, same_dtype = (gate_up.weight, down.weight), True
    elif isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor):
        tensors, same_dtype = (gate_up, down), gate_up.dtype == down.dtype == hidden.dtype
    else:
        return False
    kinds = {_kind(gate_up), _kind(down)}
    return (hidden.is_cuda and all(t.is_cuda for t in tensors) and same_dtype
            and hidden.dtype in (torch.bfloat16, torch.float16) and len(kinds) == 1 and None not in kinds
            and 0 < n_pairs <= MAX_PAIRS and fusion.triton_available())


def _build() -> Any:
    return importlib.import_module("ekmesh.infer.triton_kernels")  # imports triton


# block shapes (rows, reduction) per kernel and warps: the fastest of benchmarks/moe_kernels.py's sweep on an H100
# at Qwen3-30B-A3B's expert shapes (2026-12-06: 37.1 µs a layer, 2.0 TB/s; the first guess, (16, 256) for both at
# 4 warps, 54.4 µs)
GATE_UP_BLOCKS = (8, 256)
DOWN_BLOCKS = (4, 1024)
NUM_WARPS = 8


def _operands(w: torch.Tensor | PackedWeight, block: int) -> tuple[torch.Tensor, torch.Tensor, int, int, int,
                                                                        int, int]:
    """(weight [n, O, I'], scale (or the weight, unused), w_kind, scale stride per expert, column groups,
    block rows, group) of a stacked weight; ``block``, the kernel's column tile, must divide an FP8 group."""
    kind = _kind(w)
    if isinstance(w, torch.Tensor):
        return w, w, 0, 0, 1, 1, 1
    assert kind is not None
    scale = w.scale.contiguous()
    if kind == 1:
        return w.weight, scale, 1, scale.stride(0), 1, 1, 1
    if w.group_size % block:
        raise ValueError(f"a column tile of {block} straddles FP8 groups of {w.group_size}")
    return w.weight, scale, 2, scale.stride(0), scale.shape[2], w.block_rows, w.group_size


def moe(hidden: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor | PackedWeight,
        down: torch.Tensor | PackedWeight, gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None,
        activation: str = "silu", alpha: float = 1.702, limit: float = 7.0,
        gate_up_blocks: tuple[int, int] | None = None, down_blocks: tuple[int, int] | None = None,
        num_warps: int = NUM_WARPS, table: torch.Tensor | None = None) -> torch.Tensor:
    """hidden [T, D]; slots [T, k] (index into the stacked weights, -1 for none; or, with ``table`` [E], expert
    ids whose slots are ``table[id]``, looked up in the kernels); weights [T, k] (router);
    gate_up [n, 2I, D], down [n, D, I]: float tensors (rows contiguous) or stacked ``PackedWeight``s (q8's
    ``cuda_int8``, FP8); biases [n, 2I] / [n, D] or None -> [T, D] in hidden's dtype: per token the weighted sum
    over its k pairs of down(act(gate_up(hidden)))."""
    kern = _build()
    t, k = slots.shape
    n_pairs = t * k
    d = hidden.shape[1]
    inter = (down.shape[1] if isinstance(down, PackedWeight) else down.shape[2])
    bi, bd = gate_up_blocks or GATE_UP_BLOCKS
    rd, ri = down_blocks or DOWN_BLOCKS
    if isinstance(gate_up, PackedWeight) and gate_up.fmt == "fp8":  # a column tile within one FP8 group
        bd, ri = min(bd, gate_up.group_size), min(ri, gate_up.group_size)
    gw, gs, g_kind, g_sstride, g_groups, g_brows, g_group = _operands(gate_up, bd)
    dw, ds, d_kind, d_sstride, d_groups, d_brows, d_group = _operands(down, ri)
    hidden = hidden.contiguous()
    slots = slots.reshape(-1).contiguous()
    lookup = slots if table is None else table.contiguous()
    weights = weights.reshape(-1).contiguous()
    a = torch.empty(n_pairs, inter, device=hidden.device, dtype=hidden.dtype)  # [T*k, I]
    y = torch.empty(t, d, device=hidden.device, dtype=hidden.dtype)  # [T, D]
    kern.gate_up_act[(n_pairs, -(-inter // bi))](
        hidden, gw, gw if gate_up_bias is None else gate_up_bias.contiguous(), gs, slots, lookup, a, d, inter,
        gw.stride(0), gw.stride(1), g_sstride, g_groups, float(alpha), float(limit),
        k=k, act_kind=0 if activation == "silu" else 1, has_bias=gate_up_bias is not None, w_kind=g_kind,
        block_rows=g_brows, group=g_group, block_i=bi, block_d=bd, lookup=table is not None, num_warps=num_warps)
    kern.down_sum[(-(-d // rd), t)](
        a, dw, dw if down_bias is None else down_bias.contiguous(), ds, slots, lookup, weights, y, d, inter,
        dw.stride(0), dw.stride(1), d_sstride, d_groups,
        k=k, has_bias=down_bias is not None, w_kind=d_kind, block_rows=d_brows, group=d_group,
        block_d=rd, block_i=ri, lookup=table is not None, num_warps=num_warps)
    return y


MAX_EXPERTS = 1024  # the router kernel holds a token's logits in one block


def routes(logits: torch.Tensor, k: int) -> bool:
    """Whether ``route`` can take router logits [T, E] choosing ``k`` here."""
    return (logits.is_cuda and logits.dim() == 2 and 0 < k <= logits.shape[1] <= MAX_EXPERTS
            and logits.shape[0] * k <= MAX_PAIRS and fusion.triton_available())


def route(logits: torch.Tensor, k: int, normalize: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A softmax router in one kernel: logits [T, E] -> (weights [T, k] in ``dtype``: the chosen experts' softmax
    probabilities (fp32), renormalised over the k when ``normalize``; expert ids [T, k] int64, largest first, the
    lower id first on ties)."""
    kern = _build()
    t, e = logits.shape
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    w = torch.empty(t, k, device=logits.device, dtype=dtype)
    ids = torch.empty(t, k, device=logits.device, dtype=torch.int64)
    kern.softmax_topk[(t,)](logits, w, ids, e, logits.stride(0), k=k, normalize=normalize,
                            block_e=fusion.pow2(e, 16), block_k=fusion.pow2(k, 2),
                            num_warps=1 if e <= 256 else 4)
    return w, ids


def route_difference(got: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> float:
    """How far two routings are apart: relative difference of their [T, E] weight matrices (0 where an expert is
    not chosen), so a different choice of experts counts fully."""
    def dense(wi: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        w, ids = wi
        return torch.zeros(w.shape[0], int(ids.max()) + 1 if ids.numel() else 1, device=w.device).scatter_(
            1, ids, w.float())

    a, b = dense(got), dense(ref)
    width = max(a.shape[1], b.shape[1])
    return fusion.relative_difference(F.pad(a, (0, width - a.shape[1])), F.pad(b, (0, width - b.shape[1])))
