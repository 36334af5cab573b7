"""Membership: signed adverts spread by push-pull anti-entropy over a libp2p protocol, plus failure detection.

Equivalent of gossip, chosen over py-libp2p's gossipsub because gossipsub drops messages silently under its
rate limits and queue sizes (see DESIGN.md) and cannot tell a slow peer from a dead one. Each node, every
``advert_interval``, for every peer it knows (or was told to dial):
  1. makes sure a connection exists (dialing the addresses of the peer's advert in order, direct ones first and
     then its ``/p2p-circuit`` addresses through ``dial_circuit`` (see ``relay``), with backoff for bootstrap and
     discovered peers that failed; a member that went down is visited every interval, so a healed one is up again
     within about two intervals, plus the deadline of a dial in flight when the network came back);
  2. pings it (libp2p ping; measures RTT);
  3. syncs: sends its own fresh advert and a digest ``{peer id: [incarnation, seq]}`` of its view, and gets back
     every advert the other side holds that is newer than the digest.
Adverts are verified (signature, bounds) on receipt, whoever relays them, so peers known only through
others still converge; a peer learnt that way is dialed directly too (a full mesh: right for tens of peers).
A failed connect, ping or sync counts as a failed ping (``MeshView.ping_failed``). Leaving sends a signed
``left`` advert to every connected peer at once, within ``leave_timeout``.

Bootstrap peers (``--peer``) that never answered are diagnosed (``bootstrap_status``): when a dial fails, a plain TCP
connection to the peer's addresses tells "refused" (something listens there but the handshake did not complete:
another mesh key, or not an ekmesh node; a private network's key is checked before anything else, so a wrong one
shows only as a handshake that never completes) from "unreachable". Each change of that diagnosis is logged once at
WARNING: a node whose every bootstrap peer refuses it runs alone, and must say so.

Every exchange is one stream with one request frame and one answer frame, under a deadline.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.peer.id import ID

from ekmesh.core.errors import ConfigError, PeerError, ProtocolError
from ekmesh.discovery import host as hostlib
from ekmesh.discovery.advert import SignedAdvert, verify_advert
from ekmesh.discovery.config import MeshTimeouts
from ekmesh.discovery.view import MeshView, ViewEvent

log = logging.getLogger(__name__)

SYNC_PROTOCOL = TProtocol("/ekmesh/sync/1.0.0")
MAX_ADVERTS_PER_FRAME = 1024
_PING_BYTES = 32


class Membership:
    """Keeps ``view`` converged with the mesh through ``host``. ``make_advert(state)`` signs our own advert."""

    def __init__(self, host: IHost, view: MeshView, timeouts: MeshTimeouts,
                 make_advert: Callable[[str], SignedAdvert],
                 on_events: Callable[[list[ViewEvent]], None],
                 on_connected: Callable[[ID], None] = lambda _pid: None,
                 dial_circuit: hostlib.CircuitDialer | None = None) -> None:
        self.host = host
        self.dial_circuit = dial_circuit
        self.view = view
        self.timeouts = timeouts
        self.make_advert = make_advert
        self.on_events = on_events
        self.on_connected = on_connected
        self.bootstrap: dict[str, list[multiaddr.Multiaddr]] = {}
        self.candidates: dict[str, list[multiaddr.Multiaddr]] = {}
        self._next_dial: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._inflight: set[str] = set()
        self._introduced: set[str] = set()
        self._bootstrap_state: dict[str, tuple[str, str]] = {}  # peer id -> (state, reason); see bootstrap_status
        self._leaving = False
        self.rejected_adverts = 0
        host.set_stream_handler(SYNC_PROTOCOL, self._handle_sync)

    def add_bootstrap(self, peer_id: str, addr: multiaddr.Multiaddr) -> None:
        """A ``--peer``: dialed until it answers, and again whenever it is down."""
        self.bootstrap.setdefault(peer_id, []).append(addr)

    def add_candidate(self, peer_id: str, addrs: Sequence[multiaddr.Multiaddr], source: str) -> None:
        """A peer found by mDNS or the DHT: dialed once soon; afterwards its adverts say where it is."""
        if peer_id == self.view.self_id:
            return
        entry = self.view.get(peer_id)
        if entry is not None and entry.state in ("up", "left"):
            return
        if peer_id not in self.candidates:
            log.debug("candidate %s from %s: %s", peer_id, source, [str(a) for a in addrs])
            self._next_dial.pop(peer_id, None)  # news: try now
        self.candidates[peer_id] = list(addrs)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while not self._leaving:
                self.view.set_self(self.make_advert("up"))
                self._emit(self.view.tick())
                now = trio.current_time()
                for peer_id, addrs in self._targets():
                    if peer_id in self._inflight or self._next_dial.get(peer_id, 0.0) > now:
                        continue
                    self._inflight.add(peer_id)
                    nursery.start_soon(self._visit, peer_id, addrs)
                await trio.sleep(self.timeouts.advert_interval)

    async def announce_leave(self) -> None:
        """Tell every connected peer, at once and within ``leave_timeout``, that we are leaving."""
        self._leaving = True  # from now on no "up" advert may be signed or pushed
        left = self.make_advert("left")
        self.view.set_self(left)
        message = {"digest": {}, "adverts": [left.to_wire()]}
        peers = [e.peer_id for e in self.view.peers("up")
                 if hostlib.is_connected(self.host, ID.from_base58(e.peer_id))]

        async def tell(peer_id: str) -> None:
            try:
                await hostlib.request(self.host, ID.from_base58(peer_id), SYNC_PROTOCOL, message,
                                      self.timeouts.leave_timeout)
            except (PeerError, ProtocolError) as exc:
                log.debug("leave not delivered to %s: %s", peer_id, exc)

        with trio.move_on_after(self.timeouts.leave_timeout):
            async with trio.open_nursery() as nursery:
                for peer_id in peers:
                    nursery.start_soon(tell, peer_id)

    def _targets(self) -> list[tuple[str, list[multiaddr.Multiaddr]]]:
        out: dict[str, list[multiaddr.Multiaddr]] = {}
        for entry in self.view.peers("up", "down"):
            addrs = []
            for text in entry.signed.advert.addrs:
                try:
                    addrs.append(hostlib.split_peer_addr(text)[1])
                except ConfigError:  # a bad address in a signed advert: skip that address only
                    log.debug("skipping bad address %r of %s", text, entry.peer_id)
            out[entry.peer_id] = addrs
        for peer_id, addrs in list(self.bootstrap.items()) + list(self.candidates.items()):
            known = self.view.get(peer_id)
            if known is None or known.state == "down" or (known.state == "left" and peer_id in self.bootstrap):
                out[peer_id] = list(dict.fromkeys(out.get(peer_id, []) + addrs))
        return list(out.items())

    def bootstrap_status(self) -> list[dict[str, str]]:
        """Per ``--peer``: ``{"peer_id", "addrs", "state", "reason"}``, state ``connecting`` (no answer yet),
        ``connected`` (it answered once), ``refused`` (it listens but did not complete the handshake: another mesh
        key?) or ``unreachable`` (nothing answers at its addresses)."""
        out = []
        for peer_id, addrs in self.bootstrap.items():
            state, reason = self._bootstrap_state.get(peer_id, ("connecting", ""))
            out.append({"peer_id": peer_id, "addrs": ", ".join(str(a) for a in addrs), "state": state,
                        "reason": reason})
        return out

    async def _diagnose_bootstrap(self, peer_id: str, addrs: list[multiaddr.Multiaddr], error: str) -> None:
        listening = await _tcp_answers(addrs, self.timeouts.connect_timeout)
        if listening is not None:
            state = "refused"
            reason = (f"{listening} accepts TCP connections but did not complete the handshake: it is probably on "
                      "another mesh key (or not an ekmesh node)")
        else:
            state, reason = "unreachable", f"nothing answers at {', '.join(str(a) for a in addrs)} ({error})"
        if self._bootstrap_state.get(peer_id, ("", ""))[0] != state:
            log.warning("bootstrap peer %s: %s; until a peer admits it this node is alone", peer_id, reason)
        self._bootstrap_state[peer_id] = (state, reason)

    async def _visit(self, peer_id: str, addrs: list[multiaddr.Multiaddr]) -> None:
        pid = ID.from_base58(peer_id)
        try:
            await hostlib.connect(self.host, pid, addrs, self.timeouts, self.dial_circuit)
            rtt_ms = await self._ping(pid)
            await self._sync(pid)
        except (PeerError, ProtocolError) as exc:
            self._failed(peer_id, str(exc))
            await self._drop_if_down(pid)
            if peer_id in self.bootstrap and peer_id not in self._introduced:
                await self._diagnose_bootstrap(peer_id, addrs, str(exc))
        else:
            if peer_id in self.bootstrap:
                if self._bootstrap_state.get(peer_id, ("", ""))[0] in ("refused", "unreachable"):
                    log.warning("bootstrap peer %s answered: this node is on the mesh", peer_id)
                self._bootstrap_state[peer_id] = ("connected", "")
            self.candidates.pop(peer_id, None)
            if peer_id not in self._introduced:
                self._introduced.add(peer_id)
                self.on_connected(pid)
            self._backoff.pop(peer_id, None)
            self._next_dial.pop(peer_id, None)
            self.view.heard(peer_id)
            self.view.ping_ok(peer_id, rtt_ms)
        finally:
            self._inflight.discard(peer_id)

    def _failed(self, peer_id: str, reason: str) -> None:
        log.debug("visit to %s failed: %s", peer_id, reason)
        self._emit(self.view.ping_failed(peer_id, reason))
        entry = self.view.get(peer_id)
        if entry is not None and entry.state == "down":
            # a member that went down is visited every interval (one visit in flight at a time), not after a
            # backoff that grew while it was away: once it is reachable again it is up within about two intervals
            self._backoff.pop(peer_id, None)
            self._next_dial.pop(peer_id, None)
        elif entry is None or entry.state != "up":
            backoff = self._backoff.get(peer_id, self.timeouts.redial_interval / 2) * 2
            self._backoff[peer_id] = min(backoff, self.timeouts.redial_max_interval)
            self._next_dial[peer_id] = trio.current_time() + self._backoff[peer_id]

    async def _drop_if_down(self, pid: ID) -> None:
        """Closes the connection to a peer that is down: after a partition it may be stale, its TCP retransmitting
        on a timer that doubles up to minutes, so the next visit dials afresh instead of waiting behind it."""
        entry = self.view.get(pid.to_base58())
        if entry is None or entry.state != "down" or not hostlib.is_connected(self.host, pid):
            return
        with trio.move_on_after(self.timeouts.stream_timeout):
            await self.host.disconnect(pid)

    async def _ping(self, pid: ID) -> float:
        stream: INetStream | None = None
        try:
            with trio.fail_after(self.timeouts.ping_timeout):
                stream = await self.host.new_stream(pid, [PING_PROTOCOL])
                payload = secrets.token_bytes(_PING_BYTES)
                start = trio.current_time()
                await stream.write(payload)
                echo = await hostlib.read_exactly(stream, _PING_BYTES)
                rtt_ms = (trio.current_time() - start) * 1000
                if echo != payload:
                    raise ProtocolError(f"ping to {pid} came back altered")
                await stream.close()
                stream = None
                return rtt_ms
        except trio.TooSlowError as exc:
            raise PeerError(f"ping to {pid} timed out", peer=pid.to_base58()) from exc
        except hostlib.NET_ERRORS as exc:
            raise PeerError(f"ping to {pid} failed: {exc or type(exc).__name__}", peer=pid.to_base58()) from exc
        finally:
            if stream is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(0.5):
                    await hostlib.reset_quietly(stream)

    async def _sync(self, pid: ID) -> None:
        own = self.view.get(self.view.self_id)
        assert own is not None
        message = {"digest": self.view.digest(), "adverts": [own.signed.to_wire()]}
        answer = await hostlib.request(self.host, pid, SYNC_PROTOCOL, message, self.timeouts.stream_timeout)
        self._take_adverts(answer.get("adverts"), pid.to_base58())

    async def _handle_sync(self, stream: INetStream) -> None:
        remote = stream.muxed_conn.peer_id.to_base58()
        try:
            with trio.fail_after(self.timeouts.stream_timeout):
                message = await hostlib.read_frame(stream)
                digest = _digest(message.get("digest"))
                self._take_adverts(message.get("adverts"), remote)
                self.view.heard(remote)
                await hostlib.write_frame(stream, {"adverts": [s.to_wire() for s in self.view.newer_than(digest)]})
                await stream.close()
        except (trio.TooSlowError, ProtocolError, *hostlib.NET_ERRORS) as exc:
            log.debug("sync from %s failed: %s", remote, exc)
            await hostlib.reset_quietly(stream)

    def _take_adverts(self, adverts: Any, source: str) -> None:
        if not isinstance(adverts, list) or len(adverts) > MAX_ADVERTS_PER_FRAME:
            raise ProtocolError(f"sync from {source}: 'adverts' must be a list of at most {MAX_ADVERTS_PER_FRAME}")
        for wire in adverts:
            try:
                signed = verify_advert(wire)
            except ProtocolError as exc:
                self.rejected_adverts += 1
                log.warning("dropped an advert relayed by %s: %s", source, exc)
                continue
            self._emit(self.view.offer(signed))

    def _emit(self, events: list[ViewEvent]) -> None:
        if events:
            self.on_events(events)


def _digest(obj: Any) -> dict[str, list[int]]:
    if not isinstance(obj, dict) or len(obj) > MAX_ADVERTS_PER_FRAME:
        raise ProtocolError("sync 'digest' must be an object")
    for key, value in obj.items():
        if not (isinstance(key, str) and isinstance(value, list) and len(value) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in value)):
            raise ProtocolError("sync 'digest' entries must be peer id → [incarnation, seq]")
    return obj


async def _tcp_answers(addrs: Sequence[multiaddr.Multiaddr], timeout: float) -> str | None:
    """The first of ``addrs`` (``/ip4|ip6/../tcp/N``) where a plain TCP connection opens within ``timeout``, closed
    at once; None when none does."""
    for addr in addrs:
        text = str(addr)
        if "/tcp/" not in text or "/p2p-circuit" in text:
            continue
        try:
            ip = addr.value_for_protocol("ip4") if "/ip4/" in text else addr.value_for_protocol("ip6")
            port = int(addr.value_for_protocol("tcp"))
        except (ValueError, multiaddr.exceptions.ProtocolLookupError):
            continue
        with trio.move_on_after(timeout):
            try:
                stream = await trio.open_tcp_stream(ip, port)
            except OSError:
                continue
            await stream.aclose()
            return f"/ip4/{ip}/tcp/{port}" if "/ip4/" in text else f"/ip6/{ip}/tcp/{port}"
    return None
