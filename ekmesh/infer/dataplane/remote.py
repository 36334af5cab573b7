"""``RemoteExperts``: the experts backend of an attention host whose experts live (partly) on other peers.

Per MoE layer call: every (token, expert) pair goes to one holder: this host when ``local`` holds the expert,
else the live replica with the lowest measured latency × (1 + in-flight requests) among ``holders(layer,
expert)`` (best first; ties keep that order). One REQUEST frame per remote peer carries that peer's pairs and only
the hidden rows they use; all frames are sent, local experts computed while they are in flight, then the answers
received and summed.

Failure handling: each answer has a deadline of max(floor, multiple × the peer's latency EWMA) (a generous one
before the first measurement). A timeout, a broken channel, a refused certificate, a malformed answer or an ERROR
frame fails that peer for the rest of the call (and puts it last for ``cooldown_s``); its pairs go to the next
replica in a new wave. With no replica left, ``fallback(layer, expert)`` supplies the weights (the node fetches the
blob), which are cached in ``local``; with no fallback the call raises ``ExpertUnavailableError`` naming (layer,
expert). The caller never sees a peer loss the mesh can absorb.

Invariants: the result is, per token, the sum over its pairs of ``weight * expert(hidden)``; each pair is
computed once, weighted in fp32 and accumulated in fp32 (local pairs first, then peers in sorted order), then cast
to ``hidden.dtype``. With fp32 on the wire and top-k ≤ 2 this equals ``LocalExperts`` bit for bit up to the
rounding of differently sized matmuls. Channels are taken in sorted peer order and all released before the next
wave, so concurrent callers cannot deadlock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ekmesh.core.errors import ConfigError, ExpertUnavailableError, PeerError, ProtocolError
from ekmesh.infer.dataplane.channel import Channel, ChannelPool
from ekmesh.infer.dataplane.frames import ErrorCode, Frame, Kind, ModelLimits, encode_request
from ekmesh.infer.experts import ExpertWeights, LocalExperts

log = logging.getLogger(__name__)

LOCAL = ""  # the holder id of this host's own experts


@dataclass(frozen=True)
class RemoteTimeouts:
    floor_s: float = 1.0  # never wait less than this for an answer
    rtt_multiple: float = 10.0  # ... nor less than this many times the peer's latency EWMA
    first_s: float = 10.0  # before any measurement (includes opening the channel)
    cooldown_s: float = 5.0  # a failed peer is chosen last for this long
    max_waves: int = 8  # re-assignment rounds per call before giving up


@dataclass
class PeerStats:
    """Per-peer data-plane statistics (for ``ekmesh chat``'s status line and peer choice)."""

    round_trips: int = 0
    failures: int = 0
    total_rtt_s: float = 0.0
    ewma_rtt_s: float | None = None
    server_compute_s: float = 0.0
    in_flight: int = 0
    down_until: float = 0.0

    @property
    def mean_rtt_s(self) -> float:
        return self.total_rtt_s / self.round_trips if self.round_trips else 0.0


@dataclass
class _Sent:
    peer: str
    channel: Channel
    request_id: int
    pairs: torch.Tensor  # [P] indices into the call's flat pairs
    rows: torch.Tensor  # [R] token rows sent, in frame order
    started: float
    deadline: float


class RemoteExperts:
    """An ``ExpertsBackend`` over local experts and remote holders. See the module docstring."""

    def __init__(self, limits: ModelLimits, local: LocalExperts | None,
                 holders: Callable[[int, int], list[str]], channels: ChannelPool,
                 fallback: Callable[[int, int], ExpertWeights] | None = None,
                 timeouts: RemoteTimeouts = RemoteTimeouts()) -> None:
        if fallback is not None and local is None:
            raise ConfigError("RemoteExperts needs a LocalExperts to cache experts computed from the fallback")
        self.limits = limits
        self.local = local
        self.holders = holders
        self.channels = channels
        self.fallback = fallback
        self.timeouts = timeouts
        self._stats: dict[str, PeerStats] = {}
        self._lock = threading.Lock()

    # --- stats and choice ---------------------------------------------------------------------------------------
    def stats(self) -> dict[str, PeerStats]:
        """A snapshot of the per-peer statistics."""
        with self._lock:
            return {p: replace(s) for p, s in self._stats.items()}

    def _stat(self, peer: str) -> PeerStats:
        s = self._stats.get(peer)
        if s is None:
            s = self._stats[peer] = PeerStats()
        return s

    def _choose(self, layer: int, expert: int, excluded: set[str]) -> str | None:
        now = time.monotonic()
        best: tuple[bool, float, int] | None = None
        choice = None
        with self._lock:
            for rank, peer in enumerate(self.holders(layer, expert)):
                if peer in excluded:
                    continue
                s = self._stat(peer)
                key = (s.down_until > now, (s.ewma_rtt_s or 1e-3) * (1 + s.in_flight), rank)
                if best is None or key < best:
                    best, choice = key, peer
        return choice

    def _holder(self, layer: int, expert: int, excluded: set[str]) -> str:
        if self.local is not None and self.local.has(layer, expert):
            return LOCAL
        peer = self._choose(layer, expert, excluded)
        if peer is not None:
            return peer
        if self.fallback is None or self.local is None:
            tried = f"tried and failed: {', '.join(sorted(excluded))}" if excluded else "no holder is known"
            raise ExpertUnavailableError(layer, expert, tried)
        log.info("no live holder of expert (layer=%d, expert=%d): computing it here from its source", layer, expert)
        self.local.add(layer, expert, self.fallback(layer, expert))
        return LOCAL

    def _deadline(self, peer: str, now: float) -> float:
        with self._lock:
            ewma = self._stat(peer).ewma_rtt_s
        t = self.timeouts
        return now + (t.first_s if ewma is None else max(t.floor_s, t.rtt_multiple * ewma))

    def _failed(self, peer: str, why: str) -> None:
        log.warning("data-plane request to peer %s failed (%s); trying another holder", peer, why)
        with self._lock:
            s = self._stat(peer)
            s.failures += 1
            s.down_until = time.monotonic() + self.timeouts.cooldown_s

    # --- the backend ----------------------------------------------------------------------------------------------
    def __call__(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        t, k = expert_ids.shape
        tok = torch.arange(t).repeat_interleave(k)  # [T*k] token of each pair
        exp = expert_ids.reshape(-1).cpu()  # [T*k]
        w = weights.reshape(-1).float().cpu()  # [T*k]
        acc = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # [T, D]
        todo = torch.arange(t * k)  # pair indices still to compute
        excluded: set[str] = set()
        for _ in range(self.timeouts.max_waves):
            holder = {e: self._holder(layer, e, excluded) for e in torch.unique(exp[todo]).tolist()}
            owner = [holder[e] for e in exp[todo].tolist()]
            groups: dict[str, list[int]] = {}
            for i, h in zip(todo.tolist(), owner, strict=True):
                groups.setdefault(h, []).append(i)
            failed: list[torch.Tensor] = []
            sent: list[_Sent] = []
            for peer in sorted(p for p in groups if p != LOCAL):
                pairs = torch.tensor(groups[peer])
                try:
                    sent.append(self._send(peer, layer, hidden, pairs, tok, exp, w))
                except (PeerError, ProtocolError) as exc:
                    self._failed(peer, str(exc))
                    excluded.add(peer)
                    failed.append(pairs)
            if LOCAL in groups:
                try:
                    self._compute_local(layer, hidden, torch.tensor(groups[LOCAL]), tok, exp, w, acc)
                except BaseException:
                    for s in sent:
                        s.channel.abort()
                    raise
            for s in sent:
                try:
                    partial = self._finish(s)
                    acc.index_add_(0, s.rows.to(acc.device), partial.to(acc.device, torch.float32))
                except (PeerError, ProtocolError) as exc:
                    self._failed(s.peer, str(exc))
                    excluded.add(s.peer)
                    failed.append(s.pairs)
            if not failed:
                return acc.to(hidden.dtype)
            todo = torch.cat(failed)
        e = int(exp[todo[0]])
        raise ExpertUnavailableError(layer, e, f"every holder failed in {self.timeouts.max_waves} attempts")

    def _compute_local(self, layer: int, hidden: torch.Tensor, pairs: torch.Tensor, tok: torch.Tensor,
                       exp: torch.Tensor, w: torch.Tensor, acc: torch.Tensor) -> None:
        assert self.local is not None
        dev = hidden.device
        rows = tok[pairs].to(dev)  # [P]
        ids = exp[pairs].to(dev)[:, None]  # [P, 1]: one pair per row, weighted below in fp32
        y = self.local(layer, hidden[rows], ids, torch.ones(ids.shape, dtype=hidden.dtype, device=dev))  # [P, D]
        acc.index_add_(0, rows, y.float() * w[pairs].to(dev)[:, None])

    def _send(self, peer: str, layer: int, hidden: torch.Tensor, pairs: torch.Tensor, tok: torch.Tensor,
              exp: torch.Tensor, w: torch.Tensor) -> _Sent:
        rows, inv = torch.unique(tok[pairs], return_inverse=True)  # [R] rows sent; [P] pair -> row in the frame
        ch = self.channels.get(peer)
        rid = ch.next_id()
        data = encode_request(rid, layer, inv, exp[pairs], w[pairs], hidden[rows.to(hidden.device)])
        now = time.monotonic()
        deadline = self._deadline(peer, now)
        with self._lock:
            self._stat(peer).in_flight += 1
        try:
            ch.begin(data, deadline)
        except BaseException:
            with self._lock:
                self._stat(peer).in_flight -= 1
            raise
        return _Sent(peer, ch, rid, pairs, rows, now, deadline)

    def _finish(self, s: _Sent) -> torch.Tensor:
        try:
            f: Frame = s.channel.finish(s.request_id, s.deadline)
        finally:
            with self._lock:
                self._stat(s.peer).in_flight -= 1
        if f.kind is Kind.ERROR:
            if f.code == ErrorCode.PROTOCOL:
                s.channel.close()  # the server closes its end after a PROTOCOL error
            what = ErrorCode(f.code).name if f.code in ErrorCode._value2member_map_ else str(f.code)
            raise PeerError(f"peer {s.peer} answered {what}: {f.message}", s.peer)
        if f.kind is not Kind.RESPONSE or f.hidden is None or f.hidden.shape[0] != s.rows.shape[0]:
            raise ProtocolError(f"peer {s.peer} answered with a {f.kind.name} frame of the wrong shape")
        rtt = time.monotonic() - s.started
        with self._lock:
            st = self._stat(s.peer)
            st.round_trips += 1
            st.total_rtt_s += rtt
            st.server_compute_s += f.aux * 1e-6
            st.ewma_rtt_s = rtt if st.ewma_rtt_s is None else 0.8 * st.ewma_rtt_s + 0.2 * rtt
            st.down_until = 0.0
        return f.hidden  # [R, D]
