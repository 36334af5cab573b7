"""Model names in the live mesh: which names the live peers' signed adverts give which models, and lookups.

A peer that serves a model advertises the names it knows it by (``Advert.names``: its store's aliases, the hub id it
was imported from, the name it was started with). ``MeshNames.of(adverts)`` turns the live adverts into a table
``name -> {model id -> peers}``, so a node whose store does not know a name (``join --model NAME``, the API's
``model`` field) can find the model the mesh means by it.

Not responsible for: the local store (callers look there first: a user's own alias wins), which adverts are live
(the caller passes them), validating names (``advert`` does, before an advert is used).

Invariants: a name that live peers advertise for two different models resolves to neither
(``AmbiguousModelNameError`` lists every id and the peers behind it); peers are shown as ``"name (peer id)"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ekmesh.core.errors import AmbiguousModelNameError
from ekmesh.discovery.advert import Advert

MIN_PREFIX = 8  # hex digits a model id prefix needs to be looked up in the mesh (as the store asks)


def peer_label(advert: Advert) -> str:
    return f"{advert.name} ({advert.peer_id})"


@dataclass(frozen=True)
class MeshNames:
    """``table``: name -> {model id -> peers advertising it under that name}; ``ids``: model id -> peers advertising
    it (its experts, or a name for it)."""

    table: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)
    ids: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, adverts: Iterable[Advert]) -> MeshNames:
        table: dict[str, dict[str, set[str]]] = {}
        ids: dict[str, set[str]] = {}
        for a in adverts:
            label = peer_label(a)
            for name, model_id in a.names.items():
                table.setdefault(name, {}).setdefault(model_id, set()).add(label)
                ids.setdefault(model_id, set()).add(label)
            for model_id in a.models:
                ids.setdefault(model_id, set()).add(label)
        return cls({n: {m: tuple(sorted(p)) for m, p in by.items()} for n, by in table.items()},
                   {m: tuple(sorted(p)) for m, p in ids.items()})

    def resolve(self, ref: str) -> str | None:
        """The model id ``ref`` names in the mesh: a model id a live peer advertises, a name, or a unique id prefix
        (``blake3:`` optional, at least ``MIN_PREFIX`` hex digits); None if no live peer knows it.
        ``AmbiguousModelNameError`` if the name (or prefix) fits several models."""
        if ref in self.ids:
            return ref
        by = self.table.get(ref)
        if by:
            if len(by) > 1:
                raise AmbiguousModelNameError(ref, by)
            return next(iter(by))
        prefix = ref.partition(":")[2] if ":" in ref else ref
        if len(prefix) < MIN_PREFIX or any(c not in "0123456789abcdef" for c in prefix):
            return None
        hits = {m: p for m, p in self.ids.items() if m.partition(":")[2].startswith(prefix)
                and (":" not in ref or m.startswith(ref))}
        if len(hits) > 1:
            raise AmbiguousModelNameError(ref, hits)
        return next(iter(hits), None)

    def names_of(self, model_id: str) -> list[str]:
        """Every name live peers advertise for ``model_id`` (including names that other models share)."""
        return sorted(n for n, by in self.table.items() if model_id in by)

    def as_dict(self) -> dict[str, dict[str, list[str]]]:
        return {n: {m: list(p) for m, p in by.items()} for n, by in sorted(self.table.items())}
