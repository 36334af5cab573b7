"""Log-probabilities through the API, as evaluation tools and the official ``openai`` client read them.

A real ``ApiServer`` on 127.0.0.1 port 0 over the one-process built-in model (with its packaged draft model, so that
every speculative mode runs). Every log-prob the API returns is checked against ``log_softmax`` of
``Generator.logits`` over the same tokens (one prefill, fp32): the prompt's (``echo`` with ``max_tokens: 0``), the
generated tokens' in greedy and sampled decoding with speculative mode "off", "ngram" and "draft" (a drafted token's
come from the verification forward), chat's shape, streamed chunks, and a loglikelihood task sent exactly as
lm-evaluation-harness's ``local-completions`` model sends it and scored as it scores it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ekmesh.api import server as api
from ekmesh.api.logprobs import CompletionLogprobs, TokenTexts
from ekmesh.api.types import ServedModel, context_of
from tests.api.rawhttp import post, serving

TOL = 1e-5  # fp32: the API's log-probs against one prefill over the same tokens
PROMPT = "And God said, Let there be light: and there was light. And God said,"


class _Engine:
    def __init__(self, model: ServedModel) -> None:
        self.model = model

    def served(self) -> list[ServedModel]:
        return [self.model]

    def why_not(self) -> str:
        return ""


@pytest.fixture(scope="module")
def served() -> ServedModel:
    from ekmesh.infer.session import LocalModel
    from ekmesh.registry.lookup import open_model

    lm = LocalModel.open(open_model("builtin"), "cpu", "fp32", draft=open_model("builtin-draft"))
    return ServedModel("builtin", [], lm.generator, lm.tokenizer, context_of(lm.checkpoint.hf_config))


@pytest.fixture(scope="module")
def server(served: ServedModel) -> Iterator[api.ApiServer]:
    with serving(_Engine(served)) as srv:
        yield srv


def _model_logprobs(served: ServedModel, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1..T-1 by the model, and the log-softmax rows [T - 1, V] they come from."""
    return torch.log_softmax(served.generator.logits(ids), dim=-1)[:-1]


def _check_top(top: list[tuple[str, float]], row: torch.Tensor, names: TokenTexts, k: int) -> None:
    """``top`` (token string, log-prob) is the ``k`` most likely of ``row`` [V], most likely first."""
    assert len(top) == k
    values = [v for _, v in top]
    assert values == sorted(values, reverse=True), values
    best = torch.topk(row, k)
    assert [t for t, _ in top] == [names(i)[0] for i in best.indices.tolist()]
    assert max(abs(a - b) for a, b in zip(values, best.values.tolist(), strict=True)) <= TOL


@pytest.mark.timeout(120)
def test_echo_with_no_tokens_scores_the_prompt_as_the_model_does(client: Any, served: ServedModel) -> None:
    out = client.completions.create(model="builtin", prompt=PROMPT, max_tokens=0, echo=True, logprobs=5)
    ids = served.tokenizer.encode(PROMPT, add_special_tokens=True)
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text == PROMPT and len(lp.tokens) == len(ids)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    names = TokenTexts(served.tokenizer)
    assert lp.tokens == [names(i)[0] for i in ids] and "".join(lp.tokens) == PROMPT
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    rows = _model_logprobs(served, ids)
    want = rows.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    diff = max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want.tolist(), strict=True))
    assert diff <= TOL, f"max abs diff {diff:.2e}"
    for top, row in zip(lp.top_logprobs[1:], rows, strict=True):
        _check_top(list(top.items()), row, names, 5)


def _completion(client: Any, mode: str, extra: dict[str, Any] | None = None, **kw: Any) -> Any:
    return client.completions.create(model="builtin", prompt=PROMPT, max_tokens=40, logprobs=3, **kw,
                                     extra_body={"speculative": mode, "return_token_ids": True, "ignore_eos": True,
                                                 **(extra or {})})


@pytest.mark.timeout(240)
def test_generated_tokens_logprobs_are_the_models_in_every_speculative_mode(client: Any,
                                                                            served: ServedModel) -> None:
    prompt = served.tokenizer.encode(PROMPT, add_special_tokens=True)
    names = TokenTexts(served.tokenizer)
    answers = {}
    for mode in ("off", "ngram", "draft"):
        out = _completion(client, mode, temperature=0)
        stats, lp = out.model_extra["ekmesh"], out.choices[0].logprobs
        ids = stats["token_ids"]
        assert len(ids) == len(lp.tokens) == out.usage.completion_tokens == 40
        if mode != "off":  # drafts were verified, and some accepted: their log-probs are the verification forward's
            assert stats["accepted"] > 0, stats
        rows = _model_logprobs(served, prompt + ids)[len(prompt) - 1:]
        want = rows.gather(1, torch.tensor(ids)[:, None])[:, 0]
        diff = max(abs(a - b) for a, b in zip(lp.token_logprobs, want.tolist(), strict=True))
        assert diff <= TOL, f"{mode}: max abs diff {diff:.2e}"
        for token, top, row in zip(ids, lp.top_logprobs, rows, strict=True):
            _check_top(list(top.items()), row, names, 3)
            assert next(iter(top)) == names(token)[0]  # greedy: the most likely token
        answers[mode] = (ids, lp.token_logprobs)
    assert answers["ngram"][0] == answers["draft"][0] == answers["off"][0]
    plain = client.completions.create(model="builtin", prompt=PROMPT, max_tokens=40, temperature=0,
                                      extra_body={"return_token_ids": True, "ignore_eos": True})
    assert plain.choices[0].logprobs is None  # none asked for, none computed
    assert plain.model_extra["ekmesh"]["token_ids"] == answers["off"][0]  # asking for log-probs changes no token
    for mode in ("ngram", "draft"):
        diff = max(abs(a - b) for a, b in zip(answers[mode][1], answers["off"][1], strict=True))
        assert diff <= TOL, f"{mode} vs off: max abs diff {diff:.2e}"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["ngram", "draft"])
def test_sampled_tokens_logprobs_are_the_models_distribution_before_temperature(client: Any, served: ServedModel,
                                                                               mode: str) -> None:
    # speculative sampling: a token drawn at a rejection has the logits of the rejected position
    prompt = served.tokenizer.encode(PROMPT, add_special_tokens=True)
    out = _completion(client, mode, {"top_k": 50}, temperature=0.7, seed=3)
    ids, lp = out.model_extra["ekmesh"]["token_ids"], out.choices[0].logprobs
    assert out.model_extra["ekmesh"]["drafted"] > 0
    rows = _model_logprobs(served, prompt + ids)[len(prompt) - 1:]
    want = rows.gather(1, torch.tensor(ids)[:, None])[:, 0]
    diff = max(abs(a - b) for a, b in zip(lp.token_logprobs, want.tolist(), strict=True))
    assert diff <= TOL, f"max abs diff {diff:.2e}"


@pytest.mark.timeout(120)
def test_chat_logprobs_through_the_openai_client_streamed_and_not(client: Any, served: ServedModel) -> None:
    messages = [{"role": "user", "content": "Genesis 1"}]
    out = client.chat.completions.create(model="builtin", messages=messages, max_tokens=30, temperature=0,
                                         logprobs=True, top_logprobs=4, extra_body={"return_token_ids": True})
    choice, ids = out.choices[0], out.model_extra["ekmesh"]["token_ids"]
    content = choice.logprobs.content
    assert len(content) == len(ids) == out.usage.completion_tokens  # (a final stop id is not part of the answer)
    assert b"".join(bytes(c.bytes) for c in content).decode() == choice.message.content
    prompt = served.tokenizer.encode_chat(messages, add_generation_prompt=True)
    rows = _model_logprobs(served, prompt + ids)[len(prompt) - 1:]
    names = TokenTexts(served.tokenizer)
    for c, token, row in zip(content, ids, rows, strict=True):
        assert c.token == names(token)[0] and abs(c.logprob - float(row[token])) <= TOL
        _check_top([(t.token, t.logprob) for t in c.top_logprobs], row, names, 4)
        assert all(bytes(t.bytes) == names(i)[1] for t, i in zip(c.top_logprobs, torch.topk(row, 4).indices.tolist(),
                                                                  strict=True))

    streamed = []
    for chunk in client.chat.completions.create(model="builtin", messages=messages, max_tokens=30, temperature=0,
                                                logprobs=True, top_logprobs=4, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert [(c.token, c.bytes) for c in streamed] == [(c.token, c.bytes) for c in content]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(streamed, content, strict=True)) <= TOL


@pytest.mark.timeout(120)
def test_a_streamed_completion_carries_the_same_logprobs_in_pieces(server: api.ApiServer) -> None:
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "echo": True, "logprobs": 2}
    whole = post(server, "/v1/completions", body)
    assert whole.status == 200
    want = whole.json()["choices"][0]
    streamed = post(server, "/v1/completions", {**body, "stream": True})
    assert streamed.status == 200
    got: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    text = ""
    for chunk in streamed.events():
        c = chunk["choices"][0]
        text += c["text"]
        for key in got:
            got[key] += (c["logprobs"] or {}).get(key, [])
    assert text == want["text"] and text.startswith(PROMPT)
    assert got["tokens"] == want["logprobs"]["tokens"] and got["text_offset"] == want["logprobs"]["text_offset"]
    assert [text[o:o + len(t)] for o, t in zip(got["text_offset"], got["tokens"], strict=True)] == got["tokens"]
    pairs = zip(got["token_logprobs"][1:], want["logprobs"]["token_logprobs"][1:], strict=True)
    assert max(abs(a - b) for a, b in pairs) <= TOL


# -- a loglikelihood task, as lm-evaluation-harness's ``local-completions`` model runs it -------------------------

# (context, [choices], index of the right one): KJV verses, each with the verse's own ending and three others
TASK = [
    ("In the beginning God created", [" the heaven and the earth.", " a great fish.", " the sons of Levi.",
                                      " bread and wine."], 0),
    ("The LORD is my shepherd;", [" he shall judge the people.", " I shall not want.", " the sea roared.",
                                  " and it was so."], 1),
    ("And God said, Let there be light:", [" and he died.", " for ever and ever.", " and there was light.",
                                           " and the king wept."], 2),
    ("For God so loved the world,", [" and the cattle.", " that he gave his only begotten Son,",
                                     " upon the mountains.", " the gold of Ophir."], 1),
    ("Jesus wept.", [" Then said the Jews, Behold how he loved him!", " And the earth was without form.",
                     " Ten cubits.", " Selah."], 0),
    ("And the earth was without form, and void;", [" and the asses.", " of the tribe of Judah.",
                                                    " and darkness was upon the face of the deep.",
                                                    " he shall be cut off."], 2),
    ("Blessed are the meek:", [" for they shall inherit the earth.", " and Esau.", " in the wilderness of Sin.",
                               " unto this day."], 0),
    ("Thou shalt not", [" a great nation.", " kill.", " the children of Israel.", " from heaven."], 1),
    ("Honour thy father", [" of the house.", " in the land of Egypt.", " and thy mother.", " unto the Levites."], 2),
    ("In my Father's house are many", [" mansions:", " camels.", " swords.", " waters."], 0),
]


def _lm_eval_request(ctx: list[int], cont: list[int]) -> dict[str, Any]:
    # lm_eval/models/openai_completions.py, LocalCompletionsAPI._create_payload(generate=False)
    return {"model": "builtin", "prompt": [ctx + cont], "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}


def _lm_eval_parse(answer: dict[str, Any], ctxlen: int) -> tuple[float, bool]:
    # LocalCompletionsAPI.parse_logprobs: the continuation's log-probs, and whether each was the most likely
    choice = answer["choices"][0]
    logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    return sum(logprobs), all(lp == max(top.values()) for lp, top in zip(logprobs, tops, strict=True))


@pytest.mark.timeout(240)
def test_a_loglikelihood_task_as_lm_eval_sends_it(server: api.ApiServer, served: ServedModel) -> None:
    tok = served.tokenizer
    right_api = right_model = 0
    for context, choices, gold in TASK:
        ctx = tok.encode(context, add_special_tokens=True)
        scores_api, scores_model = [], []
        for cont_text in choices:
            cont = tok.encode(context + cont_text)[len(ctx):]  # lm-eval splits the pair's tokens at the context's end
            reply = post(server, "/v1/completions", _lm_eval_request(ctx, cont))
            assert reply.status == 200, reply.body[:300]
            answer = reply.json()
            assert len(answer["choices"][0]["logprobs"]["tokens"]) == len(ctx) + len(cont) + 1  # echo + 1 token
            ll, greedy = _lm_eval_parse(answer, len(ctx))
            rows = _model_logprobs(served, ctx + cont)[len(ctx) - 1:]
            want = float(rows.gather(1, torch.tensor(cont)[:, None]).sum())
            assert abs(ll - want) <= TOL * len(cont), (context, cont_text, ll, want)
            assert greedy == bool((rows.argmax(-1) == torch.tensor(cont)).all())
            scores_api.append(ll)
            scores_model.append(want)
        right_api += max(range(len(choices)), key=scores_api.__getitem__) == gold
        right_model += max(range(len(choices)), key=scores_model.__getitem__) == gold
    assert right_api == right_model
    assert right_api > len(TASK) // 4, f"accuracy {right_api}/{len(TASK)} is not above chance (1/4)"


# -- token strings -------------------------------------------------------------------------------------------

def test_token_bytes_join_into_the_text_when_tokens_split_characters(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from ekmesh.infer.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["the water of life", "the light of the world"] * 20  # no multi-byte character merges: they split
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    text = "the light — 光 of life"
    ids = tok.encode(text)
    names = TokenTexts(tok)
    parts = [names(i) for i in ids]
    assert b"".join(raw for _, raw in parts) == text.encode()
    assert any(s.startswith("bytes:\\x") for s, _ in parts), parts  # a piece of a character: OpenAI's convention
    assert all(s.encode() == raw for s, raw in parts if not s.startswith("bytes:"))
    block = CompletionLogprobs(names).block([(i, None, None) for i in ids])
    # text_offset: where each token's first character is; a token that only continues a character has its offset
    starts = [text.encode()[:sum(len(raw) for _, raw in parts[:k])].decode(errors="ignore") for k in range(len(ids))]
    assert block["text_offset"] == [len(s) for s in starts]
