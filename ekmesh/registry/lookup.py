"""Finding stored models: which store knows a name, its aliases, and a stored model opened as a ``Checkpoint``.

``open_model`` is what ``ekmesh generate MODEL`` uses: a directory stays a path, anything else is a model id, id
prefix or alias in the store. A name the user's store does not know is looked up in the read-only store shipped
inside the package (``shard.store.packaged_store``), so ``ekmesh generate builtin`` works offline on a fresh machine;
the user's store wins where both know a name.

``names_of`` gives the names a stored model goes by here (its aliases and the hub id it was imported from): what a
node advertises to the mesh (``discovery.advert``'s ``names``) and what its API accepts as ``model``.
"""

from __future__ import annotations

import os

from ekmesh.core.errors import CheckpointError, ShardError, ShardMissingError
from ekmesh.infer.loader import Checkpoint
from ekmesh.shard.manifest import Manifest
from ekmesh.shard.reader import open_store_model
from ekmesh.shard.store import Store, packaged_store


def aliases_of(model_id: str, store: Store | None = None) -> list[str]:
    """Every alias of ``model_id`` in ``store`` (default: the user's) and in the packaged store."""
    stores = [store or Store()] + [s for s in [packaged_store()] if s is not None]
    return sorted({a for s in stores for a, target in s.aliases().items() if target == model_id})


def hub_id_of(manifest: Manifest) -> str | None:
    """The hub id (``org/repo``) a model was imported from, if its manifest records one (an import from a directory
    does not)."""
    src = manifest.data.get("source")
    if isinstance(src, dict) and src.get("kind") == "hub" and isinstance(src.get("repo"), str):
        return str(src["repo"])
    return None


def names_of(model_id: str, store: Store | None = None) -> list[str]:
    """The names ``model_id`` goes by here: its aliases in ``store`` (default: the user's) and the packaged store,
    then the hub id it was imported from (if its manifest, in either store, records one)."""
    names = aliases_of(model_id, store)
    for s in [store or Store()] + [s for s in [packaged_store()] if s is not None]:
        try:
            hub = hub_id_of(s.load_manifest(model_id))
        except ShardError:
            continue
        if hub is not None and hub not in names:
            names.append(hub)
        break
    return names


def open_checkpoint(ref: str, store: Store | None = None) -> Checkpoint:
    """The stored model ``ref`` as a lazily-read ``Checkpoint`` (``ckpt.reader.source.opened`` lists the blobs)."""
    sm = open_store_model(ref, store)
    return Checkpoint.from_source(sm.files_dir, sm.hf_config, sm.tensors, sm.label, sm.manifest.experts_format)


def resolve_store(model: str, store: Store | None = None) -> Store:
    """The store that knows ``model`` (model id, id prefix or alias): ``store`` (default: the user's), else the
    packaged one."""
    store = store or Store()
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


def open_model(model: str, store: Store | None = None) -> str | Checkpoint:
    """A checkpoint directory path as given, or the ``Checkpoint`` of a model id / alias in ``store`` (default: the
    user's) or the packaged store."""
    if os.path.isdir(model):
        return model
    try:
        found = resolve_store(model, store)
    except ShardMissingError as exc:
        raise CheckpointError(f"{model} is not a checkpoint directory, nor a model id or alias in the store "
                              f"(see `ekmesh models`)") from exc
    return open_checkpoint(model, found)


DRAFT_SUFFIX = "-draft"


def draft_of(model_id: str, store: Store | None = None) -> str | None:
    """The draft model that goes with ``model_id`` by name: for an alias A of it, a model aliased ``A-draft`` in
    ``store`` (default: the user's) or the packaged store (the built-in model's is ``builtin-draft``); None if
    there is none."""
    stores = [store or Store()] + [s for s in [packaged_store()] if s is not None]
    for alias in aliases_of(model_id, store):
        for s in stores:
            if alias + DRAFT_SUFFIX in s.aliases():
                return alias + DRAFT_SUFFIX
    return None
