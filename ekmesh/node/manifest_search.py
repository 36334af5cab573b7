"""Finding one model among the live peers: which model a name means (``NameLookup``), then its manifest
(``ManifestSearch``), for a node started with a model its store lacks.

``NameLookup`` (a name, an alias or hub id given on another peer, that no local store knows): the live peers'
adverts name the models they serve (``discovery.names``); the name is taken once it named the same model for
``settle_s`` (adverts arrive over a few syncs: a conflict must have had the time to show). It fails with
``AmbiguousModelNameError`` (every id and the peers behind it) as soon as live peers advertise the name for
different models, and with ``ModelNameError`` once ``wait_s`` passed without a peer that advertises it.

Role (``Claimer``'s first step): ask peers over blob exchange for the manifest (``ask(peer, model_id)``: a GET of the
model id, checked against the id, which is the hash of the manifest's bytes, so any peer's answer is safe to take).
Peers that advertise the model are asked again every ``retry_s`` until one answers; any other live peer that serves
blobs is asked too, because a peer may store a model without claiming its experts (an attention-only host that
imported it advertises no experts of it), but less often once it said it lacks it (doubling waits up to
``REASK_MAX_S``). While nothing came, ``why`` says why in words (the ``claim.state`` of ``status``) and the log
warns once the node had time to meet its peers (``warn_after_s``), again when the reason changes and every
``WARN_EVERY_S``.

Not responsible for: the wire (``shard.fetch.Fetcher.manifest``), the store or the package (the claimer looks
there first), which peers are live (the caller passes the view).

Invariants: asks run in the caller's nursery, never awaited by a round, so a hung peer delays no other (each ask
has the fetcher's ``io_s`` deadline); at most one ask per peer is in flight; a round only reads what finished asks
left.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection

import trio

from ekmesh.core.errors import EkmeshError, ModelNameError, ShardMissingError
from ekmesh.discovery.advert import Advert
from ekmesh.discovery.names import MeshNames
from ekmesh.shard.manifest import Manifest

log = logging.getLogger(__name__)

REASK_MAX_S = 30.0  # longest wait before asking again a peer that said it has no manifest of the model
WARN_EVERY_S = 60.0


class NameLookup:
    """Which model the live peers mean by ``name``; ``why`` says what it waits for (the claim's ``state``)."""

    def __init__(self, name: str, wait_s: float, settle_s: float) -> None:
        self.name, self.wait_s, self.settle_s = name, wait_s, settle_s
        self.why = f"looking for a peer that serves a model named {name!r}"
        self.mesh_name: str | None = None  # ``name``, once found as a name (not as an id prefix)
        self._seen: tuple[str, float] | None = None  # the model the name named, since when (``waited``)

    def round(self, live: list[Advert], waited: float) -> str | None:
        """The model id once settled, else None (``live``: the other live peers' adverts; ``waited``: seconds since
        the node started). Raises ``AmbiguousModelNameError``, or ``ModelNameError`` past ``wait_s``."""
        names = MeshNames.of(live)
        found = names.resolve(self.name)
        if found is None:
            self._seen = None
            if waited >= self.wait_s:
                known = sorted({n for a in live for n in a.names})
                raise ModelNameError(self.name, f"no model named {self.name!r}: neither this node's store nor any "
                                     f"of the {len(live)} live peers knows it after {self.wait_s:.0f} s (names "
                                     f"they serve: {', '.join(known) or 'none'}); import it here (`ekmesh import`), "
                                     "give its full model id, or start a peer that serves it")
            self.why = (f"waiting for a peer that serves a model named {self.name!r} ({len(live)} live peers; "
                        f"{waited:.0f} of {self.wait_s:.0f} s)")
            return None
        if self._seen is None or self._seen[0] != found:
            self._seen = (found, waited)
        if waited - self._seen[1] < self.settle_s:
            self.why = f"model name {self.name!r} is {found} in the mesh; checking that no peer means another model"
            return None
        log.info("model name %r is model %s in the mesh", self.name, found)
        self.mesh_name = self.name if self.name in names.table else None
        return found


class ManifestSearch:
    """The search for the manifest of ``model_id``; ``ask(peer, model_id)`` blocks (it runs in a worker thread that
    a cancelled caller abandons)."""

    def __init__(self, model_id: str, ask: Callable[[str, str], Manifest], retry_s: float,
                 warn_after_s: float) -> None:
        self.model_id, self.ask, self.retry_s, self.warn_after_s = model_id, ask, retry_s, warn_after_s
        self.why = "not asked any peer yet"
        self._started = time.monotonic()
        self._found: list[Manifest] = []
        self._asking: set[str] = set()
        self._next: dict[str, tuple[float, float]] = {}  # peer -> (ask again at, the wait that led there)
        self._errors: dict[str, str] = {}  # peer -> why it could not be asked (last try)
        self._warned: tuple[float, str] = (-math.inf, "")

    def round(self, nursery: trio.Nursery, live: list[Advert], serving: Collection[str]) -> Manifest | None:
        """A manifest an ask found, else starts the asks that are due (``live``: the other live peers' adverts;
        ``serving``: those whose blob server can be dialled) and updates ``why``."""
        if self._found:
            return self._found[0]
        now = time.monotonic()
        for a in live:
            pid = a.peer_id
            if pid in serving and pid not in self._asking and self._next.get(pid, (0.0, 0.0))[0] <= now:
                self._asking.add(pid)
                nursery.start_soon(self._ask, pid, self.model_id in a.models)
        self._explain(live, serving, now)
        return None

    async def _ask(self, peer: str, offering: bool) -> None:
        try:
            # mypy (2.4) loses run_sync's keyword-only parameters behind trio's ``enable_ki_protection`` decorator
            m = await trio.to_thread.run_sync(self.ask, peer, self.model_id,
                                              abandon_on_cancel=True)  # type: ignore[call-arg]
        except EkmeshError as exc:
            lacks = isinstance(exc, ShardMissingError)  # it answered, without the manifest
            if lacks:
                self._errors.pop(peer, None)
            else:
                self._errors[peer] = str(exc)
            # a peer that advertises the model is asked again soon; another one less and less often
            _, wait = self._next.get(peer, (0.0, self.retry_s / 2))
            wait = self.retry_s if offering else min(2 * wait, REASK_MAX_S)
            self._next[peer] = (time.monotonic() + wait, wait)
            log.debug("no manifest of %s from peer %s: %s", self.model_id, peer, exc)
        else:
            log.info("got the manifest of model %s from peer %s", self.model_id, peer)
            self._found.append(m)
        finally:
            self._asking.discard(peer)

    def _explain(self, live: list[Advert], serving: Collection[str], now: float) -> None:
        with_blobs = [a.peer_id for a in live if a.peer_id in serving]
        errors = {p: e for p, e in self._errors.items() if p in with_blobs}
        if not live:
            why = "no live peer yet"
        elif not with_blobs:
            why = f"none of the {len(live)} live peers serves blobs (they run without --model)"
        else:
            why = f"no live peer has it (peers serving blobs: {len(with_blobs)}"
            why += f", unreachable: {len(errors)})" if errors else ")"
        self.why = why
        waited = now - self._started
        if waited >= self.warn_after_s and (why != self._warned[1] or now - self._warned[0] >= WARN_EVERY_S):
            self._warned = (now, why)
            last = next(iter(errors.items()), None)
            log.warning("model %s: still waiting for its manifest after %.0f s: %s%s; import it on some peer "
                        "(`ekmesh import`), or start a peer that has it", self.model_id, waited, why,
                        f" (peer {last[0]}: {last[1]})" if last else "")
