"""One decode step (batch 1, one token) captured as a CUDA graph over a static KV cache.

Why: at batch 1 a decode step of a 48-layer MoE is a few thousand small kernels; launched one by one from Python
they cost far more than the memory traffic they do. A graph replays them all with one launch.

Invariants: the graph reads its inputs from two static device tensors (token id, position) and writes logits to a
static output; the KV cache has a fixed capacity (``max_len``) and lives as long as the runner; the experts
backend must hold every routed expert (its missing-expert check, a host sync, is off while the step is captured).
Prefill runs eagerly on the same static cache. ``cache.length`` is advanced on the host after each replay.
The captured step uses fused kernels at ``fuse``'s level (``ekmesh.infer.fusion``: "all" by default; "compile", or
"off" for the plain code).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ekmesh.infer import fusion
from ekmesh.infer.experts import LocalExperts
from ekmesh.infer.models.attention import Attention
from ekmesh.infer.models.common import CausalLM


class GraphDecoder:
    def __init__(self, model: CausalLM, experts: LocalExperts, max_len: int, fuse: str = "all") -> None:
        if fuse not in fusion.LEVELS:
            raise ValueError(f"fusion level {fuse!r} is not one of {', '.join(fusion.LEVELS)}")
        self.fuse = fuse
        if fuse == "all":  # q, k, v as one matmul (the same weights, viewed)
            for m in model.modules():
                if isinstance(m, Attention):
                    m.fuse_projections()
        self.model = model
        self.experts = experts
        self.max_len = max_len
        self.device = next(model.parameters()).device
        self.cache = model.new_cache(max_len)
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)  # [B=1, T=1]
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)  # [T=1]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None  # [1, 1, V]

    @torch.inference_mode()
    def prefill(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Resets the cache and runs the prompt eagerly; returns the last position's logits [V]."""
        if len(prompt_ids) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit a cache of {self.max_len}")
        self.cache.length = 0
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        return self.model(ids, self.cache, self.experts, last_only=True)[0, -1]

    def _run_static(self) -> torch.Tensor:
        length = self.cache.length
        out = self.model(self.ids, self.cache, self.experts, last_only=True, positions=self.pos)
        self.cache.length = length  # forward advanced it on the host; the caller decides
        return out

    @torch.inference_mode()
    def _capture(self) -> None:
        self.pos.fill_(self.cache.length)  # warm-up writes land in the slot the next real step overwrites
        self.experts.graph_mode = True
        with fusion.fused(self.fuse):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: compiles fused kernels, picks matmul algorithms
                    self._run_static()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.out = self._run_static()
            finally:
                self.experts.graph_mode = False
        self.graph = graph

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Appends one token at the next position; returns its logits [V]."""
        if self.cache.length >= self.max_len:
            raise ValueError(f"the cache of {self.max_len} positions is full")
        if self.graph is None:
            self._capture()
        assert self.graph is not None and self.out is not None
        self.ids.fill_(token)
        self.pos.fill_(self.cache.length)
        self.graph.replay()
        self.cache.length += 1
        return self.out[0, -1]
