"""Data-plane channels: one TLS 1.3 TCP connection per peer pair, mutually authenticated by pinned certificates.

Identity binding (see DESIGN.md "Control plane vs data plane"): certificates, pins and the pin check live in
``ekmesh.core.tls`` (shared with blob exchange) and are re-exported here for the data plane's users. A TLS 1.3
client finishes its handshake before the server has checked the client, so a fresh channel sends a PING and counts
as open only once the PONG arrives; a server that refuses shows up there as ``PeerClosedError``.

Reading: one ``FrameReader`` per connection (a reusable receive buffer: a small frame costs one read call). Its
``decode_ns`` is the time the last frame's header and body took to decode (framing, not waiting or TLS), and
``Channel.sent_ns`` the time the last ``begin`` spent encrypting and writing its frame: the round-trip split
(``peerstats.HostSplit``, the expert server's ``ServerStats``) reads them after each frame.

Invariants: blocking I/O in the caller's thread, TCP_NODELAY, a deadline on every wait (socket timeouts); one
exchange at a time per channel (``begin`` takes the channel's lock, ``finish`` releases it; callers that hold
several channels take them in sorted peer order); any I/O error or timeout closes the channel (so a late answer can
never be mistaken for the next one) and is raised as ``PeerUnreachableError`` (connecting) or ``PeerClosedError``
(mid-exchange) naming the peer. The next ``begin`` reconnects.
"""

from __future__ import annotations

import itertools
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ekmesh.core.errors import PeerClosedError, PeerUnreachableError, ProtocolError
from ekmesh.core.tls import Pins, TlsIdentity, check_peer_cert, make_context
from ekmesh.infer.dataplane.frames import (
    DEFAULT_LIMITS,
    HEADER_SIZE,
    Frame,
    FrameLimits,
    Kind,
    ModelLimits,
    decode_body,
    decode_header,
    encode_ping,
)
from ekmesh.infer.dataplane.poll import Waits, recv_some

RECV_BUFFER = 1 << 16  # per-socket receive buffer of a FrameReader (a TLS record is at most 16 KiB)


def _recv_into(sock: socket.socket, view: memoryview, deadline: float, peer: str | None) -> None:
    """Fills ``view`` exactly before ``deadline``."""
    got, n = 0, len(view)
    while got < n:
        got += recv_some(sock, view[got:], deadline, peer)


def read_frame(sock: socket.socket, model: ModelLimits, limits: FrameLimits, deadline: float,
               peer: str | None, body_timeout: float | None = None) -> Frame:
    """One frame and not a byte more (a ``FrameReader`` whose buffer holds just a header): header, validated
    before the payload is allocated and read. The payload must arrive by ``deadline``, or within ``body_timeout``
    seconds of the header when given."""
    return FrameReader(sock, model, limits, peer, size=HEADER_SIZE).read(deadline, body_timeout)


class FrameReader:
    """Reads frames from one socket through a reusable buffer. A small frame usually arrives whole in one
    ``recv_into`` (one TLS record: one read call instead of a header read and a payload read); a large payload is
    read straight into its own buffer. Bytes past a frame stay buffered for the next ``read``. Each frame's payload
    is a fresh buffer (its decoded tensors are views over it and outlive the next read). One reader per socket,
    used by one thread at a time."""

    def __init__(self, sock: socket.socket, model: ModelLimits, limits: FrameLimits, peer: str | None,
                 size: int = RECV_BUFFER) -> None:
        self.sock = sock
        self.model = model
        self.limits = limits
        self.peer = peer
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = self._end = 0  # buffered bytes: _buf[_start:_end]
        self.decode_ns = 0  # the last frame's header + body decode (not its reads)

    def read(self, deadline: float, body_timeout: float | None = None, waits: Waits | None = None) -> Frame:
        """One frame: its header is validated before its payload is allocated; the payload must arrive by
        ``deadline``, or within ``body_timeout`` seconds of the header when given. With ``waits``, the wait for the
        frame's first bytes busy-polls as long as they say and is recorded there (``poll.Waits``)."""
        if waits is not None and self._end - self._start < HEADER_SIZE:
            t0 = time.monotonic()
            self._fill(deadline, waits.budget())
            waits.note(time.monotonic() - t0)
        while self._end - self._start < HEADER_SIZE:
            self._fill(deadline)
        start = self._start
        t0 = time.perf_counter_ns()
        h = decode_header(self._view[start:start + HEADER_SIZE], self.model, self.limits)
        spent = time.perf_counter_ns() - t0
        start += HEADER_SIZE
        n = h.payload_len
        have = min(n, self._end - start)
        first = self._view[start:start + have]  # stays valid until the next _fill
        start += have
        self._start = start
        if start == self._end:
            self._start = self._end = 0
        if have < n and body_timeout is not None:
            deadline = time.monotonic() + body_timeout
        payload = self._payload(n, first, deadline)
        t0 = time.perf_counter_ns()
        f = decode_body(h, payload, self.model)
        self.decode_ns = spent + time.perf_counter_ns() - t0
        return f

    def _payload(self, n: int, first: memoryview, deadline: float) -> bytearray | memoryview:
        """A frame's ``n``-byte payload: ``first`` (its bytes already buffered), the rest read by ``deadline``. (The
        expert server overrides it to reserve memory for a large payload as its bytes arrive.)"""
        payload = bytearray(n)
        payload[:len(first)] = first
        if len(first) < n:
            _recv_into(self.sock, memoryview(payload)[len(first):], deadline, self.peer)
        return payload

    def _fill(self, deadline: float, poll_s: float = 0.0) -> None:
        if self._start and len(self._buf) - self._start < HEADER_SIZE:  # too little room left: move to the front
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start:self._end]
            self._start, self._end = 0, n
        self._end += recv_some(self.sock, self._view[self._end:], deadline, self.peer, poll_s)


@dataclass(frozen=True)
class ChannelTimeouts:
    connect_s: float = 3.0  # TCP connect + TLS handshake + first PING/PONG
    lock_s: float = 10.0  # waiting for another caller's exchange on the same channel


class Channel:
    """The client end of a data channel to one peer. See the module docstring for the protocol and invariants."""

    def __init__(self, peer_id: str, address: Callable[[], tuple[str, int] | None], ctx: ssl.SSLContext,
                 pins: Pins, model: ModelLimits, limits: FrameLimits = DEFAULT_LIMITS,
                 timeouts: ChannelTimeouts = ChannelTimeouts()) -> None:
        self.peer_id = peer_id
        self._address = address
        self._ctx = ctx
        self._pins = pins
        self.model = model
        self.limits = limits
        self.timeouts = timeouts
        self._sock: ssl.SSLSocket | None = None
        self._reader: FrameReader | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.connects = 0
        self.sent_ns = 0  # the last ``begin``'s sendall: TLS encryption and the socket write (not connecting)

    def next_id(self) -> int:
        return next(self._ids)

    def _connect(self) -> tuple[ssl.SSLSocket, FrameReader]:
        addr = self._address()
        if addr is None:
            raise PeerUnreachableError(f"no data-plane address known for peer {self.peer_id}", self.peer_id)
        deadline = time.monotonic() + self.timeouts.connect_s
        try:
            raw = socket.create_connection(addr, timeout=self.timeouts.connect_s)
        except OSError as exc:
            raise PeerUnreachableError(f"cannot connect to peer {self.peer_id} at {addr}: {exc}",
                                       self.peer_id) from exc
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(max(0.01, deadline - time.monotonic()))
            sock = self._ctx.wrap_socket(raw, server_side=False)
        except (OSError, ssl.SSLError) as exc:
            raw.close()
            raise PeerUnreachableError(f"TLS handshake with peer {self.peer_id} failed: {exc}",
                                       self.peer_id) from exc
        try:
            check_peer_cert(sock, self._pins, self.peer_id)
            rid = self.next_id()
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            sock.sendall(encode_ping(rid))
            reader = FrameReader(sock, self.model, self.limits, self.peer_id)
            pong = reader.read(deadline)
            if pong.kind is not Kind.PONG or pong.request_id != rid:
                raise ProtocolError(f"peer {self.peer_id} answered the first PING with {pong.kind.name}")
        except PeerClosedError as exc:
            sock.close()
            raise PeerClosedError(f"peer {self.peer_id} closed the channel before accepting it "
                                  f"(did it refuse our certificate?): {exc}", self.peer_id) from exc
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise PeerClosedError(f"peer {self.peer_id} broke the channel while opening it: {exc}",
                                  self.peer_id) from exc
        except BaseException:
            sock.close()
            raise
        self.connects += 1
        return sock, reader

    def begin(self, data: bytes | bytearray, deadline: float) -> None:
        """Takes the channel (waits at most ``timeouts.lock_s``), connects if needed and sends one frame.
        On success the caller must call ``finish``; on error the channel is released and the error raised."""
        if not self._lock.acquire(timeout=min(self.timeouts.lock_s, max(0.0, deadline - time.monotonic()))):
            raise PeerClosedError(f"channel to peer {self.peer_id} stayed busy past the deadline", self.peer_id)
        try:
            sock = self._sock
            if sock is None:
                sock, self._reader = self._connect()
                self._sock = sock
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            t0 = time.perf_counter_ns()
            sock.sendall(data)
            self.sent_ns = time.perf_counter_ns() - t0
        except (OSError, ssl.SSLError) as exc:
            self._close_locked()
            self._lock.release()
            raise PeerClosedError(f"sending to peer {self.peer_id} failed: {exc}", self.peer_id) from exc
        except BaseException:
            self._close_locked()
            self._lock.release()
            raise

    def finish(self, request_id: int, deadline: float, waits: Waits | None = None) -> Frame:
        """Receives the answer to ``request_id`` (busy-polling first as ``waits`` say: ``poll.Waits``) and releases
        the channel. Any error closes the channel."""
        return self.finish_timed(request_id, deadline, waits)[0]

    def finish_timed(self, request_id: int, deadline: float, waits: Waits | None = None) -> tuple[Frame, int]:
        """``finish``, also giving the ns the answer's decoding took (read before the channel is released)."""
        try:
            assert self._reader is not None
            f = self._reader.read(deadline, waits=waits)
            if f.request_id != request_id:
                raise ProtocolError(f"peer {self.peer_id} answered request {f.request_id}, expected {request_id}")
            return f, self._reader.decode_ns
        except BaseException:
            self._close_locked()
            raise
        finally:
            self._lock.release()

    def exchange(self, data: bytes | bytearray, request_id: int, timeout: float) -> Frame:
        deadline = time.monotonic() + timeout
        self.begin(data, deadline)
        return self.finish(request_id, deadline)

    def abort(self) -> None:
        """Gives up an exchange started with ``begin``: closes the connection and releases the channel."""
        self._close_locked()
        self._lock.release()

    def _close_locked(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None
            self._reader = None

    def close(self) -> None:
        with self._lock:
            self._close_locked()


class ChannelPool:
    """Lazily created channels to peers, one per peer, sharing this peer's identity and the pin lookup.

    ``addresses(peer_id)`` gives a peer's data-plane (host, port) from its advert (``None``: unknown)."""

    def __init__(self, identity: TlsIdentity, pins: Pins, addresses: Callable[[str], tuple[str, int] | None],
                 model: ModelLimits, limits: FrameLimits = DEFAULT_LIMITS,
                 timeouts: ChannelTimeouts = ChannelTimeouts()) -> None:
        self.identity = identity
        self.pins = pins
        self.addresses = addresses
        self.model = model
        self.limits = limits
        self.timeouts = timeouts
        self._ctx = make_context(identity, server=False)
        self._channels: dict[str, Channel] = {}
        self._lock = threading.Lock()

    def get(self, peer_id: str) -> Channel:
        ch = self._channels.get(peer_id)  # the common case, without the lock (a dict read is atomic)
        if ch is not None:
            return ch
        with self._lock:
            ch = self._channels.get(peer_id)
            if ch is None:
                ch = self._channels[peer_id] = Channel(peer_id, lambda: self.addresses(peer_id), self._ctx,
                                                       self.pins, self.model, self.limits, self.timeouts)
            return ch

    def close(self) -> None:
        with self._lock:
            channels = list(self._channels.values())
            self._channels.clear()
        for ch in channels:
            ch.close()
