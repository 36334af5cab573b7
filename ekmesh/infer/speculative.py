"""Speculative decoding: where drafted tokens come from, how the target accepts them, and how many to draft.

A decode step of the target costs one dependent data-plane round trip per MoE layer whatever the number of tokens it
carries, so the host drafts k tokens cheaply, runs the target once over the current token and the k drafts (every
MoE layer then sends one frame per peer carrying all k + 1 tokens), and keeps the drafts the target agrees with
(``Generator.stream`` runs the loop; rejected positions are cut from the KV cache with ``KVCache.truncate``).

- Drafters (``Drafter``): ``NgramDrafter`` (prompt lookup: the tokens that followed the most recent earlier
  occurrence of the context's last n tokens, n = 3, 2, 1, a loop continued past the context's end; no model) and
  ``ModelDrafter`` (a small model with the target's tokenizer on the host, e.g. the built-in model's packaged
  draft).
- Acceptance (``accept``): greedy keeps a draft while it is the target's argmax, so the output is the plain greedy
  output; sampling draws the target's token at each drafted position as plain decoding would (one seeded generator
  per answer position, ``Draws``) and keeps a draft while it equals it, so every emitted token has the target's
  distribution p (after temperature, top-k and top-p) and a seed gives the tokens it gives without drafts; for a
  draft model that samples, speculative sampling (keep d with probability min(1, p(d)/q(d)), else draw from the
  residual max(0, p - q)).
- Length (``DraftLength``): k maximises the expected tokens per second of a step, 1 + sum over j <= k of
  P(the first j drafts are all accepted) tokens for base + k × extra seconds. The probabilities come from the
  measured acceptance of the j-th draft given that the ones before it were accepted, position by position, not from
  one per-token rate: acceptance comes in runs (a passage the draft knows, a loop prompt lookup has seen), so a
  draft that got past its first tokens usually goes on, and one rate, mixing every position, misjudges long
  drafts. The costs are the measured base of a step and the extra cost of each drafted token. On a mesh the base
  (the round trips) dwarfs the extra cost and k grows while later drafts still pass; on one CPU process a drafted
  token costs about as much as a decoded one and only a high acceptance pays.

Invariants: a drafter never sees rejected drafts (its context only grows by accepted tokens); ``accept`` returns n
accepted drafts and the token that follows them when it drew one (sampling, a rejection), else None.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch

from ekmesh.core.constants import SPECULATIVE_MODES
from ekmesh.core.errors import ConfigError
from ekmesh.infer.batching import StepBatcher
from ekmesh.infer.experts import ExpertsBackend
from ekmesh.infer.loader import Checkpoint, load_all
from ekmesh.infer.models.common import CausalLM

log = logging.getLogger(__name__)

MODES = SPECULATIVE_MODES
MAX_DRAFT = 8  # tokens drafted per step at most
NGRAM_SIZES = (3, 2, 1)  # suffix lengths tried, longest first


class Drafter(Protocol):
    def propose(self, context: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens likely to follow ``context`` (which only ever grows between calls)."""
        ...


class NgramDrafter:
    """Prompt lookup: finds the most recent earlier occurrence of the context's last n tokens (n from
    ``NGRAM_SIZES``, longest first) and proposes the tokens that followed it. Where those run into the suffix itself
    (a loop, as greedy decoding makes), a match of n >= 2 continues with the loop's period. Indexes each new token
    once: an n-gram maps to the end of its last two occurrences (the last is the suffix itself)."""

    def __init__(self, sizes: Sequence[int] = NGRAM_SIZES) -> None:
        self.sizes = tuple(sizes)
        self._last: dict[tuple[int, ...], int] = {}
        self._prev: dict[tuple[int, ...], int] = {}
        self._seen: list[int] = []

    def _index(self, context: Sequence[int]) -> None:
        seen = self._seen
        assert len(context) >= len(seen), "a drafter's context only grows"
        for end in range(len(seen) + 1, len(context) + 1):
            seen.append(int(context[end - 1]))
            for n in self.sizes:
                if end >= n:
                    gram = tuple(seen[end - n:end])
                    if gram in self._last:
                        self._prev[gram] = self._last[gram]
                    self._last[gram] = end

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        if k <= 0:
            return []
        self._index(context)
        end = len(self._seen)
        for n in self.sizes:
            if end < n:
                continue
            gram = tuple(self._seen[end - n:])
            at = self._last.get(gram)
            if at == end:
                at = self._prev.get(gram)
            if at is not None and at < end:
                out = self._seen[at:at + k]
                if n >= 2:  # the continuation runs into the suffix: the text repeats with period end - at
                    period = end - at
                    while len(out) < k:
                        out.append(out[len(out) - period])
                return out
        return []


class ModelDrafter:
    """Drafts with a small causal LM on the host (the same tokenizer as the target): greedy tokens, so each draft is
    proposed with certainty (``accept`` treats it as prompt lookup's). One per answer: it keeps its own KV cache of
    the tokens it was fed, cut back to what the target kept at the next call, so each step feeds only the tokens
    the target added since (the accepted drafts are already in it) and then drafts k tokens one forward each.
    ``batcher``: the draft model's ``StepBatcher``, shared by every answer drafting with it: the forwards of the
    answers drafting at the same moment run as one (it waits only for answers inside ``propose``)."""

    def __init__(self, model: CausalLM, experts: ExpertsBackend | None = None, max_len: int | None = None,
                 batcher: StepBatcher | None = None) -> None:
        self.model, self.experts = model, experts
        self.batcher = batcher if batcher is not None else StepBatcher(model, experts)
        self.device = next(model.parameters()).device
        self.max_len = max_len  # the draft's context limit (its max_position_embeddings); past it: no drafts
        self.cache = model.new_cache()
        self.fed: list[int] = []  # tokens whose keys and values are in the cache, in order

    @torch.inference_mode()
    def propose(self, context: Sequence[int], k: int) -> list[int]:
        if k <= 0 or (self.max_len is not None and len(context) + k > self.max_len):
            return []
        same = 0
        limit = min(len(self.fed), len(context))
        while same < limit and self.fed[same] == context[same]:
            same += 1
        if same == len(context):  # (never: the target adds a token each step) keep one to compute logits from
            same -= 1
        self.cache.truncate(same)
        del self.fed[same:]
        new = list(context[same:])
        out: list[int] = []
        self.batcher.joined()
        try:
            for _ in range(k):
                ids = torch.tensor([new], dtype=torch.long, device=self.device)
                logits = self.batcher.step(ids, self.cache, True)[0][-1]  # [V]
                self.fed.extend(new)
                nxt = int(torch.argmax(logits))
                out.append(nxt)
                new = [nxt]
        finally:
            self.batcher.left()
        return out


def load_draft(source: str | os.PathLike[str] | Checkpoint, device: torch.device, dtype: torch.dtype,
               tokenizer_dir: Path) -> Callable[[], ModelDrafter]:
    """Loads a draft model (a checkpoint directory or an opened ``Checkpoint``: a dense model, or an MoE with its
    experts here) and returns a factory of drafters over it (one per answer; the weights are shared). Refuses a
    draft whose ``tokenizer.json`` differs from the one in ``tokenizer_dir`` (the target's): its ids would mean
    other text (both without one: token ids in, token ids out)."""
    ckpt, model, experts = load_all(source, device, dtype)
    mine, theirs = tokenizer_dir / "tokenizer.json", ckpt.path / "tokenizer.json"
    if (mine.read_bytes() if mine.exists() else None) != (theirs.read_bytes() if theirs.exists() else None):
        why = "differs" if mine.exists() and theirs.exists() else "only one of them has one"
        raise ConfigError(f"draft model {ckpt.label} does not have the target's tokenizer (tokenizer.json {why}): "
                          "its drafts would be other text")
    uses = experts if any(ckpt.config.moe_layers) else None
    limit = ckpt.hf_config.get("max_position_embeddings")
    log.info("draft model %s loaded on %s", ckpt.label, device)
    batcher = StepBatcher(model, uses)
    return lambda: ModelDrafter(model, uses, int(limit) if limit else None, batcher)


def target_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] -> the distribution sampling draws from [V] (fp32, CPU): temperature, then top-k, then top-p."""
    x = logits.detach().to("cpu", torch.float32) / temperature  # [V]
    if top_k and top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # drop a token when the mass before it already reaches top_p; the first token always stays
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return torch.softmax(x, dim=-1)


class Draws:
    """An answer's randomness, one generator per token position: the token at position p is drawn with a generator
    seeded by (seed, p). So the tokens a seed gives do not depend on how the answer was cut into steps: decoding with
    drafts of any length, or without, draws each position's token the same way (``accept``)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, position: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 0x9E3779B97F4A7C15 + position) % (1 << 63))


def accept(logits: torch.Tensor, draft: Sequence[int], temperature: float, top_k: int, top_p: float,
           draws: Callable[[int], torch.Generator] | None, first: int = 0,
           draft_probs: torch.Tensor | None = None) -> tuple[int, int | None]:
    """logits [len(draft) + 1, V] of the target at the current token and each draft (already penalised, row i with
    the tokens before it: ``sampling.Penalties.rows``) -> (n drafts accepted, the token drawn after them or None).
    Draft i stands at answer position ``first + i`` (its randomness: ``draws``).

    Drafts proposed with certainty (``draft_probs`` None: prompt lookup, a greedy draft model): the target's token
    at each position is drawn as plain decoding draws it (the position's own generator), and a draft is kept while
    it equals that token; the first that differs gives the drawn token. Each emitted token then has the target's
    distribution, and a seed gives the same tokens as decoding without drafts. ``draft_probs`` [len(draft), V] (a
    draft model that samples): speculative sampling (keep d with probability min(1, p(d)/q(d)), else draw from the
    residual max(0, p - q)), which keeps the distribution but not the tokens of a seed."""
    if temperature == 0:
        best = torch.argmax(logits[: len(draft)], dim=-1).tolist()  # [k] the target's choice at each position
        n = 0
        while n < len(draft) and best[n] == draft[n]:
            n += 1
        return n, None
    for i, d in enumerate(draft):
        p = target_probs(logits[i], temperature, top_k, top_p)  # [V]
        gen = draws(first + i) if draws is not None else None
        if draft_probs is None:
            x = int(torch.multinomial(p, 1, generator=gen))
            if x == d:
                continue
            return i, x
        q = draft_probs[i].to("cpu", torch.float32)
        qd = float(q[d])
        u = float(torch.rand((), generator=gen))
        if qd > 0 and u < min(1.0, float(p[d]) / qd):
            continue
        residual = (p - q).clamp_min(0.0)
        total = float(residual.sum())
        if total <= 0.0:  # p == q: any draw from p is exact
            residual, total = p, float(p.sum())
        return i, int(torch.multinomial(residual / total, 1, generator=gen))
    return len(draft), None


class DraftLength:
    """Chooses k per step from the measured acceptance and step costs (module docstring). ``cap``: k at most. One per
    generator and mode, shared by its answers (so a short answer starts from what earlier ones measured); thread-safe.

    Acceptance, per draft position j = 1..cap: of the steps whose j-th draft was ruled on (drafts before it all
    accepted), the fraction that accepted it; counts decay by ``DECAY`` a drafting step. A position with few rulings
    leans on the one before it (``PRIOR_WEIGHT`` pseudo-rulings at that rate; ``PRIOR`` before the first: an
    optimistic start, so drafting is tried). Costs: a least-squares line seconds = base + extra × drafted over the
    recent steps (decaying by 0.9). For the first ``FIRST_STEPS`` steps, and while the line is undetermined (every
    recent step drafted alike), steps alternate between the cap and half of it (so one slow first step, a warm-up,
    does not decide alone); and once in ``EXPLORE_EVERY`` steps k moves off its best, alternately down (half, or 1
    from 0: the line keeps seeing more than one point) and up (half again more, or half the cap from 0: the later
    positions keep being measured, and a line that a slow step tipped to "drafting does not pay" is put to the
    test)."""

    EXPLORE_EVERY = 8
    FIRST_STEPS = 4  # steps that alternate between the cap and half of it before the costs decide
    DECAY = 0.95
    PRIOR = 0.7
    PRIOR_WEIGHT = 1.0

    def __init__(self, cap: int = MAX_DRAFT) -> None:
        if cap < 0:
            raise ConfigError(f"the draft length cap must be >= 0, got {cap}")
        self.cap = cap
        self.steps = 0
        self._ruled = [0.0] * cap  # [j - 1]: decayed count of steps whose j-th draft was ruled on
        self._passed = [0.0] * cap  # [j - 1]: ... and accepted it
        self._sums = [0.0] * 5  # decayed sums of w, w·n, w·n², w·t, w·n·t
        self._lock = threading.Lock()

    def passing(self) -> list[float]:
        """[j - 1]: the estimated probability that drafts 1..j are all accepted, j = 1..cap."""
        out, rate, alive = [], self.PRIOR, 1.0
        for ruled, passed in zip(self._ruled, self._passed, strict=True):
            rate = (passed + self.PRIOR_WEIGHT * rate) / (ruled + self.PRIOR_WEIGHT)
            alive *= rate
            out.append(alive)
        return out

    def costs(self) -> tuple[float, float] | None:
        """(base, extra) seconds from the recent steps, or None while undetermined."""
        s0, s1, s2, t0, t1 = self._sums
        det = s0 * s2 - s1 * s1
        if s0 <= 0 or det <= 1e-9 * max(1.0, s0 * s2):
            return None
        extra = (s0 * t1 - s1 * t0) / det
        base = (t0 - extra * s1) / s0
        return max(base, 1e-9), max(extra, 0.0)

    def choose(self, limit: int) -> int:
        """k for the next step, at most ``limit`` (tokens left to generate after the current one)."""
        cap = min(self.cap, limit)
        if cap <= 0:
            return 0
        with self._lock:
            costs, alive, step = self.costs(), self.passing(), self.steps
        if costs is None or step < self.FIRST_STEPS:
            return cap if step % 2 == 0 else cap // 2
        base, extra = costs
        best_k, best, tokens = 0, 1.0 / base, 1.0
        for k in range(1, cap + 1):
            tokens += alive[k - 1]  # expected tokens of a step that drafts k
            rate = tokens / (base + k * extra)
            if rate > best * (1 + 1e-9):
                best_k, best = k, rate
        if step % self.EXPLORE_EVERY == self.EXPLORE_EVERY - 1:
            if (step // self.EXPLORE_EVERY) % 2:
                return min(cap, best_k + max(cap // 2 if best_k == 0 else 1, best_k // 2))
            return best_k // 2 if best_k > 1 else 1
        return best_k

    def update(self, drafted: int, accepted: int, seconds: float) -> None:
        """One step's outcome: ``drafted`` tokens proposed, ``accepted`` kept, the step (drafting and the target
        forward) took ``seconds``."""
        with self._lock:
            self.steps += 1
            if drafted:
                ruled = min(drafted, accepted + 1)  # every accepted draft and the first rejected one
                for j in range(self.cap):
                    self._ruled[j] *= self.DECAY
                    self._passed[j] *= self.DECAY
                    if j < ruled:
                        self._ruled[j] += 1.0
                        self._passed[j] += 1.0 if j < accepted else 0.0
            if math.isfinite(seconds) and seconds > 0:
                n = float(drafted)
                self._sums = [0.9 * x for x in self._sums]
                for i, v in enumerate((1.0, n, n * n, seconds, n * seconds)):
                    self._sums[i] += v


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"unknown speculative mode {mode!r} (use {', '.join(MODES)})")
    return mode
