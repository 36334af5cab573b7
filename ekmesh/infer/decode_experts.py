"""The routed experts of a decode step on CUDA in two Triton kernels.

At batch 1 a MoE layer's k (token, expert) pairs through the grouped path (sort the pairs by expert, gather the
tokens, two grouped matmuls, the activation, scatter back, the weighted sum over k) are ~20 kernel launches, most of
them tiny. Here the first kernel reads each pair's gate and up rows straight from the layer's stacked weights (the
pair's slot looked up on the device) and applies the activation; the second reads the down rows of a token's k
experts and sums them weighted by the router. A layer's experts are two launches that stream the chosen experts'
bytes once, with no host sync: capturable in a CUDA graph (``cuda_graph.GraphDecoder`` uses them in its captured
step).

Responsible for: float experts (bf16 / fp16 weights) of both activations (SwiGLU; gpt-oss's clamped one), with or
without biases, for a few pairs (``MAX_PAIRS``: a decode step, a few drafted tokens). Not for: prefill-sized
batches (the grouped path is faster there), quantized experts (``qkernels``), the CPU.

Invariant: computes what ``LocalExperts``' grouped path computes within the weights' rounding: products and sums
in fp32, each projection's output rounded to the weights' dtype (as a matmul's output is) before the activation and
before the weighted sum; the sum over k in fp32, in choice order. A pair whose slot is negative (an expert not
held) contributes zeros, never reads out of bounds. Triton is imported on first use only (CPU installs lack it).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch

MAX_PAIRS = 64  # up to this many (token, expert) pairs per call; beyond, the grouped path is faster

@functools.cache
def available() -> bool:
    """Whether Triton can be imported (it ships with CUDA builds of torch)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def supports(hidden: torch.Tensor, weight: torch.Tensor, n_pairs: int) -> bool:
    """Whether a call over ``hidden`` with stacked float weights ``weight`` and ``n_pairs`` pairs can run here."""
    return (hidden.is_cuda and weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16)
            and hidden.dtype == weight.dtype and 0 < n_pairs <= MAX_PAIRS and available())


def _build() -> Any:
    return importlib.import_module("ekmesh.infer.triton_kernels")  # imports triton


# block shapes (rows, reduction) per kernel; chosen on an H100 at Qwen3-30B-A3B's shapes (benchmarks/moe_kernels.py)
GATE_UP_BLOCKS = (16, 256)
DOWN_BLOCKS = (16, 256)


def moe(hidden: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
        down: torch.Tensor, gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None,
        activation: str = "silu", alpha: float = 1.702, limit: float = 7.0,
        gate_up_blocks: tuple[int, int] | None = None, down_blocks: tuple[int, int] | None = None,
        num_warps: int = 4) -> torch.Tensor:
    """hidden [T, D]; slots [T, k] (index into the stacked weights, -1 for none); weights [T, k] (router);
    gate_up [n, 2I, D], down [n, D, I] (row-major rows), biases [n, 2I] / [n, D] or None -> [T, D] in hidden's
    dtype: per token the weighted sum over its k pairs of down(act(gate_up(hidden)))."""
    k_ = _build()
    t, k = slots.shape
    n_pairs = t * k
    d, inter = hidden.shape[1], down.shape[2]
    if gate_up.stride(2) != 1 or down.stride(2) != 1:
        raise ValueError("stacked expert weights must be contiguous in their last dimension")
    hidden = hidden.contiguous()
    slots = slots.reshape(-1).contiguous()
    weights = weights.reshape(-1).contiguous()
    a = torch.empty(n_pairs, inter, device=hidden.device, dtype=hidden.dtype)  # [T*k, I]
    y = torch.empty(t, d, device=hidden.device, dtype=hidden.dtype)  # [T, D]
    bi, bd = gate_up_blocks or GATE_UP_BLOCKS
    k_.gate_up_act[(n_pairs, -(-inter // bi))](
        hidden, gate_up, gate_up if gate_up_bias is None else gate_up_bias.contiguous(), slots, a, d, inter,
        gate_up.stride(0), gate_up.stride(1), float(alpha), float(limit),
        k=k, act_kind=0 if activation == "silu" else 1, has_bias=gate_up_bias is not None,
        block_i=bi, block_d=bd, num_warps=num_warps)
    rd, ri = down_blocks or DOWN_BLOCKS
    k_.down_sum[(-(-d // rd), t)](
        a, down, down if down_bias is None else down_bias.contiguous(), slots, weights, y, d, inter,
        down.stride(0), down.stride(1),
        k=k, has_bias=down_bias is not None, block_d=rd, block_i=ri, num_warps=num_warps)
    return y
