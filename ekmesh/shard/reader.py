"""A model in the store as a tensor source: the loader reads blobs exactly as it reads a directory.

Role: ``StoreTensors`` satisfies infer's ``TensorSource`` protocol structurally (shard does not import infer).
``has`` / ``shape`` come from the manifest's tensor tables (source tensors, and a quantized model's derived expert
tensors; no blob opened); ``read(name, index)`` opens only the blob holding that key (``name[e]`` for a row of a
fused tensor, else ``name``), so loading the dense part opens only dense blobs and loading (layer, expert) opens
only that expert's blob. ``open_store_model`` resolves a model id or alias and copies the verified config /
tokenizer blobs into a private temporary directory (removed with the source); the wiring layer (``ekmesh.registry``)
turns the result into a ``Checkpoint``.

Invariants: every blob is verified (``Store.verify``: hashed once, then trusted while its stat is unchanged)
before safetensors opens it; a blob absent from the store (partial import) raises ``ShardMissingError`` naming it;
``opened`` lists the blob ids this reader opened, in order.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load

from ekmesh.core.errors import CheckpointError, ManifestError, MissingTensorError, ShardMissingError
from ekmesh.shard.manifest import Manifest
from ekmesh.shard.store import Store


class StoreTensors:
    """The tensors of one manifest, read from verified blobs on demand."""

    def __init__(self, store: Store, manifest: Manifest) -> None:
        self.store = store
        self.manifest = manifest
        # source tensors, and a quantized model's derived expert tensors (``experts.<layer>.<e>...``)
        self._tensors: dict[str, Any] = {**manifest.data["tensors"], **manifest.derived_tensors()}
        self._where = manifest.key_map()
        self._handles: dict[str, Any] = {}
        self.opened: list[str] = []

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        t = self._tensors.get(name)
        if t is None:
            raise MissingTensorError(name)
        return tuple(t["shape"])

    def _open(self, blob_id: str) -> Any:
        h = self._handles.get(blob_id)
        if h is None:
            path = self.store.verify(blob_id, self.manifest.size(blob_id))
            try:
                h = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"cannot read blob {blob_id}: {exc}") from exc
            self._handles[blob_id] = h
            self.opened.append(blob_id)
        return h

    def release(self) -> None:
        """Closes every blob this reader opened (a whole-model pass, e.g. quantizing every expert, would otherwise
        keep each blob's mapping, and its pages, until the reader is dropped). Blobs reopen on the next read."""
        self._handles.clear()

    def read(self, name: str, index: int | None) -> torch.Tensor:
        if name not in self._tensors:
            raise MissingTensorError(name)
        row_key = f"{name}[{index}]"
        if index is not None and row_key in self._where:
            key, sub = row_key, None
        elif name in self._where:
            key, sub = name, index
        else:
            raise MissingTensorError(name if index is None else row_key,
                                     f"no blob of model {self.manifest.id} holds it")
        blob_id = self._where[key]
        try:
            sl = self._open(blob_id).get_slice(key)
            return sl[:] if sub is None else sl[sub]
        except ShardMissingError as exc:
            raise ShardMissingError(f"blob {blob_id}", f"holds {key}; import it, e.g. with --experts") from exc
        except (SafetensorError, OSError, IndexError) as exc:
            raise CheckpointError(f"cannot read {key!r} from blob {blob_id}: {exc}") from exc


class BlobTensors:
    """One tensor blob's bytes (safetensors, keys ``name`` or ``name[e]``) as a tensor source, next to the whole
    model's tensor table (``has`` / ``shape`` answer for every tensor, as a directory would; ``read`` only for what
    the blob holds). ``import --quantize`` from a source reads each expert through it: one blob in memory."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], blob: bytes, where: str) -> None:
        self._shapes, self._where = shapes, where
        try:
            self._tensors = load(blob)
        except (SafetensorError, ValueError) as exc:
            raise CheckpointError(f"{where} is not a safetensors blob: {exc}") from exc

    def names(self) -> list[str]:
        return sorted(self._shapes)

    def has(self, name: str) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            raise MissingTensorError(name)
        return self._shapes[name]

    def read(self, name: str, index: int | None) -> torch.Tensor:
        row_key = f"{name}[{index}]"
        if index is not None and row_key in self._tensors:
            return self._tensors[row_key]
        if name in self._tensors:
            t = self._tensors[name]
            return t if index is None else t[index]
        raise MissingTensorError(name if index is None else row_key, f"{self._where} does not hold it")


@dataclass
class StoreModel:
    """A model resolved in the store: its manifest, config, files directory and tensor source."""

    model_id: str
    label: str
    manifest: Manifest
    hf_config: dict[str, Any]
    files_dir: Path
    tensors: StoreTensors


def open_store_model(ref: str, store: Store | None = None) -> StoreModel:
    """The model ``ref`` (model id, id prefix or alias): manifest checked, config / tokenizer files verified."""
    store = store or Store()
    model_id = store.resolve(ref)
    m = store.load_manifest(model_id)
    tensors = StoreTensors(store, m)
    files_dir = Path(tempfile.mkdtemp(prefix="ekmesh-model-"))
    weakref.finalize(tensors, shutil.rmtree, str(files_dir), True)
    for fname, bid in sorted(m.file_ids().items()):
        dest = (files_dir / fname).resolve()
        if files_dir.resolve() not in dest.parents:
            raise ManifestError(f"manifest {model_id}: field 'files' names {fname!r}, outside the model directory")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(store.read_verified(bid, m.size(bid)))
    return StoreModel(model_id, ref, m, m.data["config"], files_dir, tensors)
