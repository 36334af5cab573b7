"""``RemoteExperts``: the experts backend of an attention host whose experts live (partly) on other peers.

Per MoE layer call: every (token, expert) pair goes to one holder: this host when ``local`` holds the expert,
else the live replica with the lowest measured latency × (1 + in-flight requests) among ``holders(layer,
expert)`` (best first; ties keep that order). One REQUEST frame per remote peer carries that peer's pairs and only
the hidden rows they use (``pairs.py`` builds the frames and adds the answers back); all frames are sent, local
experts computed while they are in flight, then the answers received and summed. The per-call bookkeeping is
numpy / plain Python over flat pair indices, and the hot path makes as few torch calls as it can (each costs
microseconds, more on a core that has just woken up from waiting).

Failure handling: each answer has a deadline of max(floor, multiple × what the peer is expected to take for that
frame): EWMAs of its round trip less its compute (network, queues) and of its compute per row (the server reports
its compute time in each answer), so a prefill's frame of hundreds of rows is not held to a decode step's
latency, and a hung peer costs a decode step ~the floor (0.3 s) instead of seconds (a generous deadline before the
first measurement). A timeout, a broken channel, a refused certificate, a malformed answer or an ERROR
frame fails that peer for the rest of the call (and puts it last for ``cooldown_s``); its pairs go to the next
replica in a new wave. With no replica left, ``fallback(layer, expert)`` supplies the weights (the node fetches the
blob), which are cached in ``local`` and used while no holder is live (when one is again, it computes the
expert); with no fallback the call raises ``ExpertUnavailableError`` naming (layer, expert). The caller never sees
a peer loss the mesh can absorb.

Verification (``verifier``, ``verify.py``): a wave with sampled pairs carries them as extra rows in the frames of
other replicas (or recomputes them here), receives every answer before adding any, and checks the sampled rows; a
peer banned there (or left unsettled) has its pairs of the wave redone by others, and banned peers are never chosen
again (they start every call excluded). Waves without a sampled pair take the unchecked path unchanged.

Timing (``split()``, ``peerstats.HostSplit``): per good answer, the ns of the rows' device-to-host copy, the frame's
encoding, its send (TLS + write), the wait for its answer and that answer's decoding, and the whole round trip; the
answers' host-to-device copies and the local experts' time per call. A few clock reads per frame, always on.

Invariants: the result is, per token, the sum over its pairs of ``weight * expert(hidden)``; each pair is
computed once, weighted in fp32 and accumulated in fp32 (local pairs first, then peers in sorted order), then cast
to ``hidden.dtype`` (when one peer computed every pair, its answer is returned as it came: the same values, as
0 + x == x and the wire dtype is ``hidden.dtype``). With fp32 on the wire and top-k ≤ 2 this equals
``LocalExperts`` bit for bit up to the rounding of differently sized matmuls. Channels are taken in sorted peer
order and all released before the next wave, so concurrent callers cannot deadlock.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace

import numpy as np
import torch

from ekmesh.core.errors import ConfigError, EkmeshError, ExpertUnavailableError, PeerError, ProtocolError
from ekmesh.infer.dataplane.channel import Channel, ChannelPool
from ekmesh.infer.dataplane.frames import HEADER_SIZE, SMALL_PAIRS, ErrorCode, Kind, ModelLimits, as_numpy
from ekmesh.infer.dataplane.pairs import add_rows, encode_pairs, indices
from ekmesh.infer.dataplane.peerstats import HostSplit, PeerStats, RemoteTimeouts
from ekmesh.infer.dataplane.poll import Registration
from ekmesh.infer.dataplane.verify import LOCAL, Plan, Verifier
from ekmesh.infer.expert import ExpertWeights
from ekmesh.infer.experts import LocalExperts

log = logging.getLogger(__name__)

NO_PAIRS = np.zeros(0, dtype=np.int64)  # a frame that only carries pairs to verify


@dataclass
class _Sent:
    peer: str
    channel: Channel
    request_id: int
    pairs: np.ndarray | None  # [P] indices into the call's flat pairs (None: all of them, in order)
    rows: np.ndarray | None  # [R] token rows sent, in frame order (None: all rows in order)
    n_rows: int  # R (+ V extra rows: pairs to verify, one per row, after the R rows)
    started: float
    deadline: float
    n_extra: int = 0  # V
    t0_ns: int = 0  # perf_counter_ns when the frame's copy / encoding began (the round trip's start)
    copy_ns: int = 0  # device-to-host copy of the rows sent (0 on a CPU host)
    encode_ns: int = 0  # building the frame
    send_ns: int = 0  # TLS encryption + socket write
    n_bytes: int = 0  # the frame's size


class RemoteExperts:
    """An ``ExpertsBackend`` over local experts and remote holders. See the module docstring."""

    def __init__(self, limits: ModelLimits, local: LocalExperts | None,
                 holders: Callable[[int, int], list[str]], channels: ChannelPool,
                 fallback: Callable[[int, int], ExpertWeights] | None = None,
                 timeouts: RemoteTimeouts | None = None, verifier: Verifier | None = None) -> None:
        if fallback is not None and local is None:
            raise ConfigError("RemoteExperts needs a LocalExperts to cache experts computed from the fallback")
        self.limits = limits
        self.local = local
        self.holders = holders
        self.channels = channels
        self.fallback = fallback
        self._borrowed: set[tuple[int, int]] = set()  # experts in ``local`` only because the fallback supplied them
        self.timeouts = timeouts or RemoteTimeouts()
        self.verifier = verifier
        self._stats: dict[str, PeerStats] = {}
        self._split = HostSplit()  # (under ``_lock``)
        self._tokens: dict[tuple[int, int], np.ndarray] = {}
        self._here = threading.local()  # .rounds: waves with a remote frame made by this thread
        self._lock = threading.Lock()

    # --- stats and choice ---------------------------------------------------------------------------------------
    def stats(self) -> dict[str, PeerStats]:
        """A snapshot of the per-peer statistics."""
        with self._lock:
            return {p: replace(s) for p, s in self._stats.items()}

    def split(self) -> HostSplit:
        """A snapshot of where this host's round trips went (``HostSplit``; cumulative since it was built)."""
        with self._lock:
            return replace(self._split)

    def _stat(self, peer: str) -> PeerStats:
        s = self._stats.get(peer)
        if s is None:
            s = self._stats[peer] = PeerStats()
        return s

    def _choose(self, layer: int, expert: int, excluded: set[str]) -> str | None:
        holders = self.holders(layer, expert)
        if len(holders) == 1:  # one replica: nothing to compare (the common decode case), no lock
            return None if holders[0] in excluded else holders[0]
        now = time.monotonic()
        best: tuple[bool, float, int] | None = None
        choice = None
        with self._lock:
            for rank, peer in enumerate(holders):
                if peer in excluded:
                    continue
                s = self._stat(peer)
                key = (s.down_until > now, (s.ewma_rtt_s or 1e-3) * (1 + s.in_flight), rank)
                if best is None or key < best:
                    best, choice = key, peer
        return choice

    def _verifier_of(self, layer: int, expert: int, peer: str, excluded: set[str], wave: set[str]) -> str | None:
        """Another replica of the expert to recompute a pair ``peer`` answered: not excluded, not down; one that
        this wave sends a frame anyway first, else the lowest latency × (1 + in flight) among those no slower than
        ``check_slack`` × the wave's slowest peer or ``check_margin_s`` more (a slower one would hold the whole layer
        up); None: none (this host recomputes it)."""
        holders = self.holders(layer, expert)
        if len(holders) < 2:
            return None
        now, t_ = time.monotonic(), self.timeouts
        best: tuple[bool, float, int] | None = None
        choice = None
        with self._lock:
            slowest = max([self._stat(p).ewma_rtt_s or 1e-3 for p in wave], default=1e-3)
            for rank, q in enumerate(holders):
                s = self._stat(q)
                if q == peer or q in excluded or s.down_until > now:
                    continue
                latency = s.ewma_rtt_s or 1e-3
                if q not in wave and latency > max(t_.check_slack * slowest, slowest + t_.check_margin_s):
                    continue
                key = (q not in wave, latency * (1 + s.in_flight), rank)
                if best is None or key < best:
                    best, choice = key, q
        return choice

    def _holder(self, layer: int, expert: int, excluded: set[str]) -> str:
        if self.local is not None and self.local.has(layer, expert):
            if (layer, expert) in self._borrowed:
                # computed here only because no holder was live once: while one is, the mesh computes it (the copy
                # stays for when it goes again), so a holder lost for a moment, or a holder map a moment behind a
                # move, does not leave this host computing the expert for good
                peer = self._choose(layer, expert, excluded)
                if peer is not None:
                    return peer
            return LOCAL
        peer = self._choose(layer, expert, excluded)
        if peer is not None:
            return peer
        if self.fallback is None or self.local is None:
            tried = f"tried and failed: {', '.join(sorted(excluded))}" if excluded else "no holder is known"
            raise ExpertUnavailableError(layer, expert, tried)
        log.info("no live holder of expert (layer=%d, expert=%d): computing it here from its source", layer, expert)
        self.local.add(layer, expert, self.fallback(layer, expert))
        with self._lock:
            self._borrowed.add((layer, expert))
        return LOCAL

    def adopt(self, items: Collection[tuple[int, int]]) -> None:
        """These experts are now this node's own (its claim loaded them into ``local``): never given back."""
        with self._lock:
            self._borrowed.difference_update(items)

    def rounds_here(self) -> int:
        """Data-plane rounds (waves that sent at least one frame; each is one network round trip, however many peers
        it went to) made by the calling thread so far: a generation's round trips, counted per thread."""
        return int(getattr(self._here, "rounds", 0))

    def failing(self) -> set[str]:
        """Peers that failed a request within the last ``cooldown_s`` (chosen last meanwhile)."""
        now = time.monotonic()
        with self._lock:
            return {p for p, s in self._stats.items() if s.down_until > now}

    def _failed(self, peer: str, why: str) -> None:
        log.warning("data-plane request to peer %s failed (%s); trying another holder", peer, why)
        with self._lock:
            s = self._stat(peer)
            s.failures += 1
            s.down_until = time.monotonic() + self.timeouts.cooldown_s

    # --- the backend ---------------------------------------------------------------------------------------------
    def __call__(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        with Registration():  # while another data-plane call or connection of this process is active: no polling
            return self._call(layer, hidden, expert_ids, weights)

    def _call(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
              weights: torch.Tensor) -> torch.Tensor:
        # Bookkeeping in numpy over flat pair indices (pair i = token i // k, choice i % k): a decode step's dispatch
        # is a few microseconds of vectorised work instead of dozens of small torch ops (each of which costs
        # microseconds, more on a core that just woke up from waiting for the previous answer).
        t, k = expert_ids.shape
        exp = as_numpy(expert_ids).reshape(-1)  # [T*k]
        w = as_numpy(weights if weights.dtype is torch.float32 else weights.float()).reshape(-1)  # [T*k] fp32
        acc: torch.Tensor | None = None  # [T, D] fp32, allocated at the first partial result
        todo: np.ndarray | None = None  # pair indices still to compute (None: all of them, in order)
        vf = self.verifier
        excluded: set[str] = set(vf.banned) if vf is not None else set()  # banned peers are never asked
        for _ in range(self.timeouts.max_waves):
            groups = self._group(layer, exp, todo, excluded)
            wave = {p for p in groups if p != LOCAL}
            plan = None if vf is None else vf.plan(
                groups, t * k, k, exp, hidden.shape[1] * hidden.element_size(),
                functools.partial(self._verifier_of, layer, excluded=excluded, wave=wave),
                None if vf.reference is None else functools.partial(vf.reference.can_check, layer))
            failed: list[np.ndarray] = []
            sent: list[_Sent] = []
            for peer in sorted({p for p in groups if p != LOCAL} | (set(plan.extra) if plan else set())):
                mine = groups.get(peer, NO_PAIRS)
                extra = plan.pairs[plan.extra[peer]] if plan is not None and peer in plan.extra else None
                try:
                    sent.append(self._send(peer, layer, hidden, mine, k, exp, w, extra))
                except (PeerError, ProtocolError) as exc:
                    self._failed(peer, str(exc))
                    excluded.add(peer)
                    failed.append(indices(mine, t * k))
            if sent:
                self._here.rounds = getattr(self._here, "rounds", 0) + 1
            checked = None
            if LOCAL in groups or plan is not None:
                try:
                    if LOCAL in groups:
                        t0 = time.perf_counter_ns()
                        acc = self._compute_local(layer, hidden, indices(groups[LOCAL], t * k), k, exp, w, acc)
                        spent = time.perf_counter_ns() - t0
                        with self._lock:
                            self._split.local_ns += spent
                            self._split.local_calls += 1
                    checked = None if plan is None else self._verify_here(layer, hidden, plan, k, exp)
                except BaseException:
                    for s in sent:
                        s.channel.abort()
                    raise
            if plan is not None:
                assert vf is not None and checked is not None
                acc = self._finish_verified(layer, hidden, plan, vf, sent, checked, k, exp, w, acc, excluded, failed)
            elif acc is None and not failed and len(sent) == 1 and sent[0].rows is None:
                # one peer computes every pair left, and nothing was computed before (acc is None), so it computes
                # every pair: its answer is the result (0 + x == x in fp32, and the wire dtype is hidden's, so the
                # fp32 round trip of the general path would give back the same values)
                try:
                    out = self._finish(sent[0])
                except (PeerError, ProtocolError) as exc:
                    self._failed(sent[0].peer, str(exc))
                    excluded.add(sent[0].peer)
                    todo = indices(sent[0].pairs, t * k)
                    continue
                if hidden.is_cpu:  # already hidden's dtype (the wire dtype) and on the host: no call at all
                    return out
                return self._arrive(out, hidden, hidden.dtype)
            else:
                for s in sent:
                    try:
                        partial = self._finish(s)  # [R, D]
                        if partial.dtype is not torch.float32 or not hidden.is_cpu:
                            partial = self._arrive(partial, hidden, torch.float32)
                    except (PeerError, ProtocolError) as exc:
                        self._failed(s.peer, str(exc))
                        excluded.add(s.peer)
                        failed.append(indices(s.pairs, t * k))
                        continue
                    acc = add_rows(acc, s.rows, partial, hidden)
            failed = [f for f in failed if len(f)]  # (a frame that only verified has no pairs to redo)
            if not failed:
                if acc is None:  # no pairs at all (T = 0)
                    return torch.zeros_like(hidden)
                return acc if acc.dtype is hidden.dtype else acc.to(hidden.dtype)
            todo = np.concatenate(failed)
        e = int(exp[indices(todo, t * k)[0]])
        raise ExpertUnavailableError(layer, e, f"every holder failed in {self.timeouts.max_waves} attempts")

    def _arrive(self, x: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """An answer ``x`` (on the host) as ``dtype`` on ``like``'s device; a copy to a device is timed."""
        if like.is_cpu:
            return x.to(dtype)
        t0 = time.perf_counter_ns()
        y = x.to(like.device, dtype)
        spent = time.perf_counter_ns() - t0
        with self._lock:
            self._split.copy_in_ns += spent
            self._split.copies_in += 1
        return y

    def _verify_here(self, layer: int, hidden: torch.Tensor, plan: Plan, k: int,
                     exp: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """([V, D] fp32 verifier outputs of ``plan``'s pairs, [V] which are there): those this host recomputes,
        computed now (while the frames are in flight); the replicas' are filled in as their answers arrive."""
        assert self.verifier is not None
        ref = self.verifier.reference
        got = torch.zeros(len(plan.pairs), hidden.shape[1], dtype=torch.float32, device=hidden.device)  # [V, D]
        have = np.zeros(len(plan.pairs), dtype=bool)
        if len(plan.local) and ref is not None:
            pairs = plan.pairs[plan.local]
            try:
                out = ref(layer, hidden.index_select(0, torch.from_numpy(pairs // k).to(hidden.device)), exp[pairs])
            except EkmeshError as exc:  # (the expert's blob could not be had: those rows go unchecked)
                log.warning("could not recompute expert results of layer %d here to verify them: %s", layer, exc)
            else:
                got[torch.from_numpy(plan.local).to(got.device)] = out.to(got.device)
                have[plan.local] = True
        return got, have

    def _finish_verified(self, layer: int, hidden: torch.Tensor, plan: Plan, vf: Verifier, sent: list[_Sent],
                         checked: tuple[torch.Tensor, np.ndarray], k: int, exp: np.ndarray, w: np.ndarray,
                         acc: torch.Tensor | None, excluded: set[str], failed: list[np.ndarray]) -> torch.Tensor | None:
        """A wave with checks: every answer received first (the replicas' extra rows go to ``checked``), the
        checks run, then the answers of peers neither banned nor unsettled are added (in sorted peer order, as
        without checks); the pairs of the others go to ``failed`` for the next wave."""
        got, have = checked
        n = len(exp)
        received: list[tuple[_Sent, torch.Tensor]] = []
        for s in sent:
            try:
                partial = self._finish(s)  # [R + V, D]
            except (PeerError, ProtocolError) as exc:
                self._failed(s.peer, str(exc))
                excluded.add(s.peer)
                failed.append(indices(s.pairs, n))
                continue
            r = s.n_rows - s.n_extra
            if s.n_extra:
                pos = plan.extra[s.peer]
                got[torch.from_numpy(pos).to(got.device)] = partial[r:].to(got.device, torch.float32)
                have[pos] = True
            received.append((s, partial[:r]))
        answers = {s.peer: (s.rows, part) for s, part in received if part.shape[0]}
        out = vf.check(layer, plan, hidden, k, exp, w, answers, got, have)
        drop = out.banned | out.unsettled
        excluded |= drop
        for s, part in received:
            if s.peer in drop:
                failed.append(indices(s.pairs, n))
            elif part.shape[0]:
                if part.dtype is not torch.float32 or not hidden.is_cpu:
                    part = self._arrive(part, hidden, torch.float32)
                acc = add_rows(acc, s.rows, part, hidden)
        return acc

    def _group(self, layer: int, exp: np.ndarray, todo: np.ndarray | None,
               excluded: set[str]) -> dict[str, np.ndarray | None]:
        """{holder: its pair indices (ascending; None: every pair)} for the pairs ``todo`` (None: every pair),
        one holder per expert."""
        sub = exp if todo is None else exp[todo]  # [N]
        if not len(sub):
            return {}
        listed = sub.tolist()
        present = set(listed)  # distinct experts (at most num_experts)
        holder = {e: self._holder(layer, e, excluded) for e in present}
        names = set(holder.values())
        if len(names) == 1:  # one holder (the common decode case): no per-pair work at all
            return {names.pop(): todo}
        if len(listed) <= SMALL_PAIRS:  # a few pairs (decode): plain Python beats a dozen numpy calls
            picked: dict[str, list[int]] = {}
            for i, e in zip(range(len(exp)) if todo is None else todo.tolist(), listed, strict=True):
                picked.setdefault(holder[e], []).append(i)
            return {name: np.array(ids) for name, ids in picked.items()}
        idx = np.arange(len(exp)) if todo is None else todo
        code = {name: i for i, name in enumerate(sorted(names))}
        ordered = sorted(present)
        lut = np.zeros(ordered[-1] + 1, dtype=np.int64)  # expert -> index of its holder in ``code``
        lut[ordered] = [code[holder[e]] for e in ordered]
        owner = lut[sub]  # [N]
        return {name: idx[owner == i] for name, i in code.items()}

    def _token_index(self, t: int, k: int) -> np.ndarray:
        """[T*k] int32: the token of each pair when every pair goes in order (cached per shape)."""
        tok = self._tokens.get((t, k))
        if tok is None:
            tok = self._tokens[(t, k)] = np.arange(t * k, dtype=np.int32) // k
        return tok

    def _compute_local(self, layer: int, hidden: torch.Tensor, pairs: np.ndarray, k: int, exp: np.ndarray,
                       w: np.ndarray, acc: torch.Tensor | None) -> torch.Tensor:
        assert self.local is not None
        dev = hidden.device
        rows = torch.from_numpy(pairs // k).to(dev)  # [P]
        ids = torch.from_numpy(exp[pairs]).to(dev, torch.long)[:, None]  # [P, 1]: one pair per row, weighted in fp32
        ones = torch.ones(ids.shape, dtype=hidden.dtype, device=dev)
        y = self.local(layer, hidden.index_select(0, rows), ids, ones)  # [P, D]
        if acc is None:
            acc = torch.zeros(hidden.shape, dtype=torch.float32, device=dev)  # [T, D]
        return acc.index_add_(0, rows, y.float() * torch.from_numpy(w[pairs]).to(dev)[:, None])

    def answer_deadline_s(self, peer: str, rows: int, replicated: bool = True) -> float:
        """How long an answer of ``peer`` to a frame of ``rows`` rows is waited for (``PeerStats.deadline_s``);
        ``replicated``: every expert of the frame has another holder to fail over to (else the next step is a blob
        fetch and a local computation, worth waiting longer to avoid)."""
        with self._lock:
            return self._stat(peer).deadline_s(rows, self.timeouts, replicated)

    def _send(self, peer: str, layer: int, hidden: torch.Tensor, pairs: np.ndarray | None, k: int,
              exp: np.ndarray, w: np.ndarray, extra: np.ndarray | None = None) -> _Sent:
        """Begins one exchange with ``peer`` for ``pairs`` (None: every pair), plus ``extra`` pairs to verify, each
        as its own row after the others (weight 1: the answer is the expert's output itself)."""
        t0 = time.perf_counter_ns()
        t = hidden.shape[0]
        ch = self.channels.get(peer)
        rid = ch.next_id()
        n_extra = 0 if extra is None else len(extra)
        rows, data, copy_ns = encode_pairs(rid, layer, hidden, pairs, k, exp, w, extra, self._token_index)
        encode_ns = time.perf_counter_ns() - t0 - copy_ns
        now = time.monotonic()
        n_rows = (t if rows is None else len(rows)) + n_extra
        experts = set((exp if pairs is None else exp[pairs]).tolist())
        replicated = all(len(self.holders(layer, e)) > 1 for e in experts)
        deadline = now + self.answer_deadline_s(peer, n_rows, replicated)
        with self._lock:
            self._stat(peer).in_flight += 1
        try:
            ch.begin(data, deadline)
        except BaseException:
            with self._lock:
                self._stat(peer).in_flight -= 1
            raise
        return _Sent(peer, ch, rid, pairs, rows, n_rows, now, deadline, n_extra, t0, copy_ns, encode_ns, ch.sent_ns,
                     len(data))

    def _finish(self, s: _Sent) -> torch.Tensor:
        t0 = time.perf_counter_ns()
        try:  # (the peer's stats were made by _send)
            f, decode_ns = s.channel.finish_timed(s.request_id, s.deadline, waits=self._stats[s.peer].waits)
        except BaseException:
            with self._lock:
                self._stat(s.peer).in_flight -= 1
            raise
        end = time.perf_counter_ns()
        ok = f.kind is Kind.RESPONSE and f.hidden is not None and f.hidden.shape[0] == s.n_rows
        rtt = time.monotonic() - s.started
        with self._lock:
            st = self._stat(s.peer)
            st.in_flight -= 1
            if ok:
                assert f.hidden is not None
                st.measured(rtt, f.aux * 1e-6, s.n_rows)
                sp = self._split
                sp.frames += 1
                sp.bytes_out += s.n_bytes
                sp.bytes_in += HEADER_SIZE + f.hidden.numel() * f.hidden.element_size()
                sp.rtt_ns += end - s.t0_ns
                sp.copy_out_ns += s.copy_ns
                sp.encode_ns += s.encode_ns
                sp.send_ns += s.send_ns
                sp.wait_ns += end - t0
                sp.decode_ns += decode_ns
        if f.kind is Kind.ERROR:
            if f.code == ErrorCode.PROTOCOL:
                s.channel.close()  # the server closes its end after a PROTOCOL error
            what = ErrorCode(f.code).name if f.code in ErrorCode._value2member_map_ else str(f.code)
            raise PeerError(f"peer {s.peer} answered {what}: {f.message}", s.peer)
        if not ok or f.hidden is None:
            raise ProtocolError(f"peer {s.peer} answered with a {f.kind.name} frame of the wrong shape")
        return f.hidden  # [R, D]

