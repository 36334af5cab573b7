"""Circuit relay v2: how a peer that cannot be dialed directly (behind NAT or a firewall) still joins the mesh.

Three roles, all over py-libp2p's circuit relay v2 wire protocol (``/libp2p/circuit/relay/0.2.0/{hop,stop}``):
- **relay** (hop server, every node unless ``serve=False``): py-libp2p's ``CircuitV2Protocol`` accepts
  reservations and forwards a ``CONNECT`` to a peer that holds a reservation here. It refuses hop requests that
  arrive over an already relayed connection (no relay chains). Limits: ``RELAY_LIMITS``.
- **reservation client**: a node reserves a slot on each of its relays (its ``--peer`` bootstrap nodes and
  ``--relay-via`` nodes), re-reserves every ``relay_refresh_interval`` and at once when its connection to the
  relay changed (a restarted relay forgot every reservation), and advertises
  ``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<self>`` after its direct addresses while the reservation holds.
- **dialer** (``dial``): opens a hop stream to the relay, sends ``CONNECT``, and upgrades the stream like a TCP
  socket: the mesh key's private-network layer, then Noise (the host's only security transport, which checks
  the peer id end to end, so the relay sees only ciphertext and cannot pose as the target), then yamux. The
  receiving side does the same through ``CircuitV2Protocol``'s stop handler and the swarm's inbound upgrade.

Mesh key: the relay's own links are private-network links like any other, so a node without the key cannot reach
a relay at all; and the relayed connection carries its own private-network layer inside the circuit (py-libp2p
applies it inbound but not on this outbound path, which is why ``dial`` adds it). Plaintext is never offered:
both ends upgrade with the host's Noise-only security options.

Not here: DCUtR hole punching (py-libp2p's ``DCUtRProtocol`` is present but not wired in nor tested: no NAT
could be built here) and AutoNAT: a node cannot tell whether it is reachable, so it reserves on its relays
whatever its reachability (``reserve=False`` / ``--no-reserve`` to skip); peers dial direct addresses first, so
a reachable node's circuit address costs only the reservation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStoreError
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.security.pnet.protector import new_protected_conn
from libp2p.tools.anyio_service import background_trio_service
from multiaddr.protocols import P_P2P, P_P2P_CIRCUIT

from ekmesh.core.errors import PeerError, PeerUnreachableError, ProtocolError
from ekmesh.discovery import host as hostlib
from ekmesh.discovery.config import MeshTimeouts

log = logging.getLogger(__name__)

RELAY_LIMITS = RelayLimits(
    duration=0,  # 0: no cap on a circuit's life (the spec's "unlimited"); membership would flap on every expiry
    data=1 << 40,  # py-libp2p treats data=0 as "nothing allowed", not "unlimited"
    max_circuit_conns=64,  # concurrent circuits to one reserved peer
    max_reservations=256,
    reservation_ttl=3600,
)


def is_circuit(addr: multiaddr.Multiaddr | str) -> bool:
    if isinstance(addr, str):
        return "/p2p-circuit" in addr
    return any(p.code == P_P2P_CIRCUIT for p in addr.protocols())


def is_relayed(conn: INetConn) -> bool:
    """Whether a swarm connection runs through a relay (either end tags it with its circuit address)."""
    if getattr(conn, "get_connection_type", lambda: None)() == ConnectionType.RELAYED:
        return True
    return any(is_circuit(a) for a in getattr(conn, "get_transport_addresses", list)())


def split_circuit(addr: multiaddr.Multiaddr) -> tuple[ID, multiaddr.Multiaddr]:
    """``<relay transport>/p2p/<relay>/p2p-circuit[/p2p/<target>]`` → (relay id, relay transport address)."""
    if is_circuit(addr):
        addr = addr.decapsulate_code(P_P2P_CIRCUIT)
    relay = addr.get_peer_id()
    if not relay:
        raise ProtocolError(f"circuit address {addr} names no relay (/p2p/<relay id>/p2p-circuit)")
    return ID.from_base58(relay), addr.decapsulate_code(P_P2P)


@dataclass
class _Slot:
    """Our reservation on one relay."""

    addr: multiaddr.Multiaddr  # the relay's transport address as we reached it
    conn: INetConn | None = None  # the connection the reservation was made on; None: not reserved
    refresh_at: float = 0.0
    retry_at: float = 0.0


class Relay:
    """Relay service, reservations and circuit dialing of one host. ``run`` must be started before use."""

    def __init__(self, host: IHost, psk_hex: str | None, timeouts: MeshTimeouts, *, serve: bool) -> None:
        self.host = host
        self.psk_hex = psk_hex
        self.timeouts = timeouts
        self.serve = serve
        self.protocol = CircuitV2Protocol(host, limits=RELAY_LIMITS, allow_hop=serve,
                                          read_timeout=int(timeouts.stream_timeout) or 1,
                                          write_timeout=int(timeouts.stream_timeout) or 1)
        self._slots: dict[ID, _Slot] = {}

    def add_relay(self, peer_id: str, addr: multiaddr.Multiaddr) -> None:
        """Reserve a slot on this peer (dialed by membership as a bootstrap peer) and advertise it."""
        pid = ID.from_base58(peer_id)
        if pid != self.host.get_id() and pid not in self._slots and not is_circuit(addr):
            self._slots[pid] = _Slot(addr)

    def circuit_addrs(self) -> list[str]:
        """Our addresses through the relays that hold a live reservation for us."""
        me = self.host.get_id().to_base58()
        return [f"{s.addr}/p2p/{rid.to_base58()}/p2p-circuit/p2p/{me}"
                for rid, s in self._slots.items() if s.conn is not None and not s.conn.is_closed]

    def relayed_peers(self) -> list[str]:
        """Peers whose current connection to us runs through a relay."""
        network = self.host.get_network()
        return sorted(pid.to_base58() for pid in network.connections
                      if any(is_relayed(c) and not c.is_closed for c in network.get_connections(pid)))

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.protocol):
            await self.protocol.event_started.wait()
            task_status.started()
            while True:
                await self._keep_reservations()
                await trio.sleep(self.timeouts.advert_interval)

    async def _keep_reservations(self) -> None:
        now = trio.current_time()
        for relay_id, slot in self._slots.items():
            conn = next((c for c in self.host.get_network().get_connections(relay_id)
                         if not c.is_closed and not is_relayed(c)), None)
            if conn is None:
                if slot.conn is not None:
                    log.info("lost the relay reservation on %s", relay_id)
                slot.conn = None
                continue
            if (slot.conn is conn and now < slot.refresh_at) or (slot.conn is not conn and now < slot.retry_at):
                continue
            try:
                expires_in = await self._reserve(relay_id)
            except (PeerError, ProtocolError) as exc:
                log.debug("no reservation on %s: %s", relay_id, exc)
                slot.conn = None
                slot.retry_at = now + self.timeouts.relay_refresh_interval
                continue
            if slot.conn is not conn:
                log.info("reserved a relay slot on %s", relay_id)
            slot.conn = conn
            slot.refresh_at = now + min(self.timeouts.relay_refresh_interval, max(1.0, expires_in / 2))

    async def _reserve(self, relay_id: ID) -> float:
        """One RESERVE exchange; returns seconds until the reservation expires."""
        answer = await self._hop(relay_id, HopMessage(type=HopMessage.RESERVE), "reserve")
        await self._close(answer[0])
        resp = answer[1]
        return max(0.0, resp.reservation.expire - time.time()) if resp.HasField("reservation") else 0.0

    async def _hop(self, relay_id: ID, msg: HopMessage, what: str) -> tuple[INetStream, HopMessage]:
        """Send one hop request on a new stream and read the STATUS answer (the stream stays open)."""
        stream: INetStream | None = None
        try:
            with trio.fail_after(self.timeouts.stream_timeout):
                stream = await self.host.new_stream(relay_id, [HOP_PROTOCOL])
                await write_delimited_msg(stream, msg)
                resp = await read_delimited_msg(stream, HopMessage)
        except trio.TooSlowError as exc:
            await self._reset(stream)
            raise PeerUnreachableError(f"relay {relay_id}: {what} timed out", peer=relay_id.to_base58()) from exc
        except (*hostlib.NET_ERRORS, ValueError) as exc:  # ValueError: oversized or malformed protobuf
            await self._reset(stream)
            raise PeerUnreachableError(f"relay {relay_id}: {what} failed: {exc or type(exc).__name__}",
                                       peer=relay_id.to_base58()) from exc
        if resp.type != HopMessage.STATUS or resp.status != StatusCode.OK:
            await self._reset(stream)
            status = StatusCode(resp.status).name if resp.status in StatusCode._value2member_map_ else resp.status
            raise PeerUnreachableError(f"relay {relay_id} refused {what}: {status}", peer=relay_id.to_base58())
        return stream, resp

    async def dial(self, peer_id: ID, addr: multiaddr.Multiaddr) -> None:
        """Connect to ``peer_id`` through the relay named in ``addr``; the caller sets the deadline."""
        relay_id, relay_addr = split_circuit(addr)
        if relay_id == self.host.get_id() or relay_id == peer_id:
            raise PeerUnreachableError(f"{addr}: not a circuit through another peer", peer=peer_id.to_base58())
        # The relay may be known to us under another address than the one the target reached it at.
        try:
            known = [a for a in self.host.get_peerstore().addrs(relay_id) if not is_circuit(a)]
        except PeerStoreError:  # never heard of the relay but through this address
            known = []
        await hostlib.connect(self.host, relay_id, list(dict.fromkeys([relay_addr, *known])), self.timeouts)
        connect = HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=peer_id.to_bytes()))
        stream, _ = await self._hop(relay_id, connect, f"connect to {peer_id}")
        circuit = multiaddr.Multiaddr(f"/p2p/{relay_id.to_base58()}/p2p-circuit/p2p/{peer_id.to_base58()}")
        raw: Any = RawConnection(stream, initiator=True, connection_type=ConnectionType.RELAYED,
                                 addresses=[circuit])
        if self.psk_hex is not None:
            raw = new_protected_conn(raw, self.psk_hex)
        network = self.host.get_network()
        assert isinstance(network, Swarm), "ekmesh hosts use py-libp2p's Swarm"
        try:
            conn = await network.upgrade_outbound_raw_conn(raw, peer_id)
        except hostlib.NET_ERRORS as exc:
            await self._reset(stream)
            raise PeerUnreachableError(f"relayed handshake with {peer_id} via {relay_id} failed: {exc}",
                                       peer=peer_id.to_base58()) from exc
        except BaseException:
            await self._reset(stream)
            raise
        conn.set_transport_info([circuit], ConnectionType.RELAYED)
        log.debug("connected to %s through relay %s", peer_id, relay_id)

    async def _close(self, stream: INetStream) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(0.5):
            try:
                await stream.close()
            except hostlib.NET_ERRORS:
                await hostlib.reset_quietly(stream)

    async def _reset(self, stream: INetStream | None) -> None:
        if stream is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(0.5):
                await hostlib.reset_quietly(stream)
