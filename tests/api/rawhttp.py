"""Raw-socket HTTP helpers for the API's tests: send exact bytes, read one answer, tell an orderly close from a reset.

The tests that use these speak HTTP by hand on purpose (malformed heads, slow clients, a flood of connections), so a
client library's own checks and retries cannot hide what the server did. Also the API tests' shared plumbing:
``serving`` (a real ``ApiServer`` on 127.0.0.1 port 0 over an engine, stopped after) and ``post`` (one JSON POST
through ``http.client``; ``Answer.events`` reads a streamed answer's SSE events).
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ekmesh.api import server as api
from ekmesh.api.types import Engine

READ_DEADLINE_S = 30.0  # every read of these helpers gives up after this


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[dict[str, Any]]:
        """A streamed answer's ``data:`` events, which must end with ``[DONE]`` (left out)."""
        lines = [ln[len(b"data: "):] for ln in self.body.split(b"\n\n") if ln.startswith(b"data: ")]
        assert lines[-1] == b"[DONE]", lines[-1]
        return [json.loads(ln) for ln in lines[:-1]]

    def assert_error(self, status: int) -> dict[str, Any]:
        """That this is the API's documented JSON error with ``status``; returns its ``error`` object."""
        assert self.status == status, (self.status, self.body[:300])
        assert self.headers.get("content-type") == "application/json", (self.headers, self.body[:300])
        err = self.json()["error"]
        assert set(err) - {"param"} == {"message", "type", "code"} and isinstance(err["message"], str) and \
            err["message"], err  # (``param``: the request field at fault, when one is)
        assert err["type"] == ("invalid_request_error" if status < 500 and status != 429 else
                               "rate_limit_error" if status == 429 else "server_error"), err
        return dict(err)


@contextmanager
def serving(engine: Engine) -> Iterator[api.ApiServer]:
    """A started ``ApiServer`` on 127.0.0.1 port 0 over ``engine``; stopped when the block ends."""
    srv = api.ApiServer(engine, port=0).start()
    try:
        yield srv
    finally:
        srv.stop()


def post(srv: api.ApiServer, path: str, body: dict[str, Any], timeout: float = 120) -> Answer:
    """``body`` as JSON to ``path`` on a fresh connection (``http.client``, ``timeout`` per read); the whole answer."""
    host, port = srv.server_address[:2]
    c = http.client.HTTPConnection(str(host), int(port), timeout=timeout)
    try:
        c.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        r = c.getresponse()
        return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        c.close()


def connect(srv: api.ApiServer, source: str | None = None) -> socket.socket:
    host, port = srv.server_address[:2]
    return socket.create_connection((str(host), int(port)), timeout=READ_DEADLINE_S,
                                    source_address=(source, 0) if source else None)


def read_answer(sock: socket.socket, method: str = "GET") -> Answer:
    """One HTTP answer from ``sock`` (status line, headers, a body of Content-Length bytes)."""
    resp = http.client.HTTPResponse(sock, method=method)
    resp.begin()
    body = resp.read()
    return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (EOF, or a reset once our answer has been read); waits at most
    ``READ_DEADLINE_S`` for it."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def exchange(srv: api.ApiServer, raw: bytes, method: str = "GET", wait_close: bool = True) -> tuple[Answer, bool]:
    """Send ``raw`` on a fresh connection, read the answer; also (with ``wait_close``) whether the server then closed
    the connection."""
    with connect(srv) as s:
        s.sendall(raw)
        answer = read_answer(s, method)
        return answer, wait_close and closed_by_server(s)
