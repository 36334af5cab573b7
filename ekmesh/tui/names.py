"""How the terminal shows a model: by the name the user knows, with its id shortened (``tinyds (blake3:9063ab…)``).

Pure functions of a model id and the names it goes by (the API's ``/v1/models`` ``aliases``, the status snapshot's
``names``). Not responsible for finding the names (the node and the mesh do) or for choosing a model.

Invariants: the shortened id keeps its algorithm prefix and ``SHORT_HEX`` hex digits, so two models' labels differ
wherever their first digits do; a model without a name is shown by its whole id (the user needs it to name it).
"""

from __future__ import annotations

from collections.abc import Iterable

SHORT_HEX = 6


def short_model_id(model_id: str) -> str:
    """``blake3:9063ab…`` for ``blake3:9063ab…<64 hex>``; an id without ``algo:`` (or already short) as given."""
    algo, sep, digest = model_id.partition(":")
    if not sep or len(digest) <= SHORT_HEX:
        return model_id
    return f"{algo}:{digest[:SHORT_HEX]}…"


def model_name(model_id: str, names: Iterable[str], wanted: str | None = None) -> str | None:
    """The name to show for ``model_id``: ``wanted`` (what the user typed) if it is one of ``names``, else the
    first alias (sorted), else a hub id (``org/repo``); None if it has none."""
    own = sorted({n for n in names if isinstance(n, str) and n and n != model_id})
    if wanted is not None and wanted in own:
        return wanted
    aliases = [n for n in own if "/" not in n]
    pick = aliases or own
    return pick[0] if pick else None


def model_label(model_id: str, names: Iterable[str], wanted: str | None = None) -> str:
    """``name (blake3:9063ab…)``, or the whole id when the model has no name."""
    name = model_name(model_id, names, wanted)
    return model_id if name is None else f"{name} ({short_model_id(model_id)})"
