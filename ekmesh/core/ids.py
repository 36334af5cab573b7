"""Typed identities and addresses that cross package boundaries.

Values enter ekmesh as text (signed adverts, the command line, manifests) and are parsed once, where they enter,
into these types; past that point no part splits a ``host:port`` string or decodes a hex fingerprint again.

- ``PeerId``, ``ModelId``, ``BlobId``: distinct names for the strings that identify a peer (libp2p base58, which
  carries its Ed25519 public key), a model (the hash of its manifest) and a blob (the hash of its bytes). They are
  ``NewType``s: free at run time, and the type checker keeps one from standing in for another.
- ``ExpertKey``: a routed expert's address, ``(layer, expert)`` with the global layer index (an alias of the
  tuple: keys are built from literals in hot loops).
- ``Endpoint``: a TCP ``(host, port)``; it is a tuple, so sockets take it as it is.
- ``Fingerprint``: the SHA-256 of a TLS certificate (32 bytes), what direct connections are pinned on.

Parsers raise ``ValueError`` naming what is wrong; each boundary translates it to its own error
(``ProtocolError`` for an advert, ``ConfigError`` for an option).
"""

from __future__ import annotations

from typing import NamedTuple, NewType

PeerId = NewType("PeerId", str)
ModelId = NewType("ModelId", str)
BlobId = NewType("BlobId", str)
ExpertKey = tuple[int, int]
"""A routed expert: ``(layer, expert)``, the layer index global. A plain tuple, so a literal ``(layer, e)`` is one."""

FINGERPRINT_BYTES = 32


class Endpoint(NamedTuple):
    """A TCP listener's address as peers dial it."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """``host:port`` (the host may not be empty; the port is 1..65535)."""
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{text!r} is not host:port")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Fingerprint(bytes):
    """The SHA-256 of a TLS certificate. A ``bytes`` of exactly 32, so it compares and hashes as bytes."""

    def __new__(cls, digest: bytes) -> Fingerprint:
        if len(digest) != FINGERPRINT_BYTES:
            raise ValueError(f"a certificate fingerprint has {FINGERPRINT_BYTES} bytes, not {len(digest)}")
        return super().__new__(cls, digest)

    @classmethod
    def from_hex(cls, text: str) -> Fingerprint:
        try:
            return cls(bytes.fromhex(text))
        except ValueError as exc:
            raise ValueError(f"{text[:80]!r} is not a hex certificate fingerprint: {exc}") from None

    def __str__(self) -> str:
        return self.hex()
