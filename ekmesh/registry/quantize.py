"""``ekmesh import SOURCE --quantize q8|q4``: a model's routed experts quantized into a new, derived model.

Role: join the loader (read each expert of the parent model in ekmesh's layout), the quantizer (``infer.expert``,
``infer.qtensor``) and the store (one blob per quantized expert, then the derived manifest of ``shard.derive``).
Two paths, one result:

- ``import_quantized``: the parent is a model the user's store or the package knows (``builtin`` works offline);
  its experts are read from their blobs.
- ``import_quantized_from_source``: the parent is a checkpoint directory or hub id. One pass over the source, as a
  full import: the dense blobs and files are stored, and each expert blob's bytes are hashed (so the parent's
  manifest, and with it ``derived_from``, is exact) and quantized in memory, but never stored: the store holds the
  dense part and the quantized experts only (the parent's manifest stays, its experts absent, as after a partial
  import).

Which tensors are quantized: the routed experts' two weight matrices (gate_up and down). Biases stay float32, and
the dense part (embeddings, attention, norms, routers, shared experts, head) is shared with the parent unchanged:
everything that decides routing stays in the parent's precision. Experts are ~95% of a large MoE's bytes.

Invariants: one expert in memory at a time (memory flat in the model's size); quantization is deterministic, so a
quantized blob is a function of its source blob, the model's config, the format and the group size: a journal
(``store/imports/``) keyed by the last three maps each source expert blob id to its quantized blob, so a re-run
(after an interruption, or from the other path) quantizes nothing twice, and the same parent gives the same model
id everywhere; the parent's shared blobs are copied into the target store when they live elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import blake3
from safetensors.torch import save

from ekmesh.core.errors import ConfigError, ShardMissingError
from ekmesh.infer.expert import ExpertWeights, expert_tensors, quantize_expert
from ekmesh.infer.loader import Checkpoint, CheckpointReader, family_config
from ekmesh.infer.models.family import Family, ModelConfig
from ekmesh.infer.qtensor import Q4_GROUP_SIZES, QFORMATS, expert_prefix
from ekmesh.infer.readplan import read_plan
from ekmesh.shard import importer
from ekmesh.shard.derive import DerivedExpert, copy_blobs, derived_manifest, tensor_table
from ekmesh.shard.importer import ImportResult, Journal, Progress, ReadPlan, still_good, summarize
from ekmesh.shard.manifest import Manifest, canonical, hash_id
from ekmesh.shard.reader import BlobTensors, open_store_model
from ekmesh.shard.store import Store, packaged_store


def _check(fmt: str, group_size: int | None) -> None:
    if fmt not in QFORMATS:
        raise ConfigError(f"--quantize {fmt!r}: the formats are {', '.join(QFORMATS)}")
    if group_size is not None and (fmt != "q4" or group_size not in Q4_GROUP_SIZES):
        raise ConfigError(f"--group-size {group_size}: q4 takes one of {Q4_GROUP_SIZES} (q8 has one scale per row)")


class _Quantizer:
    """Quantizes experts of one model into ``store``, one blob each, remembering source blob -> quantized blob."""

    def __init__(self, store: Store, hf: dict[str, Any], label: str, fmt: str, group_size: int | None) -> None:
        self.store, self.label, self.fmt, self.group_size = store, label, fmt, group_size
        key = canonical({"config": hf, "format": fmt, "group_size": group_size, "layout": "ekmesh.expert.v1"})
        self.journal = Journal(store, "quantize-" + blake3.blake3(key).hexdigest()[:32])
        self.done: list[DerivedExpert] = []
        self.quantized = 0  # experts this run quantized (the rest came from the journal)

    def add(self, layer: int, e: int, source_blob: str, read: Callable[[], ExpertWeights]) -> None:
        """Expert (layer, e), stored in ``source_blob``; ``read()`` gives its float ``ExpertWeights`` if needed."""
        bid = self.journal.done.get(source_blob)
        if bid is None or not still_good(self.store, bid):
            prefix = expert_prefix(layer, e)
            w = read()
            try:
                quantized = quantize_expert(w, self.fmt, self.group_size)
            except ConfigError as exc:  # name the expert: the quantizer knows only the projection
                raise ConfigError(f"{prefix} of model {self.label}: {exc}") from exc
            # one metadata key: safetensors writes several in hash order, and the blob's bytes must not vary
            meta = json.dumps({"format": self.fmt, "layer": layer, "expert": e}, sort_keys=True,
                              separators=(",", ":"))
            bid = self.store.put([save(expert_tensors(quantized, prefix), metadata={"ekmesh.expert": meta})])
            self.journal.record(source_blob, bid)
            self.quantized += 1
        path = self.store.verify(bid)
        self.done.append(DerivedExpert(layer, e, bid, path.stat().st_size, tensor_table(path)))


def _finish(store: Store, parent: Manifest, q: _Quantizer, alias: str | None, parent_alias: str | None,
            fetched: int) -> ImportResult:
    m = derived_manifest(parent, q.done, q.fmt, q.group_size)
    store.save_manifest(m)
    name = alias or f"{parent_alias or parent.id[7:19]}-{q.fmt}"
    store.set_alias(name, m.id)
    return summarize(store, m, name, fetched=fetched, stored=q.quantized, skipped=len(q.done) - q.quantized)


def _find(ref: str, store: Store) -> tuple[Store, Manifest]:
    """The store that knows ``ref`` (``store`` first, then the package's) and the model's manifest."""
    for s in [store] + [p for p in [packaged_store()] if p is not None]:
        try:
            return s, s.load_manifest(s.resolve(ref))
        except ShardMissingError:
            continue
    raise ShardMissingError(ref, "give a model id or alias in the store (see `ekmesh models`), or import it first")


def import_quantized(ref: str, fmt: str, group_size: int | None = None, alias: str | None = None,
                     store: Store | None = None, progress: Progress | None = None) -> ImportResult:
    """Quantizes every routed expert of the stored model ``ref`` into ``fmt`` (q8, or q4 with ``group_size``; None
    chooses per tensor) and stores the derived model under ``alias`` (default: the parent's alias + ``-fmt``)."""
    _check(fmt, group_size)
    store = store or Store()
    store.clean_tmp()
    src, parent = _find(ref, store)
    if parent.experts_format is not None:
        raise ConfigError(f"model {parent.id} is already quantized ({parent.experts_format['format']}); quantize "
                          f"the model it was derived from, {parent.experts_format['derived_from']}")
    sm = open_store_model(parent.id, src)
    ck = Checkpoint.from_source(sm.files_dir, sm.hf_config, sm.tensors, parent.id)
    q = _Quantizer(store, sm.hf_config, parent.id, fmt, group_size)
    ids = parent.expert_ids()
    if progress is not None:
        progress.start(sum(parent.size(b) for b in ids.values()), len(ids))
    for layer, e in ck.expert_addresses():
        def read(layer: int = layer, e: int = e) -> ExpertWeights:
            w = ck.read_expert(layer, e)
            sm.tensors.release()  # one expert's blob mapped at a time: memory stays flat in the model's size
            return w
        q.add(layer, e, ids[(layer, e)], read)
        if progress is not None:
            progress.advance(parent.size(ids[(layer, e)]))
    shared = sorted(set(parent.dense_ids().values()) | set(parent.file_ids().values()))
    copied = copy_blobs(store, src, shared, parent) if src is not store else 0
    parent_alias = next((a for a, mid in sorted(src.aliases().items()) if mid == parent.id), None)
    return _finish(store, parent, q, alias, parent_alias, copied)


def import_quantized_from_source(ref: str, fmt: str, group_size: int | None = None, alias: str | None = None,
                                 store: Store | None = None, progress: Progress | None = None,
                                 revision: str | None = None) -> ImportResult:
    """Imports the checkpoint directory or hub repo ``ref`` with its routed experts quantized into ``fmt``, in one
    pass, storing the dense part and the quantized experts only (see the module docstring)."""
    _check(fmt, group_size)
    store = store or Store()
    seen: dict[str, Any] = {}

    def planner(hf: dict[str, Any], table: dict[str, tuple[str, tuple[int, ...]]], label: str) -> ReadPlan:
        fam, cfg = family_config(hf, f"{label}: config.json")
        seen.update(hf=hf, fam=fam, cfg=cfg, shapes={n: shape for n, (_, shape) in table.items()},
                    quantizer=_Quantizer(store, hf, label, fmt, group_size))
        return read_plan(hf, table, label)

    def sink(layer: int, e: int, chunks: Iterator[bytes]) -> str:
        data = b"".join(chunks)  # one expert blob
        blob_id = hash_id(data)
        fam: Family[Any] = seen["fam"]
        cfg: ModelConfig = seen["cfg"]

        def read() -> ExpertWeights:
            where = f"{ref} expert (layer={layer}, expert={e})"
            reader = CheckpointReader(BlobTensors(seen["shapes"], data, where), seen["hf"].get("quantization_config"))
            return fam.read_expert(reader, cfg, layer, e)
        seen["quantizer"].add(layer, e, blob_id, read)
        return blob_id

    res = importer.import_full(ref, planner, revision=revision, store=store, progress=progress, expert_sink=sink)
    parent = store.load_manifest(res.model_id)
    return _finish(store, parent, seen["quantizer"], alias, res.alias, res.fetched)
