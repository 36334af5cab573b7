"""Serving: what a node with ``--model`` does with the experts it claimed and, as attention host, with the mesh.

Role (node level: wires ``infer`` to ``shard`` and to the view): as the ``Claimer``'s ``ClaimHooks`` it puts claimed
experts on this node's device (``load``) before they are advertised ready, and drops them (``unload``) after
make-before-break; an ``ExpertServer`` answers data-plane frames for them (its address is this node's ``data_addr``;
connections are pinned both ways to the TLS fingerprints in signed adverts, the same certificate as blob exchange).
As attention host (``--attention``, the default), once the dense blobs are verified here, it loads the dense part
and a ``Generator`` over ``RemoteExperts``: local experts first, else the live peers advertising the expert ready
(best first in placement order; the backend then prefers the lowest measured latency), else — no live holder — the
expert's blob is fetched (peers, package, model source: the ``fetch_blobs`` the node hands to ``load_attention``)
and computed here. ``served()`` is the ``api.Engine`` the node's OpenAI API uses; the model answers to its id, its
names here and the names live peers advertise for it (``discovery.names``, rebuilt at ``refresh``).

It holds no reference to the claimer: what it needs of claiming (the placement, banned peers, whether the dense part
is verified, a way to fetch a blob) the node passes into ``refresh``, ``can_load_attention`` and ``load_attention``.

Not responsible for: placement and fetching (``claim``), the wire (``infer.dataplane``), HTTP (``api``).

Invariants: the holder map, pins and addresses are rebuilt from the live view at a ``refresh`` that finds it changed
(a live advert's incarnation or sequence number, the set of live peers, the banned peers, the placement or the
manifest) and replaced whole (threads read consistent copies); only peers whose signed advert carries a data
address and a TLS fingerprint are ever dialled or accepted; an expert is in the holder map only while its holder
advertises it ready and is not banned for serving blobs that failed their hash or expert results that failed
verification (``RemoteExperts``' verifier); every expert blob is hashed again
right before it is loaded.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import psutil
import torch

from ekmesh.api.types import ServedModel, context_of
from ekmesh.core import heap, threads
from ekmesh.core.constants import SPECULATIVE, VERIFY_FRACTION
from ekmesh.core.errors import EkmeshError, ExpertUnavailableError
from ekmesh.core.ids import Endpoint, ExpertKey, Fingerprint
from ekmesh.core.tls import TlsIdentity
from ekmesh.discovery.advert import Advert
from ekmesh.discovery.names import MeshNames
from ekmesh.infer.dataplane import poll
from ekmesh.infer.dataplane.channel import ChannelPool
from ekmesh.infer.dataplane.frames import ModelLimits
from ekmesh.infer.dataplane.remote import RemoteExperts
from ekmesh.infer.dataplane.server import ExpertServer
from ekmesh.infer.dataplane.verify import Reference, Verifier
from ekmesh.infer.expert import ExpertWeights
from ekmesh.infer.experts import LocalExperts
from ekmesh.infer.generate import Generator, pick_device, pick_dtype
from ekmesh.infer.loader import Checkpoint, load_dense
from ekmesh.infer.speculative import Drafter, load_draft
from ekmesh.infer.tokenizer import Tokenizer, eos_ids_in
from ekmesh.registry.lookup import draft_of, names_of, open_model
from ekmesh.shard.manifest import Manifest
from ekmesh.shard.placement import Placement
from ekmesh.shard.reader import StoreTensors, open_store_model
from ekmesh.shard.store import Store

log = logging.getLogger(__name__)


class Serving:
    """One model's serving on this node. ``open`` names the host its expert server binds (once the node knows its
    addresses, before the manifest); ``prepare``/``load``/``unload`` are the ``Claimer``'s hooks (threads);
    ``refresh`` (the node's loop) re-reads the view; ``load_attention`` (a thread) loads the attention part once
    ``can_load_attention``."""

    def __init__(self, peer_id: str, store: Store, identity: TlsIdentity, attention: bool | None,
                 set_data_addr: Callable[[Endpoint | None], None], device: str | None = None,
                 dtype: str | None = None, verify: float = VERIFY_FRACTION,
                 mesh_warning: Callable[[], str | None] = lambda: None, speculative: str | None = None,
                 draft: str | None = None) -> None:
        self.peer_id, self.store, self.identity = peer_id, store, identity
        # how answers are decoded by default (``infer/speculative.py``; None: "draft" when a draft model is
        # loaded, else SPECULATIVE) and with which draft model (None: the model's own by name; "none": no draft)
        self.speculative, self.draft = speculative, draft
        self.mesh_warning = mesh_warning  # the node's: e.g. alone, its bootstrap peers refusing its mesh key
        self.attention = attention
        self.verify = verify  # fraction of remote expert results recomputed (``infer/dataplane/verify.py``)
        self.set_data_addr = set_data_addr
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.threads = threads.configure(torch)  # torch's CPU operator threads for this process (core/threads.py)
        if self.device.type == "cpu":
            heap.keep_freed()  # a prefill's temporaries stay in the heap between calls (core/heap.py)
        self.bind_host, self.advertise_host = "127.0.0.1", "127.0.0.1"
        self.manifest: Manifest | None = None
        self.checkpoint: Checkpoint | None = None
        self._tensors: StoreTensors | None = None  # the checkpoint's tensor source (the store's blobs)
        self.local: LocalExperts | None = None
        self.limits: ModelLimits | None = None
        self.server: ExpertServer | None = None
        self.remote: RemoteExperts | None = None
        self.model: ServedModel | None = None
        self.state = "waiting for the manifest"
        self.failed = False
        self.too_big: str | None = None  # why the automatic --attention decided against hosting attention
        self._pins: dict[str, Fingerprint] = {}
        self._addrs: dict[str, Endpoint] = {}
        self._fetch_blobs: Callable[[list[str], Collection[str]], None] | None = None
        self._holders: dict[ExpertKey, list[str]] = {}
        self._view_key: object = None  # what the maps were last built from (``refresh``)
        self._mesh_names: dict[str, dict[str, list[str]]] = {}  # name -> model id -> peers, from the live adverts
        self._read_lock = threading.Lock()
        self._files_dir = Path(tempfile.mkdtemp(prefix="ekmesh-serving-"))

    def open(self, bind_host: str, advertise_host: str) -> None:
        """The expert server will bind ``bind_host`` and be advertised at ``advertise_host`` (as ``Claimer.open``)."""
        self.bind_host, self.advertise_host = bind_host, advertise_host

    # -- claimer hooks (worker threads) ---------------------------------------------------------------------

    def prepare(self, m: Manifest) -> bool:
        """The manifest is known: the experts' reader, the device backend and the expert server. Returns whether
        this node hosts attention (decided here when ``attention`` was left automatic)."""
        self._tensors = StoreTensors(self.store, m)
        self.checkpoint = Checkpoint.from_source(self._files_dir, m.data["config"], self._tensors, m.id,
                                                 m.experts_format)
        cfg = self.checkpoint.config
        self.local = LocalExperts(cfg.expert_spec(), self.device, self.dtype)
        self.limits = ModelLimits.from_config(cfg)
        self.server = ExpertServer(self.local, self.identity, lambda p: self._pins.get(p), self.limits,
                                   host=self.bind_host).start()
        self.set_data_addr(Endpoint(self.advertise_host, self.server.address[1]))
        if self.attention is None:
            self.too_big = self._dense_too_big(m)
            self.attention = self.too_big is None
        self.manifest = m
        if self.attention:
            self.state = "loading the dense part"
        else:
            self.state = f"no attention: {self.too_big}" if self.too_big else "serving experts"
        return self.attention

    def _dense_too_big(self, m: Manifest) -> str | None:
        """Auto ``--attention``: None when the dense part, at this node's compute dtype, takes at most half the free
        memory of the device (stored weights are bf16 at the least: fp32 compute doubles them), else why not."""
        stored = sum(m.size(b) for b in set(m.dense_ids().values()))
        need = stored * (2 if self.dtype == torch.float32 else 1)
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            free = psutil.virtual_memory().available
        if need <= free // 2:
            return None
        why = (f"the dense part needs {need / 2**30:.1f} GiB, more than half of the {free / 2**30:.1f} GiB free "
               "(force it with --attention)")
        log.warning("model %s: no attention: %s", m.id, why)
        return why

    def _read_expert(self, layer: int, expert: int) -> ExpertWeights:
        ck = self.checkpoint
        assert ck is not None
        with self._read_lock:
            return ck.read_expert(layer, expert)

    def load(self, items: set[ExpertKey]) -> set[ExpertKey]:
        """Puts these experts on the device; returns those loaded. Each blob is hashed again first (not trusted
        from its stat): weights that rotted on disk are quarantined here instead of served."""
        assert self.local is not None and self.manifest is not None
        m = self.manifest
        ids = m.expert_ids()
        done = set()
        for layer, e in sorted(items):
            try:
                bid = ids[(layer, e)]
                self.store.verify(bid, m.size(bid), rehash=True)
                self.local.add(layer, e, self._read_expert(layer, e))
                if self.remote is not None:  # (no longer a fallback copy the attention host may pass over)
                    self.remote.adopt({(layer, e)})
            except EkmeshError as exc:
                log.warning("could not load expert (layer=%d, expert=%d): %s", layer, e, exc)
                continue
            done.add((layer, e))
        with self._read_lock:  # the loaded copies are on the device: unmap the blobs (their pages leave the RSS)
            if self._tensors is not None:
                self._tensors.release()
        heap.trim()  # and give back what the loads' temporaries left in the allocator (core/heap.py)
        log.info("loaded %d experts on %s", len(done), self.device)
        return done

    def unload(self, items: set[ExpertKey]) -> None:
        assert self.local is not None
        for layer, e in items:
            self.local.remove(layer, e)
        log.info("dropped %d experts from %s", len(items), self.device)

    # -- the view (the node's trio loop; cheap) ---------------------------------------------------------------

    def refresh(self, adverts: list[Advert], placement: Placement | None, banned: set[str]) -> None:
        """Re-reads the live view: ``placement`` orders each expert's holders, peers in ``banned`` (served blobs
        that failed their hash) are not used for their experts."""
        m = self.manifest
        # nothing changed since the last rebuild: keep the maps (a 30B-class model has thousands of items, and
        # this runs in the node's loop every 0.2 s, holding the GIL the attention host's threads need)
        if self.remote is not None and self.remote.verifier is not None:  # peers caught returning wrong results
            banned = banned | self.remote.verifier.banned
        key = (None if m is None else m.id, placement, frozenset(banned),
               tuple(sorted((a.peer_id, a.incarnation, a.seq) for a in adverts)))
        if key == self._view_key:  # (a placement compares by identity first: a new one is a new object)
            return
        self._view_key = key
        self._mesh_names = MeshNames.of(adverts).as_dict()  # names the API accepts for a model (replaced whole)
        pins: dict[str, Fingerprint] = {}
        addrs: dict[str, Endpoint] = {}
        holders: dict[ExpertKey, list[str]] = {}
        for a in adverts:
            fp, addr = a.tls_fp, a.data_addr
            if a.peer_id == self.peer_id or fp is None:
                continue
            pins[a.peer_id] = fp  # may dial us (attention host) or serve us
            if addr is None or m is None:
                continue
            addrs[a.peer_id] = addr
            grid = a.models.get(m.id)
            if grid is not None and a.peer_id not in banned:  # a peer that served rotten blobs: not its experts
                for layer, es in grid.ready.items():
                    for e in es:
                        holders.setdefault((layer, e), []).append(a.peer_id)
        if placement is not None:
            for it, peers in holders.items():
                rank = {p: i for i, p in enumerate(placement.holders.get(it, []))}
                peers.sort(key=lambda p: (rank.get(p, len(rank)), p))
        else:
            for peers in holders.values():
                peers.sort()
        self._pins, self._addrs, self._holders = pins, addrs, holders

    def holders(self, layer: int, expert: int) -> list[str]:
        return self._holders.get((layer, expert), [])

    # -- attention host ---------------------------------------------------------------------------------------

    def can_load_attention(self, dense_ready: bool) -> bool:
        """Whether ``load_attention`` should run now; ``dense_ready``: the dense blobs are verified in the store."""
        return (self.attention is True and self.model is None and not self.failed and self.manifest is not None
                and dense_ready)

    def load_attention(self, fetch_blobs: Callable[[list[str], Collection[str]], None]) -> None:
        """Blocking: the dense part on the device, the tokenizer and the generator over ``RemoteExperts``.
        ``fetch_blobs(ids)`` brings blobs into the store from anywhere they can be had (raises an ``EkmeshError``
        otherwise): an expert with no live holder is fetched with it and computed here."""
        m, local, limits = self.manifest, self.local, self.limits
        assert m is not None and local is not None and limits is not None
        try:
            sm = open_store_model(m.id, self.store)
            ck = Checkpoint.from_source(sm.files_dir, sm.hf_config, sm.tensors, m.id, m.experts_format)
            dense = load_dense(ck, self.device, self.dtype)
            # without a tokenizer the API still answers prompts given as token ids
            tok = Tokenizer.from_dir(ck.path) if (ck.path / "tokenizer.json").exists() else None
            drafts = self._load_draft(m.id, ck.path)
        except EkmeshError as exc:
            self.failed = True
            self.state = f"cannot host attention: {exc}"
            log.error("model %s: %s", m.id, self.state)
            return
        self._fetch_blobs = fetch_blobs
        pool = ChannelPool(self.identity, lambda p: self._pins.get(p), lambda p: self._addrs.get(p), limits)
        verifier = Verifier(self.verify, Reference(ck.config.expert_spec(), self.device, self.dtype, self._fallback))
        self.remote = RemoteExperts(limits, local, self.holders, pool, self._fallback, verifier=verifier)
        mode = self.speculative or ("draft" if drafts is not None else SPECULATIVE)
        gen = Generator(dense, self.remote, tok, default_stop_ids=() if tok else eos_ids_in(ck.path),
                        retractions=verifier.ban_count, speculative=mode, round_trips=self.remote.rounds_here,
                        draft=drafts)
        self.model = ServedModel(m.id, names_of(m.id, self.store), gen, tok, context_of(sm.hf_config),
                                 peer_stats=self._peer_stats, verify_stats=verifier.status,
                                 mesh_warning=self.mesh_warning, mesh_names=lambda: self._mesh_names)
        self._sm = sm  # keeps its files directory alive
        self.state = "serving"
        log.info("model %s: attention host ready on %s (%s)", m.id, self.device, str(self.dtype).split(".")[-1])

    def _load_draft(self, model_id: str, tokenizer_dir: Path) -> Callable[[], Drafter] | None:
        """The draft model's drafter factory: ``--draft`` (a directory, model id or alias), else the model's own by
        name (``registry.lookup.draft_of``), else None. A draft that cannot be loaded is logged, not fatal (answers
        then draft by prompt lookup), unless ``--speculative draft`` asked for it."""
        ref = self.draft if self.draft is not None else draft_of(model_id, self.store)
        if ref is None or ref == "none":
            return None
        try:
            return load_draft(open_model(ref, self.store), self.device, self.dtype, tokenizer_dir)
        except EkmeshError as exc:
            if self.speculative == "draft":
                raise
            log.warning("draft model %s not used: %s", ref, exc)
            return None

    def _peer_stats(self) -> dict[str, tuple[int, float]]:
        if self.remote is None:
            return {}
        return {p: (s.round_trips, s.total_rtt_s) for p, s in self.remote.stats().items()}

    def _fallback(self, layer: int, expert: int) -> ExpertWeights:
        """No live holder: the blob comes here (store, package, peers that may store it, the model's source)."""
        m, fetch_blobs = self.manifest, self._fetch_blobs
        assert m is not None and fetch_blobs is not None
        bid = m.expert_ids()[(layer, expert)]
        try:  # peers the data plane just saw fail are asked last: they would each cost a connect deadline first
            fetch_blobs([bid], self.remote.failing() if self.remote is not None else set())
            return self._read_expert(layer, expert)
        except EkmeshError as exc:
            raise ExpertUnavailableError(layer, expert, f"no live holder, and its blob could not be had: {exc}") \
                from exc

    # -- what the node shows -------------------------------------------------------------------------------------

    def missing(self) -> list[ExpertKey]:
        m, local = self.manifest, self.local
        if m is None or local is None:
            return []
        return [it for it in m.expert_ids() if not self._holders.get(it) and not local.has(*it)]

    def served(self) -> list[ServedModel]:
        return [self.model] if self.model is not None else []

    def why_not(self) -> str:
        if self.attention is False:
            why = f"no attention: {self.too_big}" if self.too_big else "it was started with --no-attention"
            return f"this node does not host attention ({why})"
        return f"this node is not ready to answer yet ({self.state})"

    def status(self) -> dict[str, Any]:
        missing = self.missing() if self.manifest is not None else None
        held = self.local.held() if self.local is not None else {}
        return {
            "model": self.manifest.id if self.manifest else None,
            "attention": self.attention,
            "state": self.state,
            "ready": self.model is not None and missing == [],
            "missing_experts": len(missing) if missing is not None else None,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "threads": self.threads,
            "data_addr": str(Endpoint(self.advertise_host, self.server.address[1])) if self.server else None,
            "loaded_experts": sum(len(v) for v in held.values()),
            "loaded_bytes": self.local.nbytes() if self.local is not None else 0,
            "experts_format": self.manifest.experts_format_name() if self.manifest is not None else None,
            "loaded_by_layer": {str(layer): len(es) for layer, es in held.items()},
            # this node's expert server: frames served per peer (attention hosts), batches, and batches that merged
            # frames of several peers
            "server": None if self.server is None else {
                "requests": self.server.stats.requests, "batches": self.server.stats.batches,
                "mixed_batches": self.server.stats.mixed_batches, "by_peer": dict(self.server.stats.by_peer)},
            # where data-plane round trips went (ns sums and counts, cumulative): as attention host
            # (``peerstats.HostSplit``) and as expert server (``ServerStats.split``); benchmarks/gpu_mesh.py reads them
            "split": {"host": dataclasses.asdict(self.remote.split()) if self.remote is not None else None,
                      "server": self.server.stats.split() if self.server is not None else None},
            "peers": {p: {"round_trips": s.round_trips, "mean_rtt_ms": round(1e3 * s.mean_rtt_s, 3),
                          "failures": s.failures}
                      for p, s in (self.remote.stats().items() if self.remote else [])},
            # this process's data-plane reads: how many found data while busy-polling, how many blocked
            "poll": {"max_us": round(poll.MAX_POLL_S * 1e6), "polled": poll.STATS.polled,
                     "blocked": poll.STATS.blocked},
            # results checked, and peers banned for wrong ones with the reason (``infer/dataplane/verify.py``)
            "verify": self.remote.verifier.status() if self.remote and self.remote.verifier else None,
            # how answers are decoded: the default speculative mode, whether a draft model is loaded, conversations
            # decoding now and the batch sizes of recent target steps (``infer/batching.py``)
            "decoding": None if self.model is None else {
                "speculative": self.model.generator.speculative, "draft": self.model.generator.draft is not None,
                **self.model.generator.batcher.status()},
        }

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.remote is not None:
            self.remote.channels.close()
        shutil.rmtree(self._files_dir, ignore_errors=True)
