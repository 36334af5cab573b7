"""The libp2p host of a node, and the few primitives the mesh protocols build on.

Invariants:
- Noise is the only security transport (``sec_opt`` is always passed: py-libp2p's default would also accept
  ``/plaintext/2.0.0`` and secio, letting a peer claim any id). Yamux is the only muxer.
- A mesh key becomes libp2p's private-network ``psk``: a peer without it fails the handshake and gets nothing.
- Every dial and every exchange runs under a deadline from ``MeshTimeouts``; libp2p, trio and socket errors are
  translated into ``PeerError``s here, once.
- Control messages are small length-prefixed JSON frames (``MAX_FRAME``), one request and one answer per stream.
"""

from __future__ import annotations

import errno
import json
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import multiaddr
import psutil
import trio
from libp2p import create_yamux_muxer_option, new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.config import ConnectionConfig
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from multiaddr.protocols import P_P2P

from ekmesh.core.constants import P2P_PORT
from ekmesh.core.errors import ConfigError, PeerClosedError, PeerError, PeerUnreachableError, ProtocolError
from ekmesh.discovery.config import MeshKey, MeshTimeouts

MAX_FRAME = 1 << 20
NET_ERRORS = (BaseLibp2pError, OSError, trio.BrokenResourceError, trio.ClosedResourceError, EOFError)


def build_host(key_pair: KeyPair, mesh_key: MeshKey) -> IHost:
    """A py-libp2p host that speaks Noise + yamux only, inside the mesh's private network if keyed."""
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt=create_yamux_muxer_option(),
        psk=mesh_key.psk_hex,
        # One connection per peer: removes the 250 ms happy-eyeballs delay of each dial; ekmesh dials each
        # address itself (see ``connect``), in order.
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )


def parse_multiaddr(text: str, what: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(text)
    except Exception as exc:  # multiaddr raises several unrelated types for bad input
        raise ConfigError(f"{what} {text!r} is not a multiaddr: {exc}") from exc


def listen_addrs(listen: Sequence[str]) -> list[multiaddr.Multiaddr]:
    """``--listen`` values, or all IPv4 interfaces on ``P2P_PORT``, falling back to a free port if taken."""
    if listen:
        addrs = [parse_multiaddr(a, "--listen") for a in listen]
        for addr in addrs:
            text = str(addr)
            if not text.startswith("/ip4/") or "/tcp/" not in text:
                raise ConfigError(f"--listen {text}: ekmesh listens on /ip4/<address>/tcp/<port> addresses")
            ip, port = addr.value_for_protocol("ip4"), int(addr.value_for_protocol("tcp"))
            if port and not _port_free(port, ip):
                raise ConfigError(f"--listen {text}: port {port} is in use")
        return addrs
    port = P2P_PORT if _port_free(P2P_PORT) else 0
    return [multiaddr.Multiaddr(f"/ip4/0.0.0.0/tcp/{port}")]


def _port_free(port: int, ip: str = "0.0.0.0") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise ConfigError(f"cannot listen on {ip}:{port}: {exc.strerror}") from exc
    return True


def public_addrs(host: IHost) -> list[str]:
    """The host's full listen multiaddrs (``/p2p/<id>`` included), wildcards expanded to interface addresses.

    Non-loopback addresses come first, so a peer that dials them in order reaches us over the LAN first.
    """
    peer_id = host.get_id().to_base58()
    out: list[str] = []
    for addr in host.get_transport_addrs():
        text = str(addr)
        ip = addr.value_for_protocol("ip4") if "/ip4/" in text else None
        if ip == "0.0.0.0":
            rest = text.split("/", 3)[3]  # "tcp/PORT..."
            out += [f"/ip4/{a}/{rest}" for a in _interface_ipv4()]
        else:
            out.append(text)
    out.sort(key=lambda a: a.startswith("/ip4/127."))
    return [f"{a}/p2p/{peer_id}" for a in dict.fromkeys(out)]


def _interface_ipv4() -> list[str]:
    addrs = [snic.address for nics in psutil.net_if_addrs().values() for snic in nics
             if snic.family == socket.AF_INET]
    return sorted(set(addrs), key=lambda a: (a.startswith("127."), a))


def split_peer_addr(text: str) -> tuple[str, multiaddr.Multiaddr]:
    """Split ``/ip4/.../tcp/N/p2p/ID`` into (peer id, transport address); the peer id part is required.

    A relayed address ``<relay addr>/p2p/RELAY/p2p-circuit/p2p/ID`` names its target last: it splits into
    (ID, ``<relay addr>/p2p/RELAY/p2p-circuit``).
    """
    addr = parse_multiaddr(text, "--peer")
    peer_id = addr.get_peer_id()  # the last /p2p part
    if not peer_id or not addr.protocols() or addr.protocols()[-1].code != P_P2P:
        raise ConfigError(
            f"--peer {text!r} has no /p2p/<peer id> part; use a full address as printed by `ekmesh join`"
        )
    try:
        ID.from_base58(peer_id)
    except ValueError as exc:
        raise ConfigError(f"--peer {text!r}: {peer_id!r} is not a peer id") from exc
    return peer_id, addr.decapsulate_code(P_P2P)


def is_connected(host: IHost, peer_id: ID) -> bool:
    return any(not c.is_closed for c in host.get_network().get_connections(peer_id))


CircuitDialer = Callable[[ID, multiaddr.Multiaddr], Awaitable[None]]


async def connect(host: IHost, peer_id: ID, addrs: Sequence[multiaddr.Multiaddr], timeouts: MeshTimeouts,
                  dial_circuit: CircuitDialer | None = None) -> None:
    """Make sure there is a connection to ``peer_id``; ``PeerUnreachableError`` if not.

    Direct addresses are dialed first, in order, within ``connect_timeout``; then relayed (``/p2p-circuit``)
    addresses through ``dial_circuit``, each within its own ``connect_timeout``.
    """
    if is_connected(host, peer_id):
        return
    network = host.get_network()
    # Our own redial backoff governs retries; libp2p's 60 s negative cache would hide a restarted peer.
    if isinstance(network, Swarm):
        network.unblock_peer(peer_id)
    errors = []
    direct = [a for a in addrs if "/p2p-circuit" not in str(a)]
    relayed = [a for a in addrs if "/p2p-circuit" in str(a)]
    with trio.move_on_after(timeouts.connect_timeout) as scope:
        for addr in direct:
            try:
                await network.dial_addr(addr, peer_id)
                host.get_peerstore().add_addrs(peer_id, [addr], int(timeouts.forget_after))
                return
            except NET_ERRORS as exc:
                errors.append(f"{addr}: {exc or type(exc).__name__}")
    if scope.cancelled_caught:
        errors.append(f"no direct answer within {timeouts.connect_timeout:g}s")
    if dial_circuit is None:
        if relayed:
            errors.append("relayed addresses not dialed (no relay dialer)")
    else:
        for addr in relayed:
            if is_connected(host, peer_id):
                return
            with trio.move_on_after(timeouts.connect_timeout) as scope:
                try:
                    await dial_circuit(peer_id, addr)
                    return
                except (PeerError, ProtocolError, *NET_ERRORS) as exc:
                    errors.append(f"{addr}: {exc or type(exc).__name__}")
            if scope.cancelled_caught:
                errors.append(f"{addr}: no answer through the relay within {timeouts.connect_timeout:g}s")
    if is_connected(host, peer_id):  # it dialed us meanwhile
        return
    detail = "; ".join(errors) or f"no answer within {timeouts.connect_timeout:g}s (down, or another mesh key?)"
    raise PeerUnreachableError(f"cannot connect to {peer_id}: {detail}", peer=peer_id.to_base58())


async def request(host: IHost, peer_id: ID, protocol: TProtocol, message: dict[str, Any],
                  timeout: float) -> dict[str, Any]:
    """Open a stream, send one JSON frame, read one JSON frame back, all within ``timeout``."""
    stream: INetStream | None = None
    try:
        with trio.fail_after(timeout):
            stream = await host.new_stream(peer_id, [protocol])
            await write_frame(stream, message)
            answer = await read_frame(stream)
            done, stream = stream, None
            await done.close()
            return answer
    except trio.TooSlowError as exc:
        raise PeerClosedError(f"{protocol} to {peer_id} timed out after {timeout:g}s",
                              peer=peer_id.to_base58()) from exc
    except NET_ERRORS as exc:
        raise PeerClosedError(f"{protocol} to {peer_id} failed: {exc or type(exc).__name__}",
                              peer=peer_id.to_base58()) from exc
    finally:
        if stream is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(0.5):
                await reset_quietly(stream)


async def reset_quietly(stream: INetStream) -> None:
    try:
        await stream.reset()
    except NET_ERRORS:
        pass  # already closed: nothing left to release


async def write_frame(stream: INetStream, message: dict[str, Any]) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    await stream.write(struct.pack(">I", len(body)) + body)


async def read_frame(stream: INetStream) -> dict[str, Any]:
    (length,) = struct.unpack(">I", await read_exactly(stream, 4))
    if length > MAX_FRAME:
        raise ProtocolError(f"peer announced a frame of {length} bytes, more than {MAX_FRAME}")
    body = await read_exactly(stream, length)
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"frame is not JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError("frame is not a JSON object")
    return message


async def read_exactly(stream: INetStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise EOFError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)
