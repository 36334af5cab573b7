"""The content-addressed store: blobs, manifests and aliases under ``ekmesh_home()/store``.

Layout::

    store/blobs/blake3/ab/<hex>     a blob; its name is the blake3 of its bytes (id ``blake3:<hex>``)
    store/verified/ab/<hex>         "size mtime_ns ctime_ns inode" of the blob when it last hashed right
    store/manifests/<hex>.json      a manifest's canonical bytes; model id ``blake3:<hex>``
    store/aliases.json              {"alias": "blake3:<model hex>"}
    store/quarantine/<hex>.<ns>     blobs that failed verification, moved aside (never read again)
    store/tmp/<pid>-<rand>.part     blobs being written (same filesystem, renamed into place when complete)
    store/imports/<key>.jsonl       resume journals of full imports (see importer)

Invariants: a path under ``blobs/`` only ever holds complete bytes that hashed to its name when written — writes
go to ``tmp/``, are fsynced, hashed and renamed, then the directory is fsynced; a blob is hashed again before its
first use unless its ``verified`` record still matches its stat (any write changes ctime, so a tampered or
truncated blob is re-hashed); a blob that fails is moved to ``quarantine/`` and ``BlobHashMismatchError`` names
its id. Manifests are checked against their id on every load. Ids are validated before they become paths.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import blake3

from ekmesh.core.errors import BlobHashMismatchError, ManifestError, ShardError, ShardMissingError
from ekmesh.core.paths import ekmesh_home
from ekmesh.shard.manifest import ID_RE, Manifest

log = logging.getLogger(__name__)
_HASH_CHUNK = 8 << 20


def _hex(blob_id: str) -> str:
    if not ID_RE.match(blob_id):
        raise ShardError(f"{blob_id!r} is not a blob id ('blake3:' and 64 hex digits)")
    return blob_id.split(":", 1)[1]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_ino}"


class BlobWriter:
    """Writes one blob into ``tmp/``, hashing as it goes; ``commit`` makes it visible under its id."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.path = store.root / "tmp" / f"{os.getpid()}-{secrets.token_hex(8)}.part"
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed in commit/abort
        self._h = blake3.blake3()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._f.write(chunk)
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
            raise ShardError(f"cannot write a blob into {self.store.root}: {exc}") from exc
        except BlobHashMismatchError:
            self.abort()
            raise
        self.store.mark_verified(blob_id)
        return blob_id

    def abort(self) -> None:
        self._f.close()
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class GcResult:
    blobs: int
    bytes: int


class Store:
    """The store rooted at ``root`` (default ``ekmesh_home()/store``)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else ekmesh_home() / "store"
        for sub in ("blobs/blake3", "verified", "manifests", "quarantine", "tmp", "imports"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------------------------ blobs

    def blob_path(self, blob_id: str) -> Path:
        h = _hex(blob_id)
        return self.root / "blobs" / "blake3" / h[:2] / h

    def _marker(self, blob_id: str) -> Path:
        h = _hex(blob_id)
        return self.root / "verified" / h[:2] / h

    def has(self, blob_id: str) -> bool:
        return self.blob_path(blob_id).is_file()

    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    def put(self, chunks: Iterable[bytes], expected_id: str | None = None) -> str:
        w = self.writer()
        try:
            for c in chunks:
                w.write(c)
        except BaseException:
            w.abort()
            raise
        return w.commit(expected_id)

    def mark_verified(self, blob_id: str) -> None:
        marker = self._marker(blob_id)
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(_stamp(self.blob_path(blob_id).stat()))
        os.replace(tmp, marker)

    def verify(self, blob_id: str, size: int | None = None) -> Path:
        """The blob's path once its bytes are known to hash to ``blob_id``; quarantines and raises otherwise."""
        path = self.blob_path(blob_id)
        try:
            st = path.stat()
        except FileNotFoundError as exc:
            raise ShardMissingError(f"blob {blob_id}") from exc
        marker = self._marker(blob_id)
        try:
            if marker.read_text() == _stamp(st) and (size is None or st.st_size == size):
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
        for p in (self.root / "tmp").glob("*.part"):
            pid = p.name.split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                p.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------------ manifests

    def manifest_path(self, model_id: str) -> Path:
        return self.root / "manifests" / f"{_hex(model_id)}.json"

    def save_manifest(self, m: Manifest) -> str:
        path = self.manifest_path(m.id)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(m.bytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
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
        return sorted("blake3:" + p.stem for p in (self.root / "manifests").glob("*.json"))

    def remove_model(self, model_id: str) -> None:
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
        path = self.root / "aliases.json"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(aliases, sort_keys=True, indent=1), encoding="utf-8")
        os.replace(tmp, path)

    def set_alias(self, alias: str, model_id: str) -> None:
        _hex(model_id)
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
