"""Presence and frequency penalties (OpenAI's semantics), applied to the target's logits before any sampling.

``logit[j] -= presence * (count[j] > 0) + frequency * count[j]``, where ``count[j]`` is how many times token j was
generated so far in this answer (the prompt does not count). ``Penalties`` holds one answer's counts; every decoding
mode samples from ``Penalties.apply`` of the logits at a position, so greedy takes the penalised argmax and sampling
draws from the penalised distribution (then temperature, top-k, top-p as before).

Speculative decoding verifies k drafts in one forward: its row i predicts the token after the current token and
drafts 0..i-1, so ``Penalties.rows`` penalises row i with the counts plus those tokens; the tokens kept are then the
ones plain decoding gives. Batched decoding needs nothing more: each conversation has its own ``Penalties``.

Invariants: penalties of 0 leave the logits untouched (the same tensor, so decoding without penalties is unchanged
bit for bit); penalised logits are fp32; log-probs (``generate.token_logprobs``) are computed from the unpenalised
logits, the model's own distribution, as with temperature, top-k and top-p.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ekmesh.core.constants import MAX_PENALTY

__all__ = ["MAX_PENALTY", "Penalties"]


class Penalties:
    """One answer's generated-token counts and the penalties they weigh (module docstring)."""

    def __init__(self, presence: float, frequency: float) -> None:
        self.presence, self.frequency = float(presence), float(frequency)
        self.active = bool(presence or frequency)
        self._counts: dict[int, int] = {}

    def add(self, token: int) -> None:
        """``token`` was generated (emitted as part of the answer)."""
        if self.active:
            self._counts[token] = self._counts.get(token, 0) + 1

    def _penalty(self, counts: dict[int, int], vocab: int, device: torch.device) -> torch.Tensor:
        """The amount subtracted from each logit [V] (fp32) under ``counts``."""
        out = torch.zeros(vocab, dtype=torch.float32, device=device)
        if counts:
            ids = torch.tensor(list(counts), dtype=torch.long, device=device)
            n = torch.tensor(list(counts.values()), dtype=torch.float32, device=device)
            out[ids] = self.presence + self.frequency * n
        return out

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] at the next position -> penalised logits [V] (the same tensor when no penalty is set)."""
        if not self.active:
            return logits
        return logits.float() - self._penalty(self._counts, logits.shape[-1], logits.device)

    def rows(self, logits: torch.Tensor, fed: Sequence[int]) -> torch.Tensor:
        """logits [len(fed), V] of a verification forward over ``fed`` (the current token, then drafts), where the
        current token is already counted -> penalised rows [len(fed), V]: row i counts ``fed[1:i + 1]`` too."""
        if not self.active:
            return logits
        out = logits.float().clone()
        counts = dict(self._counts)
        for i in range(logits.shape[0]):
            if i:
                counts[int(fed[i])] = counts.get(int(fed[i]), 0) + 1
            out[i] -= self._penalty(counts, logits.shape[-1], logits.device)
        return out
