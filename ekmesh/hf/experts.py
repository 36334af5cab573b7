"""The ``"ekmesh"`` experts implementation of transformers' ``ExpertsInterface``: a MoE block's routed experts
computed on the mesh through the local node's experts relay.

transformers 5 routes the experts of every MoE family ekmesh serves (qwen3_moe, qwen2_moe, mixtral, olmoe,
deepseek_v2, deepseek_v3, gpt_oss: each experts class is decorated with ``use_experts_implementation``) through
``ExpertsInterface.get_interface(config._experts_implementation)``, calling ``fn(experts_module, hidden_states
[T, D], top_k_index [T, k], top_k_weights [T, k]) -> [T, D]`` after the block's own router: the same seam as
ekmesh's ``ExpertsBackend`` once the decoder layer index is known.

Binding: ``bind(model, link)`` maps each experts module of ``model`` to (relay link, layer index, parsed from its
module path ``...layers.<i>...``), held in a weak map (a module is never modified). ``ekmesh.hf.from_pretrained``
binds before returning. A model built by transformers itself (``AutoModelForCausalLM.from_pretrained(path,
experts_implementation="ekmesh")``) is bound on its first forward: the function finds the ``PreTrainedModel`` whose
``forward`` is running in the caller's frames, opens a link for ``model.config.name_or_path`` (as
``from_pretrained``'s MODEL) and binds all of its experts modules at once.

Not responsible for: loading weights (``load.py``), the wire (``link.py``). Gradients do not flow through the mesh:
the experts' output is a constant to autograd (a LoRA on the dense part trains with it as such).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import weakref
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch

from ekmesh.core.errors import ConfigError
from ekmesh.hf.link import RelayLink, open_link
from ekmesh.hf.source import open_model

log = logging.getLogger(__name__)

NAME = "ekmesh"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_MAX_FRAMES = 64  # how far up the stack the first call looks for its model


@dataclass(frozen=True)
class Bound:
    link: RelayLink
    layer: int


_BOUND: weakref.WeakKeyDictionary[torch.nn.Module, Bound] = weakref.WeakKeyDictionary()
_BIND_LOCK = threading.Lock()


def is_experts_module(module: torch.nn.Module) -> bool:
    """An experts module transformers dispatches through ``ExpertsInterface`` (its class was decorated with
    ``use_experts_implementation``, which sets these attributes on every instance)."""
    return isinstance(getattr(module, "has_gate", None), bool) and hasattr(module, "is_concatenated") \
        and hasattr(module, "num_experts")


def experts_modules(model: torch.nn.Module) -> dict[str, tuple[int, torch.nn.Module]]:
    """module path -> (decoder layer index, experts module) for every experts module of ``model``."""
    out: dict[str, tuple[int, torch.nn.Module]] = {}
    for name, mod in model.named_modules():
        if is_experts_module(mod):
            m = _LAYER.search(name + ".")
            if m is None:
                raise ConfigError(f"experts module {name!r} is not under a numbered decoder layer (layers.<i>)")
            out[name] = (int(m.group(1)), mod)
    return out


def bind(model: torch.nn.Module, link: RelayLink) -> int:
    """Routes every experts module of ``model`` to ``link``; returns how many."""
    found = experts_modules(model)
    if not found:
        raise ConfigError(f"{type(model).__name__} has no experts module that transformers' ExpertsInterface "
                          "dispatches: nothing to compute on the mesh")
    with _BIND_LOCK:
        for layer, mod in found.values():
            _BOUND[mod] = Bound(link, layer)
    return len(found)


def bound_link(model: torch.nn.Module) -> RelayLink | None:
    """The link ``model``'s experts are bound to, if any."""
    for _layer, mod in experts_modules(model).values():
        b = _BOUND.get(mod)
        if b is not None:
            return b.link
    return None


def _bind_from_caller(module: torch.nn.Module) -> Bound:
    """First call of a module transformers built: bind the model whose forward is on the stack."""
    from transformers import PreTrainedModel

    frame: FrameType | None = sys._getframe(2)
    model: PreTrainedModel | None = None
    for _ in range(_MAX_FRAMES):
        if frame is None:
            break
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, PreTrainedModel) and any(m is module for m in candidate.modules()):
            model = candidate  # keep going: the outermost model (e.g. ForCausalLM around its base model)
        frame = frame.f_back
    if model is None:
        raise ConfigError("an experts module with experts_implementation='ekmesh' was called outside a "
                          "transformers model's forward; bind it first with ekmesh.hf.bind(model, link)")
    with _BIND_LOCK:
        b = _BOUND.get(module)
        if b is not None:  # another thread bound it meanwhile
            return b
    bind(model, open_link(open_model(str(model.config.name_or_path))))
    return _BOUND[module]


def experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The registered function: ``hidden_states`` [..., D], ``top_k_index`` / ``top_k_weights`` [..., k] (the
    block's own routing) -> [..., D], per token the weighted sum of its k experts, computed on the mesh."""
    b = _BOUND.get(self)
    if b is None:
        b = _bind_from_caller(self)
    d, k = hidden_states.shape[-1], top_k_index.shape[-1]
    out = b.link(b.layer, hidden_states.reshape(-1, d), top_k_index.reshape(-1, k),
                 top_k_weights.reshape(-1, k))  # [T, D]
    return out.view(hidden_states.shape)


def register() -> None:
    """Registers ``experts_forward`` as ``experts_implementation="ekmesh"`` (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, experts_forward)
