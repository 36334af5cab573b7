"""Circuit relay in-process (real libp2p hosts on 127.0.0.1 port 0): reservations, relayed sync, and admission
on relayed connections (the mesh key's private-network layer and Noise apply inside the circuit too)."""

from __future__ import annotations

from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p import create_yamux_muxer_option, new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.pnet.protector import new_protected_conn

from ekmesh.core.errors import ConfigError, PeerError
from ekmesh.discovery import host as hostlib
from ekmesh.discovery.config import MeshKey, MeshTimeouts
from ekmesh.discovery.membership import SYNC_PROTOCOL
from ekmesh.discovery.relay import Relay, split_circuit
from ekmesh.node.node import Node, NodeConfig
from tests.discovery.inproc import running, until

T = MeshTimeouts(connect_timeout=1.5, stream_timeout=1.5, ping_timeout=1.0, advert_interval=0.3, down_after=3.0,
                 leave_timeout=1.0, redial_interval=0.5, redial_max_interval=2.0, relay_refresh_interval=2.0)
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
KEY = MeshKey.from_options("relay-test", None)


def config(home: Path, **kw) -> NodeConfig:
    return NodeConfig(home=home, listen=LOOPBACK, mdns=False, dht=False, timeouts=T, mesh_key=KEY, **kw)


def raw_host(psk: str | None, plaintext: bool = False):
    kp = create_new_key_pair()
    if plaintext:
        sec = {PLAINTEXT_PROTOCOL_ID: InsecureTransport(kp)}
    else:
        sec = {NOISE_PROTOCOL_ID: NoiseTransport(kp, noise_privkey=create_x25519_key_pair().private_key)}
    return new_host(key_pair=kp, sec_opt=sec, muxer_opt=create_yamux_muxer_option(), psk=psk)


def is_connected(host, peer_id: str) -> bool:
    return hostlib.is_connected(host, ID.from_base58(peer_id))


def circuit_of(node: Node) -> tuple[ID, multiaddr.Multiaddr]:
    assert node.relay is not None
    peer_id, addr = hostlib.split_peer_addr(node.relay.circuit_addrs()[0])
    return ID.from_base58(peer_id), addr


def test_split_peer_addr_reads_the_target_of_a_circuit_address():
    r = "12D3KooWGzh8n3Q2ivFwR9AvqbWAb4FkJbFGtEjZmhbJsxZc7Jm7"
    b = "12D3KooWRBhwfeP2Y4TCx1SM6s9rUoHhR5STiGwxBhgFRcw3UERE"
    peer, addr = hostlib.split_peer_addr(f"/ip4/10.0.0.1/tcp/7733/p2p/{r}/p2p-circuit/p2p/{b}")
    assert (peer, str(addr)) == (b, f"/ip4/10.0.0.1/tcp/7733/p2p/{r}/p2p-circuit")
    with pytest.raises(ConfigError, match="no /p2p/<peer id>"):
        hostlib.split_peer_addr(f"/ip4/10.0.0.1/tcp/7733/p2p/{r}/p2p-circuit")


@pytest.mark.timeout(60)
def test_a_peer_reached_only_through_a_relay_syncs_and_is_admitted_only_with_the_mesh_key(tmp_path):
    async def main():
        r = Node(config(tmp_path / "r", name="r"))
        quiet = Node(config(tmp_path / "q", name="q", relay=False))
        async with running(r, quiet):
            b = Node(config(tmp_path / "b", name="b", peers=[r.addrs[0], quiet.addrs[0]]))
            async with running(b):
                await until(lambda: b.relay.circuit_addrs(), 10, "b to reserve a slot on r")
                await until(lambda: any("/p2p-circuit/" in x for x in r.view.get(b.peer_id).signed.advert.addrs),
                            5, "b's advert to carry its circuit address")
                # Only r relays: q (--no-relay) refused the reservation.
                relays = [split_circuit(multiaddr.Multiaddr(x))[0].to_base58() for x in b.relay.circuit_addrs()]
                assert relays == [r.peer_id]
                pid, circuit = circuit_of(b)

                # A member that dials only the circuit address gets a Noise + yamux connection through r.
                a = raw_host(KEY.psk_hex)
                async with a.run([multiaddr.Multiaddr(LOOPBACK[0])]):
                    relay = Relay(a, KEY.psk_hex, T, serve=False)
                    await hostlib.connect(a, pid, [circuit], T, relay.dial)
                    assert relay.relayed_peers() == [b.peer_id]
                    answer = await hostlib.request(a, pid, SYNC_PROTOCOL, {"digest": {}, "adverts": []}, 1.5)
                    assert answer["adverts"], "b answers a sync over the relayed connection"
                    assert a.get_id().to_base58() in b.snapshot()["relay"]["relayed_peers"]

                # A relayed connection without the mesh key's layer inside the circuit (or with another key) is
                # refused by b, although the intruder is a member that can reach the relay.
                for inner_psk in (None, MeshKey.from_options("wrong", None).psk_hex):
                    h = raw_host(KEY.psk_hex)
                    async with h.run([multiaddr.Multiaddr(LOOPBACK[0])]):
                        relay = Relay(h, inner_psk, T, serve=False)
                        with pytest.raises(PeerError):
                            await hostlib.connect(h, pid, [circuit], T, relay.dial)
                        assert is_connected(h, r.peer_id), "the relay itself was reachable"
                        assert h.get_id().to_base58() not in b.snapshot()["relay"]["relayed_peers"]
                        assert h.get_id().to_base58() not in b.view.entries

                # Plaintext is refused inside a circuit too: the circuit is opened by a member host, then upgraded
                # by a host that offers only /plaintext/2.0.0.
                h, plain = raw_host(KEY.psk_hex), raw_host(KEY.psk_hex, plaintext=True)
                listen = [multiaddr.Multiaddr(LOOPBACK[0])]
                rid, r_addr = hostlib.split_peer_addr(r.addrs[0])
                async with h.run(listen), plain.run(listen):
                    await hostlib.connect(h, ID.from_base58(rid), [r_addr], T)
                    connect = HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=pid.to_bytes()))
                    stream, _ = await Relay(h, None, T, serve=False)._hop(ID.from_base58(rid), connect, "connect")
                    raw = new_protected_conn(RawConnection(stream, initiator=True), KEY.psk_hex)
                    with pytest.raises((trio.TooSlowError, *hostlib.NET_ERRORS)), trio.fail_after(3):
                        await plain.get_network().upgrade_outbound_raw_conn(raw, pid)
                    assert len(b.snapshot()["relay"]["relayed_peers"]) == 1  # still only `a`'s circuit

    trio.run(main)
