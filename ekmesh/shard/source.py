"""Where an import reads a checkpoint from: a local directory or a Hugging Face hub repo, by byte range.

Role: list a checkpoint's files, parse safetensors headers (``TensorEntry``: file, absolute byte range, dtype,
shape) and stream byte ranges. Both sources read only the ranges asked for: a directory by seek + read, the hub
by HTTP Range requests against ``huggingface_hub.hf_hub_url`` with the hub's own session and headers (so
``HF_TOKEN`` and ``HF_ENDPOINT`` apply). With ``HF_HUB_OFFLINE`` set, a hub id resolves to its copy in the local
HF cache (``snapshot_download(local_files_only=True)``) and is read as a directory.

Invariants: every read is bounded (``CHUNK`` bytes at a time, never a whole file unless it is a small metadata
file); a server that ignores a Range request or returns a different length is an error, never a silent full
download; headers are validated (size, JSON, offsets inside the file) before anything is allocated from them.
``bytes_read`` counts every payload byte this process read from the source. Errors leave this module as
``ShardError`` (network, HTTP, OS) with the cause chained.
"""

from __future__ import annotations

import fnmatch
import json
import os
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ekmesh.core.errors import CheckpointError, ShardError

CHUNK = 8 << 20  # bytes per read; bounds the importer's memory
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
INDEX = "model.safetensors.index.json"
# The non-weight files ekmesh reads from a checkpoint (config, tokenizer, chat templates, generation defaults).
META_PATTERNS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "chat_templates/*.jinja")
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                      "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a source safetensors file: ``[begin, end)`` are absolute byte offsets in ``file``."""

    file: str
    begin: int
    end: int
    dtype: str
    shape: tuple[int, ...]

    def row(self, index: int) -> tuple[int, int]:
        """The absolute byte range of row ``index`` along dim 0 (rows of a C-order tensor are contiguous)."""
        if not self.shape or not 0 <= index < self.shape[0]:
            raise CheckpointError(f"row {index} is outside a tensor of shape {list(self.shape)} in {self.file}")
        size = (self.end - self.begin) // self.shape[0]
        return self.begin + index * size, self.begin + (index + 1) * size


def _is_meta(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in META_PATTERNS)


class Source(ABC):
    """A checkpoint readable by byte range. ``describe()`` is what the manifest records as its source."""

    def __init__(self) -> None:
        self.bytes_read = 0

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The manifest's ``source`` fields (kind, and hub id + revision or directory)."""

    @abstractmethod
    def list_files(self) -> list[str]:
        """Every file of the checkpoint (relative paths, '/'-separated)."""

    @abstractmethod
    def _chunks(self, file: str, begin: int, end: int) -> Iterator[bytes]:
        """The bytes ``[begin, end)`` of ``file``, in chunks of at most ``CHUNK`` bytes."""

    def read(self, file: str, begin: int, end: int) -> Iterator[bytes]:
        """Streams ``[begin, end)`` of ``file``, exactly ``end - begin`` bytes, or raises ``ShardError``."""
        if begin == end:
            return
        got = 0
        for chunk in self._chunks(file, begin, end):
            got += len(chunk)
            if got > end - begin:
                raise ShardError(f"{self.label(file)}: source sent more than the {end - begin} bytes asked for")
            self.bytes_read += len(chunk)
            yield chunk
        if got != end - begin:
            raise ShardError(f"{self.label(file)}: source ended after {got} of {end - begin} bytes "
                             f"(range {begin}-{end})")

    def read_bytes(self, file: str, begin: int, end: int) -> bytes:
        return b"".join(self.read(file, begin, end))

    @abstractmethod
    def read_file(self, file: str) -> bytes:
        """A whole small file (config, tokenizer)."""

    def label(self, file: str) -> str:
        d = self.describe()
        return f"{d.get('repo') or d.get('path')}/{file}"

    def weight_files(self) -> list[str]:
        """The safetensors files of the checkpoint: those the index names, else every top-level one."""
        files = self.list_files()
        if INDEX in files:
            try:
                wm = json.loads(self.read_file(INDEX)).get("weight_map")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
                raise CheckpointError(f"{self.label(INDEX)} is not valid JSON: {exc}") from exc
            if not isinstance(wm, dict):
                raise CheckpointError(f"{self.label(INDEX)} has no weight_map object")
            return sorted({str(v) for v in wm.values()})
        out = sorted(f for f in files if f.endswith(".safetensors") and "/" not in f)
        if not out:
            raise CheckpointError(f"no safetensors files in {self.describe()}")
        return out

    def meta_files(self) -> list[str]:
        return sorted(f for f in self.list_files() if _is_meta(f))

    def header(self, file: str) -> tuple[dict[str, TensorEntry], int]:
        """The tensors of safetensors ``file`` and the header's size in bytes (8 + JSON)."""
        return parse_header(lambda begin, end: self.read_bytes(file, begin, end), file, self.label(file))


class DirSource(Source):
    """A local checkpoint directory."""

    def __init__(self, path: str | os.PathLike[str], describe_as: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.path = Path(path).resolve()
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path} is not a checkpoint directory (no config.json)")
        self._describe = describe_as or {"kind": "dir", "path": str(self.path)}

    def describe(self) -> dict[str, Any]:
        return dict(self._describe)

    def list_files(self) -> list[str]:
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(self.path).parts))

    def _chunks(self, file: str, begin: int, end: int) -> Iterator[bytes]:
        try:
            with open(self.path / file, "rb") as f:
                f.seek(begin)
                left = end - begin
                while left > 0:
                    chunk = f.read(min(CHUNK, left))
                    if not chunk:
                        return
                    left -= len(chunk)
                    yield chunk
        except OSError as exc:
            raise ShardError(f"cannot read {self.path / file}: {exc}") from exc

    def read_file(self, file: str) -> bytes:
        try:
            data = (self.path / file).read_bytes()
        except OSError as exc:
            raise ShardError(f"cannot read {self.path / file}: {exc}") from exc
        self.bytes_read += len(data)
        return data


def parse_header(read: Callable[[int, int], bytes], file: str, label: str) -> tuple[dict[str, TensorEntry], int]:
    """The tensors of a safetensors file whose bytes ``read(begin, end)`` gives, checked (dtype width x shape ==
    data size), and the header's size in bytes (8 + JSON); ``label`` names the file in errors."""
    (n,) = struct.unpack("<Q", read(0, 8))
    if n > MAX_HEADER:
        raise CheckpointError(f"{label}: safetensors header of {n} bytes is too large")
    try:
        raw = json.loads(read(8, 8 + n))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{label}: safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{label}: safetensors header is not an object")
    out: dict[str, TensorEntry] = {}
    for name, info in raw.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = str(info["dtype"]), tuple(int(x) for x in info["shape"]), info["data_offsets"]
            b, e = int(b), int(e)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{label}: bad header entry for {name!r}: {exc}") from exc
        width = SAFETENSORS_DTYPES.get(dtype)
        count = 1
        for s in shape:
            count *= s
        if width is None or not 0 <= b <= e or e - b != count * width:
            raise CheckpointError(f"{label}: header entry for {name!r} is inconsistent "
                                  f"(dtype {dtype}, shape {list(shape)}, offsets {b}-{e})")
        out[name] = TensorEntry(file, 8 + n + b, 8 + n + e, dtype, shape)
    return out, 8 + n
