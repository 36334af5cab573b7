"""The API server's resource bounds, on a real ``ApiServer`` (port 0) over the one-process built-in model, with real
sockets: a listen backlog that takes a burst of clients without resets, a cap on connections (and so on threads)
in all and per source address that answers 429 in OpenAI's error shape with ``Retry-After`` when full, and a
whole-request deadline that cuts a client which drips its request a byte at a time.

Thread counts are ``threading.active_count()`` of this process, where the server runs; every wait polls a condition
with a deadline.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from ekmesh.api import local
from ekmesh.api import server as api
from tests.api.rawhttp import Answer, closed_by_server, connect, exchange, read_answer
from tests.discovery.meshproc import wait_until

PARTIAL_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"  # a request that never finishes its head
MODELS = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@pytest.fixture
def make_server(builtin_engine: local.LocalEngine) -> Iterator[Any]:
    with ExitStack() as stack:
        def make(**kw: Any) -> api.ApiServer:
            srv = api.ApiServer(builtin_engine, port=0, **kw).start()
            stack.callback(srv.stop)
            return srv
        yield make


def _threads_back_to(baseline: int, srv: api.ApiServer) -> None:
    wait_until(lambda: threading.active_count() == baseline and srv.connections == 0, 30,
               f"the thread count to return to {baseline} (now {threading.active_count()}, "
               f"{srv.connections} connections)")


@pytest.mark.timeout(180)
def test_forty_concurrent_clients_get_answers_or_429_never_resets(make_server: Any) -> None:
    srv = make_server()
    host, port = srv.server_address[:2]
    body = json.dumps({"prompt": "In the beginning", "max_tokens": 2, "temperature": 0}).encode()
    start = threading.Barrier(40)
    results: dict[int, Answer | BaseException] = {}

    def client(i: int) -> None:
        try:
            start.wait(timeout=30)
            c = http.client.HTTPConnection(str(host), int(port), timeout=60)
            c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            results[i] = Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
            c.close()
        except (OSError, http.client.HTTPException, threading.BrokenBarrierError) as exc:
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    failed = {i: repr(r) for i, r in results.items() if isinstance(r, BaseException)}
    assert len(results) == 40 and not failed, f"{len(failed)} of 40 clients failed at the TCP level: {failed}"
    answers = [r for r in results.values() if isinstance(r, Answer)]
    for a in answers:
        if a.status == 429:
            assert a.assert_error(429)["code"] in ("busy", "too_many_connections")
            assert a.headers.get("retry-after", "").isdigit(), a.headers
        else:
            assert a.status == 200 and a.json()["choices"][0]["text"] is not None, a
    assert any(a.status == 200 for a in answers)


DRIPS = {"head": PARTIAL_HEAD + b"X-Drip: ",
         "body": PARTIAL_HEAD + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": \""}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("part", sorted(DRIPS))
def test_a_slow_drip_client_is_cut_at_the_request_deadline(make_server: Any, part: str) -> None:
    srv = make_server(request_deadline_s=1.0)
    baseline = threading.active_count()
    stop = threading.Event()
    with connect(srv) as s:
        def drip() -> None:  # then one byte every 0.2 s: every single read is quick
            try:
                s.sendall(DRIPS[part])
                while not stop.wait(0.2):
                    s.sendall(b"a")
            except OSError:
                pass  # the server closed the connection: what the test waits for

        dripper = threading.Thread(target=drip)
        dripper.start()
        try:
            err = read_answer(s, "POST").assert_error(408)
            assert err["code"] == "request_timeout", err
            assert closed_by_server(s)
        finally:
            stop.set()
            dripper.join(timeout=10)
    _threads_back_to(baseline, srv)


@pytest.mark.timeout(60)
def test_an_idle_connection_is_closed_at_the_deadline_without_an_answer(make_server: Any) -> None:
    srv = make_server(request_deadline_s=1.0)
    baseline = threading.active_count()
    with connect(srv) as s:
        wait_until(lambda: srv.connections == 1, 10, "the server to take the connection")
        assert s.recv(1024) == b""  # nothing of a request came: closed, no 408 a client could take for an answer
    _threads_back_to(baseline, srv)


@pytest.mark.timeout(90)
def test_slow_clients_beyond_the_cap_get_429_and_threads_stay_bounded(make_server: Any,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ekmesh.api.transport")
    srv = make_server(max_connections=4, request_deadline_s=60.0)
    baseline = threading.active_count()
    with ExitStack() as held:
        slow = [held.enter_context(connect(srv)) for _ in range(4)]
        for s in slow:
            s.sendall(PARTIAL_HEAD)
        wait_until(lambda: srv.connections == 4, 10, "the server to take the 4 slow connections")
        for _ in range(6):
            with connect(srv) as s:
                s.sendall(PARTIAL_HEAD)  # refused from the connection count alone, before any request is read
                answer = read_answer(s, "POST")
                assert answer.assert_error(429)["code"] == "too_many_connections"
                assert answer.headers.get("retry-after", "").isdigit(), answer.headers
                assert closed_by_server(s)
        assert threading.active_count() <= baseline + 4, threading.enumerate()
        assert srv.connections == 4
        refusals = [r for r in caplog.records if "connection cap reached" in r.getMessage()]
        assert len(refusals) == 1, [r.getMessage() for r in refusals]  # 6 refusals, one line (rate-limited)
    _threads_back_to(baseline, srv)  # the slow clients left: their threads ended
    ok, _ = exchange(srv, MODELS)
    assert ok.status == 200


@pytest.mark.timeout(60)
def test_one_address_at_its_cap_does_not_lock_out_another(make_server: Any) -> None:
    srv = make_server(max_connections=8, max_per_address=2, request_deadline_s=60.0)
    with ExitStack() as held:
        for _ in range(2):
            held.enter_context(connect(srv, "127.0.0.1")).sendall(PARTIAL_HEAD)
        wait_until(lambda: srv.connections == 2, 10, "the server to take the 2 slow connections")
        with connect(srv, "127.0.0.1") as s:
            s.sendall(MODELS)
            assert read_answer(s).assert_error(429)["code"] == "too_many_connections"
        with connect(srv, "127.0.0.2") as s:  # another source address on the loopback interface
            s.sendall(MODELS)
            answer = read_answer(s)
            assert answer.status == 200 and answer.json()["data"], answer


@pytest.mark.timeout(30)
def test_the_listen_backlog_is_not_pythons_default_of_5(make_server: Any) -> None:
    srv = make_server()
    assert srv.request_queue_size >= 128
    assert srv.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
