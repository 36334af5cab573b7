"""What ``ekmesh.hf`` loads from: a MODEL name opened as config files, a tensor table and a logged tensor reader.

MODEL is a checkpoint directory, a model id / id prefix / alias in the store (the user's, else the packaged one),
or a hub id (resolved as ``ekmesh import`` resolves it: ``shard.hub.open_hub``, by Range requests, or the local HF
cache with ``HF_HUB_OFFLINE``). A directory or hub checkpoint is read through ``shard.source`` by byte range: only
the ranges of the tensors asked for (and the safetensors headers, which the tensor table comes from); a stored
model through its blobs (``shard.reader.StoreTensors``): only the blobs of the tensors asked for.

Invariants: nothing here reads a tensor by itself; every tensor read goes through ``reader`` (a
``CheckpointReader``), whose ``read_log`` names it; ``fingerprint`` is computed from the config and the headers
(or the manifest), never from tensor bytes, and equals the fingerprint of the manifest an import of the same
checkpoint makes (``core/relaywire.fingerprint``).
"""

from __future__ import annotations

import os
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ekmesh.core.errors import CheckpointError, MissingTensorError, ShardMissingError
from ekmesh.core.relaywire import fingerprint
from ekmesh.infer.loader import CheckpointReader, read_json
from ekmesh.registry.lookup import resolve_store
from ekmesh.shard.reader import open_store_model
from ekmesh.shard.source import DirSource, Source, TensorEntry
from ekmesh.shard.store import Store

_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class SourceTensors:
    """A ``TensorSource`` (``infer.loader``) over a ``shard.source.Source``: headers parsed once, each tensor (or
    row) read by its byte range. ``src.bytes_read`` counts every byte read, headers included."""

    def __init__(self, src: Source) -> None:
        self.src = src
        self.table: dict[str, TensorEntry] = {}
        for f in src.weight_files():
            self.table.update(src.header(f)[0])

    def names(self) -> list[str]:
        return sorted(self.table)

    def has(self, name: str) -> bool:
        return name in self.table

    def shape(self, name: str) -> tuple[int, ...]:
        e = self.table.get(name)
        if e is None:
            raise MissingTensorError(name)
        return e.shape

    def read(self, name: str, index: int | None) -> torch.Tensor:
        e = self.table.get(name)
        if e is None:
            raise MissingTensorError(name)
        dtype = _TORCH.get(e.dtype)
        if dtype is None:
            raise CheckpointError(f"{self.src.label(e.file)}: tensor {name!r} has dtype {e.dtype}, which torch "
                                  "cannot hold")
        begin, end = (e.begin, e.end) if index is None else e.row(index)
        shape = e.shape if index is None else e.shape[1:]
        data = bytearray(self.src.read_bytes(e.file, begin, end))
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)

    def manifest_table(self) -> dict[str, dict[str, Any]]:
        """The tensor table as a manifest's ``tensors`` field."""
        return {n: {"file": t.file, "range": [t.begin, t.end], "dtype": t.dtype, "shape": list(t.shape)}
                for n, t in self.table.items()}


@dataclass
class OpenedModel:
    """A MODEL opened for a dense load: ``files_dir`` holds config.json (and generation / tokenizer files)."""

    label: str
    files_dir: Path
    hf_config: dict[str, Any]
    reader: CheckpointReader
    tensors: dict[str, dict[str, Any]]  # the manifest-form tensor table (fingerprint)
    experts_format: dict[str, Any] | None = None
    keep: list[Any] = field(default_factory=list)  # what must live as long as this (a store model's files)

    @property
    def fingerprint(self) -> bytes:
        return fingerprint(self.hf_config, self.tensors, self.experts_format)

    @property
    def read_log(self) -> list[str]:
        """Every tensor read so far (``name`` or ``name[row]``)."""
        return self.reader.read_log


def _from_source(src: Source, label: str, files_dir: Path, keep: list[Any]) -> OpenedModel:
    tensors = SourceTensors(src)
    hf = read_json(files_dir / "config.json")
    return OpenedModel(label, files_dir, hf, CheckpointReader(tensors, hf.get("quantization_config")),
                       tensors.manifest_table(), None, keep)


def _hub_files(src: Source) -> tuple[Path, list[Any]]:
    """The hub checkpoint's config, generation and tokenizer files copied into a private directory (removed when
    the opened model is collected)."""
    files_dir = Path(tempfile.mkdtemp(prefix="ekmesh-hf-"))
    holder = _Cleanup(files_dir)
    for name in src.meta_files():
        dest = (files_dir / name).resolve()
        if files_dir.resolve() not in dest.parents:
            raise CheckpointError(f"{src.label(name)}: a file name outside the checkpoint directory")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(src.read_file(name))
    return files_dir, [holder]


class _Cleanup:
    """Removes a private directory when collected."""

    def __init__(self, path: Path) -> None:
        import shutil

        weakref.finalize(self, shutil.rmtree, str(path), True)


def open_model(ref: str | os.PathLike[str], revision: str | None = None, store: Store | None = None) -> OpenedModel:
    """``ref`` as a checkpoint directory, a stored model (id, id prefix, alias) of ``store`` (default: the user's)
    or of the packaged store, or a hub id, in that order."""
    text = os.fspath(ref)
    if os.path.isdir(text):
        src = DirSource(text)
        return _from_source(src, text, Path(text), [])
    try:
        found = resolve_store(text, store)
    except ShardMissingError as exc:
        if text.count("/") != 1 or text.startswith((".", "/", "~")):
            raise CheckpointError(f"{text} is not a checkpoint directory, a model id or alias in the store "
                                  "(see `ekmesh models`), nor a hub id") from exc
        from ekmesh.shard.hub import open_hub

        hub = open_hub(text, revision)
        if isinstance(hub, DirSource):  # HF_HUB_OFFLINE: the local HF cache's copy
            return _from_source(hub, text, hub.path, [])
        files_dir, keep = _hub_files(hub)
        return _from_source(hub, text, files_dir, keep)
    sm = open_store_model(text, found)
    m = sm.manifest
    return OpenedModel(text, sm.files_dir, sm.hf_config, CheckpointReader(sm.tensors, sm.hf_config.get(
        "quantization_config")), m.data["tensors"], m.experts_format, [sm])
