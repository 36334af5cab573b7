"""The one-process engine: an ``Engine`` over a model whose experts are all local, for development and as the
exactness reference of the mesh API (``python -m ekmesh.api --model builtin``).

A stored model goes by the names a node's API accepts for it (``registry.lookup.names_of``: its aliases here and
the hub id it was imported from), beside its id; a checkpoint directory by its path."""

from __future__ import annotations

import threading

from ekmesh.api.types import ServedModel, context_of
from ekmesh.core.errors import EkmeshError


class LocalEngine:
    """An ``Engine`` over a one-process model (every expert local): for development and as the exactness
    reference of the mesh API."""

    def __init__(self, model: str, device: str | None = None, dtype: str | None = None) -> None:
        from ekmesh.infer.session import LocalModel
        from ekmesh.registry.lookup import names_of, open_model, resolve_store

        lm = LocalModel.open(open_model(model), device, dtype)
        mid, names = model, []
        try:
            mid = resolve_store(model).resolve(model)
            names = names_of(mid)
        except EkmeshError:
            pass  # a checkpoint directory: named by its path
        self.model = ServedModel(mid, names, lm.generator, lm.tokenizer, context_of(lm.checkpoint.hf_config),
                                 lock=threading.Lock() if lm.generator.cuda_graphs else None)

    def served(self) -> list[ServedModel]:
        return [self.model]

    def why_not(self) -> str:
        return ""
