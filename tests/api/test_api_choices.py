"""Requests of several choices and fields real clients send, through the official ``openai`` client: ``n`` choices
(reproducible with a seed, choice i sampling with seed + i; usage added up; streamed chunks carrying their
``index``), a batch of prompts, ``stop`` as a list, and the fields ekmesh refuses (tools, response formats,
``logit_bias``, ``suffix``, ``best_of``) answered 400 with OpenAI's error shape naming the field.

A real ``ApiServer`` on 127.0.0.1 port 0 over the one-process built-in model.
"""

from __future__ import annotations

import http.client
import json
from typing import Any

import pytest

from ekmesh.api import local
from ekmesh.api import server as api
from tests.api.rawhttp import post

PROMPT = "In the beginning"
CHAT = [{"role": "user", "content": "Psalms 23"}]


def _post(srv: api.ApiServer, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """(status, the answer's JSON, or a stream's events)."""
    answer = post(srv, path, body)
    return answer.status, answer.events() if body.get("stream") and answer.status == 200 else answer.json()


def _sampled(client: Any, n: int, seed: int) -> Any:
    return client.completions.create(model="builtin", prompt=PROMPT, max_tokens=12, temperature=1.0, n=n, seed=seed,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})


@pytest.mark.timeout(120)
def test_n_choices_with_a_seed_are_reproducible_and_usage_adds_them_up(client: Any,
                                                                        builtin_engine: local.LocalEngine) -> None:
    first, again = _sampled(client, 3, 11), _sampled(client, 3, 11)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in again.choices] == texts
    assert len(set(texts)) > 1, texts  # each choice is its own generation
    # choice i samples with seed + i: it is the answer of one choice with that seed
    assert texts == [_sampled(client, 1, 11 + i).choices[0].text for i in range(3)]
    prompt = builtin_engine.model.tokenizer.encode(PROMPT, add_special_tokens=True)
    assert first.usage.prompt_tokens == len(prompt)  # the prompt once: OpenAI's count
    assert first.usage.completion_tokens == 3 * 12 == sum(len(c.model_extra["token_ids"]) for c in first.choices)
    assert first.usage.total_tokens == len(prompt) + 36
    assert first.model_extra["ekmesh"]["tokens"] == 36

    chat = [client.chat.completions.create(model="builtin", messages=CHAT, max_tokens=10, temperature=1.0, n=3,
                                           seed=5, extra_body={"return_token_ids": True}) for _ in range(2)]
    assert [c.index for c in chat[0].choices] == [0, 1, 2]
    assert [c.message.content for c in chat[0].choices] == [c.message.content for c in chat[1].choices]
    assert chat[0].usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in chat[0].choices)


@pytest.mark.timeout(120)
def test_streamed_choices_carry_their_index(server: api.ApiServer, client: Any) -> None:
    whole = _sampled(client, 3, 21)
    status, chunks = _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0,
                                                       "n": 3, "seed": 21, "ignore_eos": True, "stream": True})
    assert status == 200
    texts, finishes = {0: "", 1: "", 2: ""}, {0: [], 1: [], 2: []}
    for chunk in chunks:
        (c,) = chunk["choices"]
        texts[c["index"]] += c["text"]
        if c["finish_reason"]:
            finishes[c["index"]].append(c["finish_reason"])
    assert [texts[i] for i in range(3)] == [c.text for c in whole.choices]
    assert finishes == {0: ["length"], 1: ["length"], 2: ["length"]}
    assert chunks[-1]["ekmesh"]["tokens"] == 36  # the last chunk of all carries the answer's statistics

    parts: dict[int, str] = {}
    roles = set()
    for chunk in client.chat.completions.create(model="builtin", messages=CHAT, max_tokens=8, temperature=0, n=2,
                                                stream=True):
        for c in chunk.choices:
            parts[c.index] = parts.get(c.index, "") + (c.delta.content or "")
            if c.delta.role:
                roles.add(c.index)
    assert roles == {0, 1} and parts[0] == parts[1]  # greedy: both choices alike


@pytest.mark.timeout(120)
def test_a_batch_of_prompts_answers_each_prompt_n_times_in_order(server: api.ApiServer) -> None:
    prompts = ["In the beginning", "The LORD is my shepherd"]
    status, out = _post(server, "/v1/completions", {"prompt": prompts, "n": 2, "max_tokens": 6, "temperature": 0})
    assert status == 200
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    alone = [_post(server, "/v1/completions", {"prompt": p, "max_tokens": 6, "temperature": 0})[1] for p in prompts]
    assert [c["text"] for c in out["choices"]] == [alone[0]["choices"][0]["text"]] * 2 + \
        [alone[1]["choices"][0]["text"]] * 2
    assert out["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    assert out["usage"]["completion_tokens"] == 2 * sum(a["usage"]["completion_tokens"] for a in alone)
    # more choices than the node answers at once can never be served: a bad request, not "busy"
    status, out = _post(server, "/v1/completions", {"prompt": [PROMPT] * 3, "n": 8, "max_tokens": 1})
    assert status == 400 and out["error"]["param"] == "n", out
    assert _post(server, "/v1/completions", {"prompt": PROMPT, "n": 9})[1]["error"]["param"] == "n"


@pytest.mark.timeout(120)
def test_stop_as_a_list_ends_at_the_first_of_them(client: Any) -> None:
    free = client.completions.create(model="builtin", prompt=PROMPT, max_tokens=40, temperature=0).choices[0].text
    words = free.split()
    early, late = words[3], words[-2]  # two strings the free answer has: it ends before the first that occurs
    cut = min(free.index(early), free.index(late))
    out = client.completions.create(model="builtin", prompt=PROMPT, max_tokens=40, temperature=0,
                                    stop=[late, early])
    assert out.choices[0].text == free[:cut] and out.choices[0].finish_reason == "stop", (free, early, late)
    chat = client.chat.completions.create(model="builtin", messages=CHAT, max_tokens=40, temperature=0)
    text = chat.choices[0].message.content
    stop = text.split()[2]
    out2 = client.chat.completions.create(model="builtin", messages=CHAT, max_tokens=40, temperature=0,
                                          stop=["\u2603", stop])
    assert out2.choices[0].message.content == text[:text.index(stop)]


REFUSED = [
    ("chat", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("chat", "tool_choice", "auto"),
    ("chat", "functions", [{"name": "f", "parameters": {}}]),
    ("chat", "function_call", "auto"),
    ("chat", "response_format", {"type": "json_object"}),
    ("chat", "logit_bias", {"5": 10}),
    ("completions", "logit_bias", {"5": -100}),
    ("completions", "suffix", " amen"),
    ("completions", "best_of", 2),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("endpoint", "field", "value"), REFUSED, ids=[f"{e}-{f}" for e, f, _ in REFUSED])
def test_unsupported_fields_are_refused_naming_the_field(client: Any, endpoint: str, field: str, value: Any) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "chat":
            client.chat.completions.create(model="builtin", messages=CHAT, max_tokens=2, extra_body={field: value})
        else:
            client.completions.create(model="builtin", prompt=PROMPT, max_tokens=2, extra_body={field: value})
    err = info.value
    assert err.status_code == 400 and err.type == "invalid_request_error" and err.param == field, err.body
    assert f"'{field}' is not supported" in err.message


@pytest.mark.timeout(60)
def test_fields_that_ask_for_nothing_unsupported_are_accepted(server: api.ApiServer) -> None:
    harmless = {"response_format": {"type": "text"}, "logit_bias": {}, "tools": [], "tool_choice": "none",
                "best_of": 1}
    status, out = _post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, **harmless})
    assert status == 200 and out["usage"]["completion_tokens"] >= 1, out
    status, out = _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "suffix": None,
                                                    "best_of": 1})
    assert status == 200 and out["usage"]["completion_tokens"] >= 1, out


BAD_LOGPROBS = [
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
    ("/v1/completions", {"echo": "yes"}, "echo"),
    ("/v1/chat/completions", {"logprobs": 2}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("path", "fields", "param"), BAD_LOGPROBS, ids=[str(f) for _, f, _ in BAD_LOGPROBS])
def test_malformed_logprob_fields_are_bad_requests(server: api.ApiServer, path: str, fields: dict[str, Any],
                                                   param: str) -> None:
    body = {"prompt": PROMPT, "messages": CHAT, "max_tokens": 2, **fields}
    status, out = _post(server, path, body)
    assert status == 400 and out["error"]["param"] == param, out


@pytest.mark.timeout(120)
def test_a_client_that_leaves_stops_every_choice_and_frees_their_slots(builtin_engine: local.LocalEngine) -> None:
    import threading

    from tests.discovery.meshproc import wait_until

    srv = api.ApiServer(builtin_engine, port=0, max_active=2).start()
    try:
        host, port = srv.server_address[:2]
        c = http.client.HTTPConnection(str(host), int(port), timeout=60)
        c.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "n": 2, "max_tokens": 2000, "stream": True,
                                                         "ignore_eos": True, "temperature": 0}).encode(),
                  {"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")  # both choices are generating
        assert any(t.name.startswith("ekmesh-api-choice-") for t in threading.enumerate())
        assert _post(srv, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1})[0] == 429  # their 2 slots taken
        r.close()
        c.close()  # the client leaves mid-answer

        def stopped() -> bool:
            return not any(t.name.startswith("ekmesh-api-choice-") for t in threading.enumerate())

        wait_until(stopped, 60, "the choices' threads to end once their client left")
        wait_until(lambda: _post(srv, "/v1/completions", {"prompt": PROMPT, "n": 2, "max_tokens": 1})[0] == 200, 30,
                   "both slots to be free again")
    finally:
        srv.stop()
