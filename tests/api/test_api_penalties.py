"""``presence_penalty`` and ``frequency_penalty`` through the API and the official ``openai`` client.

A real ``ApiServer`` on 127.0.0.1 port 0 over the one-process built-in model: the client's penalties reach decoding
(the answer is the in-process generator's with the same penalties, and not the unpenalised one), the log-probs the
answer carries stay the unpenalised model's, and a penalty outside [-2, 2] or not a number is a 400 naming the field.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest
import torch

from ekmesh.api import local
from ekmesh.infer.generate import SamplingParams

PROMPT = "And God said, Let there be light: and there was light. And God said,"
TOL = 1e-5


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["off", "ngram"])
def test_the_openai_client_passes_penalties_through(client: Any, builtin_engine: local.LocalEngine,
                                                    mode: str) -> None:
    served = builtin_engine.model
    prompt = served.tokenizer.encode(PROMPT, add_special_tokens=True)
    extra = {"return_token_ids": True, "ignore_eos": True, "speculative": mode}
    out = client.completions.create(model="builtin", prompt=PROMPT, max_tokens=30, temperature=0, logprobs=1,
                                    presence_penalty=0.9, frequency_penalty=0.5, extra_body=extra)
    ids = out.model_extra["ekmesh"]["token_ids"]
    want = served.generator.generate(prompt, SamplingParams(max_tokens=30, stop_ids=frozenset(),
                                                            presence_penalty=0.9, frequency_penalty=0.5)).token_ids
    plain = served.generator.generate(prompt, SamplingParams(max_tokens=30, stop_ids=frozenset())).token_ids
    assert ids == want and ids != plain
    # the log-probs are the model's own (unpenalised): one prefill over the same tokens
    rows = torch.log_softmax(served.generator.logits(prompt + ids), dim=-1)[len(prompt) - 1:-1]
    model = rows.gather(1, torch.tensor(ids)[:, None])[:, 0].tolist()
    diff = max(abs(a - b) for a, b in zip(out.choices[0].logprobs.token_logprobs, model, strict=True))
    assert diff <= TOL, f"max abs diff {diff:.2e}"

    chat = client.chat.completions.create(model="builtin", messages=[{"role": "user", "content": "Genesis 1"}],
                                          max_tokens=30, temperature=0, presence_penalty=-2, frequency_penalty=2,
                                          extra_body=extra)
    chat_prompt = served.tokenizer.encode_chat([{"role": "user", "content": "Genesis 1"}],
                                               add_generation_prompt=True)
    want = served.generator.generate(chat_prompt, SamplingParams(max_tokens=30, stop_ids=frozenset(),
                                                                 presence_penalty=-2, frequency_penalty=2)).token_ids
    assert chat.model_extra["ekmesh"]["token_ids"] == want


@pytest.mark.timeout(60)
@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [2.5, -2.01, "1"])
def test_a_penalty_outside_its_range_is_a_400_naming_it(client: Any, field: str, value: Any) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="builtin", prompt=PROMPT, max_tokens=2, extra_body={field: value})
    assert refused.value.status_code == 400
    body = refused.value.body
    assert isinstance(body, dict) and body.get("param") == field, body
    assert field in body["message"]
