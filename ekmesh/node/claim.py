"""Claiming: a node's share of one model's routed experts, fetched from peers and advertised once verified.

Role (``ekmesh join --model ID_OR_ALIAS``): compute this node's assignment with ``shard.placement.place`` over the
live peers that claim the same model (budget = the memory each advertises, ``memory_total``), bring the expert blobs
it lacks into the local store from peers over blob exchange (``shard.fetch.Fetcher``; every peer that claims runs a
``BlobListener`` and puts its ``blob_addr`` and TLS certificate fingerprint ``tls_fp`` in its signed advert, which
is what connections are pinned on), and only then advertise them ready (``publish``: the node's advert). A node
started with a model id it has no manifest for gets the manifest from a peer over blob exchange (a GET of the model
id, checked against the id: the id is the hash of the manifest's bytes; ``node.manifest_search``): from the peers
that advertise the model and from any other live peer that serves blobs (one that claims no experts, e.g. an
attention-only host that imported the model, stores it without advertising it); while none has it, ``state`` says
why and the log warns. Such non-claiming peers are also the last sources asked for the expert and dense blobs.
A name neither store knows is looked up in the live view first (``manifest_search.NameLookup``); once the manifest is
known the node advertises the model's names (``names``: aliases here, hub id, the name it was started with).

"Ready" means *verified in the store and loaded*: with ``hooks`` (``ClaimHooks``; the node's ``Serving``), an
expert is advertised only once ``hooks.load`` has put it on this node's device; ``hooks.unload`` runs when the node
stops advertising it. With ``ClaimConfig.dense`` the dense blobs and model files are fetched too (an attention host
needs them), unless ``hooks.prepare`` answers that this node will not host attention; ``dense_ready`` says when
they are all verified here. With ``experts=False`` the node takes no part in the placement
(an attention host that holds no experts). A model the user's store does not know but the package ships (the
built-in model) is copied blob by blob from the packaged read-only store, as from a local peer. A blob no peer can
give is rebuilt from the model's source (hub or directory, ``shard.fetch.source_fallback``) when that source is
reachable.

Not responsible for: placement itself (``shard.placement``), the wire (``shard.exchange``), deleting blobs (never
done here; ``ekmesh gc`` is manual), the dense part or attention hosting.

Invariants:
- an expert is advertised ready only after its blob is verified in the store;
- make-before-break: an expert this node advertises and is no longer assigned keeps being advertised until every
  live new holder (at least one) advertises it ready;
- the placement is recomputed only when the set of claiming peers and their capacities has been stable for
  ``debounce_s`` (joins come in bursts); readiness of others is re-read every ``tick_s``;
- blocking work (placement, hashing, fetching, the listener's sockets) runs in worker threads; the trio task only
  reads the view and publishes. Peers' blob-exchange addresses and pins are handed to threads as immutable copies,
  re-read from the view every ``tick_s`` by a task of their own, so a peer's new certificate (after its restart) is
  accepted while the claim loop waits on a fetch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

import trio

from ekmesh.core.errors import BlobUnavailableError, ConfigError, EkmeshError, ShardMissingError, StoreFullError
from ekmesh.core.ids import Endpoint, ExpertKey, Fingerprint
from ekmesh.core.tls import TlsIdentity, make_context
from ekmesh.discovery.advert import MAX_NAMES, Advert, ModelReady, valid_name
from ekmesh.node.manifest_search import ManifestSearch, NameLookup
from ekmesh.shard.blobserver import BlobListener, BlobServer
from ekmesh.shard.exchange import TlsDialer
from ekmesh.shard.fetch.fetcher import FetchConfig, Fetcher, FetchReport, source_fallback
from ekmesh.shard.manifest import ID_RE, Manifest
from ekmesh.shard.placement import PeerCapacity, Placement, place
from ekmesh.shard.store import Store, packaged_store

log = logging.getLogger(__name__)

MANIFEST_WARN_AFTER_S = 5.0  # a node still without its manifest after this long (or meet_s) says so in the log
# How long ``join --model NAME`` waits for a live peer that advertises NAME: long enough for mDNS, a bootstrap
# peer's sync and a DHT rendezvous to bring the mesh's adverts, short enough that a typo fails visibly.
MODEL_NAME_WAIT_S = 60.0
T = TypeVar("T")


@dataclass(frozen=True)
class ClaimConfig:
    model: str  # model id, id prefix or alias (an id when the manifest must come from the mesh)
    replicas: int = 2
    debounce_s: float = 1.0
    tick_s: float = 0.25
    retry_s: float = 1.0  # after a fetch round that left something missing
    io_s: float = 10.0
    fetch_timeout_s: float = 120.0
    experts: bool = True  # take a share of the experts (False: an attention host holding none)
    # A node started with bootstrap peers waits this long to meet one before placing alone (placing alone first
    # would load every expert only to drop most of them a moment later).
    meet_s: float = 0.0
    dense: bool = False  # also fetch the dense blobs and model files (this node hosts attention)
    name_wait_s: float = MODEL_NAME_WAIT_S  # ``model`` a name no store knows: wait this long for the mesh's
    name_settle_s: float = 2.0  # ... and take the model it names once it named the same one for this long

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be >= 1, got {self.replicas}")


@dataclass
class ClaimStats:
    fetched_bytes: int = 0
    fetch_seconds: float = 0.0
    fetched_blobs: int = 0
    bad_peers: list[tuple[str, str]] = field(default_factory=list)


class ClaimHooks(Protocol):
    """What a ``Claimer`` asks of the part that puts claimed experts to use (the node's ``Serving``). Each runs in a
    worker thread."""

    def prepare(self, manifest: Manifest) -> bool:
        """The manifest is known, before anything is published. Returns whether this node hosts attention (then the
        claimer also fetches the dense part, if its config asks for it)."""
        ...

    def load(self, items: set[ExpertKey]) -> set[ExpertKey]:
        """Puts these experts on the device; returns the ones it loaded."""
        ...

    def unload(self, items: set[ExpertKey]) -> None:
        """Drops these experts from the device."""
        ...


def grid_of(m: Manifest) -> tuple[tuple[int, int], int]:
    """The (layers half-open, experts per layer) grid the ready bitmap of ``m`` uses."""
    items = m.expert_ids()
    if not items:
        raise ConfigError(f"model {m.id} has no routed experts to claim")
    layers = [layer for layer, _ in items]
    return (min(layers), max(layers) + 1), max(e for _, e in items) + 1


class Claimer:
    """One model's claiming on this node. ``open`` binds the blob listener (before the node's first advert), ``run``
    claims until cancelled. ``live()`` gives the live peers' adverts (self included), ``publish`` sets this node's
    ``models`` advert field; ``identity`` is this node's TLS certificate (blob exchange is pinned on it)."""

    def __init__(self, peer_id: str, store: Store, config: ClaimConfig, identity: TlsIdentity,
                 live: Callable[[], list[Advert]], publish: Callable[[dict[str, ModelReady]], None],
                 hooks: ClaimHooks | None = None) -> None:
        self.peer_id, self.store, self.config = peer_id, store, config
        self.live, self.publish, self.hooks = live, publish, hooks
        self.packaged = packaged_store()
        self.dense = config.dense  # turned off when ``hooks.prepare`` answers that this node hosts no attention
        self.dense_ready = False
        self.identity = identity
        self.tls_fp = Fingerprint(identity.fingerprint)
        self.blob_addr: Endpoint | None = None
        self.manifest: Manifest | None = None
        self.model_id: str | None = None
        self.placement: Placement | None = None
        self.stats = ClaimStats()
        self.state = "starting"
        self._pins: Mapping[str, Fingerprint] = {}
        self._addrs: Mapping[str, Endpoint] = {}
        self._listener: BlobListener | None = None
        self._fetcher: Fetcher | None = None
        self._have: set[ExpertKey] = set()  # assigned experts verified in the store
        self._loaded: set[ExpertKey] = set()  # ... and put on the device by ``load``
        self._source_fallback: Callable[[str], None] | None = None
        self._ready: set[ExpertKey] = set()  # advertised ready
        self._key: tuple[Any, ...] | None = None
        self._pending: tuple[Any, ...] | None = None
        self._pending_since = 0.0
        self._next_fetch = 0.0
        self._started = time.monotonic()
        self._search: ManifestSearch | None = None  # while the manifest comes from peers
        self._lookup: NameLookup | None = None  # while the model is a name only the mesh knows
        self.names: dict[str, str] = {}
        """``{name: model id}`` for this node's advert, once the manifest is known (replaced whole)."""
        try:
            self.model_id = store.resolve(config.model)
        except ShardMissingError:
            if self.packaged is not None and self._packaged_has(config.model):
                self.model_id = self.packaged.resolve(config.model)
            elif ID_RE.match(config.model):
                self.model_id = config.model  # its manifest comes from a peer
            # else: a name only the mesh may know, looked up in the live view (``_resolve_name``)

    def _packaged_has(self, ref: str) -> bool:
        try:
            return self.packaged is not None and bool(self.packaged.resolve(ref))
        except ShardMissingError:
            return False

    def open(self, bind_host: str, advertise_host: str) -> None:
        server = BlobServer(self.store)
        self._listener = BlobListener(server, make_context(self.identity, server=True), self._pin, bind_host)
        self.blob_addr = Endpoint(advertise_host, self._listener.address[1])
        dialer = TlsDialer(make_context(self.identity, server=False), self._pin, self._addr, self.config.io_s)
        self._fetcher = Fetcher(self.store, dialer, FetchConfig(io_s=self.config.io_s),
                                on_bad_peer=lambda p, b: self.stats.bad_peers.append((p, b)),
                                fallback=self._from_source)
        log.info("blob exchange listening on %s", self.blob_addr)

    def close(self) -> None:
        if self._fetcher is not None:
            self._fetcher.close()
        if self._listener is not None:
            self._listener.stop()

    def _from_source(self, blob_id: str) -> None:
        """The Fetcher's last resort for a blob no peer could give: the model's own source (hub or directory)."""
        if self._source_fallback is None:
            raise ShardMissingError(f"blob {blob_id}", "no peer has it and the manifest is not known yet")
        log.info("no peer has blob %s; rebuilding it from the model's source", blob_id)
        try:
            self._source_fallback(blob_id)
        except (OSError, ValueError) as exc:
            raise ShardMissingError(f"blob {blob_id}", f"the model's source is not reachable: {exc}") from exc

    def banned(self) -> set[str]:
        """Peers banned for serving bytes that do not hash to their blob id (their experts are not used either)."""
        return set(self._fetcher.banned()) if self._fetcher is not None else set()

    def _pin(self, peer_id: str) -> Fingerprint | None:
        return self._pins.get(peer_id)

    def _addr(self, peer_id: str) -> Endpoint | None:
        return self._addrs.get(peer_id)

    # -- the loop ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        self._started = time.monotonic()
        assert self._fetcher is not None, "run() before open()"
        try:
            while self.model_id is None:  # a name only the mesh knows: which model it means comes first
                self.model_id = self._resolve_name()  # raises ModelNameError (bare: outside the nursery)
                if self.model_id is None:
                    await trio.sleep(self.config.tick_s)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_peers)
                await self._claim(nursery)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.close)

    async def _watch_peers(self) -> None:
        """Keeps the blob-exchange pins and addresses in step with the view every ``tick_s``, whatever the claim loop
        is waiting for (a fetch from a hung peer can take ``io_s`` per try): a restarted peer's new certificate is
        accepted, and its new address dialled, as soon as its advert is in the view."""
        while True:
            self._refresh_peers()
            await trio.sleep(self.config.tick_s)

    async def _claim(self, nursery: trio.Nursery) -> None:
        while self.manifest is None:
            self.manifest = await self._find_manifest(nursery)
            if self.manifest is None:
                await trio.sleep(self.config.tick_s)
        self.model_id = self.manifest.id
        self.names = await trio.to_thread.run_sync(self._names_here, self.manifest.id)
        self._source_fallback = source_fallback(self.store, self.manifest)
        if self.hooks is not None:
            attention = await trio.to_thread.run_sync(self.hooks.prepare, self.manifest)
            self.dense = self.dense and attention
        self.state = "claiming"
        if self.config.experts:
            self._publish()  # an empty grid: this node now takes part in the placement
        while True:
            await self._step()
            await trio.sleep(self.config.tick_s)

    def _refresh_peers(self) -> dict[str, Advert]:
        live: dict[str, Advert] = {a.peer_id: a for a in self.live()}
        pins: dict[str, Fingerprint] = {}
        addrs: dict[str, Endpoint] = {}
        for pid, a in live.items():
            if a.tls_fp is not None and a.blob_addr is not None and pid != self.peer_id:
                pins[pid], addrs[pid] = a.tls_fp, a.blob_addr
        self._pins, self._addrs = pins, addrs  # replaced whole: threads read a consistent copy
        return live

    async def _find_manifest(self, nursery: trio.Nursery) -> Manifest | None:
        """The store's or the package's manifest, else one a peer gave (``ManifestSearch``; asks run in
        ``nursery``)."""
        mid = self.model_id
        assert mid is not None, "the model's name is resolved before the claim starts"
        try:
            return await trio.to_thread.run_sync(self.store.load_manifest, mid)
        except ShardMissingError:
            pass
        if self.packaged is not None and self._packaged_has(mid):
            m = await trio.to_thread.run_sync(self.packaged.load_manifest, mid)
            await trio.to_thread.run_sync(self.store.save_manifest, m)
            log.info("model %s: manifest taken from the package", mid)
            return m
        if self._search is None:
            assert self._fetcher is not None
            self._search = ManifestSearch(mid, self._fetcher.manifest, self.config.retry_s,
                                          max(self.config.meet_s, MANIFEST_WARN_AFTER_S))
        live = [a for a in self._refresh_peers().values() if a.peer_id != self.peer_id]
        found = self._search.round(nursery, live, self._addrs)
        if found is None:
            self.state = f"waiting for the manifest: {self._search.why}"
            return None
        await trio.to_thread.run_sync(self.store.save_manifest, found)
        return found

    def _resolve_name(self) -> str | None:
        """The model id the live peers' adverts give ``config.model`` (``NameLookup``); None while waiting."""
        if self._lookup is None:
            self._lookup = NameLookup(self.config.model, self.config.name_wait_s, self.config.name_settle_s)
        live = [a for a in self._refresh_peers().values() if a.peer_id != self.peer_id]
        found = self._lookup.round(live, time.monotonic() - self._started)  # its errors end the claim and the node
        self.state = self._lookup.why
        return found

    def _names_here(self, model_id: str) -> dict[str, str]:
        """What this node advertises as ``names``: the model's names here (``registry.lookup.names_of``) and the
        name it was started with, those that may travel in an advert (``advert.valid_name``)."""
        from ekmesh.registry.lookup import names_of  # imports torch (the loader): not at the node's import

        names = names_of(model_id, self.store)
        joined_by = self._lookup.mesh_name if self._lookup is not None else None
        if joined_by is not None and joined_by not in names:
            names.append(joined_by)
        return {n: model_id for n in [n for n in names if valid_name(n)][:MAX_NAMES]}

    async def _step(self) -> None:
        m, cfg, me = self.manifest, self.config, self.peer_id
        assert m is not None
        live = self._refresh_peers()
        claiming = {pid: a for pid, a in live.items() if m.id in a.models or (pid == me and cfg.experts)}
        # peers that serve blobs but claim no experts of the model (an attention-only host that imported it may
        # hold every blob): asked last, after the claiming peers
        stores = [p for p in self._addrs if p not in claiming]
        now = time.monotonic()
        if self.dense and not self.dense_ready and now >= self._next_fetch:
            await self._fetch_dense(m, [p for p in claiming if p != me] + stores)
        key = tuple(sorted((pid, a.memory_total, a.speed or 1.0) for pid, a in claiming.items()))
        if not key:
            return  # nobody claims experts yet (this node holds none)
        if key != self._pending:
            self._pending, self._pending_since = key, now
        if self.placement is None and len(key) == 1 and now - self._started < cfg.meet_s:
            return  # alone so far, but bootstrap peers were given: wait to meet one
        if self.placement is None or (key != self._key and now - self._pending_since >= cfg.debounce_s):
            self.placement = await trio.to_thread.run_sync(_place, m, key, cfg.replicas)
            self._key = key
            self._next_fetch = 0.0
            log.info("placement over %d peers: %d experts assigned here", len(key),
                     len(self.placement.assigned(me)))
        placement = self.placement
        assigned = set(placement.assigned(me))
        ready_at = _ready_by_peer(m.id, claiming, me)
        todo = assigned - self._have
        if todo and now >= self._next_fetch:
            experts = m.expert_ids()
            holders: dict[str, list[str]] = {}
            for it in sorted(todo):
                first = [p for p in placement.holders.get(it, []) if it in ready_at.get(p, ())]
                others = [p for p, r in ready_at.items() if it in r and p not in first]
                rest = [p for p in claiming if p != me and p not in first and p not in others]  # may have it stored
                holders[experts[it]] = [p for p in first + others + rest + stores if p in self._addrs]
            got = await _abandoning(partial(self._fetch, holders))
            self._have |= {it for it in todo if experts[it] in got}  # two experts may share a blob
            if todo - self._have:
                self._next_fetch = time.monotonic() + cfg.retry_s
        if self.hooks is not None:
            to_load = (assigned & self._have) - self._loaded
            if to_load:
                loaded = await trio.to_thread.run_sync(self.hooks.load, to_load)
                self._loaded |= loaded
                self._have -= to_load - loaded  # e.g. its blob failed the hash and was quarantined: fetch again
            ready = assigned & self._loaded
        else:
            ready = assigned & self._have
        for it in self._ready - assigned:
            new = [p for p in placement.holders.get(it, []) if p != me and p in claiming]
            if not new or not all(it in ready_at.get(p, ()) for p in new):
                ready.add(it)  # make-before-break: its new holders are not all serving it yet
        if ready != self._ready:
            dropped, added = self._ready - ready, ready - self._ready
            self._ready = ready
            self._publish()
            if self.hooks is not None and dropped:
                self._loaded -= dropped
                self._have -= dropped
                await trio.to_thread.run_sync(self.hooks.unload, dropped)
            log.info("model %s: %d experts ready here (+%d, -%d)", m.id, len(ready), len(added), len(dropped))

    def fetch_now(self, blob_ids: list[str], last: Collection[str] = ()) -> None:
        """Blocking (any thread): brings these blobs of the model into the store from any peer that may hold them,
        the package or the model's source; ``BlobUnavailableError`` if some could not be had. Peers in ``last``
        (e.g. just seen failing) are asked after the others."""
        assert self.manifest is not None
        peers = sorted(self._addrs, key=lambda p: p in last)  # stable: otherwise the view's order
        got = self._fetch({bid: peers for bid in blob_ids})
        if not set(blob_ids) <= got:
            raise BlobUnavailableError({bid: "no peer, package or source gave it" for bid in set(blob_ids) - got})

    async def _fetch_dense(self, m: Manifest, peers: list[str]) -> None:
        wanted = sorted(set(m.dense_ids().values()) | set(m.file_ids().values()))
        holders: dict[str, list[str]] = {bid: [p for p in peers if p in self._addrs] for bid in wanted}
        got = await _abandoning(partial(self._fetch, holders))
        if got >= set(wanted):
            self.dense_ready = True
            log.info("model %s: dense part verified here (%d blobs)", m.id, len(wanted))
        else:
            self._next_fetch = time.monotonic() + self.config.retry_s

    def _fetch(self, holders: dict[str, list[str]]) -> set[str]:
        """Blocking: verifies what the store has, fetches the rest from the holders given; returns the blob ids
        now verified in the store."""
        assert self._fetcher is not None and self.manifest is not None
        present, wanted = set(), {}
        for bid, peers in holders.items():
            if not self.store.has(bid) and self.packaged is not None and self.packaged.has(bid):
                size = self.manifest.size(bid)  # the package ships it: copy it, checked against its id
                self.store.put([self.packaged.read_verified(bid, size)], expected_id=bid)
            if self.store.has(bid):
                try:
                    self.store.verify(bid, self.manifest.size(bid))
                    present.add(bid)
                    continue
                except EkmeshError as exc:
                    log.warning("stored blob %s is bad (%s); fetching it again", bid, exc)
            if peers or time.monotonic() - self._started >= max(self.config.meet_s, self.config.debounce_s):
                wanted[bid] = peers  # no peer (once peers had time to show up): the Fetcher goes to the source
        if not wanted:
            return present
        start = time.monotonic()
        sizes = {bid: self.manifest.size(bid) for bid in wanted}
        report: FetchReport | None
        try:
            report = self._fetcher.fetch(wanted, sizes, timeout=self.config.fetch_timeout_s)
        except BlobUnavailableError as exc:
            report = exc.report if isinstance(exc.report, FetchReport) else None
            log.info("%d expert blob(s) not fetched yet: %s", len(exc.failures), exc)
        except StoreFullError as exc:  # retried like any fetch: space may be freed meanwhile
            report = exc.report if isinstance(exc.report, FetchReport) else None
            log.warning("%s", exc)
        self.stats.fetch_seconds += time.monotonic() - start
        if report is not None:
            self.stats.fetched_bytes += sum(report.received.values())
            self.stats.fetched_blobs += sum(1 for how in report.stored.values() if how == "peers")
            return present | set(report.stored)
        return present

    def _publish(self) -> None:
        assert self.manifest is not None
        layers, experts = grid_of(self.manifest)
        ready: dict[int, set[int]] = {}
        for layer, e in self._ready:
            ready.setdefault(layer, set()).add(e)
        grid = ModelReady(layers, experts, {k: frozenset(v) for k, v in ready.items()})
        self.publish({self.manifest.id: grid})

    # -- visibility -------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The ``claim`` block of ``status --json`` (see ``Node.snapshot``)."""
        pl, m = self.placement, self.manifest
        assigned = {pid: 0 for pid in (k[0] for k in self._key or ())}
        if pl is not None:
            for hs in pl.holders.values():
                for pid in hs:
                    assigned[pid] = assigned.get(pid, 0) + 1
        s = self.stats
        return {
            "model": self.model_id or self.config.model,
            "names": sorted(self.names),
            "state": self.state,
            "ready_means": "verified in the store and loaded" if self.hooks else "verified in the store",
            "dense_ready": self.dense_ready if self.dense else None,
            "replicas": self.config.replicas,
            "experts": len(m.expert_ids()) if m is not None else None,
            "assigned": assigned,
            "self": {"assigned": len(pl.assigned(self.peer_id)) if pl is not None else 0,
                     "fetched": len(self._have), "ready": len(self._ready),
                     "kept": len(self._ready - set(pl.assigned(self.peer_id))) if pl is not None else 0},
            "under_replicated": [list(it) for it in pl.under_replicated] if pl is not None else [],
            "bytes_fetched": s.fetched_bytes,
            "blobs_fetched": s.fetched_blobs,
            "rate_bps": round(s.fetched_bytes / s.fetch_seconds) if s.fetch_seconds > 0 else None,
            "bad_peers": [list(x) for x in s.bad_peers[-16:]],
            "blob_addr": None if self.blob_addr is None else str(self.blob_addr),
        }


async def _abandoning(fn: Callable[[], T]) -> T:
    """``fn()`` in a worker thread that a cancelled caller stops waiting for (trio's ``abandon_on_cancel``)."""
    # mypy (2.4) loses run_sync's keyword-only parameters behind trio's ``enable_ki_protection`` decorator
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)  # type: ignore[call-arg]


def _place(m: Manifest, key: tuple[tuple[str, int, float], ...], replicas: int) -> Placement:
    experts = m.expert_ids()
    peers = [PeerCapacity(pid, total, speed if speed > 0 and math.isfinite(speed) else 1.0)
             for pid, total, speed in key]
    return place(m.id, list(experts), {it: m.size(bid) for it, bid in experts.items()}, peers, replicas)


def _ready_by_peer(model_id: str, adverts: Mapping[str, Advert], me: str) -> dict[str, set[ExpertKey]]:
    """The experts each other peer advertises ready for ``model_id``."""
    out: dict[str, set[ExpertKey]] = {}
    for pid, a in adverts.items():
        grid = a.models.get(model_id)
        if pid != me and grid is not None:
            out[pid] = {(layer, e) for layer, es in grid.ready.items() for e in es}
    return out
