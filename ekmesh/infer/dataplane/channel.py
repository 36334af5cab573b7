"""Data-plane channels: one TLS 1.3 TCP connection per peer pair, mutually authenticated by pinned certificates.

Identity binding (see DESIGN.md "Control plane vs data plane"):
- each peer makes a short-lived certificate (``TlsIdentity.generate``) whose subject CN is its peer id; its SHA-256
  fingerprint (of the DER bytes) is published in the peer's signed membership advert, and ``pins(peer_id)`` returns
  the fingerprint expected for a peer id (``None``: unknown peer);
- stdlib ``ssl`` cannot accept an arbitrary self-signed client certificate without a verify callback, so every leaf
  is issued by ``ISSUER``, a certificate whose key is derived from a public constant. That issuer gives no trust at
  all (anyone can mint with it); it only lets OpenSSL finish the chain check. Authentication is the pin check:
  the TLS handshake proves possession of the leaf key, and both ends compare the other's leaf fingerprint with
  the pin of the peer id it claims (client: the peer it dialled; server: the CN of the client certificate);
- a TLS 1.3 client finishes its handshake before the server has checked the client, so a fresh channel sends a
  PING and counts as open only once the PONG arrives; a server that refuses shows up there as ``PeerClosedError``.

Invariants: blocking I/O in the caller's thread, TCP_NODELAY, a deadline on every wait (socket timeouts); one
exchange at a time per channel (``begin`` takes the channel's lock, ``finish`` releases it; callers that hold
several channels take them in sorted peer order); any I/O error or timeout closes the channel (so a late answer can
never be mistaken for the next one) and is raised as ``PeerUnreachableError`` (connecting) or ``PeerClosedError``
(mid-exchange) naming the peer. The next ``begin`` reconnects.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import itertools
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ekmesh.core.errors import PeerClosedError, PeerIdentityError, PeerUnreachableError, ProtocolError
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

Pins = Callable[[str], "bytes | None"]


def _issuer() -> tuple[bytes, object, object]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.x509.oid import NameOID

    key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"ekmesh data-plane issuer v1 (public)").digest())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ekmesh data-plane issuer (no trust)")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc))
            .not_valid_after(datetime.datetime(2100, 1, 1, tzinfo=datetime.timezone.utc))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, None))
    return cert.public_bytes(serialization.Encoding.PEM), key, name


_ISSUER: tuple[bytes, object, object] | None = None
_ISSUER_LOCK = threading.Lock()


def issuer() -> tuple[bytes, object, object]:
    """(PEM, key, name) of the public issuer (see module docstring), built once per process."""
    global _ISSUER
    with _ISSUER_LOCK:
        if _ISSUER is None:
            _ISSUER = _issuer()
        return _ISSUER


def fingerprint(cert_der: bytes) -> bytes:
    """The pin of a certificate: SHA-256 of its DER bytes."""
    return hashlib.sha256(cert_der).digest()


@dataclass(frozen=True)
class TlsIdentity:
    """This peer's data-plane certificate (CN = ``peer_id``) and private key, PEM."""

    cert_pem: bytes
    key_pem: bytes
    peer_id: str

    @classmethod
    def generate(cls, peer_id: str, valid_for_s: float = 7 * 86400) -> TlsIdentity:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.x509.oid import NameOID

        _, ikey, iname = issuer()
        key = Ed25519PrivateKey.generate()
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, peer_id)]))
                .issuer_name(iname).public_key(key.public_key())  # type: ignore[arg-type]
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))  # tolerate clock skew between peers
                .not_valid_after(now + datetime.timedelta(seconds=valid_for_s))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(ikey, None))  # type: ignore[arg-type]
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cls(cert.public_bytes(serialization.Encoding.PEM), key_pem, peer_id)

    @property
    def fingerprint(self) -> bytes:
        return fingerprint(ssl.PEM_cert_to_DER_cert(self.cert_pem.decode("ascii")))


def make_context(identity: TlsIdentity, server: bool) -> ssl.SSLContext:
    """A TLS 1.3-only context presenting ``identity`` and requiring the other side's certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # identity is the pinned fingerprint, not a DNS name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=issuer()[0].decode("ascii"))
    with tempfile.TemporaryDirectory(prefix="ekmesh-tls-") as d:  # load_cert_chain only reads files
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        for path, data in ((cert, identity.cert_pem), (key, identity.key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert, key)
    return ctx


def check_peer_cert(sock: ssl.SSLSocket, pins: Pins, expected: str | None = None) -> str:
    """Returns the peer id the other side's certificate claims, after checking its pin. Raises PeerIdentityError."""
    der = sock.getpeercert(binary_form=True)
    info = sock.getpeercert()
    cn: str | None = None
    for rdn in (info or {}).get("subject", ()):
        for attr in rdn:
            if attr[0] == "commonName":
                cn = str(attr[1])
    if der is None or cn is None:
        raise PeerIdentityError("the peer presented no certificate with a peer id", expected)
    if expected is not None and cn != expected:
        raise PeerIdentityError(f"dialled {expected} but its certificate claims {cn}", expected)
    pin = pins(cn)
    if pin is None:
        raise PeerIdentityError(f"no certificate fingerprint is pinned for peer {cn}", cn)
    if not hmac.compare_digest(pin, fingerprint(der)):
        raise PeerIdentityError(f"peer {cn}'s certificate does not match its pinned fingerprint", cn)
    return str(cn)


def recv_exact(sock: socket.socket, n: int, deadline: float, peer: str | None) -> bytearray:
    """Exactly ``n`` bytes before ``deadline`` (monotonic). EOF or timeout: PeerClosedError."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerClosedError(f"timed out waiting for data from peer {peer}", peer)
        sock.settimeout(left)
        try:
            r = sock.recv_into(view[got:], n - got)
        except TimeoutError as exc:
            raise PeerClosedError(f"timed out waiting for data from peer {peer}", peer) from exc
        except (OSError, ssl.SSLError) as exc:
            raise PeerClosedError(f"connection to peer {peer} broke: {exc}", peer) from exc
        if r == 0:
            raise PeerClosedError(f"peer {peer} closed the connection", peer)
        got += r
    return buf


def read_frame(sock: socket.socket, model: ModelLimits, limits: FrameLimits, deadline: float,
               peer: str | None, body_timeout: float | None = None) -> Frame:
    """One frame: header, validated before the payload is allocated and read. The payload must arrive by
    ``deadline``, or within ``body_timeout`` seconds of the header when given (a server's idle wait is long)."""
    h = decode_header(recv_exact(sock, HEADER_SIZE, deadline, peer), model, limits)
    if body_timeout is not None:
        deadline = time.monotonic() + body_timeout
    payload = recv_exact(sock, h.payload_len, deadline, peer) if h.payload_len else bytearray()
    return decode_body(h, payload, model)


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
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.connects = 0

    def next_id(self) -> int:
        return next(self._ids)

    def _connect(self) -> ssl.SSLSocket:
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
            pong = read_frame(sock, self.model, self.limits, deadline, self.peer_id)
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
        return sock

    def begin(self, data: bytes, deadline: float) -> None:
        """Takes the channel (waits at most ``timeouts.lock_s``), connects if needed and sends one frame.
        On success the caller must call ``finish``; on error the channel is released and the error raised."""
        if not self._lock.acquire(timeout=min(self.timeouts.lock_s, max(0.0, deadline - time.monotonic()))):
            raise PeerClosedError(f"channel to peer {self.peer_id} stayed busy past the deadline", self.peer_id)
        try:
            if self._sock is None:
                self._sock = self._connect()
            self._sock.settimeout(max(0.001, deadline - time.monotonic()))
            self._sock.sendall(data)
        except (OSError, ssl.SSLError) as exc:
            self._close_locked()
            self._lock.release()
            raise PeerClosedError(f"sending to peer {self.peer_id} failed: {exc}", self.peer_id) from exc
        except BaseException:
            self._close_locked()
            self._lock.release()
            raise

    def finish(self, request_id: int, deadline: float) -> Frame:
        """Receives the answer to ``request_id`` and releases the channel. Any error closes the channel."""
        try:
            assert self._sock is not None
            f = read_frame(self._sock, self.model, self.limits, deadline, self.peer_id)
            if f.request_id != request_id:
                raise ProtocolError(f"peer {self.peer_id} answered request {f.request_id}, expected {request_id}")
            return f
        except BaseException:
            self._close_locked()
            raise
        finally:
            self._lock.release()

    def exchange(self, data: bytes, request_id: int, timeout: float) -> Frame:
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
