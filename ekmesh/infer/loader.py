"""Loading a model from a Hugging Face checkpoint directory (config.json + safetensors shards + optional index).

Responsibilities:
- ``CheckpointReader`` (``has`` / ``shape`` / ``raw(name, index)`` / ``get`` / ``swiglu_expert`` / ``read_log``)
  reads single tensors (or one expert's row of a fused tensor) lazily from a ``TensorSource``, dequantizes FP8
  block-scaled weights (``weight_scale_inv``) on ``get`` but keeps them as stored (``QuantizedTensor`` fp8) on
  ``weight``, which routed experts are read with, and logs every read so callers can prove what was touched.
  ``DirectorySource`` is the safetensors-directory source; the registry's store is another (it lives in
  ``ekmesh.shard`` and satisfies the protocol structurally: infer never imports shard, and the wiring layer opens
  it with ``Checkpoint.from_source``).
- ``load_dense`` builds the dense part on the meta device and materialises only dense tensors: no expert tensor
  is read. ``load_experts`` reads a chosen set of (layer, expert) into an experts backend, and nothing else.
- Errors name the tensor (``MissingTensorError``, ``TensorShapeError``) or list the supported architectures.

Expert tensor layouts understood by ``CheckpointReader.swiglu_expert``: one tensor per expert
(``{prefix}.{e}.gate_proj.weight`` ...) and the transformers-v5 fused layout (``{prefix}.gate_up_proj`` [E, 2I, D],
``{prefix}.down_proj`` [E, D, I]). Families with other layouts (gpt-oss) read their own.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open

from ekmesh.core.errors import CheckpointError, ConfigError, MissingTensorError, TensorShapeError
from ekmesh.infer.expert import ExpertSpec, ExpertWeights, expert_from_tensors
from ekmesh.infer.experts import LocalExperts
from ekmesh.infer.models import family_for
from ekmesh.infer.models.common import CausalLM
from ekmesh.infer.models.family import Family, ModelConfig
from ekmesh.infer.qtensor import QuantizedTensor, cat_rows, expert_prefix, tensor_names
from ekmesh.infer.quant import dequant_fp8_block, fp8_block_size

log = logging.getLogger(__name__)

def _float(t: torch.Tensor | QuantizedTensor) -> torch.Tensor:
    return t.dequantize() if isinstance(t, QuantizedTensor) else t


_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} not found") from exc
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


class TensorSource(Protocol):
    """Where a ``CheckpointReader`` gets stored tensors: a checkpoint directory, the registry's store, headers.

    ``read`` returns the tensor ``name`` (or its ``index``-th row along dim 0) exactly as stored; ``shape`` reads no
    data. Implementations raise ``MissingTensorError`` for a name they do not hold, ``CheckpointError`` (or a
    subclass) when the bytes cannot be read. Structural: an implementation need not import infer.
    """

    def names(self) -> list[str]: ...
    def has(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def read(self, name: str, index: int | None) -> torch.Tensor: ...


class CheckpointReader:
    """Lazy, logged access to a checkpoint's tensors, over any ``TensorSource``: what the loader and the families
    read through. ``raw`` logs every read in ``read_log`` (``name`` or ``name[index]``); ``get`` dequantizes and
    ``swiglu_expert`` lays out experts identically whatever the source."""

    def __init__(self, source: TensorSource, quantization_config: dict[str, Any] | None = None) -> None:
        self.source = source
        self.fp8_block = fp8_block_size(quantization_config) or (128, 128)
        self.read_log: list[str] = []

    def names(self) -> list[str]:
        return self.source.names()

    def has(self, name: str) -> bool:
        return self.source.has(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(name)

    def raw(self, name: str, index: int | None = None) -> torch.Tensor:
        """The stored tensor (or its ``index``-th row along dim 0), as stored; logged in ``read_log``."""
        t = self.source.read(name, index)
        self.read_log.append(name if index is None else f"{name}[{index}]")
        return t

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        """A float tensor: FP8 weights are dequantized with their ``weight_scale_inv`` blocks."""
        t = self.raw(name, index)
        if t.dtype in _FP8:
            t = dequant_fp8_block(t, self._scale_inv(name, index), self.fp8_block, name=name)
        return t

    def weight(self, name: str, index: int | None = None) -> torch.Tensor | QuantizedTensor:
        """A tensor as the checkpoint keeps it: a 2-D block-FP8 weight as a ``QuantizedTensor`` (its bytes and
        scales, not expanded); anything else as ``get`` gives it."""
        t = self.raw(name, index)
        if t.dtype not in _FP8:
            return t
        scale = self._scale_inv(name, index)
        if t.dtype != torch.float8_e4m3fn or t.dim() != 2:  # dequant_fp8_block refuses it, with the reason
            return dequant_fp8_block(t, scale, self.fp8_block, name=name)
        return QuantizedTensor.fp8(t, scale, self.fp8_block, name)

    def _scale_inv(self, name: str, index: int | None) -> torch.Tensor:
        scale_name = name + "_scale_inv"
        if not self.has(scale_name):
            raise MissingTensorError(scale_name, f"needed to dequantize FP8 tensor {name!r}")
        return self.raw(scale_name, index)

    def swiglu_expert(self, prefix: str, expert: int, spec: ExpertSpec,
                      names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> ExpertWeights:
        """One SwiGLU expert from per-expert tensors or the fused v5 layout (see module docstring); block-FP8
        weights stay FP8 (``weight``)."""
        g, u, d = (f"{prefix}.{expert}.{n}.weight" for n in names)
        if self.has(g):
            gate, up = self.weight(g), self.weight(u)
            if isinstance(gate, QuantizedTensor) and isinstance(up, QuantizedTensor):
                gate_up: torch.Tensor | QuantizedTensor = cat_rows([gate, up], g)  # [2I, D]
            else:
                gate_up = torch.cat([_float(gate), _float(up)], dim=0)  # [2I, D]
            down = self.weight(d)
            if isinstance(gate_up, QuantizedTensor) != isinstance(down, QuantizedTensor):  # mixed: expand both
                gate_up, down = _float(gate_up), _float(down)
            w = ExpertWeights(gate_up, down)  # [2I, D], [D, I]
        elif self.has(f"{prefix}.gate_up_proj"):
            for fused in (f"{prefix}.gate_up_proj", f"{prefix}.down_proj"):
                shp = self.shape(fused)
                if len(shp) != 3 or shp[0] != spec.num_experts:
                    raise TensorShapeError(fused, f"[{spec.num_experts}, ...]", shp)
            gu_w, dn_w = self.weight(f"{prefix}.gate_up_proj", expert), self.weight(f"{prefix}.down_proj", expert)
            if isinstance(gu_w, QuantizedTensor) != isinstance(dn_w, QuantizedTensor):  # mixed: expand both
                gu_w, dn_w = _float(gu_w), _float(dn_w)
            w = ExpertWeights(gu_w, dn_w)
        else:
            raise MissingTensorError(g, f"nor fused {prefix}.gate_up_proj")
        w.check(spec, f"{prefix}.{expert}")
        return w


class DirectorySource:
    """A checkpoint directory as a ``TensorSource``: one safetensors file, or several with an index."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._handles: dict[str, Any] = {}
        index = self.path / "model.safetensors.index.json"
        self._where: dict[str, str] = {}
        if index.exists():
            wm = read_json(index).get("weight_map")
            if not isinstance(wm, dict):
                raise CheckpointError(f"{index} has no weight_map object")
            self._where = {str(k): str(v) for k, v in wm.items()}
            for fname in sorted(set(self._where.values())):
                if not (self.path / fname).is_file():
                    raise CheckpointError(f"{index} names shard {fname!r}, which is not in {self.path}")
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no safetensors files in {self.path}")
            for fname in files:
                for name in self._open(fname).keys():  # noqa: SIM118  (a safe_open handle is not iterable)
                    self._where[name] = fname

    def _open(self, fname: str) -> Any:
        h = self._handles.get(fname)
        if h is None:
            try:
                h = safe_open(str(self.path / fname), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"cannot read safetensors file {self.path / fname}: {exc}") from exc
            self._handles[fname] = h
        return h

    def names(self) -> list[str]:
        return sorted(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def _slice(self, name: str) -> Any:
        fname = self._where.get(name)
        if fname is None:
            raise MissingTensorError(name)
        try:
            return self._open(fname).get_slice(name)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read tensor {name!r} from {fname}: {exc}") from exc

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, index: int | None) -> torch.Tensor:
        sl = self._slice(name)
        try:
            return sl[index] if index is not None else sl[:]
        except (SafetensorError, OSError, IndexError) as exc:
            raise CheckpointError(f"cannot read tensor {name!r}: {exc}") from exc


def family_config(hf: dict[str, Any], where: str) -> tuple[Family[Any], ModelConfig]:
    """The family of a config.json dict and its parsed config; ``ConfigError`` naming ``where`` if it is invalid."""
    fam = family_for(hf)
    try:
        return fam, fam.Config.from_hf_config(hf)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: invalid value: {exc}") from exc


@dataclass
class Checkpoint:
    """A checkpoint resolved to its family and parsed config, read through ``reader``.

    ``path`` is the directory holding ``config.json`` and the tokenizer files (for a store-backed checkpoint, a
    private directory of verified copies); ``label`` is how messages name the checkpoint (its path, or a model
    id / alias). ``experts_format`` is None when the routed experts are read in the family's own checkpoint layout,
    else ``{"format": "q8" | "q4", ...}``: a quantized model's experts, stored in ekmesh's expert layout
    (``qtensor``) and kept quantized; ``read_expert`` reads either.
    """

    path: Path
    hf_config: dict[str, Any]
    family: Family[Any]  # Any: the family of this checkpoint's ``config`` (see models/family.py)
    config: ModelConfig
    reader: CheckpointReader
    label: str = ""
    experts_format: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.label:
            self.label = str(self.path)

    def read_expert(self, layer: int, expert: int) -> ExpertWeights:
        """One routed expert: through the family's ``read_expert``, or a quantized model's stored expert."""
        if self.experts_format is None:
            return self.family.read_expert(self.reader, self.config, layer, expert)
        fmt, spec, prefix = self.experts_format["format"], self.config.expert_spec(), expert_prefix(layer, expert)
        names = [*tensor_names(fmt, f"{prefix}.gate_up"), *tensor_names(fmt, f"{prefix}.down")]
        if spec.bias:
            names += [f"{prefix}.gate_up_bias", f"{prefix}.down_bias"]
        return expert_from_tensors({n: self.reader.raw(n) for n in names}, prefix, spec, fmt)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Checkpoint:
        """A checkpoint directory (config.json + safetensors shards)."""
        p = Path(path)
        if not p.is_dir():
            raise CheckpointError(f"{p} is not a checkpoint directory")
        hf = read_json(p / "config.json")
        fam, cfg = family_config(hf, str(p / "config.json"))
        return cls(p, hf, fam, cfg, CheckpointReader(DirectorySource(p), hf.get("quantization_config")))

    @classmethod
    def from_source(cls, files_dir: Path, hf: dict[str, Any], source: TensorSource,
                    label: str = "", experts_format: dict[str, Any] | None = None) -> Checkpoint:
        """A checkpoint from its HF config and any tensor source (e.g. the registry's store)."""
        fam, cfg = family_config(hf, label or str(files_dir / "config.json"))
        return cls(files_dir, hf, fam, cfg, CheckpointReader(source, hf.get("quantization_config")), label,
                   experts_format)

    def expert_addresses(self) -> list[tuple[int, int]]:
        """Every routed (layer, expert) of the model, layers ascending."""
        return [(layer, e) for layer in range(self.config.num_layers) if self.config.moe_layers[layer]
                for e in range(self.config.num_experts)]


def load_dense(ckpt: Checkpoint, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> CausalLM:
    """Builds the dense part on the meta device and materialises it from the checkpoint; reads no expert."""
    with torch.device("meta"):
        model = ckpt.family.build(ckpt.config)
    state: dict[str, torch.Tensor] = {}
    tied = ckpt.config.tie_word_embeddings
    for name, param in model.named_parameters():
        if tied and name == "lm_head.weight":
            continue
        candidates = ckpt.family.checkpoint_names(name)
        found = next((c for c in candidates if ckpt.reader.has(c)), None)
        if found is None:
            raise MissingTensorError(candidates[0])
        shape = ckpt.reader.shape(found)
        if tuple(shape) != tuple(param.shape):
            raise TensorShapeError(found, tuple(param.shape), tuple(shape))
        keep32 = any(name.endswith(s) for s in ckpt.family.KEEP_FP32)
        state[name] = ckpt.reader.get(found).to(device=device, dtype=torch.float32 if keep32 else dtype)
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.requires_grad_(False)
    model.eval()
    return model


def load_experts(ckpt: Checkpoint, backend: LocalExperts,
                 which: Iterable[tuple[int, int]] | None = None) -> int:
    """Reads the given (layer, expert) pairs (default: all) into ``backend``; returns how many were loaded."""
    valid = set(ckpt.expert_addresses())
    n = 0
    for layer, expert in (ckpt.expert_addresses() if which is None else which):
        if (layer, expert) not in valid:
            raise ConfigError(f"(layer={layer}, expert={expert}) is not a routed expert of this model")
        backend.add(layer, expert, ckpt.read_expert(layer, expert))
        n += 1
    return n


def load_all(source: str | os.PathLike[str] | Checkpoint, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> tuple[Checkpoint, CausalLM, LocalExperts]:
    """One-process convenience: the dense part and every routed expert, on one device.

    ``source`` is a checkpoint directory or an opened ``Checkpoint`` (e.g. one from the registry)."""
    ckpt = source if isinstance(source, Checkpoint) else Checkpoint.open(source)
    model = load_dense(ckpt, device, dtype)
    experts = LocalExperts(ckpt.config.expert_spec(), device, dtype)
    load_experts(ckpt, experts)
    return ckpt, model, experts
