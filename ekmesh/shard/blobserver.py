"""Blob exchange, the server: ``BlobServer`` answers the GET protocol of ``exchange.py`` from a ``Store`` over any
authenticated link, and ``BlobListener`` accepts TCP connections, makes them links (``exchange.server_link``) and
hands them to it, within the listener bounds of ``ekmesh.core.limits``.

Bounds (``ListenerLimits``, shared with the data plane; ``ekmesh.core.limits`` says what happens when full): until
its pin check passes a connection is *pending* and counts against its source address (8) and the listener (64);
the whole handshake (TLS, pin check, HELLO) has one deadline (3 s); authenticated, a link counts against its peer
(8: beyond, it is closed before this end's HELLO) and the listener (128). One thread per admitted connection, so
these bound threads too; refusals log at most 5 lines per source per 10 s.

Invariants: every frame's length is checked against a bound before anything is allocated or read; a link's
buffers grow to the largest frame it carried (an idle link holds no megabyte buffers; a transfer's 1 MiB buffer
lives as long as the transfer); a request that is malformed (bad op, flags, id, size) closes its link after a
(rate-limited) WARNING and the server keeps serving other links; the server serves only bytes of blobs that
``Store.verify`` passed; at most ``max_per_peer`` transfers per peer and ``max_total`` in all run at once (BUSY
beyond); data is written with blocking sends of one frame at a time, so a slow reader holds at most a frame and the
kernel's socket buffers of the server's memory (back-pressure), and a reader that takes nothing for ``send_s`` is
dropped; every wait has a deadline. Socket, TLS and AEAD errors become ``PeerClosedError`` /
``PeerUnreachableError`` / ``ProtocolError``.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections import deque
from dataclasses import dataclass
from io import FileIO

from ekmesh.core.errors import (
    PeerClosedError,
    PeerError,
    ProtocolError,
    ShardError,
    ShardMissingError,
)
from ekmesh.core.limits import DEFAULT_LISTENER, Gate, ListenerLimits, RateLimitedLog, Ticket
from ekmesh.core.tls import Pins
from ekmesh.shard.exchange import ANS, CHUNK, MAX_CONTROL, OP_GET, REQ, Link, Status, server_link
from ekmesh.shard.manifest import ID_RE
from ekmesh.shard.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """Transfers; the links themselves are bounded by the listener (``ListenerLimits``)."""

    max_per_peer: int = 2  # concurrent transfers per peer (BUSY beyond)
    max_total: int = 16  # concurrent transfers in all (BUSY beyond); each holds ~3 MiB of buffers
    busy_retry_ms: int = 100


@dataclass(frozen=True)
class ServerTimeouts:
    """Waits on an authenticated link (the handshake's deadline is ``ListenerLimits.handshake_s``)."""

    idle_s: float = 300.0  # waiting for the next request on an open link
    send_s: float = 30.0  # one data frame (a reader that takes nothing this long is dropped)


@dataclass(frozen=True)
class Served:
    """One answered request, for status and tests."""

    peer: str
    blob_id: str
    offset: int
    length: int
    status: Status


class BlobServer:
    """Answers GETs from a ``Store`` on links it is handed (``serve`` blocks until the link closes)."""

    def __init__(self, store: Store, limits: ServerLimits = ServerLimits(),
                 timeouts: ServerTimeouts = ServerTimeouts()) -> None:
        self.store, self.limits, self.timeouts = store, limits, timeouts
        self._lock = threading.Lock()
        self._active: dict[str, int] = {}
        self._warn = RateLimitedLog(log)  # malformed requests, per peer
        self.bytes_sent = 0
        self.served: deque[Served] = deque(maxlen=10_000)

    def serve(self, link: Link) -> None:
        try:
            while True:
                msg = link.recv(MAX_CONTROL, self.timeouts.idle_s)
                self._answer(link, self._parse(msg, link.peer))
        except ProtocolError as exc:
            self._warn.warning(link.peer, "closing blob link of peer %s: %s", link.peer, exc)
        except PeerError as exc:
            log.debug("blob link of peer %s ended: %s", link.peer, exc)
        finally:
            link.close()

    @staticmethod
    def _parse(msg: bytes, peer: str) -> tuple[str, int, int]:
        if len(msg) < REQ.size:
            raise ProtocolError(f"a {len(msg)}-byte request is too short")
        op, flags, id_len, offset, length = REQ.unpack_from(msg)
        if op != OP_GET or flags:
            raise ProtocolError(f"unknown request op={op} flags={flags}")
        if id_len != len(msg) - REQ.size:
            raise ProtocolError(f"request id length {id_len} does not match its frame")
        ident = msg[REQ.size:].decode("ascii", "replace")
        if not ID_RE.match(ident):
            raise ProtocolError(f"{ident[:80]!r} is not a blob id")
        return ident, offset, length

    def _answer(self, link: Link, req: tuple[str, int, int]) -> None:
        blob_id, offset, length = req
        if not self._take(link.peer):
            self._reply(link, req, Status.BUSY, retry_ms=self.limits.busy_retry_ms, message="transfer caps reached")
            return
        try:
            try:
                f = self._open(blob_id)
            except (ShardError, OSError) as exc:
                self._reply(link, req, Status.NOT_FOUND, message=str(exc)[:200])
                return
            with f:
                size = f.seek(0, 2)
                if offset > size:
                    self._reply(link, req, Status.BAD_RANGE, size=size, message=f"offset past {size}")
                    return
                n = size - offset if length == 0 else min(length, size - offset)
                self._reply(link, req, Status.OK, size=size, length=n)
                f.seek(offset)
                view, left, at = memoryview(bytearray(min(CHUNK, n))), n, offset  # one buffer per transfer
                while left:
                    got = self._fill(f, view[:min(CHUNK, left)], blob_id, at)
                    if got == 0:
                        raise PeerClosedError(f"blob {blob_id} shrank while being served", link.peer)
                    link.send(view[:got], self.timeouts.send_s)
                    left, at = left - got, at + got
                    with self._lock:
                        self.bytes_sent += got
        finally:
            with self._lock:
                self._active[link.peer] -= 1

    def _open(self, blob_id: str) -> FileIO:
        """A verified blob, else a stored manifest: a model id is the hash of its manifest's bytes, so a peer gets
        a manifest with a GET of the model id and checks it like any blob (manifest spread)."""
        try:
            return open(self.store.verify(blob_id), "rb", buffering=0)
        except ShardMissingError:
            if not self.store.manifest_path(blob_id).is_file():
                raise
            self.store.load_manifest(blob_id)  # checks the bytes against the id
            return open(self.store.manifest_path(blob_id), "rb", buffering=0)

    def _fill(self, f: FileIO, view: memoryview, blob_id: str, offset: int) -> int:
        """Reads the next bytes of the blob into ``view`` (a test subclass overrides it to serve corrupt bytes)."""
        return f.readinto(view)

    def _take(self, peer: str) -> bool:
        with self._lock:
            mine = self._active.get(peer, 0)
            if mine >= self.limits.max_per_peer or sum(self._active.values()) >= self.limits.max_total:
                return False
            self._active[peer] = mine + 1
            return True

    def _reply(self, link: Link, req: tuple[str, int, int], status: Status, size: int = 0, length: int = 0,
               retry_ms: int = 0, message: str = "") -> None:
        self.served.append(Served(link.peer, req[0], req[1], length, status))
        log.debug("blob %s [%d +%d] to %s: %s", req[0], req[1], length, link.peer, status.name)
        link.send(ANS.pack(status, 0, retry_ms, size, length) + message.encode("utf-8")[:255],
                  self.timeouts.send_s)


class BlobListener:
    """TCP listener whose connections are admitted by a ``Gate`` (``ListenerLimits``: connections waiting to
    authenticate per source address and in all, one handshake deadline, authenticated links per peer and in all),
    authenticated (``server_link``) and served by ``server``, a thread each; refusals are logged a few lines per
    source (``RateLimitedLog``). ``stop()`` closes the listener and every open link and joins the threads."""

    def __init__(self, server: BlobServer, ctx: ssl.SSLContext, pins: Pins, host: str = "127.0.0.1",
                 port: int = 0, limits: ListenerLimits = DEFAULT_LISTENER) -> None:
        self.server, self.ctx, self.pins, self.limits = server, ctx, pins, limits
        self.refusals = RateLimitedLog(log, limits.log_interval_s, limits.log_burst)
        self.gate = Gate(limits, self.refusals, "blob exchange")
        self._sock = socket.create_server((host, port))
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._stopped = False
        self._acceptor = threading.Thread(target=self._accept, name="blob-accept", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                raw, addr = self._sock.accept()
            except OSError:
                return  # closed by stop()
            ticket = None if self._stopped else self.gate.admit(raw, addr)  # refusals close at once, no thread
            with self._lock:
                if ticket is None or self._stopped:
                    raw.close()
                    if ticket is not None:
                        self.gate.leave(ticket)
                    continue
                self._open.add(raw)
                t = threading.Thread(target=self._conn, args=(raw, ticket), name="blob-conn", daemon=True)
                self._threads.add(t)
            t.start()

    def _admit(self, ticket: Ticket, peer: str) -> None:
        """After the pin check, before the HELLO: the peer's share of authenticated links (``server_link``)."""
        why = self.gate.authenticate(ticket, peer)
        if why is not None:
            raise PeerClosedError(f"refused peer {peer}: {why}", peer)

    def _conn(self, raw: socket.socket, ticket: Ticket) -> None:
        try:
            link = server_link(raw, self.ctx, self.pins, max(ticket.left(), 1e-3),
                               admit=lambda peer: self._admit(ticket, peer))
        except (PeerError, ProtocolError) as exc:
            if not ticket.evicted:  # (the gate logged why it closed an evicted one)
                self.refusals.warning(ticket.source, "refused a blob-exchange connection from %s: %s",
                                      ticket.address, exc)
        else:
            with self._lock:
                self._open.add(link.sock)
            self.server.serve(link)
            with self._lock:
                self._open.discard(link.sock)
        finally:
            raw.close()
            with self._lock:
                self._open.discard(raw)
                self._threads.discard(threading.current_thread())
            self.gate.leave(ticket)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            socks, threads = list(self._open), list(self._threads)
        for s in [self._sock, *socks]:  # wakes accept() and blocked reads; each link's thread closes its socket
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._sock.close()
        self._acceptor.join(5)
        for t in threads:
            t.join(5)

    def __enter__(self) -> BlobListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
