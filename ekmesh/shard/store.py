"""The content-addressed store: blobs, manifests and aliases under ``ekmesh_home()/store``.

Layout::

    store/blobs/blake3/ab/<hex>     a blob; its name is the blake3 of its bytes (id ``blake3:<hex>``)
    store/verified/ab/<hex>         "size mtime_ns ctime_ns inode" of the blob when it last hashed right
    store/manifests/<hex>.json      a manifest's canonical bytes; model id ``blake3:<hex>``
    store/aliases.json              {"alias": "blake3:<model hex>"}
    store/quarantine/<hex>.<ns>     blobs that failed verification, moved aside (never read again)
    store/tmp/<pid>-<rand>.part     blobs being written (same filesystem, renamed into place when complete)
    store/imports/<key>.jsonl       resume journals of full imports (see importer)

A store may be read-only (``Store(root, read_only=True)``): the built-in model ships as one inside the package,
at ``PACKAGED_ROOT`` (``ekmesh/builtin/store``: ``blobs/``, ``manifests/``, ``aliases.json`` only). Nothing is
ever written under a read-only root: its blobs are hashed on their first use in each process and the result is
kept in memory (keyed by the blob's stat, as the on-disk records are), a blob that fails is reported, not moved,
and every writing method raises ``ShardError``.

Invariants: a path under ``blobs/`` only ever holds complete bytes that hashed to its name when written — writes
go to ``tmp/``, are fsynced, hashed and renamed, then the directory is fsynced; a blob is hashed again before its
first use unless its ``verified`` record still matches its stat (any write changes ctime, so a tampered or
truncated blob is re-hashed); a blob that fails is moved to ``quarantine/`` and ``BlobHashMismatchError`` names
its id. Manifests are checked against their id on every load. Ids are validated before they become paths.

A full disk (ENOSPC, or a quota's EDQUOT) is a ``StoreFullError`` naming what was being written and the store:
whatever was being written is removed (its temp file too) before it is raised, so a full disk leaves nothing
partial, and what was stored before stays. A ``verified`` record that finds no space is not written (it is a cache:
the blob is hashed again on its next use), so reading and verifying a full store still works.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import blake3

from ekmesh.core.errors import BlobHashMismatchError, ManifestError, ShardError, ShardMissingError, StoreFullError
from ekmesh.core.paths import ekmesh_home
from ekmesh.shard.manifest import ID_RE, Manifest

log = logging.getLogger(__name__)
_HASH_CHUNK = 8 << 20
# The read-only store shipped inside the package (the built-in model); a path only, shard imports nothing there.
PACKAGED_ROOT = Path(__file__).resolve().parents[1] / "builtin" / "store"


def _hex(blob_id: str) -> str:
    if not ID_RE.match(blob_id):
        raise ShardError(f"{blob_id!r} is not a blob id ('blake3:' and 64 hex digits)")
    return blob_id.split(":", 1)[1]


_ALIASES_LOCK = threading.Lock()


def _tmp_beside(path: Path) -> Path:
    """A temp file name next to ``path``, unique per writer (process and thread): renamed over ``path`` when
    complete, so readers never see half a file and writers never take each other's temp file."""
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_ino}"


def out_of_space(exc: OSError) -> bool:
    """Whether a failed write found its filesystem (or the user's quota) full."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _close_quietly(f: IO[bytes], path: Path) -> None:
    """Closes a file whose write failed; the close may fail again flushing what it buffered (a full disk), and the
    file goes all the same (its caller removes it next)."""
    try:
        f.close()
    except OSError as exc:
        log.debug("closing %s after a failed write: %s", path, exc)


class BlobWriter:
    """Writes one blob into ``tmp/``, hashing as it goes; ``commit`` makes it visible under its id. ``what`` names
    the blob in errors (``StoreFullError``). A failed write or commit removes the temp file before it raises."""

    def __init__(self, store: Store, what: str = "a blob") -> None:
        self.store = store
        self.what = what
        self.path = store.root / "tmp" / f"{os.getpid()}-{secrets.token_hex(8)}.part"
        try:
            self._f = open(self.path, "wb")  # noqa: SIM115 - closed in commit/abort
        except OSError as exc:
            raise store.write_error(what, exc) from exc
        self._h = blake3.blake3()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        try:
            self._f.write(chunk)
        except OSError as exc:
            self.abort()
            raise self.store.write_error(f"{self.what} (at byte {self.size})", exc) from exc
        self._h.update(chunk)
        self.size += len(chunk)

    def commit(self, expected_id: str | None = None) -> str:
        """Fsyncs, checks the hash (against ``expected_id`` if given), renames into place; returns the id."""
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            blob_id = "blake3:" + self._h.hexdigest()
            if expected_id is not None and blob_id != expected_id:
                raise BlobHashMismatchError(expected_id, f"the fetched bytes hash to {blob_id}; not stored")
            dest = self.store.blob_path(blob_id)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path, dest)
            _fsync_dir(dest.parent)
        except OSError as exc:
            self.abort()
            raise self.store.write_error(f"{self.what} ({self.size} bytes)", exc) from exc
        except BlobHashMismatchError:
            self.abort()
            raise
        self.store.mark_verified(blob_id)
        return blob_id

    def abort(self) -> None:
        _close_quietly(self._f, self.path)
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class GcResult:
    blobs: int
    bytes: int


class Store:
    """The store rooted at ``root`` (default ``ekmesh_home()/store``)."""

    def __init__(self, root: str | os.PathLike[str] | None = None, read_only: bool = False) -> None:
        self.root = Path(root) if root is not None else ekmesh_home() / "store"
        self.read_only = read_only
        self._verified: dict[str, str] = {}  # read-only stores: blob id -> stat stamp when it hashed right
        if read_only:
            return
        for sub in ("blobs/blake3", "verified", "manifests", "quarantine", "tmp", "imports"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def _writable(self) -> None:
        if self.read_only:
            raise ShardError(f"the store at {self.root} is read-only")

    # ------------------------------------------------------------------------------------------------ blobs

    def blob_path(self, blob_id: str) -> Path:
        h = _hex(blob_id)
        return self.root / "blobs" / "blake3" / h[:2] / h

    def _marker(self, blob_id: str) -> Path:
        h = _hex(blob_id)
        return self.root / "verified" / h[:2] / h

    def has(self, blob_id: str) -> bool:
        return self.blob_path(blob_id).is_file()

    def writer(self, what: str = "a blob") -> BlobWriter:
        self._writable()
        return BlobWriter(self, what)

    def write_error(self, what: str, exc: OSError) -> ShardError:
        """The error for a write into this store that failed with ``exc`` (to raise ``from exc``):
        ``StoreFullError`` when the disk is full, else a ``ShardError`` with the cause."""
        if out_of_space(exc):
            try:
                free: int | None = shutil.disk_usage(self.root).free
            except OSError:
                free = None
            return StoreFullError(what, str(self.root), free)
        return ShardError(f"cannot write {what} into {self.root}: {exc}")

    def put(self, chunks: Iterable[bytes], expected_id: str | None = None, what: str | None = None) -> str:
        """Stores the blob of ``chunks`` (checked against ``expected_id`` if given); ``what`` names it in errors."""
        w = self.writer(what or (f"blob {expected_id}" if expected_id else "a blob"))
        try:
            for c in chunks:
                w.write(c)
        except BaseException:
            w.abort()
            raise
        return w.commit(expected_id)

    def adopt(self, path: Path, expected_id: str, hasher: blake3.blake3 | None = None,
              hasher_at: int = 0) -> str:
        """Moves a complete file from ``tmp/`` into place as blob ``expected_id`` once it hashes to it (fsynced
        first, directory fsynced after). ``hasher``, when given, already holds the file's first ``hasher_at``
        bytes (its writer hashed them as it wrote them in order); only the rest is read. On a mismatch the file is
        left where it is (its writer decides what to do with it, e.g. blob exchange compares it with a good copy
        to find the peer that lied) and ``BlobHashMismatchError`` is raised. Used by writers that fill a file out
        of order (ranged fetches)."""
        dest = self.blob_path(expected_id)
        if path.parent != self.root / "tmp":
            raise ShardError(f"{path} is not under {self.root / 'tmp'}; only files there can be adopted")
        try:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
                if hasher is None:
                    h, at = blake3.blake3(max_threads=blake3.blake3.AUTO), 0
                else:
                    h, at = hasher, hasher_at
                f.seek(at)
                while chunk := f.read(_HASH_CHUNK):
                    h.update(chunk)
            got = "blake3:" + h.hexdigest()
            if got != expected_id:
                raise BlobHashMismatchError(expected_id, f"the fetched bytes hash to {got}; not stored")
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
            _fsync_dir(dest.parent)
        except OSError as exc:
            if out_of_space(exc):
                raise self.write_error(f"blob {expected_id}", exc) from exc
            raise ShardError(f"cannot move {path} into the store as {expected_id}: {exc}") from exc
        self.mark_verified(expected_id)
        return expected_id

    def _replace(self, path: Path, data: bytes, what: str, durable: bool) -> None:
        """Writes ``data`` to a temp file beside ``path`` and renames it over ``path`` (fsynced first, and the
        directory after, if ``durable``); on a failure the temp file is removed and ``write_error`` raised."""
        tmp = _tmp_beside(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            if durable:
                _fsync_dir(path.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise self.write_error(what, exc) from exc

    def mark_verified(self, blob_id: str) -> None:
        if self.read_only:
            self._verified[blob_id] = _stamp(self.blob_path(blob_id).stat())
            return
        marker, what = self._marker(blob_id), f"the verified record of blob {blob_id}"
        stamp = _stamp(self.blob_path(blob_id).stat()).encode()
        try:
            try:
                marker.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise self.write_error(what, exc) from exc
            self._replace(marker, stamp, what, durable=False)
        except StoreFullError as exc:  # a cache: the blob is hashed again on its next use
            log.info("%s", exc)

    def verify(self, blob_id: str, size: int | None = None, rehash: bool = False) -> Path:
        """The blob's path once its bytes are known to hash to ``blob_id``; quarantines and raises otherwise.
        ``rehash``: hash it now even if its stat matches the last good hash (catches rot that left the stat as it
        was; a node does this before putting weights on its device)."""
        path = self.blob_path(blob_id)
        try:
            st = path.stat()
        except FileNotFoundError as exc:
            raise ShardMissingError(f"blob {blob_id}") from exc
        if not rehash and (size is None or st.st_size == size):
            if self.read_only:
                if self._verified.get(blob_id) == _stamp(st):
                    return path
            else:
                try:
                    if self._marker(blob_id).read_text() == _stamp(st):
                        return path
                except FileNotFoundError:
                    pass
        h = blake3.blake3()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    h.update(chunk)
        except OSError as exc:
            raise ShardError(f"cannot read blob {blob_id}: {exc}") from exc
        got = "blake3:" + h.hexdigest()
        if got != blob_id or (size is not None and st.st_size != size):
            where = self.quarantine(blob_id)
            raise BlobHashMismatchError(blob_id, f"{st.st_size} bytes hash to {got}; moved to {where}")
        self.mark_verified(blob_id)
        return path

    def quarantine(self, blob_id: str) -> Path:
        """Moves a failed blob aside; in a read-only store it stays where it is (its path is returned)."""
        if self.read_only:
            self._verified.pop(blob_id, None)
            return self.blob_path(blob_id)
        dest = self.root / "quarantine" / f"{_hex(blob_id)}.{time.time_ns()}"
        os.replace(self.blob_path(blob_id), dest)
        self._marker(blob_id).unlink(missing_ok=True)
        log.info("blob %s failed verification; moved to %s", blob_id, dest)  # the raised error reports it
        return dest

    def read_verified(self, blob_id: str, size: int | None = None) -> bytes:
        """A small blob's bytes, hashed in memory as they are read (file blobs: config, tokenizer)."""
        path = self.verify(blob_id, size)
        data = path.read_bytes()
        if "blake3:" + blake3.blake3(data).hexdigest() != blob_id:  # changed since the stat check
            self.quarantine(blob_id)
            raise BlobHashMismatchError(blob_id, "changed while being read")
        return data

    def all_blobs(self) -> list[str]:
        base = self.root / "blobs" / "blake3"
        return sorted("blake3:" + p.name for p in base.glob("*/*") if p.is_file() and ID_RE.match("blake3:" + p.name))

    def clean_tmp(self) -> None:
        """Removes partial writes left by processes that are gone (a killed import)."""
        if self.read_only:
            return
        for p in (self.root / "tmp").glob("*.part"):
            pid = p.name.split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                p.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------------ manifests

    def manifest_path(self, model_id: str) -> Path:
        return self.root / "manifests" / f"{_hex(model_id)}.json"

    def save_manifest(self, m: Manifest) -> str:
        self._writable()
        self._replace(self.manifest_path(m.id), m.bytes(), f"the manifest of model {m.id}", durable=True)
        return m.id

    def load_manifest(self, model_id: str) -> Manifest:
        path = self.manifest_path(model_id)
        try:
            raw = path.read_bytes()
        except FileNotFoundError as exc:
            raise ShardMissingError(f"model {model_id}") from exc
        except OSError as exc:
            raise ManifestError(f"cannot read manifest {path}: {exc}") from exc
        return Manifest.parse(raw, model_id, where=f"manifest {model_id}")

    def models(self) -> list[str]:
        if not (self.root / "manifests").is_dir():
            return []
        return sorted("blake3:" + p.stem for p in (self.root / "manifests").glob("*.json"))

    def remove_model(self, model_id: str) -> None:
        self._writable()
        self.manifest_path(model_id).unlink(missing_ok=True)
        self.set_aliases({a: m for a, m in self.aliases().items() if m != model_id})

    # ------------------------------------------------------------------------------------------------ aliases

    def aliases(self) -> dict[str, str]:
        path = self.root / "aliases.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ShardError(f"{path} is unreadable: {exc}") from exc
        if not isinstance(data, dict):
            raise ShardError(f"{path} must hold a JSON object")
        return {str(k): str(v) for k, v in data.items()}

    def set_aliases(self, aliases: dict[str, str]) -> None:
        self._writable()
        self._replace(self.root / "aliases.json", json.dumps(aliases, sort_keys=True, indent=1).encode(),
                      "the aliases", durable=False)

    def set_alias(self, alias: str, model_id: str) -> None:
        _hex(model_id)
        with _ALIASES_LOCK:  # read-modify-write: two threads must not each drop the other's alias
            self.set_aliases({**self.aliases(), alias: model_id})

    def resolve(self, ref: str) -> str:
        """A model id from a model id, a unique id prefix (``blake3:abc…`` or ``abc…``) or an alias."""
        aliases = self.aliases()
        if ref in aliases:
            return aliases[ref]
        if ID_RE.match(ref):
            if self.manifest_path(ref).is_file():
                return ref
            raise ShardMissingError(f"model {ref}")
        prefix = ref.removeprefix("blake3:")
        if len(prefix) >= 8 and all(c in "0123456789abcdef" for c in prefix):
            hits = [m for m in self.models() if m.split(":", 1)[1].startswith(prefix)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise ShardError(f"{ref!r} matches {len(hits)} models; give more of the id")
        raise ShardMissingError(f"model {ref!r}", "not a model id or alias in the store; see `ekmesh models`")

    # ------------------------------------------------------------------------------------------------ gc

    def gc(self) -> GcResult:
        """Removes every blob that no manifest references (and stale partial writes)."""
        self._writable()
        self.clean_tmp()
        keep: set[str] = set()
        for mid in self.models():
            keep |= self.load_manifest(mid).blob_ids()
        n = freed = 0
        for bid in self.all_blobs():
            if bid in keep:
                continue
            path = self.blob_path(bid)
            freed += path.stat().st_size
            path.unlink()
            self._marker(bid).unlink(missing_ok=True)
            n += 1
        return GcResult(n, freed)


def packaged_store() -> Store | None:
    """The read-only store shipped inside the package (the built-in model), or None if this install has none."""
    if not (PACKAGED_ROOT / "aliases.json").is_file():
        return None
    return Store(PACKAGED_ROOT, read_only=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
