"""What the API serves, apart from HTTP: a served model, the engine that lists them, how a request's model name is
resolved (the API's errors are in ``core.errors`` under ``ApiError``).

A request's ``model`` names a served model by its id, a name it goes by here (an alias in the store, the hub id it
was imported from), a unique id prefix, or a name the live mesh advertises for it (``ServedModel.mesh_names``, fed
by the node from its view). Local names win over the mesh's; a mesh name that live peers give different models is
refused (400, naming every id and its peers) rather than guessed.

The node (an attention host over the mesh) and the one-process engine (``api.local``) produce these; the HTTP
server (``api.server``) consumes them. Nothing here imports torch at run time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ekmesh.core.errors import AmbiguousModelNameError, BadRequestError, NotServingError, UnknownModelError

if TYPE_CHECKING:  # torch is imported only where a model is served: a node without one never loads it
    from ekmesh.infer.generate import Generator
    from ekmesh.infer.tokenizer import Tokenizer


@dataclass
class ServedModel:
    """What the API needs of one model: ids, tokenizer, a generator, and (on a mesh) per-peer round-trip counters
    ``peer_stats() -> {peer: (round_trips, total_rtt_s)}`` and verification counters ``verify_stats()`` (the
    ``status()`` of ``infer.dataplane.verify.Verifier``: counts, and a list of bans that only grows), and
    ``mesh_warning() -> str | None``: why answers may not be what the user expects of a mesh (e.g. this node is
    alone because its bootstrap peers do not admit it), added to every answer's ``ekmesh`` block as ``warning``.
    ``aliases``: the names it goes by here (store aliases, hub id); ``mesh_names() -> {name: {model id: peers}}``:
    the names live peers advertise (``discovery.names``), this node's own advert included."""

    model_id: str
    aliases: list[str]
    generator: Generator
    tokenizer: Tokenizer | None
    context: int
    created: int = field(default_factory=lambda: int(time.time()))
    peer_stats: Callable[[], dict[str, tuple[int, float]]] | None = None
    verify_stats: Callable[[], dict[str, Any]] | None = None
    mesh_warning: Callable[[], str | None] | None = None
    lock: threading.Lock | None = None  # held around a whole generation when the generator is not re-entrant
    mesh_names: Callable[[], Mapping[str, Mapping[str, Sequence[str]]]] | None = None

    def names(self) -> set[str]:
        """Its id, its names here, and the names the live mesh advertises for it."""
        mesh = self.mesh_names() if self.mesh_names is not None else {}
        return {self.model_id, *self.aliases, *(n for n, by in mesh.items() if self.model_id in by)}


class Engine(Protocol):
    def served(self) -> list[ServedModel]:
        """The models this node can answer with now (may be empty)."""
        ...

    def why_not(self) -> str:
        """Why ``served()`` is empty (shown to clients)."""
        ...


def resolve(engine: Engine, name: str | None) -> ServedModel:
    models = engine.served()
    if not models:
        raise NotServingError(engine.why_not())
    if not name:
        return models[0]
    for m in models:
        if name == m.model_id or name in m.aliases:
            return m
    matches = [m for m in models if len(name) >= 6 and m.model_id.startswith(name)]
    if len(matches) == 1:
        return matches[0]
    mesh = next((m.mesh_names() for m in models if m.mesh_names is not None), {})
    by = mesh.get(name, {})
    if len(by) > 1:
        ambiguous = AmbiguousModelNameError(name, by)
        raise BadRequestError(str(ambiguous), param="model") from ambiguous
    for m in models:
        if m.model_id in by:
            return m
    elsewhere = f"; in the mesh it is model {next(iter(by))}, which this node does not serve" if by else ""
    raise UnknownModelError(f"model {name!r} is not served here (serving: "
                            f"{', '.join(sorted(n for m in models for n in m.names()))}){elsewhere}")


def context_of(hf_config: dict[str, Any]) -> int:
    """The longest sequence (prompt + answer) served for a model with this HF config."""
    n = hf_config.get("max_position_embeddings")
    return n if isinstance(n, int) and n > 0 else 4096
