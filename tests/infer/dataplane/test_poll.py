"""Busy-polling reads (``poll.recv_some``) on real sockets: plain TCP and pinned TLS 1.3 on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from ekmesh.core.errors import ConfigError, PeerClosedError
from ekmesh.core.tls import TlsIdentity, make_context
from ekmesh.infer.dataplane import poll


@pytest.fixture
def polling(monkeypatch):
    monkeypatch.setattr(poll, "MAX_POLL_S", 0.5)
    monkeypatch.setattr(poll, "POLL_CAP_S", 1.5)
    monkeypatch.setattr(poll, "_REGISTRY", poll._Registry())  # threads of other tests do not count


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    srv = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    srv.close()
    return a, b


def later(delay: float, fn, *args) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        fn(*args)
    t = threading.Thread(target=run)
    t.start()
    return t


def test_budget_parses_and_refuses_garbage():
    assert poll.budget("2500", cpus=4) == pytest.approx(2.5e-3)
    assert poll.budget("2500", cpus=2) == pytest.approx(2.5e-3)  # set explicitly: any machine with 2 cores
    assert poll.budget("0", cpus=4) == 0.0
    assert poll.budget("2500", cpus=1) == 0.0  # one core: the peer we wait for would need it
    assert poll.budget(None, cpus=8) == pytest.approx(3e-3)  # unset: on by default where cores are plenty
    assert poll.budget(None, cpus=2) == 0.0  # ... and off on a 2-core machine
    for bad in ("abc", "-1", "nan", "2e6"):
        with pytest.raises(ConfigError, match=r"EKMESH_POLL_US must be a number of microseconds in \[0, 1000000\]"):
            poll.budget(bad, cpus=4)


def test_waits_poll_for_short_waits_and_block_for_long_ones(monkeypatch):
    monkeypatch.setattr(poll, "MAX_POLL_S", 3e-3)
    monkeypatch.setattr(poll, "POLL_CAP_S", 9e-3)
    w = poll.Waits(n=8, warmup=4)
    assert w.budget() == 3e-3  # nothing known yet: poll up to EKMESH_POLL_US
    for s in (0.5e-3, 0.4e-3, 0.6e-3, 50.0):  # one long idle gap among short waits: the median ignores it
        w.note(s)
    assert w.budget() == pytest.approx(2 * 0.6e-3 + 0.2e-3)
    for s in (2.9e-3,) * 8:  # a LAN-like wait: polls, capped at three times the setting
        w.note(s)
    assert w.budget() == pytest.approx(6e-3)
    for s in (7e-3,) * 5:  # a WiFi-like wait: blocking costs little next to it
        w.note(s)
    assert w.budget() == 0.0
    monkeypatch.setattr(poll, "MAX_POLL_S", 0.0)
    assert poll.Waits().budget() == 0.0  # EKMESH_POLL_US=0: never


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("delay", "poll_s", "counter"), [
    (0.02, 0.4, "polled"),  # the bytes come while polling
    (0.2, 0.01, "blocked"),  # the poll time runs out first; a blocking read gets them
])
def test_read_gets_the_bytes_and_leaves_a_blocking_socket(polling, delay, poll_s, counter):
    a, b = tcp_pair()
    buf = bytearray(64)
    before = getattr(poll.STATS, counter)
    t = later(delay, b.sendall, b"hello")
    n = poll.recv_some(a, memoryview(buf), time.monotonic() + 10, "peer", poll_s=poll_s)
    t.join()
    assert bytes(buf[:n]) == b"hello"
    assert getattr(poll.STATS, counter) == before + 1
    timeout = a.gettimeout()
    assert timeout is not None and timeout > 0  # not left non-blocking
    a.close()
    b.close()


@pytest.mark.timeout(30)
def test_eof_and_deadline_while_polling(polling):
    a, b = tcp_pair()
    buf = bytearray(8)
    later(0.02, b.close).join()
    with pytest.raises(PeerClosedError, match="peer p1 closed the connection"):
        poll.recv_some(a, memoryview(buf), time.monotonic() + 10, "p1", poll_s=0.4)
    a.close()
    a, b = tcp_pair()
    with pytest.raises(PeerClosedError, match="timed out waiting for data from peer p2"):
        poll.recv_some(a, memoryview(buf), time.monotonic() + 0.05, "p2", poll_s=0.4)  # deadline inside the poll
    a.close()
    b.close()


@pytest.mark.timeout(30)
def test_two_registered_threads_never_poll(polling):
    a, b = tcp_pair()
    buf = bytearray(8)
    before = (poll.STATS.polled, poll.STATS.blocked)
    with poll.Registration():
        assert poll.may_poll()
        with poll.Registration():
            assert not poll.may_poll()
            t = later(0.02, b.sendall, b"x")
            assert poll.recv_some(a, memoryview(buf), time.monotonic() + 10, "peer", poll_s=0.4) == 1
            t.join()
        assert poll.may_poll()
    assert (poll.STATS.polled, poll.STATS.blocked) == (before[0], before[1] + 1)
    a.close()
    b.close()


@pytest.mark.timeout(30)
def test_polled_read_through_tls(polling):
    """A TLS socket that has no whole record yet raises SSLWantReadError when non-blocking: polled past it."""
    server_id, client_id = TlsIdentity.generate("server"), TlsIdentity.generate("client")
    raw_a, raw_b = tcp_pair()
    out: dict[str, socket.socket] = {}

    def accept() -> None:
        out["b"] = make_context(server_id, server=True).wrap_socket(raw_b, server_side=True)

    t = threading.Thread(target=accept)
    t.start()
    a = make_context(client_id, server=False).wrap_socket(raw_a)
    t.join()
    a.sendall(b"ping")  # completes the server's side of the handshake
    assert out["b"].recv(4) == b"ping"
    buf = bytearray(1 << 16)
    before = poll.STATS.polled
    payload = bytes(range(256)) * 40  # 10 KiB: one TLS record
    t = later(0.02, out["b"].sendall, payload)
    got = bytearray()
    while len(got) < len(payload):
        n = poll.recv_some(a, memoryview(buf), time.monotonic() + 10, "server", poll_s=0.4)
        got += buf[:n]
    t.join()
    assert bytes(got) == payload
    assert poll.STATS.polled > before
    a.close()
    out["b"].close()


@pytest.mark.parametrize("poll_s", [0.0, 0.4])
def test_bytes_that_arrived_count_even_past_the_deadline(polling, poll_s):
    """A caller that waited on another peer first reads this one's answer late: bytes already there are read, not
    refused for the deadline (before, the host failed healthy peers read after a hung one)."""
    a, b = tcp_pair()
    b.sendall(b"answer")
    time.sleep(0.05)  # the bytes are in a's receive buffer
    buf = bytearray(8)
    assert poll.recv_some(a, memoryview(buf), time.monotonic() - 1.0, "p", poll_s=poll_s) == 6
    assert bytes(buf[:6]) == b"answer"
    with pytest.raises(PeerClosedError, match="timed out waiting for data from peer p"):
        poll.recv_some(a, memoryview(buf), time.monotonic() - 1.0, "p", poll_s=poll_s)  # nothing there: refused
    a.close()
    b.close()
