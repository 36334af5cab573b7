"""The API server's own limits, on a real HTTP server over the one-process built-in model (``ekmesh.api``):
bounded concurrency (429 beyond it, the slot freed when a streaming client leaves), bounded and validated bodies,
a deadline on a client that stops sending."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator

import pytest

from ekmesh.api import local
from ekmesh.api import server as api
from tests.discovery.meshproc import wait_until


@pytest.fixture(scope="module")
def engine() -> local.LocalEngine:
    return local.LocalEngine("builtin", "cpu", "fp32")


@pytest.fixture
def server(engine: local.LocalEngine, monkeypatch: pytest.MonkeyPatch) -> Iterator[api.ApiServer]:
    monkeypatch.setattr(api._Handler, "timeout", 1.0)
    srv = api.ApiServer(engine, port=0, max_active=1).start()
    try:
        yield srv
    finally:
        srv.stop()


def _conn(srv: api.ApiServer) -> http.client.HTTPConnection:
    host, port = srv.server_address[:2]
    return http.client.HTTPConnection(str(host), int(port), timeout=30)


def _post(srv: api.ApiServer, path: str, body: bytes | dict, headers: dict[str, str] | None = None
          ) -> tuple[int, dict]:
    c = _conn(srv)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    c.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    out = json.loads(r.read())
    c.close()
    return r.status, out


LONG = {"messages": [{"role": "user", "content": "Genesis 1"}], "max_tokens": 2000, "temperature": 0,
        "stream": True, "ignore_eos": True}


@pytest.mark.timeout(120)
def test_one_slot_busy_answers_429_and_a_leaving_client_frees_it(server: api.ApiServer) -> None:
    first = _conn(server)
    first.request("POST", "/v1/chat/completions", json.dumps(LONG).encode(), {"Content-Type": "application/json"})
    resp = first.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    assert resp.readline().startswith(b"data: ")  # streaming: the slot is taken
    status, out = _post(server, "/v1/completions", {"prompt": "In the beginning", "max_tokens": 4})
    assert status == 429, out
    assert out["error"]["code"] == "busy" and "answering 1 requests already" in out["error"]["message"]
    resp.close()  # the client leaves mid-answer
    first.close()

    def free() -> bool:
        return _post(server, "/v1/completions", {"prompt": "In the beginning", "max_tokens": 4,
                                                 "temperature": 0})[0] == 200

    wait_until(free, 30, "the slot to be freed once the streaming client left")


@pytest.mark.timeout(60)
def test_bad_bodies_are_refused_before_generation(server: api.ApiServer) -> None:
    status, out = _post(server, "/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in out["error"]["message"]
    status, out = _post(server, "/v1/chat/completions", b"[1, 2]")
    assert status == 400 and out["error"]["message"] == "the body must be a JSON object"
    status, out = _post(server, "/v1/completions", {"prompt": [1, "x"]})
    assert status == 400 and "token ids must be a non-empty list" in out["error"]["message"]
    status, out = _post(server, "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]})
    assert status == 400 and "messages[0] needs a 'role'" in out["error"]["message"]
    status, out = _post(server, "/v1/completions", {"prompt": "x", "stop": ""})
    assert status == 400 and "'stop' strings must not be empty" in out["error"]["message"]
    c = _conn(server)  # a body over the limit is refused from its Content-Length, unread
    c.putrequest("POST", "/v1/completions")
    c.putheader("Content-Length", str(api.MAX_BODY + 1))
    c.endheaders()
    r = c.getresponse()
    assert r.status == 413 and f"at most {api.MAX_BODY} are accepted" in json.loads(r.read())["error"]["message"]
    c.close()


@pytest.mark.timeout(60)
def test_a_client_that_stops_sending_is_dropped(server: api.ApiServer) -> None:
    host, port = server.server_address[:2]
    with socket.create_connection((str(host), int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\":")
        start = time.monotonic()
        assert s.recv(1024) == b""  # the server closes the connection after its read deadline (1 s here)
        assert time.monotonic() - start < 10
    assert _post(server, "/v1/completions", {"prompt": "In", "max_tokens": 2})[0] == 200  # still serving
