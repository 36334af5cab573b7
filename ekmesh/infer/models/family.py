"""The model-family contract, as typing protocols: what a family module provides and what it needs of a reader.

Role: ``Family`` is what the loader (``ekmesh.infer.loader``), the read planner and the serving node use of a
family module; ``ModelConfig`` is what they use of the config it parses; ``ExpertReader`` is what a family's
``read_expert`` uses of the tensor reader it is handed. A family is a plain module (``qwen3_moe``, ``deepseek``...):
a module satisfies a protocol through its module-level names, so ``FAMILIES: tuple[Family[Any], ...]`` is checked
member by member, and nothing here exists at runtime beyond the protocol classes.

Invariants:
- ``Family`` is generic in its config class ``C``: ``build`` and ``read_expert`` accept only the config that its own
  ``Config.from_hf_config`` returns. Which family (so which ``C``) a checkpoint has is known only at runtime, so
  code that holds any family uses ``Family[Any]`` next to a ``ModelConfig``; every result it gets back is typed.
- Module constants are modelled as read-only properties: a module-level ``ARCHITECTURES = ("X",)`` is a
  ``tuple[str]``, which a settable ``tuple[str, ...]`` member would reject.
- ``ExpertReader`` is ``ekmesh.infer.loader.CheckpointReader``'s reading surface. A ``TensorSource`` (a directory,
  the registry's ``StoreTensors``, ``MetaSource``) is not one: a ``CheckpointReader`` wraps it, adding FP8
  dequantization, the read log and the SwiGLU expert layouts. Kept structural so family files need not import
  the loader (which imports this package).
"""

# ruff: noqa: N802  (the protocols' properties stand for module constants and the Config class; names must match)
from __future__ import annotations

from typing import Any, Protocol, TypeVar

import torch

from ekmesh.infer.expert import ExpertSpec, ExpertWeights
from ekmesh.infer.models.common import CausalLM


class ModelConfig(Protocol):
    """What code outside a family reads of its parsed config (a frozen dataclass; hence read-only members)."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_experts(self) -> int: ...
    @property
    def moe_layers(self) -> tuple[bool, ...]: ...  # per global layer: routed experts (True) or a dense MLP
    @property
    def tie_word_embeddings(self) -> bool: ...
    def expert_spec(self) -> ExpertSpec: ...


C = TypeVar("C", bound=ModelConfig)
C_co = TypeVar("C_co", bound=ModelConfig, covariant=True)


class ConfigClass(Protocol[C_co]):
    """A family's ``Config`` class object: parses a config.json dict (``ConfigError`` / ``ValueError`` if bad)."""

    def from_hf_config(self, hf: dict[str, Any]) -> C_co: ...


class ExpertReader(Protocol):
    """The tensor reader a family's ``read_expert`` reads through (``CheckpointReader`` is the implementation).

    ``raw`` returns a tensor (or its ``index``-th row along dim 0) as stored, ``get`` the same as a float tensor
    (FP8 dequantized); both raise ``MissingTensorError`` for an unknown name. ``swiglu_expert`` reads one SwiGLU
    expert from per-expert tensors named ``{prefix}.{expert}.{names[i]}.weight`` or the fused v5 layout.
    """

    def has(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def raw(self, name: str, index: int | None = None) -> torch.Tensor: ...
    def get(self, name: str, index: int | None = None) -> torch.Tensor: ...
    def swiglu_expert(self, prefix: str, expert: int, spec: ExpertSpec,
                      names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> ExpertWeights: ...


class Family(Protocol[C]):
    """A model-family module. ``C`` is its config dataclass (see the module docstring for ``Family[Any]``)."""

    @property
    def ARCHITECTURES(self) -> tuple[str, ...]: ...  # HF ``architectures`` entries it claims
    @property
    def MODEL_TYPES(self) -> tuple[str, ...]: ...  # HF ``model_type`` values it claims (when no architecture matches)
    @property
    def KEEP_FP32(self) -> tuple[str, ...]: ...  # parameter-name suffixes loaded in fp32 whatever the model dtype
    @property
    def Config(self) -> ConfigClass[C]: ...

    def build(self, cfg: C) -> CausalLM:
        """The dense part (routed experts live in an experts backend), on the current default device."""

    def checkpoint_names(self, name: str) -> list[str]:
        """Checkpoint names to try, in order, for the model parameter ``name``."""

    def read_expert(self, reader: ExpertReader, cfg: C, layer: int, expert: int) -> ExpertWeights:
        """One routed expert of one layer, checked against ``cfg.expert_spec()``, reading only its tensors/rows."""
