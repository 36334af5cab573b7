"""Model families, one module per architecture family, and the lookup from a Hugging Face config to its family.

A family module exposes: ``ARCHITECTURES`` and ``MODEL_TYPES`` (what it claims), ``KEEP_FP32`` (parameters loaded
in fp32), ``Config`` (a frozen dataclass with ``from_hf_config(dict)`` and ``expert_spec()``),
``build(config) -> CausalLM`` (dense part only; routed experts live in an experts backend),
``checkpoint_names(param_name)`` (checkpoint aliases of a parameter) and
``read_expert(reader, config, layer, expert) -> ExpertWeights``. The contract is typed in ``family.py``
(``Family``); ``FAMILIES`` is checked against it module by module.
"""

from __future__ import annotations

from typing import Any

from ekmesh.core.errors import UnsupportedArchitectureError
from ekmesh.infer.models import deepseek, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3, qwen3_moe
from ekmesh.infer.models.family import Family

# Any: each family takes only its own Config; which one a checkpoint has is known at runtime (family.py)
FAMILIES: tuple[Family[Any], ...] = (qwen3_moe, qwen2_moe, mixtral, olmoe, gpt_oss, deepseek, qwen3)


def supported_architectures() -> list[str]:
    return sorted(a for f in FAMILIES for a in f.ARCHITECTURES)


def family_for(hf: dict[str, Any]) -> Family[Any]:
    """The family module for a config.json dict (by ``architectures``, else ``model_type``)."""
    archs = hf.get("architectures") or []
    for fam in FAMILIES:
        if any(a in fam.ARCHITECTURES for a in archs):
            return fam
    mt = hf.get("model_type")
    for fam in FAMILIES:
        if mt in fam.MODEL_TYPES:
            return fam
    got = ", ".join(archs) or mt or "none given"
    raise UnsupportedArchitectureError(
        f"unsupported architecture {got!r}; supported: {', '.join(supported_architectures())}")
