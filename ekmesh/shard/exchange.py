"""Blob exchange, the wire: authenticated links, the GET protocol, and the server that answers it from a ``Store``.

A **link** is a connected byte stream to one authenticated peer that carries length-prefixed messages. The server
(``BlobServer.serve``) and the client primitives (``get``) only see links, so the transport is injected: the node
may hand over any connected socket whose remote peer id it authenticated. ``TlsDialer`` / ``BlobListener`` make
links the default way, over a direct TCP connection bound to peer ids with the pinned certificates of
``ekmesh.core.tls`` (libp2p streams reach ~100-130 MB/s here, too slow for bulk bytes):

1. TLS 1.3 handshake; both ends run ``check_peer_cert`` (client: the peer it dialled; server: the CN's pin);
2. over TLS, each end sends ``HELLO = "EKBX" | version u8 | 32 random bytes`` (the server only after its pin check,
   so a refused client sees the connection close before any answer);
3. both ends send TLS close_notify (``unwrap``) and continue on the bare TCP socket with AES-256-GCM frames, one key
   per direction from HKDF-SHA256(client secret | server secret). The secrets crossed the authenticated TLS channel,
   so the keys are bound to both peer ids; Python's TLS reads one 16 KiB record per call, which halves throughput,
   whereas 1 MiB AEAD frames cost little beyond the AES-GCM work itself (~10 GB/s a core here; docs/BENCHMARKS.md).

Both ends set TCP_NODELAY: every message leaves in one ``sendall`` (length, ciphertext and tag together), and with
Nagle's algorithm the small handshake and control messages waited for the peer's delayed ACK (45 ms a handshake
instead of 4 ms here).

Frames: ``u32 length | body``; sealed bodies are ciphertext + 16-byte tag, nonce = 4 zero bytes | u64 frame counter
of that direction, associated data = the length bytes (so reordering, replay, truncation of a frame or a change of
its length fail authentication). Messages (one frame each, big-endian):

    request  c->s   op u8 (1 = GET) | flags u8 (0) | id_len u16 | offset u64 | length u64 (0: to the end) | id ascii
    answer   s->c   status u8 | 0 u8 | retry_ms u16 | size u64 | length u64 | message utf-8 (< 256 bytes)
    data     s->c   after an OK answer: ``length`` bytes of the blob from ``offset``, in frames of <= 1 MiB

A GET of a model id answers the bytes of that model's stored manifest (checked against the id before it is served).

Status: OK, NOT_FOUND (no verified copy here), BUSY (transfer caps reached; retry after ``retry_ms``), BAD_RANGE
(offset past the end). One request at a time per link; the link stays open for the next one.

Invariants: every frame's length is checked against a bound before anything is allocated or read; a request that
is malformed (bad op, flags, id, size) closes its link after a WARNING and the server keeps serving other links;
the server serves only bytes of blobs that ``Store.verify`` passed; at most ``max_per_peer`` transfers per peer and
``max_total`` in all run at once (BUSY beyond), and at most ``max_conns`` links stay open; data is written with
blocking sends of one frame at a time, so a slow reader holds at most a frame and the kernel's socket buffers of
the server's memory (back-pressure), and a reader that takes nothing for ``send_s`` is dropped; every wait has a
deadline. Socket, TLS and AEAD errors become ``PeerClosedError`` / ``PeerUnreachableError`` / ``ProtocolError``.
"""

from __future__ import annotations

import logging
import secrets
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from io import FileIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ekmesh.core.errors import (
    PeerClosedError,
    PeerError,
    PeerUnreachableError,
    ProtocolError,
    ShardError,
    ShardMissingError,
)
from ekmesh.core.tls import Pins, check_peer_cert
from ekmesh.shard.manifest import ID_RE
from ekmesh.shard.store import Store

log = logging.getLogger(__name__)

MAGIC, VERSION = b"EKBX", 1
_HELLO = struct.Struct("!4sB32s")
_LEN = struct.Struct("!I")
_REQ = struct.Struct("!BBHQQ")
_ANS = struct.Struct("!BBHQQ")
OP_GET = 1
CHUNK = 1 << 20  # data frame payload
MAX_CONTROL = 512  # request / answer frames
_TAG = 16


class Status(IntEnum):
    OK = 0
    NOT_FOUND = 1
    BUSY = 2
    BAD_RANGE = 3


class Link:
    """Messages over a connected socket to authenticated peer ``peer``; sealed with AES-GCM when ``keys`` (send key,
    receive key) are given, plain frames otherwise (for a transport that is already encrypted). One thread at a
    time sends and one receives."""

    def __init__(self, sock: socket.socket, peer: str, keys: tuple[bytes, bytes] | None = None) -> None:
        self.sock, self.peer = sock, peer
        self._seal = (AESGCM(keys[0]), AESGCM(keys[1])) if keys else None
        self._sent = self._received = 0
        self._out = bytearray(_LEN.size + CHUNK + _TAG)
        self._in = bytearray(CHUNK + _TAG)

    def _nonce(self, n: int) -> bytes:
        return b"\0\0\0\0" + n.to_bytes(8, "big")

    def send(self, data: bytes | memoryview, timeout: float) -> None:
        n = len(data)
        if n > CHUNK:
            raise ValueError(f"a frame carries at most {CHUNK} bytes, not {n}")
        out = memoryview(self._out)
        if self._seal is not None:
            _LEN.pack_into(out, 0, n + _TAG)
            self._seal[0].encrypt_into(self._nonce(self._sent), data, out[:4], out[4:4 + n + _TAG])
            self._sent += 1
            frame = out[:4 + n + _TAG]
        else:
            _LEN.pack_into(out, 0, n)
            out[4:4 + n] = data
            frame = out[:4 + n]
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(frame)
        except OSError as exc:
            raise PeerClosedError(f"sending to peer {self.peer} failed: {exc}", self.peer) from exc

    def recv_into(self, buf: memoryview, timeout: float) -> int:
        """One message into ``buf`` (at most ``len(buf)`` bytes, else ProtocolError); returns its length."""
        deadline = time.monotonic() + timeout
        head = bytearray(4)
        self._read(memoryview(head), deadline)
        (n,) = _LEN.unpack(head)
        limit = len(buf) + (_TAG if self._seal is not None else 0)
        if n > limit or (self._seal is not None and n < _TAG):
            raise ProtocolError(f"peer {self.peer} sent a {n}-byte frame; at most {limit} expected here")
        if self._seal is None:
            self._read(buf[:n], deadline)
            return n
        body = memoryview(self._in)[:n]
        self._read(body, deadline)
        try:
            self._seal[1].decrypt_into(self._nonce(self._received), body, bytes(head), buf[:n - _TAG])
        except InvalidTag as exc:
            raise ProtocolError(f"a frame from peer {self.peer} failed authentication") from exc
        self._received += 1
        return n - _TAG

    def recv(self, limit: int, timeout: float) -> bytes:
        buf = bytearray(limit)
        return bytes(buf[:self.recv_into(memoryview(buf), timeout)])

    def _read(self, view: memoryview, deadline: float) -> None:
        got = 0
        while got < len(view):
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerClosedError(f"timed out waiting for data from peer {self.peer}", self.peer)
            try:
                self.sock.settimeout(left)
                r = self.sock.recv_into(view[got:])
            except TimeoutError as exc:
                raise PeerClosedError(f"timed out waiting for data from peer {self.peer}", self.peer) from exc
            except OSError as exc:
                raise PeerClosedError(f"connection to peer {self.peer} broke: {exc}", self.peer) from exc
            if r == 0:
                raise PeerClosedError(f"peer {self.peer} closed the connection", self.peer)
            got += r

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------- handshake


def _keys(client_secret: bytes, server_secret: bytes, client: bool) -> tuple[bytes, bytes]:
    def derive(label: bytes) -> bytes:
        return HKDF(hashes.SHA256(), 32, None, b"ekmesh blob exchange v1 " + label).derive(
            client_secret + server_secret)
    c2s, s2c = derive(b"c2s"), derive(b"s2c")
    return (c2s, s2c) if client else (s2c, c2s)


def _hello(tls: ssl.SSLSocket, peer: str | None) -> bytes:
    buf, got = bytearray(_HELLO.size), 0
    while got < len(buf):
        r = tls.recv_into(memoryview(buf)[got:])
        if r == 0:
            raise PeerClosedError(f"peer {peer} closed the connection during the handshake "
                                  "(did it refuse our certificate?)", peer)
        got += r
    magic, version, secret = _HELLO.unpack(buf)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"peer {peer} does not speak blob exchange v{VERSION} ({bytes(magic)!r} v{version})")
    return bytes(secret)


def _no_delay(sock: socket.socket) -> None:
    """No Nagle: it held small messages back until the peer's delayed ACK (see the module docstring)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def client_link(raw: socket.socket, ctx: ssl.SSLContext, pins: Pins, peer_id: str, timeout: float) -> Link:
    """Authenticates a connected socket to ``peer_id`` (see module docstring) and returns its sealed link."""
    raw.settimeout(timeout)
    tls: socket.socket = raw
    try:
        _no_delay(raw)
        tls = ctx.wrap_socket(raw, server_side=False)
        assert isinstance(tls, ssl.SSLSocket)
        check_peer_cert(tls, pins, peer_id)
        mine = secrets.token_bytes(32)
        tls.sendall(_HELLO.pack(MAGIC, VERSION, mine))
        theirs = _hello(tls, peer_id)
        bare = tls.unwrap()
    except (OSError, ssl.SSLError) as exc:
        tls.close()
        raise PeerUnreachableError(f"handshake with peer {peer_id} failed: {exc}", peer_id) from exc
    except BaseException:
        tls.close()
        raise
    return Link(bare, peer_id, _keys(mine, theirs, client=True))


def server_link(raw: socket.socket, ctx: ssl.SSLContext, pins: Pins, timeout: float) -> Link:
    """The server side of ``client_link``: returns a link whose ``peer`` is the client's pinned peer id."""
    raw.settimeout(timeout)
    tls: socket.socket = raw
    try:
        _no_delay(raw)
        tls = ctx.wrap_socket(raw, server_side=True)
        assert isinstance(tls, ssl.SSLSocket)
        peer = check_peer_cert(tls, pins)
        theirs = _hello(tls, peer)
        mine = secrets.token_bytes(32)
        tls.sendall(_HELLO.pack(MAGIC, VERSION, mine))
        bare = tls.unwrap()
    except (OSError, ssl.SSLError) as exc:
        tls.close()
        raise PeerClosedError(f"handshake with a client failed: {exc}") from exc
    except BaseException:
        tls.close()  # a refused certificate: the client sees the connection close
        raise
    return Link(bare, peer, _keys(theirs, mine, client=False))


class TlsDialer:
    """``dial(peer_id) -> Link`` over TCP + pinned TLS to the address ``addresses(peer_id)`` gives."""

    def __init__(self, ctx: ssl.SSLContext, pins: Pins, addresses: Callable[[str], tuple[str, int] | None],
                 timeout_s: float = 5.0) -> None:
        self.ctx, self.pins, self.addresses, self.timeout_s = ctx, pins, addresses, timeout_s

    def __call__(self, peer_id: str) -> Link:
        addr = self.addresses(peer_id)
        if addr is None:
            raise PeerUnreachableError(f"no blob-exchange address known for peer {peer_id}", peer_id)
        try:
            raw = socket.create_connection(addr, timeout=self.timeout_s)
        except OSError as exc:
            raise PeerUnreachableError(f"cannot connect to peer {peer_id} at {addr}: {exc}", peer_id) from exc
        return client_link(raw, self.ctx, self.pins, peer_id, self.timeout_s)


# --------------------------------------------------------------------------------------------- client primitive


@dataclass(frozen=True)
class Answer:
    status: Status
    size: int  # the blob's size (OK, BAD_RANGE)
    length: int  # data bytes that follow (OK)
    retry_s: float  # BUSY: when to ask again
    message: str


def get(link: Link, blob_id: str, offset: int, length: int, timeout: float) -> Answer:
    """Sends one GET and reads its answer; after OK the caller must read ``length`` bytes with ``link.recv_into``
    (or close the link)."""
    ident = blob_id.encode("ascii")
    link.send(_REQ.pack(OP_GET, 0, len(ident), offset, length) + ident, timeout)
    raw = link.recv(MAX_CONTROL, timeout)
    if len(raw) < _ANS.size:
        raise ProtocolError(f"peer {link.peer} sent a {len(raw)}-byte answer")
    status, zero, retry_ms, size, n = _ANS.unpack_from(raw)
    if status not in Status._value2member_map_ or zero:
        raise ProtocolError(f"peer {link.peer} sent an answer with status {status}")
    return Answer(Status(status), size, n, retry_ms / 1000, raw[_ANS.size:].decode("utf-8", "replace"))


# --------------------------------------------------------------------------------------------- server


@dataclass(frozen=True)
class ServerLimits:
    max_per_peer: int = 2  # concurrent transfers per peer (BUSY beyond)
    max_total: int = 16  # concurrent transfers in all (BUSY beyond)
    max_conns: int = 64  # open links in all (closed at once beyond)
    max_conns_per_peer: int = 8
    busy_retry_ms: int = 100


@dataclass(frozen=True)
class ServerTimeouts:
    handshake_s: float = 5.0
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
        self._conns: dict[str, int] = {}
        self.bytes_sent = 0
        self.served: deque[Served] = deque(maxlen=10_000)

    def serve(self, link: Link) -> None:
        with self._lock:
            n = self._conns[link.peer] = self._conns.get(link.peer, 0) + 1
        try:
            if n > self.limits.max_conns_per_peer:
                log.warning("peer %s opened more than %d blob links; closing one", link.peer, n - 1)
                return
            buf = bytearray(CHUNK)
            while True:
                msg = link.recv(MAX_CONTROL, self.timeouts.idle_s)
                self._answer(link, self._parse(msg, link.peer), buf)
        except ProtocolError as exc:
            log.warning("closing blob link of peer %s: %s", link.peer, exc)
        except PeerError as exc:
            log.debug("blob link of peer %s ended: %s", link.peer, exc)
        finally:
            link.close()
            with self._lock:
                self._conns[link.peer] -= 1
                if not self._conns[link.peer]:
                    del self._conns[link.peer]

    @staticmethod
    def _parse(msg: bytes, peer: str) -> tuple[str, int, int]:
        if len(msg) < _REQ.size:
            raise ProtocolError(f"a {len(msg)}-byte request is too short")
        op, flags, id_len, offset, length = _REQ.unpack_from(msg)
        if op != OP_GET or flags:
            raise ProtocolError(f"unknown request op={op} flags={flags}")
        if id_len != len(msg) - _REQ.size:
            raise ProtocolError(f"request id length {id_len} does not match its frame")
        ident = msg[_REQ.size:].decode("ascii", "replace")
        if not ID_RE.match(ident):
            raise ProtocolError(f"{ident[:80]!r} is not a blob id")
        return ident, offset, length

    def _answer(self, link: Link, req: tuple[str, int, int], buf: bytearray) -> None:
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
                view, left, at = memoryview(buf), n, offset
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
        link.send(_ANS.pack(status, 0, retry_ms, size, length) + message.encode("utf-8")[:255],
                  self.timeouts.send_s)


class BlobListener:
    """TCP listener whose connections are authenticated (``server_link``) and served by ``server``, a thread each.
    ``stop()`` closes the listener and every open link and joins the threads."""

    def __init__(self, server: BlobServer, ctx: ssl.SSLContext, pins: Pins, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.server, self.ctx, self.pins = server, ctx, pins
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
                raw, _ = self._sock.accept()
            except OSError:
                return  # closed by stop()
            with self._lock:
                if self._stopped or len(self._open) >= self.server.limits.max_conns:
                    raw.close()
                    continue
                self._open.add(raw)
                t = threading.Thread(target=self._conn, args=(raw,), name="blob-conn", daemon=True)
                self._threads.add(t)
            t.start()

    def _conn(self, raw: socket.socket) -> None:
        try:
            link = server_link(raw, self.ctx, self.pins, self.server.timeouts.handshake_s)
        except (PeerError, ProtocolError) as exc:
            log.warning("refused a blob-exchange connection: %s", exc)
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
