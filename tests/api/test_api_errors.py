"""Every malformed request gets the API's documented JSON error, ``{"error": {"message", "type", "code"}}`` with its
HTTP status, never ``http.server``'s HTML page or a reset: malformed request lines, unknown methods and versions,
oversized request lines, header lines and header counts, oversized bodies (answered from the Content-Length, and
readable by a client that is still sending), and prompt token ids outside the model's vocabulary (400, not 503).

A real ``ApiServer`` on port 0 over the one-process built-in model; requests written byte for byte on raw sockets.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest

from ekmesh.api import local
from ekmesh.api import server as api
from tests.api.rawhttp import closed_by_server, connect, exchange, read_answer, serving


@pytest.fixture
def server(builtin_engine: local.LocalEngine) -> Iterator[api.ApiServer]:
    """A server per test (conftest's ``server`` is one per module)."""
    with serving(builtin_engine) as srv:
        yield srv


def _post_head(path: str, length: int | str, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
            f"{extra}\r\n").encode()


MALFORMED = [
    ("a request line that is not HTTP", b"garbage\r\n\r\n", 400),
    ("a request line of four words", b"GET /v1/models HTTP/1.1 more\r\n\r\n", 400),
    ("a bad version", b"GET /v1/models HTTP/x.y\r\nHost: x\r\n\r\n", 400),
    ("HTTP/2", b"GET /v1/models HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    ("an unknown method", b"BREW /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 501),
    ("a request line over 64 KiB", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    ("a header line over 64 KiB", b"GET /v1/models HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    ("over 100 headers", b"GET /v1/models HTTP/1.1\r\n" + b"".join(b"X-H%d: y\r\n" % i for i in range(101))
     + b"\r\n", 431),
    ("a Content-Length that is not a number", _post_head("/v1/completions", "lots") + b"{}", 400),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("case", "raw", "status"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_requests_get_json_errors(server: api.ApiServer, case: str, raw: bytes, status: int) -> None:
    answer, closed = exchange(server, raw)
    answer.assert_error(status)
    assert closed, f"{case}: the connection stays open after an error in the request's head"
    ok, _ = exchange(server, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ok.status == 200 and ok.json()["data"], "the server stopped serving"


@pytest.mark.timeout(60)
def test_an_oversized_body_is_answered_413_before_it_is_read(server: api.ApiServer) -> None:
    # a client that keeps sending its (huge) body before it reads: it gets the 413, not a reset or a broken pipe
    with connect(server) as s:
        s.sendall(_post_head("/v1/completions", 1 << 40))
        s.sendall(b"x" * (1 << 20))
        err = read_answer(s, "POST").assert_error(413)
        assert err["code"] == "body_too_large" and f"at most {api.MAX_BODY}" in err["message"], err
        assert closed_by_server(s)
    # one that asks first (Expect: 100-continue) gets the 413 instead of a 100
    with connect(server) as s:
        s.sendall(_post_head("/v1/completions", api.MAX_BODY + 1, "Expect: 100-continue\r\n"))
        read_answer(s, "POST").assert_error(413)
    # an ordinary client that sends the whole body, then reads
    host, port = server.server_address[:2]
    c = http.client.HTTPConnection(str(host), int(port), timeout=30)
    c.request("POST", "/v1/completions", b" " * (api.MAX_BODY + 1), {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "body_too_large"
    c.close()


@pytest.mark.timeout(60)
def test_a_post_to_an_unknown_path_does_not_read_its_body_as_the_next_request(server: api.ApiServer) -> None:
    body = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"  # a body that looks like a request
    with connect(server) as s:
        s.sendall(_post_head("/v1/nowhere", len(body)) + body)
        read_answer(s, "POST").assert_error(404)
        assert closed_by_server(s), "the unread body was left on a connection kept open"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ids", [[0, 99_999_999], [5, -1], [1 << 70]], ids=["too-large", "negative", "huge"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_token_ids_outside_the_vocabulary_are_a_bad_request(server: api.ApiServer, ids: list[int],
                                                             stream: bool) -> None:
    data = json.dumps({"prompt": ids, "max_tokens": 2, "stream": stream}).encode()
    answer, _ = exchange(server, _post_head("/v1/completions", len(data)) + data, "POST", wait_close=False)
    err = answer.assert_error(400)
    vocab = server.engine.served()[0].generator.vocab_size
    assert f"outside the vocabulary [0, {vocab})" in err["message"], err
