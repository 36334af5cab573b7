"""Kademlia rendezvous with real hosts: two peers that only know a common bootstrap node find each other."""

from __future__ import annotations

import multiaddr
import pytest
import trio

from ekmesh.discovery import host as hostlib
from ekmesh.discovery.config import MeshKey, MeshTimeouts
from ekmesh.discovery.identity import load_or_create_identity
from ekmesh.discovery.rendezvous import Rendezvous

T = MeshTimeouts(connect_timeout=2.0, dht_timeout=3.0)


@pytest.mark.timeout(60)
def test_peers_sharing_one_bootstrap_find_each_other_under_the_mesh_key(tmp_path):
    key = MeshKey.from_options("k", None)

    async def main():
        hosts = []
        for name in ("boot", "b", "c"):
            (tmp_path / name).mkdir()
            hosts.append(hostlib.build_host(load_or_create_identity(tmp_path / name), key))
        boot, b, c = hosts
        found: dict[str, list[str]] = {"b": [], "c": []}
        listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
        async with boot.run(listen), b.run(listen), c.run(listen), trio.open_nursery() as nursery:
            rv = {
                "boot": Rendezvous(boot, key.rendezvous, T, lambda pid, addrs: None),
                "b": Rendezvous(b, key.rendezvous, T, lambda pid, addrs: found["b"].append(pid)),
                "c": Rendezvous(c, key.rendezvous, T, lambda pid, addrs: found["c"].append(pid)),
            }
            for r in rv.values():
                nursery.start_soon(r.run)
            _, boot_addr = hostlib.split_peer_addr(hostlib.public_addrs(boot)[0])
            for name, h in (("b", b), ("c", c)):
                pid = boot.get_id()
                await hostlib.connect(h, pid, [boot_addr], T)
                rv[name].peer_connected(pid)
                rv["boot"].peer_connected(h.get_id())
            with trio.fail_after(20):
                while not (b.get_id().to_base58() in found["c"] and c.get_id().to_base58() in found["b"]):
                    await rv["b"].round()
                    await rv["c"].round()
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()

    trio.run(main)
