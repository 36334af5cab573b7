"""The HTTP server of the OpenAI-compatible API every node serves on localhost: ``/v1/models``,
``/v1/chat/completions`` and ``/v1/completions``, streaming (Server-Sent Events) or not.

Role: translate HTTP requests into generation on an ``Engine`` (the node's attention host over the mesh, or a
one-process model for ``python -m ekmesh.api``) and stream the tokens back. One thread per connection (the bounded
transport of ``api.transport``); generation is blocking torch work and runs in that thread, so several
conversations run at once (the engine serialises what cannot run concurrently).

Not responsible for: the model, the mesh, authentication (it binds 127.0.0.1 only, like the control endpoint's
socket; an ``Authorization`` header is accepted and ignored so any OpenAI client works unchanged).

Wire details beyond OpenAI's: a request may set ``"speculative": "off" | "ngram" | "draft"`` (how the answer is
decoded: ``infer/speculative.py``; default: the node's ``--speculative``). Every answer carries ``"ekmesh":
{"ttft_s", "tokens_per_s", "tokens", "peers", "mean_layer_rtt_ms", "speculative", "steps", "drafted", "accepted"}``
(``steps``: target forward passes after the prefill; on a mesh also ``round_trips``: data-plane round trips per MoE
layer over the answer, prefill included), at the top level of a non-streamed answer, in the usage chunk of a stream
(or its last chunk when ``stream_options.include_usage`` is off); on a mesh also ``"verify": {"fraction", "pairs",
"rows", "mismatches", "bans", "recomputed_tokens", "banned"}`` (remote expert results checked during this answer,
the bans made during it with their reasons, tokens computed again after a ban (``Generator``), every peer banned so
far; ``infer/dataplane/verify.py``). ``model`` may be a model id, an id prefix or an alias, or
omitted. ``/v1/completions`` also takes ``prompt`` as a list of token ids (as OpenAI's does), which also works for a
model without a tokenizer; ``"return_token_ids": true`` adds the generated ids to the ``ekmesh`` block as
``token_ids`` (and to every streamed chunk, then sent even when its text is empty); ``"ignore_eos": true`` generates
until ``max_tokens`` or a stop string.

Invariants (the HTTP-level bounds are ``api.transport``'s: backlog 128, at most ``max_connections`` connections
= threads, in all and per source address, beyond them 429 ``too_many_connections``; a request's head and body read
within ``request_deadline_s`` or 408; bodies over ``MAX_BODY`` refused 413 from the head; malformed heads 400, 414,
431, 501, 505): request bodies are validated before any generation starts, prompt token ids included (each in the
served model's vocabulary, else 400); at most ``max_active`` generations run at once (more get 429 ``busy`` with
``Retry-After``); every socket read and write has a deadline (``SOCKET_TIMEOUT_S`` per write of a stream); every
error is a JSON ``{"error": {"message", "type", "code"}}`` with a 4xx/5xx status; a client that closes its
connection mid-stream stops its generation at the next token; a stream always ends with ``data: [DONE]`` unless
the client left.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import Generator as Gen
from typing import TYPE_CHECKING, Any

from ekmesh.api.transport import (
    MAX_BODY,  # noqa: F401 (the API's body limit, named here too: ``server.MAX_BODY``)
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_ADDRESS,
    REQUEST_DEADLINE_S,
    RETRY_AFTER_S,
    BoundedHTTPServer,
    JsonRequestHandler,
)
from ekmesh.api.types import Engine, ServedModel, resolve
from ekmesh.core.constants import API_PORT, SPECULATIVE_MODES
from ekmesh.core.errors import (
    BadRequestError,
    ConfigError,
    EkmeshError,
    GenerationError,
    NotServingError,
    TokenizerError,
    UnknownModelError,
)

if TYPE_CHECKING:  # torch is imported only where a model is served: a node without one never loads it
    from ekmesh.infer.generate import SamplingParams, TokenEvent

log = logging.getLogger(__name__)

MAX_MESSAGES = 1024
DEFAULT_MAX_TOKENS = 256
MAX_ACTIVE = 16  # generations at once; more are answered 429 at once (each one holds a thread and a KV cache)


# -- request parsing -------------------------------------------------------------------------------------------

def _num(body: dict[str, Any], key: str, kind: type, default: Any, lo: float, hi: float) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise BadRequestError(f"'{key}' must be a{'n integer' if kind is int else ' number'}, got {v!r}")
    if not lo <= v <= hi:
        raise BadRequestError(f"'{key}' must be in [{lo}, {hi}], got {v!r}")
    return kind(v)


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
        raise BadRequestError("'stop' must be a string or a list of at most 16 strings")
    if any(not s for s in stops):
        raise BadRequestError("'stop' strings must not be empty")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    speculative = body.get("speculative")
    if speculative is not None and speculative not in SPECULATIVE_MODES:
        raise BadRequestError(f"'speculative' must be one of {', '.join(SPECULATIVE_MODES)}, got {speculative!r}")
    return SamplingParams(
        max_tokens=_num({"max_tokens": max_tokens}, "max_tokens", int, DEFAULT_MAX_TOKENS, 0, 1 << 20),
        temperature=_num(body, "temperature", float, 1.0, 0.0, 2.0),
        top_k=_num(body, "top_k", int, 0, 0, 1 << 20),
        top_p=_num(body, "top_p", float, 1.0, 1e-9, 1.0),
        seed=_num(body, "seed", int, None, -(1 << 63), (1 << 63) - 1),
        stop_strings=stops,
        stop_ids=frozenset() if body.get("ignore_eos") is True else None,
        speculative=speculative,
    )


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequestError("'messages' must be a non-empty list")
    if len(msgs) > MAX_MESSAGES:
        raise BadRequestError(f"at most {MAX_MESSAGES} messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise BadRequestError(f"messages[{i}] needs a 'role' of system, developer, user or assistant")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            parts = [p["text"] for p in content
                     if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)]
            if len(parts) != len(content):
                raise BadRequestError(f"messages[{i}].content: only text parts are supported")
            content = "".join(parts)
        if not isinstance(content, str):
            raise BadRequestError(f"messages[{i}].content must be a string")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


# -- one generation with its statistics ------------------------------------------------------------------------

class Run:
    """One generation: yields ``TokenEvent``s, then ``stats()`` has the ekmesh block and ``usage()`` the counts."""

    def __init__(self, served: ServedModel, prompt_ids: list[int], params: SamplingParams) -> None:
        if len(prompt_ids) >= served.context:
            raise BadRequestError(f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                                  f"{served.context}")
        vocab = served.generator.vocab_size
        bad = next((i for i in prompt_ids if not 0 <= i < vocab), None)
        if bad is not None:  # checked here so that it is a bad request, not a failed generation
            raise BadRequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        room = served.context - len(prompt_ids)
        if params.max_tokens > room:
            params = dataclasses.replace(params, max_tokens=room)
        self.served, self.prompt_ids, self.params = served, prompt_ids, params
        self.tokens = 0
        self.token_ids: list[int] = []
        self.counted = False  # whether the last event's token is part of the output
        self.finish = "length"
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.end: float | None = None
        self._before = served.peer_stats() if served.peer_stats else {}
        self._verify_before = served.verify_stats() if served.verify_stats else None
        served.generator.check(params)  # (a GenerationError here is the request's fault: 400)
        self._recomputed_before = served.generator.recomputed_tokens
        from ekmesh.infer.generate import StreamStats

        self.decoding = StreamStats()

    def events(self) -> Gen[TokenEvent, None, None]:
        lock = self.served.lock
        if lock is not None:
            lock.acquire()
        try:
            gen = self.served.generator
            stops = gen.default_stop_ids if self.params.stop_ids is None else self.params.stop_ids
            for ev in gen.stream(self.prompt_ids, self.params, self.decoding):
                if self.first is None:
                    self.first = time.perf_counter()
                self.counted = not (ev.finish == "stop" and ev.token_id in stops)  # a final stop id is not output
                if self.counted:
                    self.tokens += 1
                    self.token_ids.append(ev.token_id)
                if ev.finish:
                    self.finish = ev.finish
                yield ev
        finally:
            self.end = time.perf_counter()
            if lock is not None:
                lock.release()

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": self.tokens,
                "total_tokens": len(self.prompt_ids) + self.tokens}

    def stats(self) -> dict[str, Any]:
        end = self.end or time.perf_counter()
        first = self.first or end
        rate = (self.tokens - 1) / (end - first) if self.tokens > 1 and end > first else 0.0
        after = self.served.peer_stats() if self.served.peer_stats else {}
        trips, rtt, peers = 0, 0.0, []
        for peer, (n, total) in sorted(after.items()):
            n0, t0 = self._before.get(peer, (0, 0.0))
            if n > n0:
                peers.append(peer)
                trips += n - n0
                rtt += total - t0
        out = {"ttft_s": round(first - self.t0, 6), "tokens_per_s": round(rate, 3), "tokens": self.tokens,
               "peers": peers, "mean_layer_rtt_ms": round(1e3 * rtt / trips, 4) if trips else None,
               "speculative": self.decoding.speculative, "steps": self.decoding.steps,
               "drafted": self.decoding.drafted, "accepted": self.decoding.accepted}
        if self.decoding.round_trips is not None:
            out["round_trips"] = round(self.decoding.round_trips, 3)
        if self._verify_before is not None and self.served.verify_stats is not None:
            v0, v1 = self._verify_before, self.served.verify_stats()
            out["verify"] = {"fraction": v1["fraction"], **{n: v1[n] - v0[n] for n in ("pairs", "rows", "mismatches")},
                             "bans": v1["banned"][len(v0["banned"]):],
                             "recomputed_tokens": self.served.generator.recomputed_tokens - self._recomputed_before,
                             "banned": sorted({b["peer"] for b in v1["banned"]})}
        warning = self.served.mesh_warning() if self.served.mesh_warning else None
        if warning:
            out["warning"] = warning
        return out


# -- HTTP ----------------------------------------------------------------------------------------------------

class _ClientGone(Exception):  # noqa: N818 (not an error: control flow inside this module)
    """The client closed its connection mid-answer: stop generating for it."""


class ApiServer(BoundedHTTPServer):
    """The API on ``host:port`` (a free port if it is taken): ``max_active`` generations at once, and the
    transport's bounds (``max_connections`` in all, ``max_per_address`` from one address, ``request_deadline_s`` to
    send a request)."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = API_PORT,
                 max_active: int = MAX_ACTIVE, *, max_connections: int = MAX_CONNECTIONS,
                 max_per_address: int = MAX_CONNECTIONS_PER_ADDRESS,
                 request_deadline_s: float = REQUEST_DEADLINE_S) -> None:
        self.engine = engine
        self.max_active = max_active
        self.slots = threading.BoundedSemaphore(max_active)
        bounds: dict[str, Any] = {"max_connections": max_connections, "max_per_address": max_per_address,
                                  "request_deadline_s": request_deadline_s}
        try:
            super().__init__((host, port), _Handler, **bounds)
        except OSError as exc:
            if port == 0:
                raise ConfigError(f"cannot listen for the API on {host}: {exc}") from exc
            log.warning("API port %d is taken (%s); using a free port instead", port, exc)
            super().__init__((host, 0), _Handler, **bounds)
        self.url = f"http://{host}:{self.server_address[1]}/v1"
        self._thread: threading.Thread | None = None

    def start(self) -> ApiServer:
        self._thread = threading.Thread(target=self.serve_forever, name="ekmesh-api", daemon=True)
        self._thread.start()
        log.info("OpenAI-compatible API on %s", self.url)
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


class _Handler(JsonRequestHandler):
    server: ApiServer

    # -- plumbing
    def _sse_start(self) -> None:
        self.close_connection = True  # the stream ends with the connection (``Connection: close`` is sent)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

    def _sse(self, obj: dict[str, Any] | str) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj)
        try:
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()
        except OSError as exc:  # broken pipe, reset, timeout
            raise _ClientGone() from exc

    # -- routes
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            models = self.server.engine.served()
            self._send_json(200, {"object": "list", "data": [
                {"id": m.model_id, "object": "model", "created": m.created, "owned_by": "ekmesh",
                 "aliases": sorted(m.aliases), "context_length": m.context} for m in models]})
        elif path in ("/v1", "/health", "/v1/health"):
            self._send_json(200, {"ok": True, "serving": [m.model_id for m in self.server.engine.served()]})
        else:
            self._error(404, f"no such endpoint: GET {path}", "invalid_request_error", "not_found")

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?")[0].rstrip("/")
        if path not in ("/v1/chat/completions", "/v1/completions"):
            self._error(404, f"no such endpoint: POST {path}", "invalid_request_error", "not_found")
            return
        try:
            body = self.json_body()
            served = resolve(self.server.engine, body.get("model"))
            params = sampling_from(body)
            chat = path == "/v1/chat/completions"
            prompt_ids = _prompt_ids(served, body, chat)
            run = Run(served, prompt_ids, params)
        except (BadRequestError, GenerationError, TokenizerError) as exc:
            self._error(400, str(exc), "invalid_request_error")
            return
        except UnknownModelError as exc:
            self._error(404, str(exc), "invalid_request_error", "model_not_found")
            return
        except NotServingError as exc:
            self._error(503, str(exc), "server_error", "not_ready")
            return
        if not self.server.slots.acquire(blocking=False):
            self._error(429, f"this node is answering {self.server.max_active} requests already; try again shortly",
                        "rate_limit_error", "busy", retry_after=RETRY_AFTER_S)
            return
        try:
            if body.get("stream"):
                self._stream(run, chat, body)
            else:
                self._complete(run, chat, body)
        except _ClientGone:
            log.info("API client left; its generation stopped after %d tokens", run.tokens)
        finally:
            self.server.slots.release()

    def _complete(self, run: Run, chat: bool, body: dict[str, Any]) -> None:
        try:
            text = "".join(ev.text for ev in run.events())
        except EkmeshError as exc:  # e.g. ExpertUnavailableError: an expert with no holder and no source
            self._error(503, f"generation failed: {exc}", "server_error", "mesh_unavailable")
            return
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        choice: dict[str, Any] = {"index": 0, "finish_reason": run.finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        self._send_json(200, {"id": rid, "object": "chat.completion" if chat else "text_completion",
                              "created": int(time.time()), "model": run.served.model_id, "choices": [choice],
                              "usage": run.usage(), "ekmesh": _stats(run, body)})

    def _stream(self, run: Run, chat: bool, body: dict[str, Any]) -> None:
        opts = body.get("stream_options")
        usage_chunk = isinstance(opts, dict) and bool(opts.get("include_usage"))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": run.served.model_id}

        want_ids = body.get("return_token_ids") is True

        def chunk(text: str | None, finish: str | None, first: bool = False,
                  token: int | None = None) -> dict[str, Any]:
            c: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if want_ids and token is not None:
                c["token_ids"] = [token]
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if first else {}
                if text is not None:
                    delta["content"] = text
                c["delta"] = delta
            else:
                c["text"] = text or ""
            return {**base, "choices": [c]}

        self._sse_start()
        if chat:
            self._sse(chunk("", None, first=True))
        try:
            events = run.events()
            try:
                for ev in events:
                    if ev.finish:
                        last = chunk(ev.text, ev.finish, token=ev.token_id if run.counted else None)
                        break
                    if ev.text or want_ids:
                        self._sse(chunk(ev.text, None, token=ev.token_id))
                else:
                    last = chunk("", run.finish)
            finally:
                events.close()  # a client that left ends its generation here
        except EkmeshError as exc:
            self._sse({"error": {"message": f"generation failed: {exc}", "type": "server_error",
                                 "code": "mesh_unavailable"}})
            return
        if not usage_chunk:
            last["ekmesh"] = _stats(run, body)
        self._sse(last)
        if usage_chunk:
            self._sse({**base, "choices": [], "usage": run.usage(), "ekmesh": _stats(run, body)})
        self._sse("[DONE]")


def _prompt_ids(served: ServedModel, body: dict[str, Any], chat: bool) -> list[int]:
    tok = served.tokenizer
    if chat:
        if tok is None:
            raise BadRequestError(f"model {served.model_id} has no tokenizer: use /v1/completions with a prompt of "
                                  "token ids")
        return tok.encode_chat(chat_messages(body), add_generation_prompt=True)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or len(prompt) > served.context or \
                not all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            raise BadRequestError(f"'prompt' as token ids must be a non-empty list of at most {served.context} "
                                  "integers")
        return list(prompt)
    if not isinstance(prompt, str) or not prompt:
        raise BadRequestError("'prompt' must be a non-empty string or a list of token ids")
    if tok is None:
        raise BadRequestError(f"model {served.model_id} has no tokenizer: give the prompt as token ids")
    return tok.encode(prompt, add_special_tokens=True)


def _stats(run: Run, body: dict[str, Any]) -> dict[str, Any]:
    stats = run.stats()
    if body.get("return_token_ids") is True:
        stats["token_ids"] = list(run.token_ids)
    return stats
