"""Nodes in-process (real libp2p hosts on 127.0.0.1 port 0): admission by mesh key, Noise-only security,
forged adverts, and the local control endpoint."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p import create_yamux_muxer_option, new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.peer.id import ID
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from ekmesh.core.constants import STATUS_PATH
from ekmesh.core.errors import NodeAlreadyRunningError, PeerError
from ekmesh.discovery import host as hostlib
from ekmesh.discovery.advert import Advert, sign_advert
from ekmesh.discovery.config import MeshKey, MeshTimeouts
from ekmesh.discovery.control import get_json, read_control_file
from ekmesh.discovery.membership import SYNC_PROTOCOL
from ekmesh.node.node import Node, NodeConfig
from tests.discovery.inproc import running, until

T = MeshTimeouts(connect_timeout=1.5, stream_timeout=1.5, ping_timeout=1.0, advert_interval=0.3, down_after=3.0,
                 leave_timeout=1.0, redial_interval=0.5, redial_max_interval=2.0)
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def config(home: Path, **kw) -> NodeConfig:
    return NodeConfig(home=home, listen=LOOPBACK, mdns=False, timeouts=T, **kw)


def live(node: Node) -> set[str]:
    assert node.view is not None
    return {e.peer_id for e in node.view.peers("self", "up")}


def raw_host(psk: str | None = None, plaintext: bool = False):
    kp = create_new_key_pair()
    if plaintext:
        sec = {PLAINTEXT_PROTOCOL_ID: InsecureTransport(kp)}
    else:
        sec = {NOISE_PROTOCOL_ID: NoiseTransport(kp, noise_privkey=create_x25519_key_pair().private_key)}
    return kp, new_host(key_pair=kp, sec_opt=sec, muxer_opt=create_yamux_muxer_option(), psk=psk)


def target(node: Node) -> tuple[ID, multiaddr.Multiaddr]:
    peer_id, addr = hostlib.split_peer_addr(node.addrs[0])
    return ID.from_base58(peer_id), addr


@pytest.mark.timeout(60)
def test_mesh_key_admits_only_holders_of_the_same_key(tmp_path):
    async def main():
        key = MeshKey.from_options("correct horse", None)
        a = Node(config(tmp_path / "a", mesh_key=key, name="a"))
        async with running(a):
            b = Node(config(tmp_path / "b", mesh_key=key, name="b", peers=[a.addrs[0]]))
            wrong = Node(config(tmp_path / "w", mesh_key=MeshKey.from_options("wrong", None), name="w",
                                peers=[a.addrs[0]]))
            nokey = Node(config(tmp_path / "n", name="n", peers=[a.addrs[0]]))
            async with running(b, wrong, nokey):
                await until(lambda: live(a) == {a.peer_id, b.peer_id} == live(b), 10, "a and b to converge")
                # Give the keyless and wrong-key nodes more than one full connect deadline to try.
                deadline = trio.current_time() + 2 * T.connect_timeout + 1
                while trio.current_time() < deadline:
                    assert live(a) == {a.peer_id, b.peer_id}
                    assert live(wrong) == {wrong.peer_id} and live(nokey) == {nokey.peer_id}
                    await trio.sleep(0.1)
                assert set(wrong.view.entries) == {wrong.peer_id}  # learnt nothing, not even ids
                assert set(nokey.view.entries) == {nokey.peer_id}
                snap = a.snapshot()
                assert snap["mesh"] == {"open": False, "key_id": key.key_id}

                # Served nothing: a raw host with another key (or none) cannot open any stream to `a`.
                for psk in (MeshKey.from_options("wrong", None).psk_hex, None):
                    _, h = raw_host(psk=psk)
                    async with h.run([multiaddr.Multiaddr(LOOPBACK[0])]):
                        pid, addr = target(a)
                        with pytest.raises(PeerError):
                            await hostlib.connect(h, pid, [addr], T)
                        with pytest.raises(PeerError):
                            await hostlib.request(h, pid, SYNC_PROTOCOL, {"digest": {}, "adverts": []}, 1.5)

    trio.run(main)


@pytest.mark.timeout(60)
def test_plaintext_security_is_refused(tmp_path):
    async def main():
        a = Node(config(tmp_path / "a", name="a"))
        async with running(a):
            _, h = raw_host(plaintext=True)
            async with h.run([multiaddr.Multiaddr(LOOPBACK[0])]):
                pid, addr = target(a)
                with pytest.raises(PeerError, match="cannot connect"):
                    await hostlib.connect(h, pid, [addr], T)
                with pytest.raises(PeerError):
                    await hostlib.request(h, pid, SYNC_PROTOCOL, {"digest": {}, "adverts": []}, 1.5)
                assert live(a) == {a.peer_id}
            # Control: a Noise host with the same (open) mesh does get served.
            _, good = raw_host()
            async with good.run([multiaddr.Multiaddr(LOOPBACK[0])]):
                pid, addr = target(a)
                await hostlib.connect(good, pid, [addr], T)
                answer = await hostlib.request(good, pid, SYNC_PROTOCOL, {"digest": {}, "adverts": []}, 1.5)
                assert answer["adverts"], "a Noise peer of the same mesh gets the node's advert"

    trio.run(main)


@pytest.mark.timeout(60)
def test_an_advert_signed_by_another_key_is_dropped(tmp_path):
    async def main():
        a = Node(config(tmp_path / "a", name="a"))
        async with running(a):
            kp_sender, h = raw_host()
            kp_victim = create_new_key_pair()
            sender_id = ID.from_pubkey(kp_sender.public_key).to_base58()
            victim_id = ID.from_pubkey(kp_victim.public_key).to_base58()
            async with h.run([multiaddr.Multiaddr(LOOPBACK[0])]):
                pid, addr = target(a)
                await hostlib.connect(h, pid, [addr], T)
                forged = sign_advert(Advert(peer_id=victim_id, incarnation=1, seq=1, name="victim", version="x"),
                                     kp_sender.private_key)  # claims the victim's id, signed by the sender
                tampered = sign_advert(Advert(peer_id=sender_id, incarnation=1, seq=1, name="honest", version="x"),
                                       kp_sender.private_key).to_wire()
                tampered_body = json.loads(base64.b64decode(tampered["b"]))
                tampered_body["name"] = "evil"
                tampered["b"] = base64.b64encode(json.dumps(tampered_body).encode()).decode()
                honest = sign_advert(Advert(peer_id=sender_id, incarnation=1, seq=2, name="honest", version="x"),
                                     kp_sender.private_key)
                await hostlib.request(h, pid, SYNC_PROTOCOL,
                                      {"digest": {}, "adverts": [forged.to_wire(), tampered]}, 1.5)
                assert a.view.get(victim_id) is None and a.view.get(sender_id) is None
                assert a._membership.rejected_adverts == 2
                await hostlib.request(h, pid, SYNC_PROTOCOL, {"digest": {}, "adverts": [honest.to_wire()]}, 1.5)
                entry = a.view.get(sender_id)
                assert entry is not None and entry.signed.advert.name == "honest" and entry.state == "up"

    trio.run(main)


@pytest.mark.timeout(60)
def test_control_endpoint_lock_and_token(tmp_path):
    async def main():
        a = Node(config(tmp_path / "a", name="a", memory_gib=1.5))
        async with running(a):
            info = read_control_file(a.config.home)
            assert (a.config.home / "node.json").stat().st_mode & 0o777 == 0o600
            snap = await trio.to_thread.run_sync(lambda: get_json(a.config.home, STATUS_PATH, 5))
            assert snap["self"] == a.peer_id and snap["peers"][0]["memory_total"] == int(1.5 * (1 << 30))

            def no_token():
                try:
                    urllib.request.urlopen(info["url"] + STATUS_PATH, timeout=5)
                except urllib.error.HTTPError as exc:
                    return exc.code
                return 200

            assert await trio.to_thread.run_sync(no_token) == 401
            with pytest.raises(NodeAlreadyRunningError):
                await Node(config(tmp_path / "a", name="again")).run(handle_signals=False)
        assert not (tmp_path / "a" / "node.json").exists()

    trio.run(main)


@pytest.mark.timeout(60)
def test_in_process_nodes_converge_and_leave(tmp_path):
    async def main():
        a = Node(config(tmp_path / "a", name="a"))
        events: list[dict] = []
        async with running(a):
            b = Node(config(tmp_path / "b", name="b", peers=[a.addrs[0]]), on_event=events.append)
            c = Node(config(tmp_path / "c", name="c", peers=[a.addrs[0]]))
            async with running(b):
                async with running(c):
                    ids = {a.peer_id, b.peer_id, c.peer_id}
                    await until(lambda: live(a) == live(b) == live(c) == ids, 10, "three nodes to converge")
                    assert b.snapshot()["peers"][0]["state"] == "self"
                    # A peer first learnt through a relayed advert gets an RTT once b has pinged it directly.
                    await until(lambda: all(e.rtt_ms is not None for e in b.view.peers("up")), 5, "RTTs")
                    assert all(e.rtt_ms >= 0 for e in b.view.peers("up"))
                t = await until(lambda: b.view.get(c.peer_id).state == "left", 2, "c to be seen leaving")
                assert t < T.down_after
        kinds = [(e["event"], e.get("name")) for e in events]
        assert ("started", None) in kinds and ("joined", "a") in kinds and ("left", "c") in kinds

    start = time.monotonic()
    trio.run(main)
    assert time.monotonic() - start < 30


def test_the_advertised_ip_of_blob_and_data_listeners():
    from ekmesh.node.node import _advertised_ip

    assert _advertised_ip("10.1.2.3", ["192.168.1.4", "127.0.0.1"]) == "10.1.2.3"  # bound: as bound
    # wildcard: the default-route interface when it is ours, else the first address (non-loopback first)
    assert _advertised_ip("0.0.0.0", ["203.0.113.9", "127.0.0.1"]) == "203.0.113.9"
    assert _advertised_ip("0.0.0.0", ["127.0.0.1"]) == "127.0.0.1"
