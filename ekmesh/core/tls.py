"""Mutual TLS 1.3 bound to peer ids: short-lived certificates whose CN is the peer id, pinned by fingerprint.

Role: the generic identity pieces that every direct (non-libp2p) connection of ekmesh uses: the data plane
(``infer/dataplane/channel.py``) and blob exchange (``shard/exchange.py``). Pure stdlib ``ssl`` + ``cryptography``.

- each peer makes a short-lived certificate (``TlsIdentity.generate``) whose subject CN is its peer id; its SHA-256
  fingerprint (of the DER bytes) is published in the peer's signed membership advert, and ``pins(peer_id)`` returns
  the fingerprint expected for a peer id (``None``: unknown peer);
- stdlib ``ssl`` cannot accept an arbitrary self-signed client certificate without a verify callback, so every leaf
  is issued by ``issuer()``, a certificate whose key is derived from a public constant. That issuer gives no trust
  at all (anyone can mint with it); it only lets OpenSSL finish the chain check. Authentication is the pin check
  (``check_peer_cert``): the TLS handshake proves possession of the leaf key, and both ends compare the other's
  leaf fingerprint with the pin of the peer id it claims (client: the peer it dialled; server: the client's CN).

Invariant: a connection counts as authenticated only after ``check_peer_cert`` returned on it; a TLS 1.3 client
finishes its handshake before the server has checked it, so protocols must wait for the server's first bytes.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import ssl
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ekmesh.core.errors import PeerIdentityError

if TYPE_CHECKING:  # for annotations only: cryptography is imported where a certificate is made
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

Pins = Callable[[str], "bytes | None"]


def _issuer() -> tuple[bytes, Ed25519PrivateKey, x509.Name]:
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


_ISSUER: tuple[bytes, Ed25519PrivateKey, x509.Name] | None = None
_ISSUER_LOCK = threading.Lock()


def issuer() -> tuple[bytes, Ed25519PrivateKey, x509.Name]:
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
                .issuer_name(iname).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))  # tolerate clock skew between peers
                .not_valid_after(now + datetime.timedelta(seconds=valid_for_s))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(ikey, None))
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
