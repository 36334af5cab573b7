"""``GatedListener`` (``ekmesh.core.limits``), the accept loop of the data plane's expert server and the experts
relay, on real sockets on 127.0.0.1 port 0: a connection the gate refuses is closed without a thread and counted;
an admitted one is served on its own thread and leaves the gate and ``conns`` when its handler returns; ``stop()``
wakes a handler blocked in ``recv``, joins it and frees its ticket."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

import pytest

from ekmesh.core.limits import Connection, Gate, GatedListener, ListenerLimits, RateLimitedLog
from tests.discovery.meshproc import wait_until

DEADLINE_S = 10.0


def _until(cond: Callable[[], bool], what: str) -> None:
    wait_until(cond, DEADLINE_S, what)


def _gate(per_source: int = 8) -> Gate:
    limits = ListenerLimits(max_unauth_per_source=per_source, max_unauth=max(per_source, 8))
    return Gate(limits, RateLimitedLog(logging.getLogger(__name__)), "test listener")


@pytest.mark.timeout(30)
def test_a_refused_connection_is_closed_and_counted_without_a_thread() -> None:
    blocked, refused = threading.Event(), []

    def serve(conn: Connection) -> None:  # holds its connection pending until the test lets it go
        blocked.wait(DEADLINE_S)

    lst: GatedListener[Connection] = GatedListener(_gate(per_source=1), Connection, serve, "test-gated",
                                                   refused=lambda: refused.append(1))
    lst.start()
    try:
        first = socket.create_connection(lst.address, timeout=DEADLINE_S)
        _until(lambda: lst.gate.pending() == 1 and len(lst.conns) == 1, "the first connection to be admitted")
        second = socket.create_connection(lst.address, timeout=DEADLINE_S)
        assert second.recv(1) == b""  # closed by the listener: its source already holds its one pending slot
        _until(lambda: refused == [1], "the refusal to be counted")
        assert len(lst.conns) == 1 and sum(t.name == "test-gated-conn" for t in threading.enumerate()) == 1
        blocked.set()
        _until(lambda: not lst.conns and lst.gate.pending() == 0, "the served connection to leave")
        assert first.recv(1) == b""  # its socket was closed when its handler returned
        first.close()
        second.close()
    finally:
        blocked.set()
        lst.stop()


@pytest.mark.timeout(30)
def test_stop_wakes_a_handler_blocked_in_recv_and_frees_its_ticket() -> None:
    started, ended = threading.Event(), threading.Event()

    def serve(conn: Connection) -> None:
        started.set()
        conn.sock.settimeout(DEADLINE_S)
        try:
            assert conn.sock.recv(1) == b""  # woken by stop()'s shutdown, long before its deadline
        finally:
            ended.set()

    lst: GatedListener[Connection] = GatedListener(_gate(), Connection, serve, "test-gated")
    lst.start()
    client = socket.create_connection(lst.address, timeout=DEADLINE_S)
    assert started.wait(DEADLINE_S)
    lst.stop()
    assert ended.is_set()  # joined: stop() returned after the handler did
    assert not lst.conns and lst.gate.pending() == 0 and lst.stopping
    with pytest.raises(OSError):
        socket.create_connection(lst.address, timeout=DEADLINE_S).close()  # the listener is closed
    client.close()
    lst.stop()  # idempotent
