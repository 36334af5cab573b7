"""A member banned for lying: the generator rebuilds its cache without the liar's unchecked results.

The experts backend here is the tiny model's own experts with a liar in front of them: it adds a large offset to
every MoE output until it is "banned" at a chosen call (the call it is banned in returns honest results, as
``RemoteExperts`` redoes that layer's pairs without the banned peer); the ban raises the retraction counter the
generator is handed. Honest tokens come from the same experts without the liar.
"""

from __future__ import annotations

import pytest
import torch

from ekmesh.infer.experts import LocalExperts
from ekmesh.infer.generate import Generator, SamplingParams
from ekmesh.infer.loader import load_all
from ekmesh.infer.models.common import CausalLM
from tests.tiny_models import make_tiny

PROMPT = [5, 17, 33, 2, 71, 8, 40, 11]
GREEDY = SamplingParams(max_tokens=12, stop_ids=frozenset())


class LiarUntilBanned:
    """Experts whose results are off by ``offset`` until call ``ban_at`` (1-based), which bans the liar."""

    def __init__(self, inner: LocalExperts, ban_at: int, offset: float = 3.0) -> None:
        self.inner, self.ban_at, self.offset = inner, ban_at, offset
        self.calls = 0
        self.bans = 0

    def __call__(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        out = self.inner(layer, hidden, expert_ids, weights)
        self.calls += 1
        if self.calls == self.ban_at:
            self.bans += 1
        return out if self.bans else out + self.offset

    def retractions(self) -> int:
        return self.bans


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[CausalLM, LocalExperts, int]:
    path, _ = make_tiny("qwen3_moe", tmp_path_factory.mktemp("retract") / "m")
    _, model, experts = load_all(path)
    moe_layers = sum(1 for m in model.config.moe_layers if m)
    return model, experts, moe_layers


def _tokens(gen: Generator, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    return [ev.token_id for ev in gen.stream(prompt, params)]


def test_a_ban_in_the_prefill_makes_the_answer_exact(parts: tuple[CausalLM, LocalExperts, int]) -> None:
    model, experts, moe_layers = parts
    honest = _tokens(Generator(model, experts), PROMPT)
    # banned in the prompt's last MoE layer: every earlier layer of the prefill used the liar's results
    liar = LiarUntilBanned(experts, ban_at=moe_layers)
    unrecomputed = _tokens(Generator(model, liar), PROMPT)
    assert unrecomputed != honest, "the liar must change the answer when nothing is recomputed"
    liar = LiarUntilBanned(experts, ban_at=moe_layers)
    got = _tokens(Generator(model, liar, retractions=liar.retractions), PROMPT)
    assert got == honest, f"answer {got} != honest {honest}"
    # logits of a whole prompt too (one forward, computed again)
    liar = LiarUntilBanned(experts, ban_at=1)
    diff = (Generator(model, liar, retractions=liar.retractions).logits(PROMPT)
            - Generator(model, experts).logits(PROMPT)).abs().max().item()
    assert diff == 0.0, f"max |logits - honest| = {diff}"


@pytest.mark.parametrize("step", [2, 5])
def test_a_ban_while_decoding_gives_the_honest_continuation(parts: tuple[CausalLM, LocalExperts, int],
                                                            step: int) -> None:
    """Banned during the forward that computes token ``step``: the tokens sent before are the liar's, and every
    token from ``step`` on is the honest model's continuation of the prompt and those tokens."""
    model, experts, moe_layers = parts
    liar = LiarUntilBanned(experts, ban_at=step * moe_layers + 1)  # the prefill is forward 0
    got = _tokens(Generator(model, liar, retractions=liar.retractions), PROMPT)
    assert liar.bans == 1
    honest_rest = _tokens(Generator(model, experts), PROMPT + got[:step],
                          SamplingParams(max_tokens=len(got) - step, stop_ids=frozenset()))
    assert got[step:] == honest_rest
    # without the rebuild the continuation is computed over the liar's cache and differs
    liar = LiarUntilBanned(experts, ban_at=step * moe_layers + 1)
    stale = _tokens(Generator(model, liar), PROMPT)
    assert stale[:step] == got[:step] and stale[step:] != honest_rest


def test_a_ban_in_another_conversation_rebuilds_this_one(parts: tuple[CausalLM, LocalExperts, int]) -> None:
    """Two streams over one backend: the liar is banned while the second one runs; the first, whose cache was built
    with the liar, rebuilds it at its next step."""
    model, experts, moe_layers = parts
    liar = LiarUntilBanned(experts, ban_at=10**9)
    gen = Generator(model, liar, retractions=liar.retractions)
    first = gen.stream(PROMPT, GREEDY)
    head = [next(first).token_id for _ in range(3)]
    liar.ban_at = liar.calls + 1  # the other conversation's prefill bans it
    _tokens(gen, [9, 9, 4], SamplingParams(max_tokens=1, stop_ids=frozenset()))
    rest = [ev.token_id for ev in first]
    honest_rest = _tokens(Generator(model, experts), PROMPT + head, SamplingParams(max_tokens=len(rest),
                                                                                  stop_ids=frozenset()))
    assert rest == honest_rest
