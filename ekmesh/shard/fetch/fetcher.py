"""Blob exchange, the client: fetch blobs by id from the peers that hold them into a ``Store``.

Role: given ``{blob id: [holder peer ids]}``, bring every blob into the store. Small blobs (< ``split_at``) come whole,
different blobs from different holders; a large blob is split into ``range_size`` ranges fetched in parallel from
its holders. Links come from an injected ``dial(peer_id)`` (``exchange.TlsDialer`` by default in the node); this
module opens no socket itself. ``Fetcher.manifest`` gets one model's manifest from one peer (a GET of the model id,
checked against the id). It is not responsible for choosing holders (placement) or for loading blobs.

Invariants:
- bytes land in ``store/tmp/fetch-<hex>.part`` (flock-ed: one fetcher per blob per store) and become a blob only
  through ``Store.adopt``, which hashes the whole file against the id first; nothing unverified is ever stored;
- resumable: ``fetch-<hex>.json`` records the blob's size and the byte ranges already written (saved every
  ``record_every`` bytes once a background data sync has put them on disk, and whenever a transfer ends), so a
  fetch cut by a dead peer or a dead process continues where it stopped, in this run (another holder) or the next
  (the final hash check covers any stale record);
- a peer whose bytes fail the hash is reported (``on_bad_peer(peer, blob_id)``) and banned for ``ban_s`` (bans
  outlive one ``fetch`` call); when several peers filled a blob, it is refetched whole from one holder at a time
  (each attributable) and the ranges of the failed copy are compared with the good one to find the liar;
- at most ``max_per_peer`` transfers per peer and ``max_total`` in all; BUSY holds a peer back for its ``retry_ms``
  (other holders keep working); NOT_FOUND, BAD_RANGE or ``max_failures`` broken transfers skip that holder for
  that blob; when no holder is left the ``fallback`` (e.g. ``source_fallback``: the hub partial-import path)
  rebuilds the blob, else ``BlobUnavailableError`` names every blob that failed and why; every wait has a deadline.

Structure: a ``Fetcher`` owns one ``peers.PeerSlots`` (caps, BUSY hold-backs, bans, idle links and ``dial``),
shared by all its ``fetch`` calls, and builds one ``run.Run`` per call, handing it that state, the store, the config
and the hooks. ``FetchConfig`` and ``FetchReport`` live in ``config`` and are importable from here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence

from ekmesh.core.errors import (
    BlobHashMismatchError,
    BlobUnavailableError,
    ShardError,
    ShardMissingError,
)
from ekmesh.shard.blobfmt import parts_for, stream_blob
from ekmesh.shard.exchange import Status, get
from ekmesh.shard.fetch.config import FetchConfig, FetchReport
from ekmesh.shard.fetch.partial import Partial
from ekmesh.shard.fetch.peers import Dial, PeerSlots
from ekmesh.shard.fetch.run import Job, Run
from ekmesh.shard.importer import source_of
from ekmesh.shard.manifest import ID_RE, Manifest
from ekmesh.shard.source import Source, TensorEntry
from ekmesh.shard.store import Store

_DEFAULT_CONFIG = FetchConfig()
MAX_MANIFEST = 64 << 20


class Fetcher:
    """Fetches blobs into ``store`` over links from ``dial``. Thread-safe; caps and bans span all ``fetch`` calls."""

    def __init__(self, store: Store, dial: Dial, config: FetchConfig = _DEFAULT_CONFIG,
                 on_bad_peer: Callable[[str, str], None] | None = None,
                 on_progress: Callable[[str, str, int], None] | None = None,
                 fallback: Callable[[str], None] | None = None) -> None:
        self.store, self.dial, self.config = store, dial, config
        self.on_bad_peer, self.on_progress, self.fallback = on_bad_peer, on_progress, fallback
        self._peers = PeerSlots(dial, config)  # caps, bans and idle links: shared by every ``fetch`` call

    def banned(self) -> dict[str, float]:
        """Banned peers and the seconds left on their bans."""
        return self._peers.banned()

    def close(self) -> None:
        """Closes the idle links."""
        self._peers.close()

    def fetch(self, holders: Mapping[str, Sequence[str]], sizes: Mapping[str, int] | None = None,
              timeout: float = 600.0) -> FetchReport:
        """Brings every blob of ``holders`` into the store (see module docstring); raises ``BlobUnavailableError``
        (its ``report`` attribute says what did arrive) when some could not be fetched, ``StoreFullError`` (with the
        report too) when the store's disk had no room for some."""
        report, jobs = FetchReport(), []
        for bid, peers in holders.items():
            if not ID_RE.match(bid):
                raise ShardError(f"{bid!r} is not a blob id")
            if self.store.has(bid):
                try:
                    self.store.verify(bid, (sizes or {}).get(bid))
                    report.stored[bid] = "present"
                    continue
                except BlobHashMismatchError:
                    pass  # quarantined; fetch a good copy
            size = (sizes or {}).get(bid, Partial.recorded_size(self.store, bid))
            jobs.append(Job(bid, list(dict.fromkeys(peers)), size))
        if jobs:
            Run(self.store, self._peers, self.config, jobs, report, time.monotonic() + timeout,
                on_progress=self.on_progress, on_bad_peer=self.on_bad_peer, fallback=self.fallback).run()
        failed = {j.blob_id: j.error for j in jobs if j.state != "done"}
        if failed:
            raise BlobUnavailableError(failed, report)
        return report


    def manifest(self, peer: str, model_id: str) -> Manifest:
        """Blocking: the manifest of ``model_id`` from ``peer`` (a GET of the model id), checked against the id;
        ``ShardMissingError`` when the peer answers without it, ``PeerError`` / ``ProtocolError`` when the link
        fails."""
        link = self.dial(peer)
        try:
            ans = get(link, model_id, 0, 0, self.config.io_s)
            if ans.status != Status.OK:
                raise ShardMissingError(f"manifest {model_id}", f"peer {peer}: {ans.status.name} {ans.message}")
            if ans.length > MAX_MANIFEST:
                raise ShardMissingError(f"manifest {model_id}", f"peer {peer} offers {ans.length} bytes")
            buf = bytearray(ans.length)
            got = 0
            while got < ans.length:
                got += link.recv_into(memoryview(buf)[got:], self.config.io_s)
        finally:
            link.close()
        return Manifest.parse(bytes(buf), model_id, where=f"manifest {model_id} from peer {peer}")


def source_fallback(store: Store, manifest: Manifest, source: Source | None = None) -> Callable[[str], None]:
    """A ``fallback`` that rebuilds one blob of ``manifest`` from its source (hub repo at the recorded commit, or
    directory) by byte ranges, as a partial import does; the store checks it against its id."""
    tensors = {n: TensorEntry(t["file"], t["range"][0], t["range"][1], t["dtype"], tuple(t["shape"]))
               for n, t in manifest.data["tensors"].items()}
    opened: list[Source] = [source] if source is not None else []
    lock = threading.Lock()

    def rebuild(blob_id: str) -> None:
        info = manifest.data["blobs"].get(blob_id)
        if info is None:
            raise ShardMissingError(f"blob {blob_id}", f"not part of model {manifest.id}")
        if "derived" in info:
            raise ShardMissingError(f"blob {blob_id}", f"a quantized expert of model {manifest.id}: no source has "
                                    "it, only peers that hold it (or `ekmesh import` its parent with --quantize)")
        with lock:
            if not opened:
                opened.append(source_of(manifest))
            src = opened[0]
        if "file" in info:
            store.put([src.read_file(info["file"])], expected_id=blob_id)
        else:
            store.put(stream_blob(parts_for(info["keys"], tensors), src), expected_id=blob_id)

    return rebuild
