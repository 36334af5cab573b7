"""Wires the registry (``ekmesh.shard``) to the loader (``ekmesh.infer``): import with infer's read plan, and open
a stored model as a ``Checkpoint``.

This sits at the node level (like ``node.py``): shard and infer are siblings that never import each other, so the
one thing that needs both — cutting a checkpoint into blobs by what the loader reads, and loading from blobs —
is joined here. ``open_model`` is what ``ekmesh generate MODEL`` uses: a directory stays a path, anything else is a
model id, id prefix or alias in the store. A name the user's store does not know is looked up in the read-only
store shipped inside the package (``shard.store.packaged_store``), so ``ekmesh generate builtin`` works offline on
a fresh machine; the user's store wins where both know a name.
"""

from __future__ import annotations

import os

from ekmesh.core.errors import CheckpointError, ShardMissingError
from ekmesh.core.paths import ekmesh_home
from ekmesh.discovery import control
from ekmesh.infer.loader import Checkpoint
from ekmesh.infer.readplan import read_plan
from ekmesh.shard import importer
from ekmesh.shard.importer import ImportResult, Progress
from ekmesh.shard.manifest import Manifest
from ekmesh.shard.placement import PeerCapacity, place
from ekmesh.shard.reader import open_store_model
from ekmesh.shard.store import Store, packaged_store


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
    snap = control.get_json(ekmesh_home(), "/ekmesh/status", timeout)
    me = snap.get("self")
    live = [p for p in snap.get("peers", []) if p.get("state") in ("self", "up")]
    peers = [PeerCapacity(str(p["peer_id"]), int(p.get("memory_total") or 0), float(p.get("speed") or 1.0))
             for p in live]
    experts = m.expert_ids()
    pl = place(m.id, list(experts), {it: m.size(bid) for it, bid in experts.items()}, peers, replicas)
    return pl.assigned(str(me))


def aliases_of(model_id: str, store: Store | None = None) -> list[str]:
    """Every alias of ``model_id`` in ``store`` (default: the user's) and in the packaged store."""
    stores = [store or Store()] + [s for s in [packaged_store()] if s is not None]
    return sorted({a for s in stores for a, target in s.aliases().items() if target == model_id})


def open_checkpoint(ref: str, store: Store | None = None) -> Checkpoint:
    """The stored model ``ref`` as a lazily-read ``Checkpoint`` (``ckpt.reader.source.opened`` lists the blobs)."""
    sm = open_store_model(ref, store)
    return Checkpoint.from_source(sm.files_dir, sm.hf_config, sm.tensors, sm.label)


def resolve_store(model: str) -> Store:
    """The store that knows ``model`` (model id, id prefix or alias): the user's, else the packaged one."""
    store = Store()
    try:
        store.resolve(model)
        return store
    except ShardMissingError:
        packaged = packaged_store()
        if packaged is None:
            raise
        try:
            packaged.resolve(model)
        except ShardMissingError:
            pass
        else:
            return packaged
        raise


def open_model(model: str) -> str | Checkpoint:
    """A checkpoint directory path as given, or the store's ``Checkpoint`` for a model id / alias."""
    if os.path.isdir(model):
        return model
    try:
        store = resolve_store(model)
    except ShardMissingError as exc:
        raise CheckpointError(f"{model} is not a checkpoint directory, nor a model id or alias in the store "
                              f"(see `ekmesh models`)") from exc
    return open_checkpoint(model, store)
