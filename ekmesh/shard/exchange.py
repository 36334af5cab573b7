"""Blob exchange, the wire: authenticated links and the GET protocol (``blobserver.py`` answers it from a ``Store``).

A **link** is a connected byte stream to one authenticated peer that carries length-prefixed messages. The server
(``blobserver.BlobServer.serve``) and the client primitives (``get``) only see links, so the transport is injected:
the node may hand over any connected socket whose remote peer id it authenticated. ``TlsDialer`` /
``blobserver.BlobListener`` make links the default way, over a direct TCP connection bound to peer ids with the
pinned certificates of ``ekmesh.core.tls`` (libp2p streams reach ~100-130 MB/s here, too slow for bulk bytes):

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

Invariants: every frame's length is checked against a bound before anything is allocated or read; a link's
buffers grow to the largest frame it carried; every wait has a deadline. Socket, TLS and AEAD errors become
``PeerClosedError`` / ``PeerUnreachableError`` / ``ProtocolError``.
"""

from __future__ import annotations

import logging
import secrets
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ekmesh.core.errors import (
    PeerClosedError,
    PeerUnreachableError,
    ProtocolError,
)
from ekmesh.core.tls import Pins, check_peer_cert

log = logging.getLogger(__name__)

MAGIC, VERSION = b"EKBX", 1
_HELLO = struct.Struct("!4sB32s")
_LEN = struct.Struct("!I")
REQ = struct.Struct("!BBHQQ")
ANS = struct.Struct("!BBHQQ")
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
        # grown on the first large frame: an idle link, or a server's that receives only requests, holds no MiB
        self._out = bytearray(_LEN.size + MAX_CONTROL + _TAG)
        self._in = bytearray(MAX_CONTROL + _TAG)

    def _nonce(self, n: int) -> bytes:
        return b"\0\0\0\0" + n.to_bytes(8, "big")

    def send(self, data: bytes | memoryview, timeout: float) -> None:
        n = len(data)
        if n > CHUNK:
            raise ValueError(f"a frame carries at most {CHUNK} bytes, not {n}")
        if len(self._out) < _LEN.size + n + _TAG:
            self._out = bytearray(_LEN.size + CHUNK + _TAG)
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
        if len(self._in) < n:
            self._in = bytearray(CHUNK + _TAG)
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


def _hello(tls: ssl.SSLSocket, peer: str | None, deadline: float | None = None) -> bytes:
    buf, got = bytearray(_HELLO.size), 0
    while got < len(buf):
        if deadline is not None:  # one deadline for the whole hello, however slowly its bytes drip in
            tls.settimeout(_until(deadline))
        r = tls.recv_into(memoryview(buf)[got:])
        if r == 0:
            raise PeerClosedError(f"peer {peer} closed the connection during the handshake "
                                  "(did it refuse our certificate?)", peer)
        got += r
    magic, version, secret = _HELLO.unpack(buf)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"peer {peer} does not speak blob exchange v{VERSION} ({bytes(magic)!r} v{version})")
    return bytes(secret)


def _until(deadline: float) -> float:
    """Seconds left before ``deadline`` (monotonic); TimeoutError once it passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the handshake's deadline passed")
    return left


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


def server_link(raw: socket.socket, ctx: ssl.SSLContext, pins: Pins, timeout: float,
                admit: Callable[[str], None] | None = None) -> Link:
    """The server side of ``client_link``: returns a link whose ``peer`` is the client's pinned peer id. The whole
    handshake must finish within ``timeout`` seconds (one deadline, not one per read). ``admit(peer)``, called
    after the pin check and before this end's HELLO, may refuse the peer by raising ``PeerError``: the client then
    sees the connection close."""
    deadline = time.monotonic() + timeout
    raw.settimeout(timeout)
    tls: socket.socket = raw
    try:
        _no_delay(raw)
        tls = ctx.wrap_socket(raw, server_side=True)  # the TLS handshake: one deadline inside ssl
        assert isinstance(tls, ssl.SSLSocket)
        peer = check_peer_cert(tls, pins)
        if admit is not None:
            admit(peer)
        theirs = _hello(tls, peer, deadline)
        mine = secrets.token_bytes(32)
        tls.settimeout(_until(deadline))
        tls.sendall(_HELLO.pack(MAGIC, VERSION, mine))
        tls.settimeout(_until(deadline))
        bare = tls.unwrap()
    except (OSError, ssl.SSLError) as exc:
        tls.close()
        raise PeerClosedError(f"handshake with a client failed: {exc}") from exc
    except BaseException:
        tls.close()  # a refused certificate or peer: the client sees the connection close
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
    link.send(REQ.pack(OP_GET, 0, len(ident), offset, length) + ident, timeout)
    raw = link.recv(MAX_CONTROL, timeout)
    if len(raw) < ANS.size:
        raise ProtocolError(f"peer {link.peer} sent a {len(raw)}-byte answer")
    status, zero, retry_ms, size, n = ANS.unpack_from(raw)
    if status not in Status._value2member_map_ or zero:
        raise ProtocolError(f"peer {link.peer} sent an answer with status {status}")
    return Answer(Status(status), size, n, retry_ms / 1000, raw[ANS.size:].decode("utf-8", "replace"))
