"""Derived models: a model whose routed experts were computed from another model's (quantized at import), sharing
its dense part and files.

Role: the store side of ``ekmesh import SOURCE --quantize q8|q4``. The caller (``registry.imports``, which has
infer's quantizers) stores one blob per expert; this module reads such a blob's tensor table back from its
safetensors header, copies the parent's shared blobs into the target store when the parent lives in another one
(the read-only store shipped in the package), and builds the derived manifest (``manifest`` describes the schema:
``experts_format`` and ``derived`` blob entries).

Invariants: the derived manifest keeps the parent's config, dtype, quantization, source, tensor table, dense blobs
and files unchanged, so the dense part loads exactly as the parent's; only the expert rows, their blob entries and
the sizes change, and ``experts_format.derived_from`` names the parent. A shared blob is copied by streaming its
verified bytes (never whole in memory) and stored only if it hashes to its id. Nothing here quantizes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ekmesh.core.errors import CheckpointError
from ekmesh.shard.manifest import Manifest
from ekmesh.shard.source import parse_header
from ekmesh.shard.store import Store

COPY_CHUNK = 8 << 20


@dataclass(frozen=True)
class DerivedExpert:
    """One stored derived expert blob: its address, id, size and tensor table (name -> dtype and shape)."""

    layer: int
    expert: int
    blob_id: str
    size: int
    tensors: dict[str, dict[str, Any]]


def tensor_table(path: Path) -> dict[str, dict[str, Any]]:
    """The tensors of a stored safetensors blob as ``{name: {"dtype", "shape"}}``, from its (checked) header."""
    try:
        with open(path, "rb") as f:
            def read(begin: int, end: int) -> bytes:
                f.seek(begin)
                return f.read(end - begin)

            entries, _ = parse_header(read, path.name, str(path))
    except OSError as exc:
        raise CheckpointError(f"cannot read the safetensors header of {path}: {exc}") from exc
    return {name: {"dtype": t.dtype, "shape": list(t.shape)} for name, t in sorted(entries.items())}


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK):
            yield chunk


def copy_blobs(dst: Store, src: Store, blob_ids: Iterable[str], manifest: Manifest) -> int:
    """Brings these blobs of ``manifest`` from ``src`` into ``dst`` where ``dst`` lacks them; returns bytes copied."""
    copied = 0
    for bid in blob_ids:
        if dst.has(bid):
            continue
        size = manifest.size(bid)
        dst.put(_chunks(src.verify(bid, size)), expected_id=bid)
        copied += size
    return copied


def derived_manifest(parent: Manifest, experts: list[DerivedExpert], fmt: str, group_size: int | None) -> Manifest:
    """The manifest of ``parent`` with these experts (one per routed expert of ``parent``) in format ``fmt``."""
    data = json.loads(parent.bytes())  # a deep copy
    by_addr = {(d.layer, d.expert): d for d in experts}
    if set(by_addr) != set(parent.expert_ids()):
        raise CheckpointError(f"derived experts cover {len(by_addr)} of the {len(parent.expert_ids())} routed "
                              f"experts of {parent.id}")
    old = set(parent.expert_ids().values())
    shared = set(parent.dense_ids().values()) | set(parent.file_ids().values())
    blobs = {bid: b for bid, b in data["blobs"].items() if bid not in old or bid in shared}
    rows: list[list[str] | None] = []
    for layer, row in enumerate(data["experts"]):
        rows.append(None if row is None else [by_addr[(layer, e)].blob_id for e in range(len(row))])
    for d in experts:
        blobs[d.blob_id] = {"size": d.size, "derived": {"expert": [d.layer, d.expert], "format": fmt},
                            "tensors": d.tensors}
    data["experts"] = rows
    data["blobs"] = blobs
    size_of = {bid: b["size"] for bid, b in blobs.items()}
    expert_ids = {d.blob_id for d in experts}
    dense = set(data["dense"].values())
    files = set(data["files"].values())
    data["sizes"] = {"dense": sum(size_of[b] for b in dense), "experts": sum(size_of[b] for b in expert_ids),
                     "files": sum(size_of[b] for b in files), "total": sum(size_of.values())}
    data["experts_format"] = {"format": fmt, "group_size": group_size, "derived_from": parent.id}
    return Manifest.build(data)
