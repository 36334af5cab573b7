"""Which stored tensors (and rows) the dense part and each routed expert read, learnt without reading weights.

Role: a ``MetaSource`` answers ``has`` / ``shape`` from a table of (safetensors dtype, shape) — e.g. parsed
safetensors headers — and returns meta tensors, so ``load_dense`` and each family's ``read_expert`` run without a
byte of weights while ``read_log`` records exactly what they would read (``name`` or ``name[e]`` for one row of a
fused tensor). That makes the answer generic over every family and layout (per-expert names, fused v5 tensors,
gpt-oss MXFP4, FP8 with ``_scale_inv``). Tensors neither part reads (e.g. DeepSeek-V3's multi-token-prediction
layer) appear nowhere. The registry uses this to cut a checkpoint into blobs; it is handed ``read_plan`` by the
wiring layer, since shard does not import infer.

Invariant: every expert's key list is non-empty; dense keys are in first-read order, without repeats.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ekmesh.core.errors import CheckpointError, MissingTensorError
from ekmesh.infer.loader import Checkpoint, load_dense

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}
for _st, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"),
                   ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        TORCH_DTYPES[_st] = getattr(torch, _attr)


class MetaSource:
    """A ``TensorSource`` of meta tensors built from ``{name: (safetensors dtype, shape)}``."""

    def __init__(self, table: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        self.table = table

    def names(self) -> list[str]:
        return sorted(self.table)

    def has(self, name: str) -> bool:
        return name in self.table

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.table:
            raise MissingTensorError(name)
        return tuple(self.table[name][1])

    def read(self, name: str, index: int | None) -> torch.Tensor:
        if name not in self.table:
            raise MissingTensorError(name)
        st, shape = self.table[name]
        dtype = TORCH_DTYPES.get(st)
        if dtype is None:
            raise CheckpointError(f"tensor {name!r} has dtype {st}, which this torch cannot represent")
        if index is not None and (not shape or not 0 <= index < shape[0]):
            raise CheckpointError(f"row {index} is outside tensor {name!r} of shape {list(shape)}")
        return torch.empty(tuple(shape) if index is None else tuple(shape[1:]), dtype=dtype, device="meta")


@dataclass
class ReadPlan:
    dense: list[str]  # keys load_dense reads
    experts: dict[tuple[int, int], list[str]]  # (layer, expert) -> keys read_expert reads
    num_layers: int
    num_experts: int


def read_plan(hf: dict[str, Any], table: dict[str, tuple[str, tuple[int, ...]]], label: str = "") -> ReadPlan:
    ckpt = Checkpoint.from_source(Path("."), hf, MetaSource(table), label)
    reader = ckpt.reader
    load_dense(ckpt, device="meta")
    dense = list(dict.fromkeys(reader.read_log))
    experts: dict[tuple[int, int], list[str]] = {}
    for layer, e in ckpt.expert_addresses():
        reader.read_log.clear()
        ckpt.family.read_expert(reader, ckpt.config, layer, e)
        keys = list(dict.fromkeys(reader.read_log))
        if not keys:
            raise CheckpointError(f"{label}: expert ({layer}, {e}) reads no tensor")
        experts[(layer, e)] = keys
    return ReadPlan(dense, experts, ckpt.config.num_layers, ckpt.config.num_experts)
