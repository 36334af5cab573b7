"""``ekmesh import SOURCE --quantize q8|q4``: a stored model's routed experts quantized into a new, derived model.

Role: join the loader (read each expert of the parent model in ekmesh's layout, ``Checkpoint.read_expert``), the
quantizer (``infer.qtensor``) and the store (one blob per quantized expert, then the derived manifest of
``shard.derive``). The parent is any model the user's store or the package knows (``builtin`` works offline); a
checkpoint directory or hub id is imported in full first by the caller.

Which tensors are quantized: the routed experts' two weight matrices (gate_up and down). Biases stay float32, and
the dense part (embeddings, attention, norms, routers, shared experts, head) is shared with the parent unchanged:
everything that decides routing stays in the parent's precision. Experts are ~95% of a large MoE's bytes.

Invariants: one expert in memory at a time (memory flat in the model's size); each blob is stored atomically and
recorded in a journal (``store/imports/``) keyed by the parent, format and group size, so an interrupted import
resumes without quantizing finished experts again; quantization is deterministic, so the same parent gives the
same model id everywhere; the parent's shared blobs are copied into the target store when they live elsewhere.
"""

from __future__ import annotations

import json

import blake3
from safetensors.torch import save

from ekmesh.core.errors import ConfigError, ShardMissingError
from ekmesh.infer.expert import expert_tensors, quantize_expert
from ekmesh.infer.loader import Checkpoint
from ekmesh.infer.qtensor import Q4_GROUP_SIZES, QFORMATS, expert_prefix
from ekmesh.shard.derive import DerivedExpert, copy_blobs, derived_manifest, tensor_table
from ekmesh.shard.importer import ImportResult, Journal, Progress, still_good, summarize
from ekmesh.shard.manifest import Manifest
from ekmesh.shard.reader import open_store_model
from ekmesh.shard.store import Store, packaged_store


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
    if fmt not in QFORMATS:
        raise ConfigError(f"--quantize {fmt!r}: the formats are {', '.join(QFORMATS)}")
    if group_size is not None and (fmt != "q4" or group_size not in Q4_GROUP_SIZES):
        raise ConfigError(f"--group-size {group_size}: q4 takes one of {Q4_GROUP_SIZES} (q8 has one scale per row)")
    store = store or Store()
    store.clean_tmp()
    src, parent = _find(ref, store)
    if parent.experts_format is not None:
        raise ConfigError(f"model {parent.id} is already quantized ({parent.experts_format['format']}); quantize "
                          f"the model it was derived from, {parent.experts_format['derived_from']}")
    sm = open_store_model(parent.id, src)
    ck = Checkpoint.from_source(sm.files_dir, sm.hf_config, sm.tensors, parent.id)
    key = blake3.blake3(f"quantize {parent.id} {fmt} {group_size}".encode()).hexdigest()[:32]
    journal = Journal(store, key)
    addresses = ck.expert_addresses()
    todo = [a for a in addresses if not (f"expert.{a[0]}.{a[1]}" in journal.done
                                         and still_good(store, journal.done[f"expert.{a[0]}.{a[1]}"]))]
    if progress is not None:
        progress.start(sum(parent.size(parent.expert_ids()[a]) for a in todo), len(todo))
    for layer, e in todo:
        prefix = expert_prefix(layer, e)
        try:
            quantized = quantize_expert(ck.read_expert(layer, e), fmt, group_size)
        except ConfigError as exc:  # name the expert: the quantizer knows only the projection
            raise ConfigError(f"{prefix} of model {parent.id}: {exc}") from exc
        sm.tensors.release()  # one expert's blob mapped at a time: memory stays flat in the model's size
        tensors = expert_tensors(quantized, prefix)
        # one metadata key: safetensors writes several in hash order, and the blob's bytes must not vary
        meta = json.dumps({"format": fmt, "layer": layer, "expert": e}, sort_keys=True, separators=(",", ":"))
        data = save(tensors, metadata={"ekmesh.expert": meta})
        journal.record(f"expert.{layer}.{e}", store.put([data]))
        if progress is not None:
            progress.advance(parent.size(parent.expert_ids()[(layer, e)]))
    experts = []
    for layer, e in addresses:
        bid = journal.done[f"expert.{layer}.{e}"]
        path = store.verify(bid)
        experts.append(DerivedExpert(layer, e, bid, path.stat().st_size, tensor_table(path)))
    shared = sorted(set(parent.dense_ids().values()) | set(parent.file_ids().values()))
    copied = copy_blobs(store, src, shared, parent) if src is not store else 0
    m = derived_manifest(parent, experts, fmt, group_size)
    store.save_manifest(m)
    parent_alias = next((a for a, mid in sorted(src.aliases().items()) if mid == parent.id), None)
    name = alias or f"{parent_alias or parent.id[7:19]}-{fmt}"
    store.set_alias(name, m.id)
    return summarize(store, m, name, fetched=copied, stored=len(todo), skipped=len(addresses) - len(todo))
