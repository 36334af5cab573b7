"""Typed addresses and fingerprints: parsed once, refused with a message that names what is wrong."""

from __future__ import annotations

import hashlib
import socket

import pytest

from ekmesh.core.ids import Endpoint, Fingerprint


@pytest.mark.parametrize("text,host,port", [("127.0.0.1:80", "127.0.0.1", 80), ("node.lan:65535", "node.lan", 65535),
                                            ("a:1", "a", 1)])
def test_endpoint_round_trips_through_text(text: str, host: str, port: int) -> None:
    ep = Endpoint.parse(text)
    assert (ep.host, ep.port) == (host, port) and str(ep) == text and ep == (host, port)


@pytest.mark.parametrize("text", ["", "127.0.0.1", ":80", "h:", "h:0", "h:65536", "h:-1", "h:8o", "h: 80"])
def test_a_malformed_endpoint_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not host:port"):
        Endpoint.parse(text)


def test_an_endpoint_is_what_sockets_take() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        ep = Endpoint.parse(f"127.0.0.1:{srv.getsockname()[1]}")
        with socket.create_connection(ep, timeout=5):
            conn, _ = srv.accept()
            conn.close()


def test_fingerprint_is_32_bytes_and_compares_as_bytes() -> None:
    digest = hashlib.sha256(b"cert").digest()
    fp = Fingerprint.from_hex(digest.hex())
    assert fp == digest and isinstance(fp, bytes) and str(fp) == digest.hex() and {fp: 1}[digest] == 1
    for bad, why in [("ab" * 31, "32 bytes, not 31"), ("zz" * 32, "non-hexadecimal"), ("", "32 bytes, not 0")]:
        with pytest.raises(ValueError, match=why):
            Fingerprint.from_hex(bad)
    with pytest.raises(ValueError, match="32 bytes, not 33"):
        Fingerprint(bytes(33))
