"""Blob exchange, the client's scheduler: one ``Fetcher.fetch`` call as worker threads over (blob, peer, range) units.

Role: the state of each blob being fetched (``Job``: its holders, its ``Partial`` file, ranges to do, ranges in
flight and who wrote what) and the loop that hands units to workers, runs transfers, hash-checks complete files and
finds the peer that lied. Per-peer caps, BUSY hold-backs, bans and links are the ``Fetcher``'s ``PeerSlots``
(``peers``), handed to the constructor and used only through its public methods. ``ekmesh.shard.fetch.fetcher``
documents the behaviour.

Invariants: all shared state (jobs, per-peer counters, bans, the report) changes only under ``PeerSlots.cv``, and
no network or disk wait happens while it is held (except the small record file); a job is "finishing" or
"fallback" only with no transfer in flight, so a file is never reset under a writer; every transfer that ends (well
or not) records the bytes it wrote and releases its peer slot before its range is handed out again.

A full disk: a job whose bytes, record or final move find no space fails with the store's ``StoreFullError``;
its partial file and record are removed once no transfer writes to it (they would hold the space a retry needs, and
nothing partial stays in the store), and ``run`` raises ``StoreFullError`` (with the report) after the other jobs
ended, naming the blobs that did not fit.

Speed: in-order bytes are hashed from the frame just written (one holder streams a blob in order), so they are
never read back; each partial file is data-synced in the background every ``record_every`` bytes (``Run._syncer``,
which then saves the record), so the fsync of ``Store.adopt``, which alone makes a blob durable, finds little left
to write, and the receiving loop never waits for the disk.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from ekmesh.core.errors import (
    BlobHashMismatchError,
    EkmeshError,
    PeerError,
    PeerUnreachableError,
    ProtocolError,
    ShardError,
    StoreFullError,
)
from ekmesh.shard.exchange import CHUNK, Status, get
from ekmesh.shard.fetch.config import FetchConfig, FetchReport
from ekmesh.shard.fetch.partial import Partial
from ekmesh.shard.fetch.peers import PeerSlots
from ekmesh.shard.store import Store, out_of_space

log = logging.getLogger(__name__)


@dataclass
class Job:
    blob_id: str
    holders: list[str]
    size: int | None
    part: Partial | None = None
    todo: list[tuple[int, int]] = field(default_factory=list)
    inflight: int = 0
    single: bool = False  # refetch whole from one holder at a time (after a mismatch of a multi-peer copy)
    sources: list[tuple[int, int, str]] = field(default_factory=list)  # ranges written in this run, by whom
    suspect: tuple[Path, list[tuple[int, int, str]]] | None = None
    failures: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # peer -> why it no longer serves this blob
    state: str = "active"  # active | finishing | fallback | done | failed
    error: str = ""
    full: StoreFullError | None = None  # the disk had no room for it: its partial file goes, ``run`` raises this
    tries: int = 0
    # bytes [0, hash_at) are in ``hasher``: the one transfer that starts at hash_at hashes what it writes, so
    # in-order data is hashed once, as it arrives; the rest is read back and hashed by ``Store.adopt``. One thread:
    # 1 MiB updates gain nothing from blake3's thread pool while the same cores receive and decrypt (measured ~10%
    # slower with it on 2 cores); a read-back of most of a file gets the pool (``_finish``)
    hasher: blake3.blake3 = field(default_factory=blake3.blake3)
    hash_at: int = 0
    hash_busy: bool = False

    def rehash(self) -> None:
        self.hasher, self.hash_at = blake3.blake3(), 0


class _Skip(Exception):  # noqa: N818 (not an error: control flow inside this module)
    """This peer cannot serve this blob (for the rest of this fetch)."""


class Run:
    """One ``fetch`` call: worker threads take (blob, peer, range) units under ``peers.cv``.

    ``store``, ``peers``, ``config`` and the hooks are the ``Fetcher``'s (``peers`` outlives this call: its caps
    and bans span all of them); ``jobs`` and ``report`` are this call's; ``deadline`` is a ``time.monotonic()``."""

    def __init__(self, store: Store, peers: PeerSlots, config: FetchConfig, jobs: list[Job], report: FetchReport,
                 deadline: float, on_progress: Callable[[str, str, int], None] | None = None,
                 on_bad_peer: Callable[[str, str], None] | None = None,
                 fallback: Callable[[str], None] | None = None) -> None:
        self.store, self.peers, self.cfg = store, peers, config
        self.jobs, self.report, self.deadline = jobs, report, deadline
        self.on_progress, self.on_bad_peer, self.fallback = on_progress, on_bad_peer, fallback
        self._to_sync: queue.SimpleQueue[Partial | None] = queue.SimpleQueue()

    def run(self) -> None:
        syncer = threading.Thread(target=self._syncer, name="blob-fetch-sync", daemon=True)
        threads = [threading.Thread(target=self._worker, name=f"blob-fetch-{i}", daemon=True)
                   for i in range(max(1, self.cfg.max_total))]
        for t in [syncer, *threads]:
            t.start()
        for t in threads:
            t.join()
        self._to_sync.put(None)
        syncer.join()
        full = [j for j in self.jobs if j.full is not None]
        if full:
            first = full[0].full
            assert first is not None
            names = ", ".join(f"blob {j.blob_id}" for j in full[:3]) + (f" and {len(full) - 3} more"
                                                                         if len(full) > 3 else "")
            raise StoreFullError(names, first.where, first.free, self.report)

    def _syncer(self) -> None:
        """Background data syncs of partial files while their transfers go on: the disk writes while the network
        reads, instead of one long fsync after the last byte."""
        while (part := self._to_sync.get()) is not None:
            try:
                part.sync()
            except OSError as exc:  # the fsync of ``Store.adopt`` will report a disk that fails
                log.debug("background sync of %s: %s", part.path, exc)

    def _io(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise PeerUnreachableError("the fetch deadline passed")
        return min(self.cfg.io_s, left)

    def _worker(self) -> None:
        buf = memoryview(bytearray(CHUNK))
        while True:
            with self.peers.cv:
                while True:
                    if all(j.state in ("done", "failed") for j in self.jobs):
                        self.peers.cv.notify_all()
                        return
                    now = time.monotonic()
                    if now >= self.deadline:
                        for j in self.jobs:
                            if j.state == "active" and not j.inflight:
                                self._fail(j, "the fetch deadline passed")
                    work, wait = self._next(now)
                    if work is not None:
                        break
                    self.peers.cv.wait(max(0.005, min(wait, self.deadline - now, 1.0)))
            job, kind, peer, a, b = work
            if kind.startswith("get"):
                self._transfer(job, peer, a, b, buf, kind == "get+hash")
            elif kind == "finish":
                self._finish(job)
            else:
                self._fallback(job)

    # -- under the lock

    def _next(self, now: float) -> tuple[tuple[Job, str, str, int, int] | None, float]:
        wait, peers = 1.0, self.peers
        for j in self.jobs:
            if j.state != "active":
                continue
            if j.size is not None and j.part is None:
                if j.size > self.cfg.max_blob:
                    self._fail(j, f"its size {j.size} exceeds the limit {self.cfg.max_blob}")
                    continue
                try:
                    j.part = Partial(self.store, j.blob_id, j.size)
                except (ShardError, OSError) as exc:
                    self._write_failed(j, exc)
                    continue
            if j.part is not None and not j.inflight and not j.part.gaps():
                j.state = "finishing"
                return (j, "finish", "", 0, 0), 0.0
            usable = [p for p in j.holders if p not in j.skipped and peers.usable(p, now)]
            if not usable:
                if not j.inflight:
                    if self.fallback is not None:
                        j.state = "fallback"
                        return (j, "fallback", "", 0, 0), 0.0
                    self._fail(j, "no holder left")
                continue
            unit = self._unit(j, len(usable))
            if unit is None:
                continue
            free = [p for p in usable if peers.free(p, now)]
            if not free or peers.full():
                wait = min([wait] + [peers.busy_until(p) - now for p in usable if peers.busy_until(p) > now])
                continue
            serving = [s[2] for s in j.sources]
            peer = min(free, key=lambda p: (peers.active(p), serving.count(p), j.holders.index(p)))
            if j.todo and unit == j.todo[0]:
                j.todo.pop(0)
            j.inflight += 1
            peers.acquire(peer)
            hashing = unit[0] == j.hash_at and not j.hash_busy
            j.hash_busy |= hashing
            return (j, "get" if not hashing else "get+hash", peer, unit[0], unit[1]), 0.0
        return None, wait

    def _unit(self, j: Job, holders: int) -> tuple[int, int] | None:
        if j.part is None:  # size unknown: one probe at a time, whose answer tells the size
            return None if j.inflight else (0, self.cfg.split_at)
        if j.single:
            gaps = j.part.gaps()
            return (gaps[0][0], j.size or 0) if gaps and not j.inflight else None
        if not j.todo and not j.inflight:
            j.todo = self._split(j.part.gaps(), j.part.size, holders)
        return j.todo[0] if j.todo else None

    def _split(self, gaps: list[tuple[int, int]], size: int, holders: int) -> list[tuple[int, int]]:
        if size < self.cfg.split_at or holders < 2:  # ranges pay off across holders; one holder streams in order
            return gaps
        step = max(1, self.cfg.range_size)
        return [(a, min(a + step, e)) for s, e in gaps for a in range(s, e, step)]

    def _fail(self, j: Job, why: str) -> None:
        j.state = "failed"
        reasons = "; ".join(f"peer {p}: {r}" for p, r in j.skipped.items())
        j.error = why + (f" ({reasons})" if reasons else "") + ("" if j.holders else " (no holders given)")
        if j.part is not None:
            j.part.close(keep=bool(j.part.done) and j.full is None)
            j.part = None

    def _write_failed(self, j: Job, exc: OSError | EkmeshError) -> None:
        """(Under the lock.) The store cannot take this blob's bytes: the job fails, on a full disk with
        ``StoreFullError``. Its partial file is closed now if no transfer writes to it, else by the last one to end
        (``_transfer``), so no writer loses its file under it; on a full disk the file is removed, else kept for a
        later resume."""
        if isinstance(exc, StoreFullError):
            j.full = j.full or exc
        elif isinstance(exc, OSError) and out_of_space(exc):
            err = self.store.write_error(f"blob {j.blob_id}", exc)
            j.full = j.full or (err if isinstance(err, StoreFullError) else None)
        if j.state == "failed":
            return
        part = j.part
        if j.inflight:
            j.part = None  # not closed by ``_fail``: a transfer still writes to it
        self._fail(j, f"cannot write it here: {exc}")
        if j.inflight:
            j.part = part

    # -- outside the lock

    def _transfer(self, j: Job, peer: str, start: int, end: int, buf: memoryview, hashing: bool) -> None:
        peers, at, mark, link, requeue = self.peers, start, start, None, True
        try:
            link = peers.take_link(peer)
            ans = get(link, j.blob_id, start, end - start, self._io())
            with peers.cv:
                self.report.requests.append((peer, j.blob_id, start, ans.length, ans.status.name))
            if ans.status is Status.BUSY:
                with peers.cv:
                    peers.hold_back(peer, time.monotonic() + max(0.02, ans.retry_s))
                peers.give_link(link)
                link = None
                return
            if ans.status is not Status.OK:
                peers.give_link(link)
                link = None
                raise _Skip(f"answered {ans.status.name}: {ans.message}")
            if j.size is None:
                if ans.size > self.cfg.max_blob:
                    raise _Skip(f"says the blob has {ans.size} bytes, over the limit")
                with peers.cv:
                    j.size = ans.size
                    j.part = Partial(self.store, j.blob_id, ans.size)
                    j.part.mark(0, 0)
                    usable = sum(1 for p in j.holders if p not in j.skipped and peers.usable(p, time.monotonic()))
                    j.todo = self._split([(end, ans.size)], ans.size, usable) if end < ans.size else []
                    requeue = False
            elif ans.size != j.size:
                raise _Skip(f"says the blob has {ans.size} bytes, not {j.size}")
            end = min(end, ans.size)
            if ans.length != end - start:
                raise ProtocolError(f"peer {peer} announced {ans.length} bytes for [{start}, {end})")
            assert j.part is not None
            while at < end:
                n = link.recv_into(buf, self._io())
                if n == 0 or at + n > end:
                    raise ProtocolError(f"peer {peer} sent a {n}-byte data frame at {at} of [{start}, {end})")
                _pwrite_all(j.part.fd, buf[:n], at)  # the hasher takes the buffer: the file must hold it all
                if hashing:
                    j.hasher.update(buf[:n])
                at += n
                if self.on_progress is not None:
                    self.on_progress(j.blob_id, peer, n)
                if at - mark >= self.cfg.record_every:
                    with peers.cv:
                        self._record(j, peer, mark, at, save=False)
                    self._to_sync.put(j.part)  # syncs, then saves the record
                    mark = at
            peers.give_link(link)
            link = None
        except _Skip as exc:
            with peers.cv:
                j.skipped[peer] = str(exc)
        except (PeerError, ProtocolError) as exc:
            with peers.cv:
                j.failures[peer] = j.failures.get(peer, 0) + 1
                if isinstance(exc, (ProtocolError, PeerUnreachableError)) or \
                        j.failures[peer] >= self.cfg.max_failures:
                    j.skipped[peer] = str(exc)
            log.info("fetching blob %s from peer %s stopped at byte %d: %s", j.blob_id, peer, at, exc)
        except (OSError, ShardError) as exc:
            with peers.cv:
                self._write_failed(j, exc)
        finally:
            if link is not None:
                link.close()
            with peers.cv:
                if j.part is not None and j.full is None:
                    self._record(j, peer, mark, at)
                    if requeue and at < end and not j.single:
                        j.todo.insert(0, (at, end))
                if hashing:
                    j.hash_at, j.hash_busy = at, False
                j.inflight -= 1
                if j.state == "failed" and not j.inflight and j.part is not None:  # its writers are done
                    j.part.close(keep=bool(j.part.done) and j.full is None)
                    j.part = None
                peers.release(peer)
                self.report.received[peer] = self.report.received.get(peer, 0) + at - start
                peers.cv.notify_all()

    def _record(self, j: Job, peer: str, a: int, b: int, save: bool = True) -> None:
        if j.part is None:
            return
        if b > a:
            j.part.mark(a, b)
            j.sources.append((a, b, peer))
        if save:  # also when nothing is new here: the last periodic record may still wait for its data sync
            try:
                j.part.save()
            except OSError as exc:
                self._write_failed(j, exc)

    def _finish(self, j: Job) -> None:
        part = j.part
        assert part is not None
        try:
            if 2 * j.hash_at >= part.size:  # mostly hashed as it arrived: hash the rest the same way
                self.store.adopt(part.path, j.blob_id, j.hasher, j.hash_at)
            else:  # mostly out of order (ranges from several holders, a resumed fetch): read it all back, threaded
                self.store.adopt(part.path, j.blob_id)
        except BlobHashMismatchError as exc:
            with self.peers.cv:
                bad = self._mismatch(j, part, exc)
                self.peers.cv.notify_all()
            for p in bad:
                self._report_bad(p, j.blob_id)
            return
        except StoreFullError as exc:
            with self.peers.cv:
                self._write_failed(j, exc)
                self.peers.cv.notify_all()
            return
        except ShardError as exc:
            with self.peers.cv:
                self._fail(j, str(exc))
                self.peers.cv.notify_all()
            return
        part.close(keep=False)
        if j.suspect is not None:
            for p in self._blame(j.blob_id, *j.suspect):
                self._report_bad(p, j.blob_id)
        with self.peers.cv:
            j.part, j.state = None, "done"
            self.report.stored[j.blob_id] = "peers"
            self.peers.cv.notify_all()

    def _mismatch(self, j: Job, part: Partial, exc: BlobHashMismatchError) -> list[str]:
        peers, bad = {s[2] for s in j.sources}, []
        j.tries += 1
        if len(peers) == 1 and not part.resumed:
            p = peers.pop()
            if self.peers.ban(p, j.blob_id, self.report):
                bad.append(p)
            j.skipped[p] = "served bytes that do not hash to the blob's id"
            part.reset()
        elif not j.single and j.suspect is None:  # keep the copy to find the liar once a good copy arrives
            suspect = part.path.with_suffix(".suspect")
            os.replace(part.path, suspect)
            part.close(keep=False)
            j.suspect, j.single = (suspect, list(j.sources)), True
            j.part = Partial(self.store, j.blob_id, part.size)
        else:
            part.reset()
        j.sources, j.todo, j.state = [], [], "active"
        j.rehash()
        log.info("blob %s failed its hash check (%s); fetching it again", j.blob_id, exc)
        if j.tries > 2 * len(j.holders) + 2:
            self._fail(j, "every copy fetched failed the hash check")
        return bad

    def _blame(self, blob_id: str, suspect: Path, sources: list[tuple[int, int, str]]) -> list[str]:
        """Peers whose ranges of the failed copy differ from the good blob now in the store."""
        bad: list[str] = []
        try:
            with open(suspect, "rb") as s, open(self.store.blob_path(blob_id), "rb") as g:
                for a, b, peer in sources:
                    s.seek(a)
                    g.seek(a)
                    for at in range(a, b, CHUNK):
                        n = min(CHUNK, b - at)
                        if s.read(n) != g.read(n):
                            with self.peers.cv:
                                if self.peers.ban(peer, blob_id, self.report) and peer not in bad:
                                    bad.append(peer)
                            break
        except OSError as exc:
            log.warning("cannot compare the failed copy of blob %s: %s", blob_id, exc)
        finally:
            suspect.unlink(missing_ok=True)
        return bad

    def _report_bad(self, peer: str, blob_id: str) -> None:
        if self.on_bad_peer is not None:
            self.on_bad_peer(peer, blob_id)

    def _fallback(self, j: Job) -> None:
        assert self.fallback is not None
        try:
            self.fallback(j.blob_id)
            self.store.verify(j.blob_id, j.size)
        except EkmeshError as exc:
            with self.peers.cv:
                if isinstance(exc, StoreFullError):
                    j.full = exc
                self._fail(j, f"no holder left, and the fallback failed: {exc}")
                self.peers.cv.notify_all()
            return
        with self.peers.cv:
            if j.part is not None:
                j.part.close(keep=False)
                j.part = None
            j.state = "done"
            self.report.stored[j.blob_id] = "fallback"
            self.peers.cv.notify_all()


def _pwrite_all(fd: int, data: memoryview, at: int) -> None:
    """Writes all of ``data`` at offset ``at``: a write cut short (a disk filling up) is continued, so its real
    error (ENOSPC) is the one raised."""
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], at + done)
        if n <= 0:
            raise OSError(errno.EIO, f"a write at byte {at + done} took no bytes")
        done += n
