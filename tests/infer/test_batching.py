"""Batched decoding: ``CausalLM.forward_many`` and the ``StepBatcher`` behind concurrent conversations.

- one forward over several sequences, each continuing its own cache (a fresh prompt, one decode token, a token with
  drafts), gives every sequence the logits it gets alone (1e-5 in fp32), for every family, and leaves each cache as
  a forward of its own would (the next step agrees too);
- conversations of different lengths that start at different times, decoded on their own threads, are batched
  (batches of several seen) and each gives the tokens it gives alone, greedy and with drafts; an error in a batch
  reaches every conversation in it.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from ekmesh.core.errors import ExpertUnavailableError
from ekmesh.infer.generate import Generator, SamplingParams
from ekmesh.infer.loader import load_all
from tests.families import BUILDERS
from tests.tiny_models import make_tiny


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_forward_many_equals_forwards_alone(arch: str, tmp_path) -> None:
    path, _ = BUILDERS[arch](tmp_path / arch)
    _, model, experts = load_all(path)
    g = torch.Generator().manual_seed(5)
    vocab = model.config.vocab_size

    def ids(n: int) -> torch.Tensor:
        return torch.randint(0, vocab, (1, n), generator=g)

    histories, news = [ids(0), ids(7), ids(11)], [ids(5), ids(1), ids(4)]
    with torch.inference_mode():
        alone, together = [], []
        for hist, new in zip(histories, news, strict=True):
            c = model.new_cache()
            if hist.shape[1]:
                model(hist, c, experts)
            alone.append((model(new, c, experts)[0], c))
            c2 = model.new_cache()
            if hist.shape[1]:
                model(hist, c2, experts)
            together.append(c2)
        outs = model.forward_many([(new, c) for new, c in zip(news, together, strict=True)], experts)
        diff = max((a - b).abs().max().item() for (a, _), b in zip(alone, outs, strict=True))
        nxt = ids(1)
        step_diff = max((model(nxt, ca, experts) - model(nxt, cb, experts)).abs().max().item()
                        for (_, ca), cb in zip(alone, together, strict=True))
    print(f"{arch}: max |batched - alone| = {diff:.3g}, next step {step_diff:.3g}")
    assert diff <= 1e-5 and step_diff <= 1e-5
    last = model.forward_many([(ids(3), model.new_cache()), (ids(2), model.new_cache())], experts, [True, False])
    assert [o.shape[0] for o in last] == [1, 2]


def _run(gen: Generator, prompts: list[list[int]], lengths: list[int], speculative: str,
         stagger: list[int]) -> tuple[list[list[int]], list[BaseException]]:
    """Each conversation on its own thread; conversation i starts once conversation 0 has produced stagger[i]
    tokens (so they join at different steps); returns each one's tokens and the errors raised."""
    out: list[list[int]] = [[] for _ in prompts]
    progress = threading.Condition()
    errors: list[BaseException] = []

    def talk(i: int) -> None:
        try:
            if stagger[i]:
                with progress:
                    progress.wait_for(lambda: len(out[0]) >= stagger[i] or bool(errors), timeout=60)
            params = SamplingParams(max_tokens=lengths[i], stop_ids=frozenset(), speculative=speculative)
            for ev in gen.stream(prompts[i], params):
                with progress:
                    out[i].append(ev.token_id)
                    progress.notify_all()
        except BaseException as exc:  # reported by the test
            errors.append(exc)
            with progress:
                progress.notify_all()

    threads = [threading.Thread(target=talk, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out, errors


@pytest.mark.timeout(300)
@pytest.mark.parametrize("speculative", ["off", "ngram"])
def test_concurrent_conversations_are_batched_and_each_equals_alone(tmp_path, speculative: str) -> None:
    path, _ = make_tiny("qwen3_moe", tmp_path / "m")
    _, model, experts = load_all(path)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (6, 11, 3, 17)]
    prompts = [p + p[:5] for p in prompts]  # (repeats: prompt lookup has drafts to offer)
    lengths, stagger = [60, 25, 40, 12], [0, 0, 5, 20]
    alone = [Generator(model, experts).generate(p, SamplingParams(max_tokens=n, stop_ids=frozenset())).token_ids
             for p, n in zip(prompts, lengths, strict=True)]
    gen = Generator(model, experts, speculative=speculative)
    got, errors = _run(gen, prompts, lengths, speculative, stagger)
    assert errors == []
    st = gen.batcher.status()
    print(f"{speculative}: batches {st}")
    assert got == alone
    assert st["max_batch"] >= 2 and st["active"] == 0


def test_an_error_in_a_batch_reaches_every_conversation(tmp_path) -> None:
    path, _ = make_tiny("qwen3_moe", tmp_path / "m")
    _, model, experts = load_all(path)
    calls = [0]

    def failing(layer: int, hidden: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> Any:
        calls[0] += 1
        if hidden.shape[0] >= 2 and calls[0] > 40:  # a batched decode step, after the prefills
            raise ExpertUnavailableError(layer, int(ids[0, 0]), "every holder failed")
        return experts(layer, hidden, ids, w)

    gen = Generator(model, failing)
    _, errors = _run(gen, [[1, 2, 3], [4, 5, 6, 7]], [200, 200], "off", [0, 0])
    assert len(errors) == 2 and all(isinstance(e, ExpertUnavailableError) for e in errors), errors
    assert gen.batcher.active == 0
