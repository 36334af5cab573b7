"""The bytes of a tensor blob: a safetensors file built deterministically from source byte ranges.

Role: given a blob's keys (``name`` or ``name[e]``) and the manifest's source tensors, say which source ranges make
up the blob and produce its header; ``stream_blob`` yields the whole blob, chunk by chunk, from a ``Source``.
The same keys and source always give the same bytes, so a blob fetched later (partial import, another peer) can
be checked against the id the manifest recorded.

Layout: 8-byte little-endian header length N, the header JSON (sorted keys, no whitespace, ``__metadata__``
``{"format": "pt"}``, padded with spaces to a multiple of 8 as safetensors does), then each tensor's source bytes
unchanged (FP8 / MXFP4 stay quantized), in key order, contiguous. A row ``name[e]`` has the source tensor's
shape without dim 0.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ekmesh.shard.manifest import split_key
from ekmesh.shard.source import Source, TensorEntry


@dataclass(frozen=True)
class Part:
    """One tensor of a blob and the source range its bytes come from."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    begin: int
    end: int


def parts_for(keys: list[str], tensors: dict[str, TensorEntry]) -> list[Part]:
    out = []
    for key in sorted(keys):
        name, index = split_key(key)
        t = tensors[name]
        if index is None:
            out.append(Part(key, t.dtype, t.shape, t.file, t.begin, t.end))
        else:
            b, e = t.row(index)
            out.append(Part(key, t.dtype, t.shape[1:], t.file, b, e))
    return out


def header_bytes(parts: list[Part]) -> bytes:
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for p in parts:
        n = p.end - p.begin
        meta[p.key] = {"dtype": p.dtype, "shape": list(p.shape), "data_offsets": [off, off + n]}
        off += n
    js = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js


def blob_size(parts: list[Part]) -> int:
    return len(header_bytes(parts)) + sum(p.end - p.begin for p in parts)


def payload_size(parts: list[Part]) -> int:
    return sum(p.end - p.begin for p in parts)


def _coalesce(parts: list[Part]) -> list[tuple[str, int, int]]:
    """Adjacent source ranges of consecutive parts merged into one read (one HTTP request)."""
    runs: list[tuple[str, int, int]] = []
    for p in parts:
        if runs and runs[-1][0] == p.file and runs[-1][2] == p.begin:
            runs[-1] = (p.file, runs[-1][1], p.end)
        else:
            runs.append((p.file, p.begin, p.end))
    return runs


def stream_blob(parts: list[Part], source: Source) -> Iterator[bytes]:
    yield header_bytes(parts)
    for file, begin, end in _coalesce(parts):
        yield from source.read(file, begin, end)
