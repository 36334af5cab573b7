"""The HTTP server of the OpenAI-compatible API every node serves on localhost: ``/v1/models``,
``/v1/chat/completions`` and ``/v1/completions``, streaming (Server-Sent Events) or not.

Role: translate HTTP requests into generation on an ``Engine`` (the node's attention host over the mesh, or a
one-process model for ``python -m ekmesh.api``) and stream the tokens back. One thread per connection (the bounded
transport of ``api.transport``); generation is blocking torch work and runs in that thread (a request of several
choices: one thread per choice), so several conversations run at once (the engine serialises what cannot run
concurrently).

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
``token_ids`` (and to every streamed chunk, then sent even when its text is empty; with several choices, to each
choice instead); ``"ignore_eos": true`` generates until ``max_tokens`` or a stop string.

OpenAI's fields for clients and evaluation tools (parsed in ``api.request``, formatted in ``api.logprobs``):
log-probs (completions: ``logprobs: N`` and ``echo``, with ``max_tokens: 0`` to score a prompt only, what
lm-evaluation-harness's ``local-completions`` sends; chat: ``logprobs``, ``top_logprobs``), of the model's
distribution at temperature 1 before any top-k / top-p, in fp32 from the target's logits at each position (streamed
chunks carry their tokens'); ``n`` choices per prompt and a batch of prompts (choices decode concurrently, one
thread each, so their steps batch; ``usage`` adds them up; streamed chunks carry their ``index``); ``stop`` as a
list; ``seed`` (choice i: seed + i). Fields asking for what ekmesh does not do (tools, ``response_format`` other
than text, ``logit_bias``, ``suffix``, ``best_of`` > 1) are refused with 400 naming the field (``param``).
Every non-streamed answer has ``usage``.

Invariants (the HTTP-level bounds are ``api.transport``'s: backlog 128, at most ``max_connections`` connections
= threads, in all and per source address, beyond them 429 ``too_many_connections``; a request's head and body read
within ``request_deadline_s`` or 408; bodies over ``MAX_BODY`` refused 413 from the head; malformed heads 400, 414,
431, 501, 505): request bodies are validated before any generation starts, prompt token ids included (each in the
served model's vocabulary, else 400); at most ``max_active`` generations run at once, each choice counting as one
(more get 429 ``busy`` with ``Retry-After``; a request of more choices than that, 400); every socket read and write
has a deadline (``SOCKET_TIMEOUT_S`` per write of a stream); every error is a JSON ``{"error": {"message", "type",
"code"}}`` (with ``param`` when a field is at fault) with a 4xx/5xx status; a client that closes its connection
mid-stream stops its generations at their next token; a stream always ends with ``data: [DONE]`` unless
the client left.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any

from ekmesh.api.logprobs import CompletionLogprobs, Entry, TokenTexts, chat_logprobs
from ekmesh.api.request import Request, parse
from ekmesh.api.runs import Echo, Run, echo_of, run_all, stats_of, usage_of
from ekmesh.api.transport import (
    MAX_BODY,  # noqa: F401 (the API's body limit, named here too: ``server.MAX_BODY``)
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_ADDRESS,
    REQUEST_DEADLINE_S,
    RETRY_AFTER_S,
    BoundedHTTPServer,
    JsonRequestHandler,
)
from ekmesh.api.types import Engine, resolve
from ekmesh.core.constants import API_PORT
from ekmesh.core.errors import (
    BadRequestError,
    ConfigError,
    EkmeshError,
    GenerationError,
    NotServingError,
    TokenizerError,
    UnknownModelError,
)

log = logging.getLogger(__name__)

MAX_ACTIVE = 16  # generations (choices) at once; more are answered 429 at once (each holds a thread and a KV cache)


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
                 "aliases": sorted(m.names() - {m.model_id}), "context_length": m.context} for m in models]})
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
            req = parse(served, body, path == "/v1/chat/completions")
            if len(req.choices) > self.server.max_active:
                raise BadRequestError(f"{len(req.choices)} choices (prompts × n) in one request; this node answers "
                                      f"at most {self.server.max_active} at once", "n")
            runs = [Run(served, prompt.ids, params) for prompt, params in req.choices]
        except BadRequestError as exc:
            self._error(400, str(exc), "invalid_request_error", param=exc.param)
            return
        except (GenerationError, TokenizerError) as exc:
            self._error(400, str(exc), "invalid_request_error")
            return
        except UnknownModelError as exc:
            self._error(404, str(exc), "invalid_request_error", "model_not_found")
            return
        except NotServingError as exc:
            self._error(503, str(exc), "server_error", "not_ready")
            return
        taken = 0  # each choice is a generation: it takes a slot
        while taken < len(runs) and self.server.slots.acquire(blocking=False):
            taken += 1
        try:
            if taken < len(runs):
                self._error(429, f"this node is answering {self.server.max_active} requests already; try again "
                            "shortly", "rate_limit_error", "busy", retry_after=RETRY_AFTER_S)
                return
            try:
                echoes = [echo_of(served, p, req.logprobs) for p in req.prompts] if req.echo else []
            except EkmeshError as exc:
                self._error(503, f"scoring the prompt failed: {exc}", "server_error", "mesh_unavailable")
                return
            if req.stream:
                self._stream(req, runs, echoes)
            else:
                self._complete(req, runs, echoes)
        except _ClientGone:
            log.info("API client left; its generation stopped after %d tokens", sum(r.tokens for r in runs))
        finally:
            for _ in range(taken):
                self.server.slots.release()

    def _complete(self, req: Request, runs: list[Run], echoes: list[Echo]) -> None:
        texts: list[list[str]] = [[] for _ in runs]
        entries: list[list[Entry]] = [[] for _ in runs]
        events = run_all(runs)
        try:
            for i, ev in events:
                texts[i].append(ev.text)
                if req.logprobs is not None and runs[i].is_output(ev):
                    entries[i].append((ev.token_id, ev.logprob, ev.top))
        except EkmeshError as exc:  # e.g. ExpertUnavailableError: an expert with no holder and no source
            self._error(503, f"generation failed: {exc}", "server_error", "mesh_unavailable")
            return
        finally:
            events.close()
        names = TokenTexts(runs[0].served.tokenizer)
        choices = []
        for i, run in enumerate(runs):
            text = "".join(texts[i])
            choice: dict[str, Any] = {"index": i, "finish_reason": run.finish, "logprobs": None}
            if req.chat:
                choice["message"] = {"role": "assistant", "content": text}
                if req.logprobs is not None:
                    choice["logprobs"] = chat_logprobs(names, entries[i])
            else:
                echo = echoes[i // req.n] if req.echo else Echo("", [])
                choice["text"] = echo.text + text
                if req.logprobs is not None:
                    choice["logprobs"] = CompletionLogprobs(names).block(echo.entries + entries[i])
            if req.token_ids and len(runs) > 1:
                choice["token_ids"] = list(run.token_ids)
            choices.append(choice)
        self._send_json(200, {"id": ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex,
                              "object": "chat.completion" if req.chat else "text_completion",
                              "created": int(time.time()), "model": runs[0].served.model_id, "choices": choices,
                              "usage": usage_of(req, runs), "ekmesh": stats_of(runs, req)})

    def _stream(self, req: Request, runs: list[Run], echoes: list[Echo]) -> None:
        chat = req.chat
        base = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
                "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
                "model": runs[0].served.model_id}
        names = TokenTexts(runs[0].served.tokenizer)
        offsets = [CompletionLogprobs(names) for _ in runs]  # text_offset goes on from chunk to chunk

        def chunk(i: int, text: str | None, finish: str | None, first: bool = False, token: int | None = None,
                  logprobs: list[Entry] | None = None) -> dict[str, Any]:
            c: dict[str, Any] = {"index": i, "finish_reason": finish, "logprobs": None}
            if req.token_ids and token is not None:
                c["token_ids"] = [token]
            if logprobs:
                c["logprobs"] = chat_logprobs(names, logprobs) if chat else offsets[i].block(logprobs)
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if first else {}
                if text is not None:
                    delta["content"] = text
                c["delta"] = delta
            else:
                c["text"] = text or ""
            return {**base, "choices": [c]}

        self._sse_start()
        for i in range(len(runs)):
            if chat:
                self._sse(chunk(i, "", None, first=True))
            elif req.echo:
                echo = echoes[i // req.n]
                self._sse(chunk(i, echo.text, None, logprobs=echo.entries))
        done = [False] * len(runs)
        last: dict[str, Any] | None = None  # the very last choice's last chunk: it carries the ekmesh block
        try:
            events = run_all(runs)
            try:
                for i, ev in events:
                    out = runs[i].is_output(ev)
                    scored: list[Entry] | None = [(ev.token_id, ev.logprob, ev.top)] \
                        if req.logprobs is not None and out else None
                    if ev.finish:
                        done[i] = True
                        c = chunk(i, ev.text, ev.finish, token=ev.token_id if out else None, logprobs=scored)
                        if all(done):
                            last = c
                        else:
                            self._sse(c)
                    elif ev.text or req.token_ids or scored:
                        self._sse(chunk(i, ev.text, None, token=ev.token_id, logprobs=scored))
            finally:
                events.close()  # a client that left ends its generations here
        except EkmeshError as exc:
            self._sse({"error": {"message": f"generation failed: {exc}", "type": "server_error",
                                 "code": "mesh_unavailable"}})
            return
        ends = [chunk(i, "", run.finish) for i, run in enumerate(runs) if not done[i]]  # (runs that made no token)
        for c in ends[:-1]:
            self._sse(c)
        if last is None:
            last = ends[-1]
        if not req.include_usage:
            last["ekmesh"] = stats_of(runs, req)
        self._sse(last)
        if req.include_usage:
            self._sse({**base, "choices": [], "usage": usage_of(req, runs), "ekmesh": stats_of(runs, req)})
        self._sse("[DONE]")
