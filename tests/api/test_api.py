"""The OpenAI-compatible API of real nodes serving the built-in model, through the official ``openai`` client.

Three ``ekmesh join --model builtin`` processes (R = 2; the third with ``--no-attention``). Every answer is checked
token for token against the same request run in this process on the one-process model (greedy), so the mesh is
exact through the API too; streaming and not, chat and text completions, two streamed conversations that overlap
(each has received a token before either ends), the error answers (unknown model, bad parameters, a node that does
not host attention, a node that serves no model).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from tests.discovery.meshproc import NodeProc
from tests.node.servingmesh import BASE, ServingMesh, post

PROMPTS = ["Genesis 1", "Psalms 23", "The LORD is my shepherd"]


@pytest.fixture(scope="module")
def reference() -> Any:
    from ekmesh.infer.generate import SamplingParams
    from ekmesh.infer.session import LocalModel
    from ekmesh.registry.lookup import open_model

    lm = LocalModel.open(open_model("builtin"), "cpu", "fp32")

    def answer(text: str, n: int, chat: bool = True) -> str:
        ids = lm.encode_prompt(text, chat=chat)
        return lm.generator.generate(ids, SamplingParams(max_tokens=n)).text

    return answer


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_openai_client_against_a_three_node_mesh(tmp_path: Path, reference: Any) -> None:
    import openai

    with ServingMesh(tmp_path, "builtin", [[], [], ["--no-attention"]], extra=["--replicas", "2"]) as mesh:
        snap = mesh.wait_ready(0, holders=2)
        assert snap["serving"]["state"] == "serving" and snap["serving"]["missing_experts"] == 0
        per_peer = snap["models"][snap["serving"]["model"]]["per_peer"]
        assert len(per_peer) == 3 and max(per_peer.values()) < 8 * 12, per_peer  # nobody holds all 96
        client = openai.OpenAI(base_url=mesh.api(0), api_key="unused", max_retries=0, timeout=60)

        models = client.models.list().data
        assert [m.id for m in models] == [snap["serving"]["model"]]
        assert models[0].model_extra["aliases"] == ["builtin"]

        # chat, not streamed: equal to the one-process answer, and remote peers were used
        r = client.chat.completions.create(model="builtin", messages=[{"role": "user", "content": PROMPTS[0]}],
                                           max_tokens=24, temperature=0)
        assert r.choices[0].message.content == reference(PROMPTS[0], 24)
        assert r.choices[0].finish_reason in ("length", "stop")
        assert r.usage.completion_tokens == 24 or r.choices[0].finish_reason == "stop"
        stats = r.model_extra["ekmesh"]
        assert stats["peers"] and stats["mean_layer_rtt_ms"] > 0, stats

        # chat, streamed, with the usage chunk: the deltas add up to the same text
        parts, usage = [], None
        stream = client.chat.completions.create(model=snap["serving"]["model"][:20],
                                                messages=[{"role": "user", "content": PROMPTS[1]}],
                                                max_tokens=20, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = chunk
        assert "".join(parts) == reference(PROMPTS[1], 20)
        assert usage is not None and usage.model_extra["ekmesh"]["tokens"] == usage.usage.completion_tokens

        # text completion, streamed and not
        c = client.completions.create(model="builtin", prompt=PROMPTS[2], max_tokens=16, temperature=0)
        assert c.choices[0].text == reference(PROMPTS[2], 16, chat=False)
        streamed = "".join(ch.choices[0].text for ch in client.completions.create(
            model="builtin", prompt=PROMPTS[2], max_tokens=16, temperature=0, stream=True) if ch.choices)
        assert streamed == c.choices[0].text

        # two conversations at once on one attention host, streamed: the second starts once the first has sent a
        # token, and sends one of its own before the first ends (one after the other, it would send none before)
        _two_conversations_at_once(client, reference)

        # sampling with a seed is reproducible
        def sampled() -> str:
            out = client.chat.completions.create(messages=[{"role": "user", "content": PROMPTS[0]}],
                                                 model="builtin", max_tokens=16, temperature=0.8, seed=7)
            return out.choices[0].message.content or ""
        assert sampled() == sampled()

        # errors, with OpenAI's error shape
        with pytest.raises(openai.NotFoundError, match="is not served here"):
            client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError, match="'temperature' must be in"):
            client.chat.completions.create(model="builtin", messages=[{"role": "user", "content": "hi"}],
                                           temperature=5)
        with pytest.raises(openai.BadRequestError, match="'messages' must be a non-empty list"):
            client.chat.completions.create(model="builtin", messages=[])
        with pytest.raises(openai.BadRequestError, match="context is 2048"):
            client.completions.create(model="builtin", prompt=[1] * 2048, max_tokens=1)
        no_attention = openai.OpenAI(base_url=mesh.api(2), api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError, match="--no-attention") as info:
            no_attention.chat.completions.create(model="builtin", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 503
        assert no_attention.models.list().data == []

        # token ids in and out (what tokenizer-less models use)
        ids = post(mesh.api(0) + "/completions", {"prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0,
                                                  "return_token_ids": True, "ignore_eos": True})
        assert len(ids["ekmesh"]["token_ids"]) == 8 and ids["usage"]["completion_tokens"] == 8


def _two_conversations_at_once(client: Any, reference: Any) -> None:
    """Two streamed chats on one host, each equal to the one-process answer, that overlap as the client sees them:
    both have received a token before either has ended."""
    lengths = {0: 96, 1: 16}  # the first is long enough to still be streaming while the second starts
    events: list[tuple[int, str]] = []  # (conversation, "token" | "end"), in the order the client received them
    lock, first_token = threading.Lock(), threading.Event()
    texts: dict[int, str] = {}

    def converse(i: int) -> None:
        parts: list[str] = []
        for chunk in client.chat.completions.create(messages=[{"role": "user", "content": PROMPTS[i]}],
                                                    model="builtin", max_tokens=lengths[i], temperature=0,
                                                    stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
                with lock:
                    events.append((i, "token"))
                first_token.set()
        with lock:
            events.append((i, "end"))
        texts[i] = "".join(parts)

    threads = {i: threading.Thread(target=converse, args=(i,), daemon=True) for i in (0, 1)}
    threads[0].start()
    assert first_token.wait(60), "the first conversation sent no token"
    threads[1].start()
    for t in threads.values():
        t.join(timeout=120)
    assert texts == {i: reference(PROMPTS[i], n) for i, n in lengths.items()}, events
    started = max(events.index((i, "token")) for i in (0, 1))
    assert started < min(events.index((i, "end")) for i in (0, 1)), f"the conversations did not overlap: {events}"


@pytest.mark.timeout(60)
def test_a_node_without_a_model_answers_503_with_a_hint(tmp_path: Path) -> None:
    import openai

    node = NodeProc(tmp_path / "solo", *BASE)
    try:
        client = openai.OpenAI(base_url=node.hello["api_url"], api_key="unused", max_retries=0, timeout=30)
        assert client.models.list().data == []
        with pytest.raises(openai.APIStatusError, match="start it with `ekmesh join --model ID`") as info:
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 503
        with pytest.raises(openai.NotFoundError, match="no such endpoint"):
            client.embeddings.create(model="x", input="hi")
        from ekmesh.discovery.control import read_control_file
        assert read_control_file(node.home)["api_url"] == node.hello["api_url"]
    finally:
        assert node.stop() == 0
