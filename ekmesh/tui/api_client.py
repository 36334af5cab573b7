"""The HTTP client of a node's OpenAI-compatible API, as ``ekmesh chat`` and ``generate --mesh`` use it.

``ApiClient`` talks HTTP/1.1 (``http.client``) to ``{api_url}/models``, ``/chat/completions`` and ``/completions``.
Answers stream as Server-Sent Events: an ``AnswerStream`` yields text deltas, and closing it closes the connection,
which cancels the generation on the node. Socket, HTTP and JSON errors are translated here, once, into
``ekmesh.core.errors`` types; every wait has a deadline from ``ClientTimeouts``; lines and bodies are bounded.

Not responsible for rendering (``tui.chat``) or finding the node (the CLI reads ``node.json``). Standard library
only (no rich, torch, libp2p or trio).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ekmesh.core.errors import (
    ConfigError,
    EkmeshError,
    GenerationError,
    NodeNotRunningError,
    PeerClosedError,
    PeerError,
    PeerUnreachableError,
    ProtocolError,
)

MAX_LINE = 1 << 20  # one SSE line (one chunk's JSON) may not exceed 1 MiB
MAX_BODY = 1 << 22  # nor may a JSON answer or an error body exceed 4 MiB
START_HINT = "start a node with `ekmesh join --model ID` (or try `ekmesh demo`)"


@dataclass(frozen=True)
class ClientTimeouts:
    """Deadlines (seconds) of the API client."""

    connect_timeout: float = 5.0
    # Between two bytes of an answer: covers the prefill of a long prompt on a slow mesh.
    read_timeout: float = 120.0


@dataclass
class Answer:
    """One finished (or stopped) answer. ``finish_reason`` is the API's ("stop", "length"), or "cancelled" when
    the client closed the stream; ``stats`` is the API's ``ekmesh`` object, or, when the API sent none (a stopped
    answer, another OpenAI server), what this client measured: ``ttft_s``, ``tokens_per_s``, ``tokens``."""

    text: str
    finish_reason: str | None
    usage: dict[str, Any]
    stats: dict[str, Any]
    seconds: float  # request sent → last byte, measured here

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "finish_reason": self.finish_reason, "usage": self.usage, "ekmesh": self.stats}


class ApiClient:
    """The HTTP API of one node, at ``api_url`` (e.g. ``http://127.0.0.1:8000/v1``). One connection a request."""

    def __init__(self, api_url: str, timeouts: ClientTimeouts | None = None) -> None:
        parts = urllib.parse.urlsplit(api_url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"an API URL looks like http://127.0.0.1:PORT/v1, got {api_url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._base = parts.path.rstrip("/") or "/v1"
        self.api_url = f"{parts.scheme}://{parts.netloc}{self._base}"
        self.timeouts = timeouts or ClientTimeouts()

    def models(self) -> list[dict[str, Any]]:
        """``GET /models``: the models the node serves, each a dict with at least a string ``id``."""
        conn, resp = self._request("GET", "/models", None)
        try:
            raw = _read_body(resp, self.api_url + "/models")
        finally:
            conn.close()
        obj = _json_object(raw, self.api_url + "/models")
        data = obj.get("data")
        if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
            raise ProtocolError(f"{self.api_url}/models answered no model list: {raw[:200]!r}")
        return data

    def stream_chat(self, body: dict[str, Any]) -> AnswerStream:
        """``POST /chat/completions`` with ``stream`` on; ``body`` holds ``messages`` and sampling settings."""
        return self._stream("/chat/completions", body, chat=True)

    def stream_completion(self, body: dict[str, Any]) -> AnswerStream:
        """``POST /completions`` with ``stream`` on; ``body`` holds ``prompt`` and sampling settings."""
        return self._stream("/completions", body, chat=False)

    def _stream(self, path: str, body: dict[str, Any], chat: bool) -> AnswerStream:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.monotonic()
        conn, resp = self._request("POST", path, body)
        kind = resp.getheader("Content-Type", "")
        if not kind.startswith("text/event-stream"):
            conn.close()
            raise ProtocolError(f"{self.api_url}{path} answered {kind or 'no content type'}, not an event stream")
        return AnswerStream(self.api_url + path, conn, resp, chat, t0, self.timeouts.read_timeout)

    def _request(self, method: str, path: str, body: dict[str, Any] | None
                 ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        url = self.api_url + path
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeouts.connect_timeout)
        try:
            conn.connect()
        except ConnectionRefusedError as exc:
            raise NodeNotRunningError(f"no ekmesh API answers at {self.api_url} (connection refused); "
                                      f"{START_HINT}") from exc
        except OSError as exc:  # timeout, no route, unknown host
            raise PeerUnreachableError(f"cannot connect to the ekmesh API at {self.api_url} within "
                                       f"{self.timeouts.connect_timeout:g} s: {exc}") from exc
        headers = {"Accept": "application/json, text/event-stream", "Authorization": "Bearer ekmesh"}
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            assert conn.sock is not None
            conn.sock.settimeout(self.timeouts.read_timeout)
            conn.request(method, self._base + path, body=data, headers=headers)
            resp = conn.getresponse()
            if resp.status != 200:
                raise _http_error(url, resp.status, resp.reason, _read_body(resp, url))
        except TimeoutError as exc:
            conn.close()
            raise PeerClosedError(f"{url} sent no answer within {self.timeouts.read_timeout:g} s") from exc
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise PeerClosedError(f"{url} closed the connection before answering ({exc!r})") from exc
        except BaseException:  # our own errors, KeyboardInterrupt: close, then let it go on
            conn.close()
            raise
        return conn, resp


class AnswerStream:
    """An answer arriving as Server-Sent Events. Iterating yields its text deltas; when the API's end mark
    (``data: [DONE]``) arrives, ``answer`` holds the whole answer. ``close()`` (also on leaving ``with``) closes
    the connection, which cancels the generation on the node; an answer not finished by then is "cancelled"."""

    def __init__(self, url: str, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, chat: bool,
                 t0: float, read_timeout: float) -> None:
        self.url = url
        self.answer: Answer | None = None
        self._conn, self._resp, self._chat, self._t0 = conn, resp, chat, t0
        self._read_timeout = read_timeout
        self._parts: list[str] = []
        self._finish: str | None = None
        self._usage: dict[str, Any] = {}
        self._stats: dict[str, Any] | None = None
        self._t_first: float | None = None
        self._closed = False

    def __enter__(self) -> AnswerStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        for data in iter_sse_data(self._readline):
            if data == "[DONE]":
                self._complete(self._finish)
                self.close()
                return
            delta = self._chunk(data)
            if delta:
                if self._t_first is None:
                    self._t_first = time.monotonic()
                self._parts.append(delta)
                yield delta
        raise PeerClosedError(f"{self.url}: the answer stream ended before its end mark (data: [DONE]); "
                              "the node may have stopped or failed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.answer is None:
            self._complete("cancelled")
        sock = self._conn.sock
        if sock is not None:  # shut down first: the node must see the close now, whoever still holds the socket
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._resp.close()
        self._conn.close()

    def _readline(self) -> bytes:
        try:
            line = self._resp.readline(MAX_LINE + 1)
        except TimeoutError as exc:
            raise PeerClosedError(f"{self.url}: no data for {self._read_timeout:g} s in the middle of an "
                                  "answer") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise PeerClosedError(f"{self.url}: the connection broke in the middle of an answer "
                                  f"({exc!r})") from exc
        if len(line) > MAX_LINE:
            raise ProtocolError(f"{self.url}: an event stream line is longer than {MAX_LINE} bytes")
        return line

    def _chunk(self, data: str) -> str:
        obj = _json_object(data.encode(), self.url)
        if "error" in obj:
            message, kind = _error_fields(obj)
            raise PeerError(f"{self.url} failed in the middle of an answer" + (f" ({kind})" if kind else "")
                            + f": {message}")
        choices = obj.get("choices")
        if not isinstance(choices, list):
            raise ProtocolError(f"{self.url}: an answer chunk has no choices list: {data[:200]!r}")
        if isinstance(obj.get("usage"), dict):
            self._usage = obj["usage"]
        if isinstance(obj.get("ekmesh"), dict):
            self._stats = obj["ekmesh"]
        if not choices:
            return ""
        choice = choices[0]
        if not isinstance(choice, dict):
            raise ProtocolError(f"{self.url}: an answer chunk's choice is not an object: {data[:200]!r}")
        if choice.get("finish_reason"):
            self._finish = str(choice["finish_reason"])
        delta = choice.get("delta") if self._chat else choice
        text = delta.get("content" if self._chat else "text") if isinstance(delta, dict) else None
        if text is not None and not isinstance(text, str):
            raise ProtocolError(f"{self.url}: an answer chunk's text is not a string: {data[:200]!r}")
        return text or ""

    def _complete(self, reason: str | None) -> None:
        t_end = time.monotonic()
        stats = dict(self._stats) if self._stats is not None else self._measured(t_end)
        self.answer = Answer("".join(self._parts), reason, dict(self._usage), stats, t_end - self._t0)

    def _measured(self, t_end: float) -> dict[str, Any]:
        tokens = self._usage.get("completion_tokens")
        n = tokens if isinstance(tokens, int) else len(self._parts)
        stats: dict[str, Any] = {"tokens": n}
        if self._t_first is not None:
            stats["ttft_s"] = self._t_first - self._t0
            if n > 1 and t_end > self._t_first:
                stats["tokens_per_s"] = (n - 1) / (t_end - self._t_first)
        return stats


def iter_sse_data(readline: Callable[[], bytes]) -> Iterator[str]:
    """The ``data`` of each Server-Sent Event read line by line with ``readline`` until it returns ``b""``.
    Several ``data`` lines of one event are joined with newlines; comments and other fields are skipped; an event
    cut off by the end of the stream is dropped (as the SSE spec says)."""
    data: list[str] = []
    while True:
        raw = readline()
        if not raw:
            return
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"an event stream line is not UTF-8: {raw[:80]!r}") from exc
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            if name == "data":
                data.append(value[1:] if value.startswith(" ") else value)


def _read_body(resp: http.client.HTTPResponse, url: str) -> bytes:
    raw = resp.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise ProtocolError(f"{url} answered more than {MAX_BODY} bytes")
    return raw


def _json_object(raw: bytes, url: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise ProtocolError(f"{url} answered something other than JSON: {raw[:200]!r}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"{url} answered JSON that is not an object: {raw[:200]!r}")
    return obj


def _error_fields(obj: Any) -> tuple[str, str | None]:
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        kind = err.get("type")
        return err["message"], kind if isinstance(kind, str) else None
    return str(err if err is not None else obj)[:300], None


def _http_error(url: str, status: int, reason: str, raw: bytes) -> EkmeshError:
    """An HTTP error answer → ``GenerationError`` (4xx: the request was refused) or ``PeerError`` (5xx)."""
    try:
        message, kind = _error_fields(json.loads(raw))
    except ValueError:
        message, kind = raw[:300].decode("utf-8", "replace").strip() or "(no body)", None
    text = f"{url} answered HTTP {status} {reason}" + (f" ({kind})" if kind else "") + f": {message}"
    return GenerationError(text) if 400 <= status < 500 else PeerError(text)
