"""An OpenAI request body, parsed and validated into what the server runs (``Request``): the prompts as token ids,
the sampling parameters, how many choices, and what log-probs to return.

Role: every check of a body's fields happens here, before any generation starts; ``api.server`` runs and answers.
Not responsible for HTTP or for generation.

Invariants:
- A field that asks for something ekmesh does not do is refused, never ignored: ``UNSUPPORTED`` (tools, functions,
  a ``response_format`` other than text, a non-empty ``logit_bias``, ``suffix``, ``best_of`` over 1) raises
  ``BadRequestError`` naming the field (``param``), as does every malformed field.
- Choice ``i`` of prompt ``p`` is ``Request.choices[p * n + i]`` (OpenAI's order); with a seed, choice ``i`` samples
  with ``seed + i`` (reproducible, and distinct); without one, each choice draws its own random seed.
- ``presence_penalty`` and ``frequency_penalty`` (each in [-2, 2]) reach ``SamplingParams`` and every decoding mode
  honours them (``infer.sampling``); the log-probs an answer carries stay the unpenalised model's.
- Log-probs: ``/v1/completions`` ``logprobs: N`` (0..5) and ``echo``; ``/v1/chat/completions`` ``logprobs: true``
  and ``top_logprobs: N`` (0..20). ``Request.logprobs`` is N, or None when none were asked for.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ekmesh.api.types import ServedModel
from ekmesh.core.constants import MAX_PENALTY, SPECULATIVE_MODES
from ekmesh.core.errors import BadRequestError

if TYPE_CHECKING:  # torch is imported only where a model is served: a node without one never loads it
    from ekmesh.infer.generate import SamplingParams

MAX_MESSAGES = 1024
MAX_PROMPTS = 16  # prompts in one /v1/completions request (a batch)
MAX_N = 8  # choices per prompt
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound for /v1/completions ``logprobs``
MAX_CHAT_TOP_LOGPROBS = 20  # and for chat's ``top_logprobs``
DEFAULT_MAX_TOKENS = 256


def _asks_for_tools(v: Any) -> bool:
    return v not in (None, [], {})


def _asks_for_a_choice(v: Any) -> bool:
    return v not in (None, "none")


def _asks_for_a_format(v: Any) -> bool:
    return v is not None and v != {"type": "text"}


# field -> (does this value ask for what ekmesh does not do, what to call it)
UNSUPPORTED = {
    "tools": (_asks_for_tools, "tool calling"),
    "functions": (_asks_for_tools, "function calling"),
    "tool_choice": (_asks_for_a_choice, "tool calling"),
    "function_call": (_asks_for_a_choice, "function calling"),
    "response_format": (_asks_for_a_format, "a response format other than {\"type\": \"text\"}"),
    "logit_bias": (_asks_for_tools, "logit_bias"),
    "suffix": (lambda v: v not in (None, ""), "suffix (insertion)"),
    "best_of": (lambda v: v not in (None, 1), "best_of"),
}


def refuse_unsupported(body: dict[str, Any]) -> None:
    for key, (asks, what) in UNSUPPORTED.items():
        if key in body and asks(body[key]):
            raise BadRequestError(f"'{key}' is not supported by ekmesh ({what}); remove it from the request",
                                  param=key)


def _num(body: dict[str, Any], key: str, kind: type, default: Any, lo: float, hi: float) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise BadRequestError(f"'{key}' must be a{'n integer' if kind is int else ' number'}, got {v!r}", key)
    if not lo <= v <= hi:
        raise BadRequestError(f"'{key}' must be in [{lo}, {hi}], got {v!r}", key)
    return kind(v)


def _flag(body: dict[str, Any], key: str) -> bool:
    v = body.get(key)
    if v is not None and not isinstance(v, bool):
        raise BadRequestError(f"'{key}' must be true or false, got {v!r}", key)
    return bool(v)


def sampling_from(body: dict[str, Any]) -> SamplingParams:
    from ekmesh.infer.generate import SamplingParams

    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        stops = tuple(stop)
    else:
        raise BadRequestError("'stop' must be a string or a list of at most 16 strings", "stop")
    if any(not s for s in stops):
        raise BadRequestError("'stop' strings must not be empty", "stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    speculative = body.get("speculative")
    if speculative is not None and speculative not in SPECULATIVE_MODES:
        raise BadRequestError(f"'speculative' must be one of {', '.join(SPECULATIVE_MODES)}, got {speculative!r}",
                              "speculative")
    return SamplingParams(
        max_tokens=_num({"max_tokens": max_tokens}, "max_tokens", int, DEFAULT_MAX_TOKENS, 0, 1 << 20),
        temperature=_num(body, "temperature", float, 1.0, 0.0, 2.0),
        top_k=_num(body, "top_k", int, 0, 0, 1 << 20),
        top_p=_num(body, "top_p", float, 1.0, 1e-9, 1.0),
        seed=_num(body, "seed", int, None, -(1 << 63), (1 << 63) - 1),
        stop_strings=stops,
        stop_ids=frozenset() if body.get("ignore_eos") is True else None,
        speculative=speculative,
        presence_penalty=_num(body, "presence_penalty", float, 0.0, -MAX_PENALTY, MAX_PENALTY),
        frequency_penalty=_num(body, "frequency_penalty", float, 0.0, -MAX_PENALTY, MAX_PENALTY),
    )


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequestError("'messages' must be a non-empty list", "messages")
    if len(msgs) > MAX_MESSAGES:
        raise BadRequestError(f"at most {MAX_MESSAGES} messages", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise BadRequestError(f"messages[{i}] needs a 'role' of system, developer, user or assistant", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            parts = [p["text"] for p in content
                     if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)]
            if len(parts) != len(content):
                raise BadRequestError(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(parts)
        if not isinstance(content, str):
            raise BadRequestError(f"messages[{i}].content must be a string", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str | None  # the prompt as sent (None: sent as token ids)


@dataclass(frozen=True)
class Request:
    """A validated request: ``choices`` holds the (prompt, sampling) of each choice, in the answer's order."""

    chat: bool
    prompts: list[Prompt]
    choices: list[tuple[Prompt, SamplingParams]]
    n: int
    echo: bool  # /v1/completions: the prompt's text (and log-probs) come first
    logprobs: int | None  # alternatives per token; None: no log-probs
    stream: bool
    include_usage: bool  # a stream's last chunk before [DONE] carries usage (``stream_options.include_usage``)
    token_ids: bool  # ``return_token_ids``


def parse(served: ServedModel, body: dict[str, Any], chat: bool) -> Request:
    """The request ``body`` sent to ``/v1/chat/completions`` (``chat``) or ``/v1/completions``, for ``served``."""
    refuse_unsupported(body)
    params = sampling_from(body)
    n = _num(body, "n", int, 1, 1, MAX_N)
    if chat:
        echo = False
        top = _num(body, "top_logprobs", int, None, 0, MAX_CHAT_TOP_LOGPROBS)
        if not _flag(body, "logprobs") and top is not None:
            raise BadRequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        logprobs = (top or 0) if _flag(body, "logprobs") else None
    else:
        echo = _flag(body, "echo")
        logprobs = _num(body, "logprobs", int, None, 0, MAX_COMPLETION_LOGPROBS)
    prompts = _prompts(served, body, chat)
    params = replace(params, logprobs=logprobs)
    choices = []
    for prompt in prompts:
        for i in range(n):
            seed = params.seed + i if params.seed is not None else secrets.randbits(63) if n > 1 else None
            choices.append((prompt, replace(params, seed=seed)))
    opts = body.get("stream_options")
    return Request(chat, prompts, choices, n, echo, logprobs, _flag(body, "stream"),
                   isinstance(opts, dict) and bool(opts.get("include_usage")), body.get("return_token_ids") is True)


def _prompts(served: ServedModel, body: dict[str, Any], chat: bool) -> list[Prompt]:
    tok = served.tokenizer
    if chat:
        if tok is None:
            raise BadRequestError(f"model {served.model_id} has no tokenizer: use /v1/completions with a prompt of "
                                  "token ids", "messages")
        return [Prompt(tok.encode_chat(chat_messages(body), add_generation_prompt=True), None)]
    prompt = body.get("prompt")
    batch = isinstance(prompt, list) and bool(prompt) and all(isinstance(p, (str, list)) for p in prompt)
    items = prompt if batch else [prompt]
    assert isinstance(items, list)
    if len(items) > MAX_PROMPTS:
        raise BadRequestError(f"at most {MAX_PROMPTS} prompts in one request, got {len(items)}", "prompt")
    return [_prompt(served, p) for p in items]


def _prompt(served: ServedModel, prompt: Any) -> Prompt:
    if isinstance(prompt, list):
        if not prompt or len(prompt) > served.context or \
                not all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            raise BadRequestError(f"'prompt' as token ids must be a non-empty list of at most {served.context} "
                                  "integers", "prompt")
        return Prompt(list(prompt), None)
    if not isinstance(prompt, str) or not prompt:
        raise BadRequestError("'prompt' must be a non-empty string or a list of token ids", "prompt")
    if served.tokenizer is None:
        raise BadRequestError(f"model {served.model_id} has no tokenizer: give the prompt as token ids", "prompt")
    return Prompt(served.tokenizer.encode(prompt, add_special_tokens=True), prompt)
