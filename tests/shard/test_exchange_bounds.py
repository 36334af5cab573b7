"""Blob exchange under a connection flood: bounds counted before authentication and per source address.

An idle TCP connection costs nothing to open, so the listener must not let unauthenticated ones crowd out real
peers: a flood of idle connections from one address (reopened as soon as the server closes one), and one from
many addresses, while a pinned peer on another loopback address (Linux routes all of 127/8 to lo) fetches a blob
ten times; refusals are logged a few lines per source, not one each; a blob id with a trailing newline is refused.
Real sockets on 127.0.0.x port 0, real stores, pinned mutual TLS.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ekmesh.core.errors import PeerClosedError, PeerError
from ekmesh.core.limits import ListenerLimits
from ekmesh.core.tls import TlsIdentity, make_context
from ekmesh.shard.blobserver import BlobListener, BlobServer, ServerLimits
from ekmesh.shard.exchange import CHUNK, Link, Status, client_link, get
from ekmesh.shard.manifest import ID_RE
from ekmesh.shard.store import Store
from tests.flood import Flood, holds_within
from tests.shard.test_exchange import DEFAULT_LIMITS, NAMES, Mesh, blob, put

MiB = 1 << 20
LIMITS = ListenerLimits()


@pytest.fixture(scope="module")
def ids() -> dict[str, TlsIdentity]:
    return {n: TlsIdentity.generate(n) for n in NAMES}


class BoundsMesh(Mesh):
    """``Mesh`` that keeps each server's listener (its gate's counts are part of what the tests check)."""

    def __init__(self, root: Path, ids: dict[str, TlsIdentity]) -> None:
        super().__init__(root, ids)
        self.listeners: dict[str, BlobListener] = {}

    def serve(self, name: str, server_cls: type[BlobServer] = BlobServer,
              limits: ServerLimits = DEFAULT_LIMITS) -> Store:
        store = self.stores[name] = Store(self.root / name)
        lst = self._stack.enter_context(BlobListener(server_cls(store, limits),
                                                     make_context(self.ids[name], server=True), self.pins.get))
        self.servers[name], self.addresses[name], self.listeners[name] = lst.server, lst.address, lst
        return store


@contextmanager
def mesh(tmp_path: Path, ids: dict[str, TlsIdentity]) -> Iterator[BoundsMesh]:
    m = BoundsMesh(tmp_path, ids)
    try:
        yield m
    finally:
        m.close()


def dialer_from(source: str, ids: dict[str, TlsIdentity], addresses: dict[str, tuple[str, int]],
                pins: dict[str, bytes], who: str = "client") -> Callable[[str], Link]:
    """A ``TlsDialer`` whose connections leave from ``source`` (another loopback address than the flood's)."""
    ctx = make_context(ids[who], server=False)

    def dial(peer: str) -> Link:
        raw = socket.create_connection(addresses[peer], timeout=5, source_address=(source, 0))
        return client_link(raw, ctx, pins.get, peer, 5)
    return dial


def fetch_all(dial: Callable[[str], Link], bid: str, data: bytes, n: int) -> tuple[int, list[str]]:
    """``n`` fetches of ``bid``, each on a fresh link; returns (successes, errors)."""
    ok, errors = 0, []
    for _ in range(n):
        try:
            link = dial("s1")
        except PeerError as exc:
            errors.append(f"dial: {exc}")
            continue
        try:
            a = get(link, bid, 0, 0, 10)
            got, buf = bytearray(), memoryview(bytearray(CHUNK))
            while a.status is Status.OK and len(got) < a.length:
                got += buf[:link.recv_into(buf, 10)]
            if a.status is Status.OK and bytes(got) == data:
                ok += 1
            else:
                errors.append(f"answer {a.status.name}")
        except PeerError as exc:
            errors.append(f"get: {exc}")
        finally:
            link.close()
    return ok, errors


@pytest.mark.timeout(90)
def test_a_flood_from_one_address_does_not_lock_out_other_peers(tmp_path: Path, ids) -> None:
    """The reported attack: far more idle connections than any cap from 127.0.0.1, reopened when closed; a pinned
    peer on 127.0.0.2 fetches 10 times, all 10 succeed, and the flood holds at most its per-source share."""
    with mesh(tmp_path, ids) as m:
        data = blob(300_000, 5)
        bid = put(m.serve("s1"), data)
        flood = Flood(m.addresses["s1"], ["127.0.0.1"], 3 * LIMITS.max_unauth)
        try:
            flood.wait_closed(LIMITS.max_unauth)
            ok, errors = fetch_all(dialer_from("127.0.0.2", ids, m.addresses, m.pins), bid, data, 10)
            gate = m.listeners["s1"].gate
            assert gate.pending_from("127.0.0.1") <= LIMITS.max_unauth_per_source
            closed_during = flood.closed
        finally:
            flood.stop()
        assert ok == 10, errors
        assert closed_during >= LIMITS.max_unauth  # the flood was refused all along, not let in


@pytest.mark.timeout(90)
def test_a_flood_from_many_addresses_does_not_lock_out_a_new_one(tmp_path: Path, ids) -> None:
    """20 flooding addresses fill the global cap of unauthenticated connections (each within its per-source cap):
    a newcomer from an address holding none displaces the oldest pending connection of the address holding the
    most, so its handshake runs and its 10 fetches succeed."""
    with mesh(tmp_path, ids) as m:
        data = blob(300_000, 6)
        bid = put(m.serve("s1"), data)
        sources = [f"127.0.0.{i}" for i in range(10, 30)]
        assert len(sources) * LIMITS.max_unauth_per_source > LIMITS.max_unauth
        flood = Flood(m.addresses["s1"], sources, LIMITS.max_unauth_per_source)
        try:
            flood.wait_closed(LIMITS.max_unauth)
            ok, errors = fetch_all(dialer_from("127.0.0.2", ids, m.addresses, m.pins), bid, data, 10)
            gate = m.listeners["s1"].gate
            assert gate.pending() <= LIMITS.max_unauth
        finally:
            flood.stop()
        assert ok == 10, errors
        assert gate.evictions > 0  # the global cap was full: room was made, not refused


@pytest.mark.timeout(60)
def test_a_peer_holds_at_most_its_share_of_authenticated_links(tmp_path: Path, ids) -> None:
    """A pinned peer that opens links and leaves them idle gets ``max_auth_per_peer``; its next one is refused
    before the handshake's HELLO (the client sees the connection close), and another peer is still served."""
    with mesh(tmp_path, ids) as m:
        data = blob(10_000, 7)
        bid = put(m.serve("s1"), data)
        mine = [m.dialer("evil")("s1") for _ in range(LIMITS.max_auth_per_peer)]
        try:
            with pytest.raises(PeerError, match="closed the connection during the handshake"):
                m.dialer("evil")("s1")
            ok, errors = fetch_all(m.dialer(), bid, data, 2)
            assert ok == 2, errors
        finally:
            for link in mine:
                link.close()
        gate = m.listeners["s1"].gate
        assert _wait(lambda: gate.authenticated("evil") == 0), gate.authenticated("evil")
        assert fetch_all(m.dialer("evil"), bid, data, 1)[0] == 1  # its links closed: its share is back


def _wait(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    return holds_within(cond, timeout)


@pytest.mark.timeout(60)
def test_refused_connections_are_logged_a_few_lines_per_source(tmp_path: Path, ids, caplog) -> None:
    """1,000 connections that fail their handshake (junk bytes) from one address: a handful of WARNING lines, not
    1,000; and the server keeps serving."""
    with mesh(tmp_path, ids) as m:
        data = blob(10_000, 8)
        bid = put(m.serve("s1"), data)
        with caplog.at_level(logging.WARNING, logger="ekmesh.shard.blobserver"):
            for _ in range(1000):
                with socket.create_connection(m.addresses["s1"], timeout=10) as s:
                    s.sendall(b"GET / HTTP/1.1\r\n\r\n")
                    try:
                        while s.recv(4096):
                            pass
                    except ConnectionResetError:
                        pass  # the server refused it: it has logged (or not) by now
        refusals = [r for r in caplog.records if r.name == "ekmesh.shard.blobserver"]
        assert 1 <= len(refusals) <= LIMITS.log_burst + 1, len(refusals)
        assert fetch_all(m.dialer(), bid, data, 1)[0] == 1


@pytest.mark.timeout(30)
def test_a_blob_id_with_a_trailing_newline_is_refused(tmp_path: Path, ids) -> None:
    """``$`` matches before a final newline; ``\\Z`` does not. On the wire the request closes its link (malformed)
    instead of being looked up."""
    good = "blake3:" + "ab" * 32
    assert ID_RE.match(good) and not ID_RE.match(good + "\n")
    with mesh(tmp_path, ids) as m:
        m.serve("s1")
        link = m.dialer()("s1")
        try:
            ident = (good + "\n").encode()
            link.send(struct.pack("!BBHQQ", 1, 0, len(ident), 0, 0) + ident, 5)
            with pytest.raises(PeerClosedError):
                link.recv(512, 10)
        finally:
            link.close()


@pytest.mark.timeout(60)
def test_a_handshake_has_one_deadline_however_slowly_it_drips(tmp_path: Path, ids) -> None:
    """A pinned client that completes TLS and then sends its 37-byte HELLO one byte every 0.2 s (each read would
    meet its own timeout) is closed at the handshake's deadline, long before its HELLO is whole."""
    with mesh(tmp_path, ids) as m:
        store = Store(tmp_path / "s1")
        quick = ListenerLimits(handshake_s=1.0)
        lst = m._stack.enter_context(BlobListener(BlobServer(store), make_context(ids["s1"], server=True),
                                                  m.pins.get, limits=quick))
        raw = socket.create_connection(lst.address, timeout=10)
        with make_context(ids["client"], server=False).wrap_socket(raw) as tls:
            sent = 0
            try:
                while sent < 37:
                    tls.sendall(b"E")
                    sent += 1
                    tls.settimeout(0.2)
                    try:
                        if tls.recv(64) == b"":
                            break  # closed by the server
                    except TimeoutError:
                        continue  # nothing yet: drip on
            except OSError:
                pass  # reset by the server
        assert sent < 37, "the server waited for the whole dripping HELLO"
        assert _wait(lambda: lst.gate.pending() == 0 and lst.gate.authenticated() == 0)
