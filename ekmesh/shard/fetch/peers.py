"""Blob exchange, the client's per-peer state: ``PeerSlots``, shared by every ``fetch`` call of one ``Fetcher``.

Role: what the client knows about each peer across fetch calls: transfers in flight (``max_per_peer`` each,
``max_total`` in all), how long a BUSY answer holds it back, bans (``ban_s``, so a liar stays banned in the next
call), and the pool of idle links, opened through the injected ``dial(peer_id)``. It does not schedule (that is
``run``) and opens no socket itself.

Invariants:
- one condition variable, ``cv``, guards all of it; a ``Run`` also changes its jobs and its report under ``cv`` and
  waits on it for a slot, so every change that can free work is followed by ``cv.notify_all()``;
- the methods marked "under ``cv``" expect the caller to hold it; ``banned``, ``take_link``, ``give_link`` and
  ``close`` take it themselves, and never dial or close a link while holding it;
- a transfer holds its slot from ``acquire`` (when it is handed out) to ``release`` (when it ends, well or not);
- at most ``max_per_peer`` idle links are kept per peer; any more are closed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ekmesh.shard.exchange import Link
from ekmesh.shard.fetch.config import FetchConfig, FetchReport

log = logging.getLogger(__name__)
Dial = Callable[[str], Link]


class PeerSlots:
    """Transfer slots, BUSY hold-backs, bans and idle links per peer, under one condition variable ``cv``."""

    def __init__(self, dial: Dial, config: FetchConfig) -> None:
        self.dial, self.config = dial, config
        self.cv = threading.Condition()
        self._active: dict[str, int] = {}
        self._busy_until: dict[str, float] = {}
        self._bans: dict[str, float] = {}
        self._idle: dict[str, list[Link]] = {}

    # -- bans

    def usable(self, peer: str, now: float) -> bool:
        """(Under ``cv``.) Whether ``peer`` is not banned at ``now``."""
        return self._bans.get(peer, 0.0) <= now

    def ban(self, peer: str, blob_id: str, report: FetchReport) -> bool:
        """(Under ``cv``.) Bans ``peer`` for ``ban_s`` and records it in ``report``; True if it was not banned
        already (the caller then reports it)."""
        now = time.monotonic()
        fresh = self._bans.get(peer, 0.0) <= now
        self._bans[peer] = now + self.config.ban_s
        if (peer, blob_id) not in report.bad_peers:
            report.bad_peers.append((peer, blob_id))
        log.warning("peer %s served bytes that do not hash to blob %s; banned for %.0f s", peer, blob_id,
                    self.config.ban_s)
        return fresh

    def banned(self) -> dict[str, float]:
        """Banned peers and the seconds left on their bans."""
        now = time.monotonic()
        with self.cv:
            return {p: t - now for p, t in self._bans.items() if t > now}

    # -- transfer slots

    def active(self, peer: str) -> int:
        """(Under ``cv``.) Transfers in flight from ``peer``."""
        return self._active.get(peer, 0)

    def busy_until(self, peer: str) -> float:
        """(Under ``cv``.) The monotonic time until which ``peer``'s BUSY answer holds it back (0.0: never BUSY)."""
        return self._busy_until.get(peer, 0.0)

    def free(self, peer: str, now: float) -> bool:
        """(Under ``cv``.) Whether ``peer`` may take one more transfer: under ``max_per_peer`` and not held back."""
        return self.active(peer) < self.config.max_per_peer and self.busy_until(peer) <= now

    def full(self) -> bool:
        """(Under ``cv``.) Whether ``max_total`` transfers are in flight."""
        return sum(self._active.values()) >= self.config.max_total

    def acquire(self, peer: str) -> None:
        """(Under ``cv``.) Takes a transfer slot of ``peer``; ``release`` gives it back."""
        self._active[peer] = self._active.get(peer, 0) + 1

    def release(self, peer: str) -> None:
        """(Under ``cv``.) Gives back a slot taken by ``acquire``; the caller then notifies ``cv``."""
        self._active[peer] -= 1

    def hold_back(self, peer: str, until: float) -> None:
        """(Under ``cv``.) After a BUSY answer: no new transfer from ``peer`` before monotonic time ``until``."""
        self._busy_until[peer] = until

    # -- links

    def take_link(self, peer: str) -> Link:
        """An idle link to ``peer``, else a new one from ``dial`` (outside ``cv``)."""
        with self.cv:
            pool = self._idle.get(peer)
            if pool:
                return pool.pop()
        return self.dial(peer)

    def give_link(self, link: Link) -> None:
        """Keeps ``link`` for the next transfer from its peer, or closes it when ``max_per_peer`` are kept."""
        with self.cv:
            pool = self._idle.setdefault(link.peer, [])
            if len(pool) < self.config.max_per_peer:
                pool.append(link)
                return
        link.close()

    def close(self) -> None:
        """Closes every idle link."""
        with self.cv:
            links = [ln for lst in self._idle.values() for ln in lst]
            self._idle.clear()
        for ln in links:
            ln.close()
