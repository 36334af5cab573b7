"""``ekmesh.hf.from_pretrained``: a transformers model whose dense part is loaded here, without reading any expert
tensor, and whose routed experts run on the mesh through the local node.

Steps: open MODEL (``source.py``: a directory, a stored model or a hub id), connect to the local node's experts
relay for it (so a missing node, another model or experts without a holder fail before anything heavy), build the
transformers model from its config with every parameter on the ``meta`` device (buffers, e.g. rotary tables, are
computed as usual), turn the experts modules' parameters into plain meta tensors (nothing allocated; ``model.to()``
and ``state_dict()`` see only the dense part), then read each non-expert checkpoint tensor by name and assign it.
Checkpoint names are mapped to the model's through transformers' own conversion mapping for the family (renames
such as Mixtral's ``block_sparse_moe`` -> ``mlp``); a tensor that maps into an experts module, or that a converter
would merge into one, is never read. FP8 dense weights are dequantized by ekmesh's reader.

Invariants: after loading, no dense parameter or buffer is left on ``meta`` (else ``MissingTensorError`` naming
it); ``read_log(model)`` lists every tensor read, and none is an expert's; the model is bound to its relay link
(``experts.bind``) before it is returned, in eval mode.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ekmesh.core.errors import ConfigError, MissingTensorError
from ekmesh.hf.experts import NAME, bind, experts_modules, register
from ekmesh.hf.link import open_link
from ekmesh.hf.source import OpenedModel, open_model

log = logging.getLogger(__name__)

_OPENED: weakref.WeakKeyDictionary[torch.nn.Module, OpenedModel] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Every parameter registered inside is moved to ``meta`` at once (``torch.empty`` touched no page of it);
    buffers stay where they were made. (Patches ``nn.Module.register_parameter`` for the duration, as
    accelerate's ``init_empty_weights(include_buffers=False)`` does: build one model at a time.)"""
    original = torch.nn.Module.register_parameter

    def register_parameter(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register_parameter  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def _resolve_dtype(dtype: torch.dtype | str | None, config: Any) -> torch.dtype:
    value = dtype if dtype is not None else getattr(config, "dtype", None)
    if value is None or value == "auto":
        return torch.float32
    if isinstance(value, str):
        found = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(found, torch.dtype):
            raise ConfigError(f"unknown dtype {value!r}")
        return found
    return value


def _drop_expert_params(model: torch.nn.Module) -> tuple[str, ...]:
    """The experts modules' parameters become plain meta attributes (the experts function never reads them); returns
    the experts modules' path prefixes (``"...experts."``)."""
    found = experts_modules(model)
    for _layer, mod in found.values():
        for name in list(mod._parameters):
            p = mod._parameters.pop(name)
            setattr(mod, name, None if p is None else p.detach().to("meta"))
    return tuple(f"{path}." for path in found)


def _dense_state(model: Any, opened: OpenedModel, expert_prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The model's non-expert tensors, read from the checkpoint by name (experts never read)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    wanted = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    reader = opened.reader
    out: dict[str, torch.Tensor] = {}
    for name in reader.names():
        if name.endswith("_scale_inv"):  # FP8 scales: read with their weight (``CheckpointReader.get``)
            continue
        key, merged_by = rename_source_key(name, renamings, converters, model.base_model_prefix, wanted)
        if merged_by is not None or key.startswith(expert_prefixes):
            continue  # an expert tensor (or one a converter would merge into the experts): never read
        current = wanted.get(key)
        if current is None:
            log.debug("checkpoint tensor %s (as %s) is not part of the model; not read", name, key)
            continue
        t = reader.get(name)
        if tuple(t.shape) != tuple(current.shape):
            raise MissingTensorError(name, f"shape {list(t.shape)} in the checkpoint, the model wants "
                                           f"{list(current.shape)}")
        out[key] = t.to(current.dtype) if t.is_floating_point() else t
    return out


def _check_complete(model: torch.nn.Module, label: str) -> None:
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise MissingTensorError(name, f"the model needs it and {label} does not hold it")


def from_pretrained(model: str | os.PathLike[str], *, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None, revision: str | None = None,
                    home: str | os.PathLike[str] | None = None, attn_implementation: str | None = None,
                    **config_kwargs: Any) -> Any:
    """A transformers ``PreTrainedModel`` of ``model`` (a checkpoint directory, a model id / alias in the store, or
    a hub id; ``revision`` for a hub id) whose routed experts run on the mesh through the node of ``home`` (default
    ``$EKMESH_HOME``, whose store also resolves a model id or alias). ``dtype``: of the dense part (default: the
    config's); ``device``: where the dense part goes; other keyword arguments override config values (as
    transformers' ``from_pretrained``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from ekmesh.shard.store import Store

    register()
    store = Store(Path(home) / "store") if home is not None else None  # the node's store (model ids, aliases)
    opened = open_model(model, revision, store)
    link = open_link(opened, Path(home) if home is not None else None)
    config = AutoConfig.from_pretrained(opened.files_dir, **config_kwargs)
    torch_dtype = _resolve_dtype(dtype, config)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "experts_implementation": NAME}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with _params_on_meta():
        hf = AutoModelForCausalLM.from_config(config, **kwargs)
    prefixes = _drop_expert_params(hf)
    missing, unexpected = hf.load_state_dict(_dense_state(hf, opened, prefixes), strict=False, assign=True)
    assert not unexpected, unexpected  # only the model's own keys were read
    if missing:
        hf.tie_weights()  # e.g. tied embeddings: lm_head.weight is not in the checkpoint
    _check_complete(hf, opened.label)
    if (opened.files_dir / "generation_config.json").exists():
        hf.generation_config = GenerationConfig.from_pretrained(opened.files_dir)
    bind(hf, link)
    hf.eval()
    _OPENED[hf] = opened
    if device is not None:
        hf.to(device)
    log.info("loaded the dense part of %s (%d tensors); its experts run on the mesh through %s", opened.label,
             len(opened.read_log), link.home)
    return hf


def read_log(model: torch.nn.Module) -> list[str]:
    """Every checkpoint tensor ``from_pretrained`` read for ``model`` (``name`` or ``name[row]``)."""
    opened = _OPENED.get(model)
    if opened is None:
        raise ConfigError("this model was not loaded by ekmesh.hf.from_pretrained")
    return list(opened.read_log)
