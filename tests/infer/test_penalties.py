"""Presence and frequency penalties in every decoding mode, against a plain reference loop.

The reference: one process, no drafts, no cache: at each step ``Generator.logits`` over the prompt and the tokens so
far, the last row penalised by hand (``logit[j] -= presence * (count[j] > 0) + frequency * count[j]``, counts over
the generated tokens), then the argmax (greedy) or the seeded draw of ``speculative.Draws`` (sampled). The built-in
model with its packaged draft model, fp32 on the CPU, decodes with speculative mode "off", "ngram" (prompt lookup)
and "draft" (a draft model), and in batches of concurrent conversations: every answer must equal the reference,
with drafts proposed and accepted; a drafter that proposes the reference answer itself has every draft kept (so
verification row i is penalised with the drafts before it).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from ekmesh.core.errors import GenerationError
from ekmesh.infer.generate import Generator, SamplingParams
from ekmesh.infer.speculative import Draws, target_probs

# a prompt that repeats itself: prompt lookup has drafts to offer, and unpenalised greedy repeats too
PROMPT = ("And God said, Let there be light: and there was light. And God saw the light, that it was good. "
          "And God said, Let there be a firmament in the midst of the waters. And God said,")
N = 40
PENALTIES = [(1.0, 0.0), (0.0, 0.6), (-1.0, 1.5)]  # (presence, frequency)


@pytest.fixture(scope="module")
def model() -> Any:
    from ekmesh.infer.session import LocalModel
    from ekmesh.registry.lookup import open_model

    return LocalModel.open(open_model("builtin"), "cpu", "fp32", draft=open_model("builtin-draft"))


def _penalised(logits: torch.Tensor, tokens: list[int], presence: float, frequency: float) -> torch.Tensor:
    counts = torch.bincount(torch.tensor(tokens, dtype=torch.long), minlength=logits.shape[-1]).float()
    return logits - presence * (counts > 0).float() - frequency * counts


def reference(gen: Generator, prompt: list[int], n: int, presence: float, frequency: float,
              temperature: float = 0.0, seed: int = 0, top_k: int = 0) -> list[int]:
    """``n`` tokens, one full prefill a step, penalties applied by hand to the last row."""
    out: list[int] = []
    draws = Draws(seed)
    for pos in range(n):
        logits = _penalised(gen.logits(prompt + out)[-1], out, presence, frequency)
        if temperature == 0:
            out.append(int(torch.argmax(logits)))
        else:
            probs = target_probs(logits, temperature, top_k, 1.0)
            out.append(int(torch.multinomial(probs, 1, generator=draws(pos))))
    return out


def _params(mode: str, presence: float, frequency: float, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=N, stop_ids=frozenset(), speculative=mode, presence_penalty=presence,
                          frequency_penalty=frequency, **kw)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("presence", "frequency"), PENALTIES)
def test_greedy_with_penalties_equals_the_reference_in_every_mode(model: Any, presence: float,
                                                                  frequency: float) -> None:
    gen = model.generator
    prompt = model.tokenizer.encode(PROMPT, add_special_tokens=True)
    want = reference(gen, prompt, N, presence, frequency)
    plain = gen.generate(prompt, SamplingParams(max_tokens=N, stop_ids=frozenset(), speculative="off")).token_ids
    assert want != plain  # the penalties change the answer (so this test can tell them from none)
    for mode in ("off", "ngram", "draft"):
        res = gen.generate(prompt, _params(mode, presence, frequency))
        print(f"{mode} ({presence}, {frequency}): {res.stats.accepted}/{res.stats.drafted} drafts accepted")
        assert res.token_ids == want, mode
        if mode != "off":  # drafts were verified under penalties
            assert res.stats.drafted > 0, (mode, res.stats)
        if mode == "draft":  # and some kept (the draft model agrees often enough)
            assert res.stats.accepted > 0, (mode, res.stats)


class _Oracle:
    """Drafts the reference answer itself: every draft is right, so verification must keep every one, which it does
    only if row i of a verification forward is penalised with the drafts before it."""

    def __init__(self, answer: list[int], prompt_len: int) -> None:
        self.answer, self.prompt_len = answer, prompt_len

    def propose(self, context: Any, k: int) -> list[int]:
        done = len(context) - self.prompt_len
        return self.answer[done:done + k]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("presence", "frequency", "temperature"), [(2.0, 2.0, 0.0), (2.0, 1.0, 0.9)])
def test_drafts_of_the_right_answer_are_all_kept_under_penalties(model: Any, presence: float, frequency: float,
                                                                 temperature: float) -> None:
    base = model.generator
    prompt = model.tokenizer.encode(PROMPT, add_special_tokens=True)
    want = reference(base, prompt, N, presence, frequency, temperature=temperature, seed=4)
    gen = Generator(base.model, base.experts, model.tokenizer, speculative="draft",
                    draft=lambda: _Oracle(want, len(prompt)))
    res = gen.generate(prompt, _params("draft", presence, frequency, temperature=temperature, seed=4))
    assert res.token_ids == want
    assert res.stats.drafted > N // 2 and res.stats.accepted == res.stats.drafted, res.stats


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_seeded_sampling_with_penalties_is_the_same_in_every_mode(model: Any) -> None:
    gen = model.generator
    prompt = model.tokenizer.encode(PROMPT, add_special_tokens=True)
    presence, frequency, kw = 0.7, 0.3, {"temperature": 0.8, "top_k": 40, "seed": 11}
    want = reference(gen, prompt, N, presence, frequency, temperature=0.8, seed=11, top_k=40)
    assert want != reference(gen, prompt, N, 0.0, 0.0, temperature=0.8, seed=11, top_k=40)
    for mode in ("off", "ngram", "draft"):
        res = gen.generate(prompt, _params(mode, presence, frequency, **kw))
        assert res.token_ids == want, mode
        if mode != "off":
            assert res.stats.drafted > 0, (mode, res.stats)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_batched_conversations_each_have_their_own_counts(model: Any) -> None:
    gen = model.generator
    texts = [PROMPT, "In the beginning God created the heaven and the earth. In the beginning",
             "The LORD is my shepherd; I shall not want. The LORD is my shepherd;", PROMPT]
    prompts = [model.tokenizer.encode(t, add_special_tokens=True) for t in texts]
    setups = [("off", 1.0, 0.0), ("ngram", 0.0, 0.6), ("draft", -1.0, 1.5), ("off", 0.0, 0.0)]
    want = [reference(gen, p, N, pr, fr) for p, (_, pr, fr) in zip(prompts, setups, strict=True)]
    out: list[list[int]] = [[] for _ in prompts]
    errors: list[BaseException] = []
    started = threading.Barrier(len(prompts), timeout=60)
    gen.batcher.sizes.clear()  # (the sizes of this test's batches only)

    def talk(i: int) -> None:
        try:
            mode, presence, frequency = setups[i]
            started.wait()
            for ev in gen.stream(prompts[i], _params(mode, presence, frequency)):
                out[i].append(ev.token_id)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=talk, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert errors == []
    assert out == want
    assert max(gen.batcher.sizes) >= 2  # steps did run in shared batches


def test_verification_row_i_counts_the_drafts_before_it() -> None:
    from ekmesh.infer.sampling import Penalties

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 12, generator=g)  # [current token + 4 drafts, V]
    pen = Penalties(0.7, 0.4)
    for t in (3, 3, 9):  # generated so far
        pen.add(t)
    fed = [5, 3, 5, 11, 5]  # the current token (already generated, so counted) and four drafts
    pen.add(fed[0])
    got = pen.rows(logits, fed)
    for i in range(len(fed)):
        want = _penalised(logits[i], [3, 3, 9, *fed[:i + 1]], 0.7, 0.4)
        assert torch.allclose(got[i], want, atol=1e-6), (i, got[i] - want)
    assert torch.equal(pen.apply(logits[0]), got[0])
    assert Penalties(0.0, 0.0).rows(logits, fed) is logits  # no penalty: the very same logits


def test_penalties_outside_their_range_are_refused() -> None:
    for field in ("presence_penalty", "frequency_penalty"):
        for bad in (2.5, -2.01):
            with pytest.raises(GenerationError, match=field):
                SamplingParams(**{field: bad}).validate()
        SamplingParams(**{field: -2.0}).validate()
        SamplingParams(**{field: 2.0}).validate()


@pytest.mark.timeout(120)
def test_ekmesh_generate_takes_the_penalty_flags(model: Any) -> None:
    import json
    import subprocess
    import sys

    def generate(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ekmesh.cli", "generate", "builtin", "--prompt", PROMPT,
                               "--max-tokens", "16", "--device", "cpu", "--dtype", "fp32", "--json", *flags],
                              capture_output=True, text=True, timeout=100)

    got = generate("--presence-penalty", "1.5", "--frequency-penalty", "0.5")
    assert got.returncode == 0, got.stderr[-2000:]
    prompt = model.tokenizer.encode(PROMPT, add_special_tokens=True)
    want = model.generator.generate(prompt, SamplingParams(max_tokens=16, presence_penalty=1.5,
                                                           frequency_penalty=0.5)).token_ids
    assert json.loads(got.stdout)["token_ids"] == want
    refused = generate("--presence-penalty", "3")
    assert refused.returncode != 0 and "presence_penalty" in refused.stderr, refused.stderr[-2000:]
