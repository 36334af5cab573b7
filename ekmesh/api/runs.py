"""The generations behind one API answer: ``Run`` (one choice: its events, its ekmesh statistics), ``run_all`` (the
runs of a request decoding concurrently), ``echo_of`` (the prompt's text and log-probs for ``/v1/completions``'
``echo``), and the ``usage`` and ``ekmesh`` blocks of a whole answer (``usage_of``, ``stats_of``).

Not responsible for HTTP (``api.server``) or for parsing (``api.request``). Invariants: a run's events are its
generator's, in order; ``run_all`` of several runs decodes each in a thread of its own (so their steps batch), hands
their events to the request's thread, raises a run's error there, and when closed stops every run at its next token
and waits for its thread (``CHOICE_JOIN_S``); a generator whose ``ServedModel.lock`` is set is used under it only.
Nothing here imports torch at module level.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Generator as Gen
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ekmesh.api.logprobs import Entry
from ekmesh.api.request import Prompt, Request
from ekmesh.api.types import ServedModel
from ekmesh.core.errors import BadRequestError

if TYPE_CHECKING:  # torch is imported only where a model is served: a node without one never loads it
    from ekmesh.infer.generate import SamplingParams, TokenEvent

log = logging.getLogger(__name__)

CHOICE_JOIN_S = 60.0  # how long a request's end waits for its choices' threads (each stops at its next token)


class Run:
    """One generation (one choice): yields ``TokenEvent``s, then ``stats()`` has its ekmesh block and ``tokens`` its
    count."""

    def __init__(self, served: ServedModel, prompt_ids: list[int], params: SamplingParams) -> None:
        if len(prompt_ids) >= served.context:
            raise BadRequestError(f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                                  f"{served.context}", "prompt")
        vocab = served.generator.vocab_size
        bad = next((i for i in prompt_ids if not 0 <= i < vocab), None)
        if bad is not None:  # checked here so that it is a bad request, not a failed generation
            raise BadRequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})", "prompt")
        room = served.context - len(prompt_ids)
        if params.max_tokens > room:
            params = dataclasses.replace(params, max_tokens=room)
        self.served, self.prompt_ids, self.params = served, prompt_ids, params
        gen = served.generator
        self.stops = gen.default_stop_ids if params.stop_ids is None else params.stop_ids
        self.tokens = 0
        self.token_ids: list[int] = []
        self.finish = "length"
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.end: float | None = None
        self._before = served.peer_stats() if served.peer_stats else {}
        self._verify_before = served.verify_stats() if served.verify_stats else None
        served.generator.check(params)  # (a GenerationError here is the request's fault: 400)
        self._recomputed_before = served.generator.recomputed_tokens
        from ekmesh.infer.generate import StreamStats

        self.decoding = StreamStats()

    def events(self) -> Gen[TokenEvent, None, None]:
        lock = self.served.lock
        if lock is not None:
            lock.acquire()
        try:
            for ev in self.served.generator.stream(self.prompt_ids, self.params, self.decoding):
                if self.first is None:
                    self.first = time.perf_counter()
                if self.is_output(ev):
                    self.tokens += 1
                    self.token_ids.append(ev.token_id)
                if ev.finish:
                    self.finish = ev.finish
                yield ev
        finally:
            self.end = time.perf_counter()
            if lock is not None:
                lock.release()

    def is_output(self, ev: TokenEvent) -> bool:
        """Whether the event's token is part of the answer (a final stop id is not)."""
        return not (ev.finish == "stop" and ev.token_id in self.stops)

    def stats(self) -> dict[str, Any]:
        end = self.end or time.perf_counter()
        first = self.first or end
        rate = (self.tokens - 1) / (end - first) if self.tokens > 1 and end > first else 0.0
        after = self.served.peer_stats() if self.served.peer_stats else {}
        trips, rtt, peers = 0, 0.0, []
        for peer, (n, total) in sorted(after.items()):
            n0, t0 = self._before.get(peer, (0, 0.0))
            if n > n0:
                peers.append(peer)
                trips += n - n0
                rtt += total - t0
        out = {"ttft_s": round(first - self.t0, 6), "tokens_per_s": round(rate, 3), "tokens": self.tokens,
               "peers": peers, "mean_layer_rtt_ms": round(1e3 * rtt / trips, 4) if trips else None,
               "speculative": self.decoding.speculative, "steps": self.decoding.steps,
               "drafted": self.decoding.drafted, "accepted": self.decoding.accepted}
        if self.decoding.round_trips is not None:
            out["round_trips"] = round(self.decoding.round_trips, 3)
        if self._verify_before is not None and self.served.verify_stats is not None:
            v0, v1 = self._verify_before, self.served.verify_stats()
            out["verify"] = {"fraction": v1["fraction"], **{n: v1[n] - v0[n] for n in ("pairs", "rows", "mismatches")},
                             "bans": v1["banned"][len(v0["banned"]):],
                             "recomputed_tokens": self.served.generator.recomputed_tokens - self._recomputed_before,
                             "banned": sorted({b["peer"] for b in v1["banned"]})}
        warning = self.served.mesh_warning() if self.served.mesh_warning else None
        if warning:
            out["warning"] = warning
        return out


def run_all(runs: list[Run]) -> Gen[tuple[int, TokenEvent], None, None]:
    """The events of every run as (choice index, event). One run decodes in this thread; several each in a thread of
    its own, so that their steps run as one batch (``infer/batching.py``). Closing this stops every run at its next
    token and waits for their threads; a run's error is raised here, in the request's thread."""
    if len(runs) == 1:
        events = runs[0].events()
        try:
            for ev in events:
                yield 0, ev
        finally:
            events.close()
        return
    out: queue.SimpleQueue[tuple[int, TokenEvent | None, Exception | None]] = queue.SimpleQueue()
    stop = threading.Event()

    def work(i: int, run: Run) -> None:
        events, error = run.events(), None
        try:
            for ev in events:
                out.put((i, ev, None))
                if stop.is_set():
                    break
        except Exception as exc:  # handed to the request's thread, which answers it as it answers a single run's
            error = exc
        finally:
            events.close()
            out.put((i, None, error))

    threads = [threading.Thread(target=work, args=(i, run), name=f"ekmesh-api-choice-{i}", daemon=True)
               for i, run in enumerate(runs)]
    for t in threads:
        t.start()
    try:
        running = len(threads)
        while running:
            i, got, error = out.get()  # (every thread puts its end, whatever happens to it)
            if got is not None:
                yield i, got
                continue
            running -= 1
            if error is not None:
                raise error
    finally:
        stop.set()
        for t in threads:
            t.join(CHOICE_JOIN_S)
            if t.is_alive():
                log.warning("%s has not stopped %g s after its request ended", t.name, CHOICE_JOIN_S)


@dataclass(frozen=True)
class Echo:
    """What ``echo`` puts before a completion: the prompt's text and, when log-probs are asked for, its tokens'."""

    text: str
    entries: list[Entry]


def echo_of(served: ServedModel, prompt: Prompt, top: int | None) -> Echo:
    tok = served.tokenizer
    text = prompt.text if prompt.text is not None else tok.decode(prompt.ids, skip_special_tokens=False) if tok else ""
    if top is None:
        return Echo(text, [])
    if served.lock is not None:
        served.lock.acquire()
    try:
        scored = served.generator.prompt_logprobs(prompt.ids, top)
    finally:
        if served.lock is not None:
            served.lock.release()
    first: Entry = (prompt.ids[0], None, None)  # nothing precedes it
    return Echo(text, [first, *((t, lp, alt) for t, (lp, alt) in zip(prompt.ids[1:], scored, strict=True))])


def stats_of(runs: list[Run], req: Request) -> dict[str, Any]:
    """The ekmesh block: one run's; with several choices, their counts added up (a forward that batched several
    choices' steps counts once per choice), ``ttft_s`` the first choice's first token, ``tokens_per_s`` every choice's
    tokens after its first over the time from the first to the end, and ``round_trips`` the most any choice made
    (the choices' steps share their batches' round trips)."""
    stats = runs[0].stats()  # (the first run began first: its view of peers and verification covers them all)
    if len(runs) > 1:
        ends = [r.end or time.perf_counter() for r in runs]
        firsts = [r.first for r in runs if r.first is not None]
        stats["tokens"] = tokens = sum(r.tokens for r in runs)
        if firsts:
            stats["ttft_s"] = round(min(firsts) - runs[0].t0, 6)
            span = max(ends) - min(firsts)
            stats["tokens_per_s"] = round((tokens - len(firsts)) / span, 3) if span > 0 else 0.0
        for key in ("steps", "drafted", "accepted"):
            stats[key] = sum(getattr(r.decoding, key) for r in runs)
        if "round_trips" in stats:
            stats["round_trips"] = round(max(r.decoding.round_trips or 0.0 for r in runs), 3)
    elif req.token_ids:
        stats["token_ids"] = list(runs[0].token_ids)
    return stats


def usage_of(req: Request, runs: list[Run]) -> dict[str, int]:
    prompt, completion = sum(len(p.ids) for p in req.prompts), sum(r.tokens for r in runs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
