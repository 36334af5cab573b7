"""Channels: mutual TLS 1.3 bound to peer ids by pinned fingerprints, on real sockets (127.0.0.1, port 0)."""

from __future__ import annotations

import logging
import socket
import ssl

import pytest
import torch

from ekmesh.core.errors import PeerClosedError, PeerIdentityError, PeerUnreachableError
from ekmesh.infer.dataplane.channel import ChannelPool, TlsIdentity
from ekmesh.infer.dataplane.frames import Kind, ModelLimits, encode_request
from ekmesh.infer.dataplane.server import ExpertServer
from ekmesh.infer.expert import ExpertSpec, ExpertWeights
from ekmesh.infer.experts import LocalExperts

MODEL = ModelLimits(num_layers=2, num_experts=4, hidden=16, moe_layers=(False, True))


def make_backend() -> LocalExperts:
    g = torch.Generator().manual_seed(0)
    be = LocalExperts(ExpertSpec(hidden=16, intermediate=8, num_experts=4))
    for e in range(4):
        be.add(1, e, ExpertWeights(torch.randn(16, 16, generator=g), torch.randn(16, 8, generator=g)))
    return be


@pytest.fixture(scope="module")
def ids():
    return {name: TlsIdentity.generate(name) for name in ("server", "client", "other")}


@pytest.fixture
def server(ids):
    pins = {n: i.fingerprint for n, i in ids.items()}
    with ExpertServer(make_backend(), ids["server"], pins.get, MODEL) as srv:
        yield srv


def ask(pool: ChannelPool, peer: str = "server") -> torch.Tensor:
    ch = pool.get(peer)
    rid = ch.next_id()
    hidden = torch.randn(2, 16)
    f = ch.exchange(encode_request(rid, 1, torch.tensor([0, 1, 1]), torch.tensor([0, 2, 3]),
                                   torch.tensor([1.0, 0.5, 0.5]), hidden), rid, 10)
    assert f.kind is Kind.RESPONSE and f.hidden is not None
    return f.hidden


def pool_for(client: TlsIdentity, server: ExpertServer, pins: dict[str, bytes]) -> ChannelPool:
    return ChannelPool(client, pins.get, lambda p: server.address if p == "server" else None, MODEL)


@pytest.mark.timeout(30)
def test_mutual_tls_with_pins(ids, server):
    pool = pool_for(ids["client"], server, {"server": ids["server"].fingerprint})
    try:
        assert ask(pool).shape == (2, 16)
        assert ask(pool).shape == (2, 16)
        assert pool.get("server").connects == 1  # kept open
    finally:
        pool.close()


@pytest.mark.timeout(30)
def test_server_refuses_a_client_whose_pin_does_not_match(ids, caplog):
    pins = {"server": ids["server"].fingerprint, "client": ids["other"].fingerprint}  # wrong pin for "client"
    with ExpertServer(make_backend(), ids["server"], pins.get, MODEL) as srv:
        pool = pool_for(ids["client"], srv, pins)
        with caplog.at_level(logging.WARNING), pytest.raises(PeerClosedError) as info:
            ask(pool)
        assert info.value.peer == "server"
        assert "peer client's certificate does not match its pinned fingerprint" in caplog.text
        unknown = pool_for(TlsIdentity.generate("stranger"), srv, pins)
        with pytest.raises(PeerClosedError):
            ask(unknown)
        assert "no certificate fingerprint is pinned for peer stranger" in caplog.text
        pool.close()
        unknown.close()


@pytest.mark.timeout(30)
def test_client_refuses_a_server_whose_pin_does_not_match(ids, server):
    pool = pool_for(ids["client"], server, {"server": ids["other"].fingerprint})
    with pytest.raises(PeerIdentityError, match="peer server's certificate does not match its pinned fingerprint"):
        ask(pool)
    impostor = pool_for(ids["client"], server, {"server": ids["server"].fingerprint})
    impostor.addresses = lambda p: server.address if p == "other" else None  # dial "other", reach "server"
    with pytest.raises(PeerIdentityError, match="dialled other but its certificate claims server"):
        ask(impostor, "other")


@pytest.mark.timeout(30)
def test_plaintext_client_gets_nothing_and_others_are_served(ids, server, caplog):
    with caplog.at_level(logging.WARNING):
        raw = socket.create_connection(server.address, timeout=5)
        with raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 4)
            got = b""
            try:
                while chunk := raw.recv(4096):
                    got += chunk
            except ConnectionResetError:
                pass
        assert b"EKDP" not in got and b"HTTP" not in got
        # a TLS client without a certificate is refused too
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(server.address, timeout=5) as s, pytest.raises((ssl.SSLError, OSError)), \
                ctx.wrap_socket(s) as tls:
            tls.sendall(b"x" * 64)
            assert tls.recv(10) == b""
    assert "failed its TLS handshake" in caplog.text
    pool = pool_for(ids["client"], server, {"server": ids["server"].fingerprint})
    try:
        assert ask(pool).shape == (2, 16)
    finally:
        pool.close()


@pytest.mark.timeout(30)
def test_unreachable_and_broken_channels_name_the_peer(ids):
    pins = {"server": ids["server"].fingerprint, "client": ids["client"].fingerprint}
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    pool = ChannelPool(ids["client"], pins.get, lambda p: ("127.0.0.1", port), MODEL)
    with pytest.raises(PeerUnreachableError) as info:
        ask(pool)
    assert info.value.peer == "server"
    srv = ExpertServer(make_backend(), ids["server"], pins.get, MODEL).start()
    pool = ChannelPool(ids["client"], pins.get, lambda p: srv.address, MODEL)
    assert ask(pool).shape == (2, 16)
    srv.stop()
    with pytest.raises((PeerClosedError, PeerUnreachableError)) as info2:
        ask(pool)
    assert info2.value.peer == "server"
    pool.close()
