"""The membership view: which peers exist, their latest verified advert, and whether they are alive.

A pure state machine (no I/O, an injectable clock), fed by the membership protocol: ``offer`` an advert
(already signature-checked), report ``ping_ok`` / ``ping_failed``, and ``tick`` regularly. It answers with
``ViewEvent``s (joined, down, left) for the live log.

States: ``self`` (this node), ``up``, ``down`` (adverts stopped for ``down_after`` or ``ping_failures``
consecutive failed pings), ``left`` (the peer announced a clean shutdown). A newer advert (higher
``(incarnation, seq)``) of a down or left peer brings it back up. Entries down or left for ``forget_after``
are dropped. Adverts of down peers are not relayed, so a dead peer is not brought back to life by gossip.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ekmesh.discovery.advert import SignedAdvert
from ekmesh.discovery.config import MeshTimeouts


@dataclass(frozen=True)
class ViewEvent:
    kind: str  # "joined" | "down" | "left"
    peer_id: str
    name: str
    detail: str = ""


@dataclass
class PeerEntry:
    signed: SignedAdvert
    state: str
    last_heard: float
    """Monotonic time of the last fresh advert (or successful sync) from this peer."""
    changed_at: float
    rtt_ms: float | None = None
    failures: int = 0
    reason: str = ""

    @property
    def peer_id(self) -> str:
        return self.signed.advert.peer_id


class MeshView:
    def __init__(self, self_advert: SignedAdvert, timeouts: MeshTimeouts,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.timeouts = timeouts
        self.clock = clock
        self.self_id = self_advert.advert.peer_id
        now = clock()
        self.entries: dict[str, PeerEntry] = {self.self_id: PeerEntry(self_advert, "self", now, now)}

    def set_self(self, signed: SignedAdvert) -> None:
        assert signed.advert.peer_id == self.self_id
        entry = self.entries[self.self_id]
        entry.signed, entry.last_heard = signed, self.clock()

    def offer(self, signed: SignedAdvert) -> list[ViewEvent]:
        """Take a verified advert; ignore it unless it is newer than what the view holds for that peer."""
        advert = signed.advert
        if advert.peer_id == self.self_id:
            return []
        now = self.clock()
        entry = self.entries.get(advert.peer_id)
        if entry is not None and advert.order <= entry.signed.advert.order:
            return []
        if entry is None:
            entry = PeerEntry(signed, "new", now, now)
            self.entries[advert.peer_id] = entry
        entry.signed, entry.last_heard = signed, now
        if advert.state == "left":
            return self._transition(entry, "left", "announced leave")
        entry.failures = 0
        return self._transition(entry, "up", "")

    def heard(self, peer_id: str) -> None:
        """A direct exchange with the peer succeeded: it is alive even if its advert did not change."""
        entry = self.entries.get(peer_id)
        if entry is not None and entry.state == "up":
            entry.last_heard = self.clock()

    def ping_ok(self, peer_id: str, rtt_ms: float) -> None:
        entry = self.entries.get(peer_id)
        if entry is not None:
            entry.rtt_ms, entry.failures = rtt_ms, 0

    def ping_failed(self, peer_id: str, reason: str) -> list[ViewEvent]:
        entry = self.entries.get(peer_id)
        if entry is None or entry.state != "up":
            return []
        entry.failures += 1
        if entry.failures >= self.timeouts.ping_failures:
            return self._transition(entry, "down", f"{entry.failures} pings failed ({reason})")
        return []

    def tick(self) -> list[ViewEvent]:
        now = self.clock()
        events: list[ViewEvent] = []
        for peer_id, entry in list(self.entries.items()):
            if entry.state == "up" and now - entry.last_heard > self.timeouts.down_after:
                events += self._transition(entry, "down", f"no advert for {now - entry.last_heard:.1f}s")
            elif entry.state in ("down", "left") and now - entry.changed_at > self.timeouts.forget_after:
                del self.entries[peer_id]
        return events

    def digest(self) -> dict[str, list[int]]:
        """``{peer id: [incarnation, seq]}`` of every advert this view would relay."""
        return {pid: list(e.signed.advert.order) for pid, e in self.entries.items() if e.state != "down"}

    def newer_than(self, digest: dict[str, list[int]]) -> list[SignedAdvert]:
        """Adverts (of live or left peers, and our own) that are newer than the other side's ``digest``."""
        out = []
        for pid, entry in self.entries.items():
            if entry.state == "down":
                continue
            theirs = digest.get(pid)
            if theirs is None or tuple(theirs) < entry.signed.advert.order:
                out.append(entry.signed)
        return out

    def get(self, peer_id: str) -> PeerEntry | None:
        return self.entries.get(peer_id)

    def peers(self, *states: str) -> list[PeerEntry]:
        return [e for e in self.entries.values() if not states or e.state in states]

    def _transition(self, entry: PeerEntry, state: str, reason: str) -> list[ViewEvent]:
        if entry.state == state:
            return []
        entry.state, entry.changed_at, entry.reason = state, self.clock(), reason
        kind = {"up": "joined", "down": "down", "left": "left"}[state]
        return [ViewEvent(kind, entry.peer_id, entry.signed.advert.name, reason)]
