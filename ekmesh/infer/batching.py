"""Batched decoding: the steps of the conversations active on one attention host run as one forward.

Each conversation decodes on its own thread (an API request's) with its own cache, sampling and stop conditions;
when it needs a target step it hands (input ids, cache) to the ``StepBatcher`` and waits. Whoever finds no batch
running becomes the leader: it takes every step waiting (up to ``max_batch``) and runs them as one
``CausalLM.forward_many``, so every MoE layer makes one experts call, one frame per peer on a mesh, for all of
them; steps that arrive meanwhile wait for the next batch, whose leader is one of them. Before it runs, a leader
waits up to ``GATHER_S`` for the steps of the other conversations decoding now (they are sampling and sending the
tokens of the last batch), so a batch holds all of them rather than whoever came first. A conversation alone runs
its step at once through the plain forward (nothing waits for company), so batching costs nothing when there is
none and grows with the load.

Invariants: a step runs exactly once, in one batch; an error in a batch's forward is raised in every conversation
of that batch (each then fails as it would alone); the data-plane rounds a batch made (counted on the leader's
thread) are reported to each of its conversations.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ekmesh.infer.experts import ExpertsBackend
from ekmesh.infer.models.cache import KVCache
from ekmesh.infer.models.common import CausalLM

MAX_BATCH = 32  # conversations per forward
# How long a leader waits for the other active conversations' steps: they arrive within a few hundred microseconds of
# Python each after a batch; a conversation still in its prefill (or whose client reads slowly) costs at most this.
GATHER_S = 0.003


@dataclass
class _Step:
    ids: torch.Tensor  # [1, T]
    cache: KVCache
    last_only: bool
    logits: torch.Tensor | None = None  # [T or 1, V]
    error: BaseException | None = None
    rounds: int = 0
    size: int = 0  # the batch it ran in
    done: bool = False


class StepBatcher:
    """Runs target steps of concurrent conversations together (module docstring). ``rounds``: the data-plane rounds
    made by the calling thread so far (None: no mesh)."""

    def __init__(self, model: CausalLM, experts: ExpertsBackend | None, rounds: Callable[[], int] | None = None,
                 max_batch: int = MAX_BATCH, gather_s: float = GATHER_S) -> None:
        self.model, self.experts, self.rounds, self.max_batch = model, experts, rounds, max_batch
        self.gather_s = gather_s
        self._cond = threading.Condition()
        self._queue: list[_Step] = []
        self._busy = False
        self.sizes: collections.deque[int] = collections.deque(maxlen=256)  # recent batch sizes (for status)
        self.active = 0  # conversations decoding now (``joined`` / ``left``)

    def joined(self) -> None:
        with self._cond:
            self.active += 1

    def left(self) -> None:
        with self._cond:
            self.active -= 1
            self._cond.notify_all()  # (a leader waiting for this conversation's step)

    def step(self, ids: torch.Tensor, cache: KVCache, last_only: bool) -> tuple[torch.Tensor, int, int]:
        """Blocking: the logits [T or 1, V] of ``ids`` [1, T] continuing ``cache``, the data-plane rounds its batch
        made, and the batch's size."""
        me = _Step(ids, cache, last_only)
        with self._cond:
            self._queue.append(me)
            self._cond.notify_all()  # (a leader gathering its batch)
        while True:
            with self._cond:
                while self._busy and not me.done:
                    self._cond.wait()
                if me.done:
                    break
                self._busy = True
                deadline = time.monotonic() + self.gather_s
                while len(self._queue) < min(self.active, self.max_batch):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._busy = False
                    for s in batch:
                        s.done = True
                    self._cond.notify_all()
        if me.error is not None:
            raise me.error
        assert me.logits is not None
        return me.logits, me.rounds, me.size

    def _run(self, batch: list[_Step]) -> None:
        before = self.rounds() if self.rounds is not None else 0
        try:
            if len(batch) == 1:
                s = batch[0]
                outs = [self.model(s.ids, s.cache, self.experts, last_only=s.last_only)[0]]
            else:
                outs = self.model.forward_many([(s.ids, s.cache) for s in batch], self.experts,
                                               [s.last_only for s in batch])
        except BaseException as exc:  # every conversation of the batch fails with it (the leader's re-raises)
            for s in batch:
                s.error = exc
            return
        finally:
            made = (self.rounds() if self.rounds is not None else 0) - before
            self.sizes.append(len(batch))
            for s in batch:
                s.rounds, s.size = made, len(batch)
        for s, out in zip(batch, outs, strict=True):
            s.logits = out

    def status(self) -> dict[str, float | int]:
        """Active conversations and the sizes of recent batches (``ekmesh status``)."""
        sizes = list(self.sizes)
        return {"active": self.active, "recent_steps": len(sizes),
                "mean_batch": round(sum(sizes) / len(sizes), 2) if sizes else 0.0, "max_batch": max(sizes, default=0)}
