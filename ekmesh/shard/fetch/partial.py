"""Blob exchange, the client's partial files: ``Partial``, the bytes and the resume record of one blob being fetched.

Role: ``store/tmp/fetch-<hex>.part`` (the bytes, at their offsets) and ``fetch-<hex>.json`` (the blob's size and
the byte ranges already written), so a fetch cut by a dead peer or a dead process continues where it stopped. It
does not hash (``Store.adopt`` does) and does not schedule (``run`` does).

Invariants: the ``.part`` file is flock-ed while open (one fetcher per blob per store; a second gets
``ShardError``); a record is trusted only when its size and the file's length are the blob's, and only its in-bounds
ranges; a record written by ``sync`` claims only bytes a data sync has put on disk; an older record never replaces
a newer one (``version``); a closed file's record is never written again. Nothing here is trusted as blob data:
the final hash check covers any stale record.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading

from ekmesh.core.errors import ShardError
from ekmesh.shard.store import Store


class Partial:
    """``tmp/fetch-<hex>.part`` (the bytes) and ``.json`` (size, ranges written) of one blob being fetched.

    ``done`` changes under the peer state's condition variable (``PeerSlots.cv``); the record is written by
    ``save`` (a transfer's end, ``reset``) and by ``sync`` (in the background, after a data sync, so it claims only
    bytes on disk), never an older state over a newer one (``version`` counts the changes of ``done``)."""

    def __init__(self, store: Store, blob_id: str, size: int) -> None:
        base = store.root / "tmp" / f"fetch-{blob_id.split(':', 1)[1]}"
        self.path, self.rec, self.suspect = base.with_suffix(".part"), base.with_suffix(".json"), None
        self.size, self.done = size, list[tuple[int, int]]()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.version = self._saved = 0
        self._lock = threading.Lock()  # the descriptor and the record, between the workers and the syncer
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            raise ShardError(f"blob {blob_id} is being fetched by another process ({self.path})") from exc
        try:
            rec = json.loads(self.rec.read_text())
            if rec["size"] == size and os.fstat(self.fd).st_size == size:
                self.done = [(int(a), int(b)) for a, b in rec["done"] if 0 <= int(a) < int(b) <= size]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if not self.done:
            os.ftruncate(self.fd, 0)
        os.ftruncate(self.fd, size)
        self.resumed = sum(b - a for a, b in self.done)

    @staticmethod
    def recorded_size(store: Store, blob_id: str) -> int | None:
        try:
            size = json.loads((store.root / "tmp" / f"fetch-{blob_id.split(':', 1)[1]}.json").read_text())["size"]
            return size if isinstance(size, int) and size >= 0 else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def mark(self, a: int, b: int) -> None:
        if a >= b:
            return
        out: list[tuple[int, int]] = []
        for s, e in sorted([*self.done, (a, b)]):
            if out and s <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], e))
            else:
                out.append((s, e))
        self.done = out
        self.version += 1

    def save(self, done: list[tuple[int, int]] | None = None, version: int = 0) -> None:
        """Writes the record of ``done`` as of ``version`` (default: as it is now), unless a newer one is written
        or the file is closed (a closed file's record stays as it was, or is gone)."""
        with self._lock:
            if done is None:
                done, version = self.done, self.version
            if self.fd < 0 or version <= self._saved:
                return
            tmp = self.rec.with_suffix(f".{os.getpid()}.tmp")
            try:
                tmp.write_text(json.dumps({"size": self.size, "done": done}))
                os.replace(tmp, self.rec)
            except OSError:
                tmp.unlink(missing_ok=True)  # a full disk leaves no half record behind
                raise
            self._saved = version

    def gaps(self) -> list[tuple[int, int]]:
        out, at = [], 0
        for s, e in self.done:
            if s > at:
                out.append((at, s))
            at = e
        return out + ([(at, self.size)] if at < self.size else [])

    def reset(self) -> None:
        os.ftruncate(self.fd, 0)
        os.ftruncate(self.fd, self.size)
        self.done, self.resumed = [], 0
        self.version += 1
        self.save()

    def sync(self) -> None:
        """From the background (``Run._syncer``): writes the bytes so far to disk, then records the ranges they
        fill. Early work only (the fsync of ``Store.adopt`` is what makes the blob durable): the disk writes while
        the network reads, and the hot loop writes no record. Syncs its own descriptor, so ``close`` never waits for
        the disk."""
        with self._lock:
            if self.fd < 0:
                return
            fd, done, version = os.dup(self.fd), self.done, self.version
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        self.save(done, version)

    def close(self, keep: bool) -> None:
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
            self.fd = -1
        if not keep:
            self.path.unlink(missing_ok=True)
            self.rec.unlink(missing_ok=True)
