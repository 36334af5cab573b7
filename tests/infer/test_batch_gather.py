"""The step batcher gathers the steps of every conversation decoding now before it runs a batch.

Without the gathering window, the first conversation to finish sampling after a batch led the next one alone or with
a few others (8 threads on the built-in model: batches of 3.0 on average), so batched decoding paid nearly as many
forwards (and, on a mesh, round trips per MoE layer) as conversations one by one. With a window longer than the test
can take, every batch once all conversations decode holds all of them; the window closes as soon as they are in, so
the test takes no longer for it. Prefills go through the batcher too (conversations that start together share them).

A draft model's forwards are batched the same way across the answers drafting at the same moment (its own batcher,
which waits only for answers inside ``propose``); each answer stays what it is alone.
"""

from __future__ import annotations

import threading

import pytest
import torch

from ekmesh.infer.batching import StepBatcher
from ekmesh.infer.generate import Generator, SamplingParams
from ekmesh.infer.loader import load_all
from ekmesh.infer.speculative import ModelDrafter
from tests.tiny_models import make_tiny, make_tiny_dense


def _together(gen: Generator, prompts: list[list[int]], length: int) -> list[list[int]]:
    """Each prompt answered on its own thread, all started at once."""
    n = len(prompts)
    start = threading.Barrier(n)
    got: list[list[int]] = [[] for _ in range(n)]
    errors: list[BaseException] = []

    def talk(i: int) -> None:
        try:
            start.wait(30)
            params = SamplingParams(max_tokens=length, stop_ids=frozenset())
            got[i] = [ev.token_id for ev in gen.stream(prompts[i], params)]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=talk, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert errors == []
    return got


@pytest.mark.timeout(120)
def test_a_batch_holds_every_conversation_decoding_now(tmp_path) -> None:
    path, _ = make_tiny("qwen3_moe", tmp_path / "m")
    _, model, experts = load_all(path)
    g = torch.Generator().manual_seed(3)
    n, length = 4, 30
    prompts = [torch.randint(0, 96, (5 + 3 * i,), generator=g).tolist() for i in range(n)]
    alone = [Generator(model, experts).generate(p, SamplingParams(max_tokens=length, stop_ids=frozenset())).token_ids
             for p in prompts]
    gen = Generator(model, experts)
    gen.batcher = StepBatcher(model, experts, max_batch=n, gather_s=60.0)
    assert _together(gen, prompts, length) == alone
    sizes = list(gen.batcher.sizes)
    print(f"batch sizes: {sizes}")
    # each conversation makes a prefill and length - 1 decode steps; batched fully that is length batches, plus the
    # few a conversation ran before the others had joined (a leader waits only for conversations that joined)
    assert sum(sizes) == n * length
    assert len(sizes) <= length + n, sizes
    assert sizes.count(n) >= length - n, sizes


@pytest.mark.timeout(120)
def test_draft_model_forwards_of_concurrent_answers_are_batched(tmp_path) -> None:
    path, _ = make_tiny("qwen3_moe", tmp_path / "m")
    _, model, experts = load_all(path)
    dpath, _ = make_tiny_dense(tmp_path / "draft", vocab_size=model.config.vocab_size + 32)
    _, dmodel, _ = load_all(dpath)
    g = torch.Generator().manual_seed(4)
    n, length = 4, 24
    prompts = [torch.randint(0, 96, (6 + 2 * i,), generator=g).tolist() for i in range(n)]
    alone = [Generator(model, experts).generate(p, SamplingParams(max_tokens=length, stop_ids=frozenset())).token_ids
             for p in prompts]
    drafts = StepBatcher(dmodel, None, gather_s=60.0)
    gen = Generator(model, experts, speculative="draft", draft=lambda: ModelDrafter(dmodel, None, None, drafts))
    assert _together(gen, prompts, length) == alone
    sizes = list(drafts.sizes)
    print(f"draft batch sizes: {sizes}")
    assert max(sizes) >= 2 and drafts.active == 0, sizes
