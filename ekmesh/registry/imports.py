"""Importing a model into the store with the loader's read plan (full, or a partial import of the experts the
live mesh's placement gives this node).

``import_full`` / ``import_partial`` are ``shard.importer``'s imports with ``infer.readplan.read_plan`` (what the
loader reads of each tensor); a partial import asks the node running for this ``EKMESH_HOME`` for the live peers
(its status snapshot) to compute this node's share.
"""

from __future__ import annotations

from ekmesh.core.constants import STATUS_PATH
from ekmesh.core.paths import ekmesh_home
from ekmesh.discovery import control
from ekmesh.infer.readplan import read_plan
from ekmesh.shard import importer
from ekmesh.shard.importer import ImportResult, Progress
from ekmesh.shard.manifest import Manifest
from ekmesh.shard.placement import PeerCapacity, place
from ekmesh.shard.store import Store


def import_full(ref: str, revision: str | None = None, alias: str | None = None, store: Store | None = None,
                progress: Progress | None = None) -> ImportResult:
    return importer.import_full(ref, read_plan, revision=revision, alias=alias, store=store, progress=progress)


def import_partial(ref: str, spec: str, revision: str | None = None, alias: str | None = None,
                   store: Store | None = None, progress: Progress | None = None) -> ImportResult:
    return importer.import_partial(ref, spec, revision=revision, alias=alias, store=store, progress=progress,
                                   assigned=assigned_from_mesh)


def assigned_from_mesh(m: Manifest, replicas: int = 2, timeout: float = 5.0) -> list[tuple[int, int]]:
    """The experts the placement over the live mesh (as the running node of this EKMESH_HOME sees it) gives
    this node: budgets are the memory each live peer offers (its advertised ``memory_total``)."""
    snap = control.get_json(ekmesh_home(), STATUS_PATH, timeout)
    me = snap.get("self")
    live = [p for p in snap.get("peers", []) if p.get("state") in ("self", "up")]
    peers = [PeerCapacity(str(p["peer_id"]), int(p.get("memory_total") or 0), float(p.get("speed") or 1.0))
             for p in live]
    experts = m.expert_ids()
    pl = place(m.id, list(experts), {it: m.size(bid) for it, bid in experts.items()}, peers, replicas)
    return pl.assigned(str(me))
