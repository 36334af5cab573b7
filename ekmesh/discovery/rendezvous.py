"""Rendezvous beyond the LAN through the Kademlia DHT.

Every node runs a DHT server (only mesh members can reach it when the mesh is keyed) and, every
``rendezvous_interval``, announces itself as a provider of the mesh's rendezvous key (``MeshKey.rendezvous``)
and looks up the other providers. Peers found there are handed to ``on_found``; the membership protocol dials
them. So nodes that share one bootstrap node find each other even before any advert is relayed, and a large
mesh need not be fully known to a joining node's bootstrap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.tools.anyio_service import background_trio_service

from ekmesh.discovery.config import MeshTimeouts
from ekmesh.discovery.host import NET_ERRORS

log = logging.getLogger(__name__)


class Rendezvous:
    def __init__(self, host: IHost, key: str, timeouts: MeshTimeouts,
                 on_found: Callable[[str, list[multiaddr.Multiaddr]], None]) -> None:
        self.host = host
        self.key = key
        self.timeouts = timeouts
        self.on_found = on_found
        self.dht = KadDHT(host, DHTMode.SERVER)
        self._wake = trio.Event()
        self._pending: list[ID] = []

    def peer_connected(self, peer_id: ID) -> None:
        """A mesh peer is connected: use it as a DHT neighbour and query soon."""
        self._pending.append(peer_id)
        self._wake.set()

    async def run(self) -> None:
        async with background_trio_service(self.dht):
            while True:
                with trio.move_on_after(self.timeouts.rendezvous_interval):
                    await self._wake.wait()
                self._wake = trio.Event()
                pending, self._pending = self._pending, []
                for peer_id in pending:
                    await self.dht.add_peer(peer_id, skip_server_mode_check=True)
                if self.dht.get_routing_table_size() == 0:
                    continue
                await self.round()

    async def round(self) -> list[str]:
        """Announce ourselves under the rendezvous key and report the other providers; returns their ids."""
        found: list[str] = []
        try:
            with trio.fail_after(self.timeouts.dht_timeout):
                await self.dht.provide(self.key)
            with trio.fail_after(self.timeouts.dht_timeout):
                providers = await self.dht.find_providers(self.key)
        except (trio.TooSlowError, *NET_ERRORS) as exc:
            log.debug("DHT rendezvous round failed: %s", exc)
            return found
        me = self.host.get_id()
        for info in providers:
            if info.peer_id == me or not info.addrs:
                continue
            addrs = []
            for addr in info.addrs:
                try:
                    addrs.append(addr.decapsulate(multiaddr.Multiaddr(f"/p2p/{info.peer_id}")))
                except ValueError:
                    addrs.append(addr)
            found.append(info.peer_id.to_base58())
            self.on_found(info.peer_id.to_base58(), addrs)
        return found
