"""Verification of remote expert results: the attention host recomputes a sampled fraction of what its peers answer
and bans a peer whose answers disagree with the recomputation beyond what honest arithmetic can explain.

What is checked. A peer answers one vector per token: the sum over that token's pairs it was sent of
``weight * expert(hidden)``. Every remote (token, expert) pair is sampled independently with probability ``f``
(``ekmesh join --verify f``); the *row* of a sampled pair (all pairs of that token sent to that peer) is checked
whole. Each pair of a checked row is recomputed by a verifier: another live replica of its expert, which gets the
pair as an extra row of its frame in the same wave (weight 1, one pair per row: no extra round trip when it was sent
a frame anyway), else this host itself from the expert's blob (``Reference``: a bounded cache of experts kept apart
from the routing's local experts, so verifying never changes where pairs go; experts it does not hold are fetched
within a budget, ``FETCH_BURST`` at once and ``FETCHES_PER_S`` after, and a sampled row that would need more stays
unchecked: with R = 1 and large experts, checking would otherwise keep downloading blobs). The row's weighted sum of the
verifier's outputs is compared with the peer's answer.

Tolerance. Let ``v_j`` be the verifier's output of pair j of a row, ``w_j`` its routing weight, and
``S = Σ_j |w_j| ‖v_j‖₂`` (a scale that a sum's cancellation cannot shrink). A side that computes in a dtype of unit
roundoff ``u`` (fp32 2^-24, fp16 2^-11, bf16 2^-8) and sends its outputs in the wire dtype rounds the activations
it reads, its matmul outputs, the activation function, the gate product and its output once each; each rounding is a
relative error ≤ u per element, and the down projection carries them into the output with a gain of a few (its
condition on the intermediate vector). So one side is within ``ε·‖y‖`` of the exact result with ``ε = K·u`` and
the two sides of a comparison within ``(ε_peer + ε_ref)·S``, plus a floor of ``2^-20·√D`` (in absolute terms for
rows near zero, where fp16's subnormals lose digits). The coarsest rounding each side can have:

- a remote peer (checked or verifier): its compute dtype is not advertised, so it is allowed bf16's (the coarsest
  of the dtypes an ekmesh peer computes in; quantized kernels read bf16 activations too): ``ε = K·2^-8``;
- this host: ``K·u`` of its compute dtype, or of bf16 when its experts are quantized (the kernels' activations).

Quantization itself adds nothing to the comparison: both sides read the same blob (the model id names its bytes),
so they hold the same quantized values and differ only in how they round the arithmetic above. K = 16, chosen by
measurement (``python benchmarks/verify_cost.py --tolerance``; ``tests/infer/dataplane/test_verify.py``): over the
built-in model's real hidden states (float, q8 and q4 experts; fp32, fp16 and bf16 peers on the CPU and on an H100;
a bf16 wire) the largest honest difference was 0.12 of the bound, and over tiny random models of several families
0.2 (4.1·2^-8 of ‖v_j‖ for a pair, 2.8·2^-8 of S for a row): a margin of 5× or more. A peer whose answers differ by
less than the bound (6.25% of S against an fp32 host, 12.5% against a replica or with quantized experts) is not
caught: that is the price of never banning an honest bf16 peer. Two replicas that lie alike pass each other's
checks; only this host's own recomputation (no other replica live, or a mismatch to settle) catches them.

Detection. A liar that perturbs every pair it answers beyond the bound and serves m pairs per token is caught in a
given token with probability at least ``1 - (1-f)^m``, and within n tokens with ``1 - (1-f)^(m·n)``: e.g. the
built-in model (8 MoE layers, top-2) with a liar serving a third of a token's 16 pairs (m ≈ 5) and f = 0.05 is caught
within 20 tokens with probability 0.994 and within 60 with 1 - 2·10^-7; a prompt's prefill counts its tokens too.
One that lies on a fraction q of its pairs is caught as one with ``m·q`` pairs per token.

Cost, and the default f = 0.05 (``core.constants.VERIFY_FRACTION``). Measured with ``python
benchmarks/verify_cost.py --tokens 48 --requests 4 --rounds 4`` (the built-in model, three CPU holders with R = 2 and
an attention host holding none, all on one shared 2-core machine, 16 answers per fraction): the fastest answer per
fraction decoded at 11.9 ms/token with f = 0, 12.2 with 0.01, 11.4 with 0.05, 12.0 with 0.1 and 17.3 with 1 (14.2
rows checked per token); medians were dominated by other processes' load (16.6, 17.0, 26.2, 20.9, 34.5). Checking
every row costs ~0.4 ms per row checked (5.4 ms / 14.2 rows), so f = 0.05 (0.84 rows per token) adds ~0.3 ms per
token, ~3% here and less on a model whose experts cost more to compute, below what the measurement resolves, while a
liar answering 5 pairs per token is caught within 60 tokens with probability 1 - 2·10^-7 (above). f = 0.1 doubles
the cost for a detection delay that is already short; f = 1 makes every answer exact even during an attack.

On a mismatch. When every pair of the row was recomputed here, the peer is banned. When a replica recomputed some,
either side may lie: the row is recomputed here (the blob fetched if needed), and whichever of the two disagrees
with this host is banned (both, if both do; if the row cannot be recomputed here, neither is banned and both are
treated as failed for this call). Every pair a banned peer answered in that wave is then recomputed without it, so
the answer of that layer is exact; a ban lasts as long as this process (a ``Ban`` records peer, layer, experts,
difference and bound, for ``ekmesh status --json`` and the API's ``ekmesh`` block).

Probation. Until ``PROBATION_ROWS`` (32) of a peer's rows have been checked and agreed, at least
``PROBATION_PER_WAVE`` (2) rows of every wave it answers are checked, whatever f (f = 0 turns checking off
altogether). A peer that is wrong from the start (a broken kernel, corrupted memory, a liar) is caught in the
first wave it answers a wrong row in (when a replica checks, or this host may fetch the experts to: see the fetch
budget above), and since that wave's pairs are redone without it, none of its wrong results is ever used: answers
stay exact. Its cost is bounded: 32 rows per peer over the process's life.

Not guaranteed: a peer that answers honestly through probation and lies later is caught at rate f; pairs that were
not sampled before it was caught (earlier layers, earlier tokens) may have been wrong. The generator then builds its
caches again without it (``Generator(retractions=)``, ``ban_count``), so every token after the ban is the honest
continuation, but tokens sent before it stay as they were. With f = 1 nothing is ever wrong, since every pair is
checked before its layer's result is used.

Invariants: sampling uses a generator seeded from the OS (peers cannot predict it); ``Reference`` holds at most
``max_experts`` experts (least recently used dropped; more only while one call needs more at once); a verifier
replica's frame carries at most ``max_extra_bytes`` of extra rows per wave (beyond them pairs are recomputed
here); counters and bans are read under a lock as consistent copies; the list of bans only grows.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ekmesh.core.errors import ConfigError, EkmeshError
from ekmesh.infer.expert import ExpertSpec, ExpertWeights
from ekmesh.infer.experts import LocalExperts

log = logging.getLogger(__name__)

K = 16.0  # roundings per side, with their gain through the down projection (see the module docstring)
FLOOR = 2.0 ** -20  # per element, for rows near zero
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
REMOTE_EPS = K * UNIT_ROUNDOFF[torch.bfloat16]  # a peer's compute dtype is not advertised: bf16's, the coarsest
LOCAL = ""  # the verifier name of this host (``RemoteExperts``' holder id of its own experts)


def unit_roundoff(dtype: torch.dtype) -> float:
    if dtype not in UNIT_ROUNDOFF:
        raise ConfigError(f"no unit roundoff known for {dtype} (fp32, fp16, bf16)")
    return UNIT_ROUNDOFF[dtype]


def local_eps(dtype: torch.dtype, quantized: bool) -> float:
    """ε of this host's own computation: its compute dtype's, or bf16's when its experts are quantized."""
    u = unit_roundoff(dtype)
    return K * (max(u, UNIT_ROUNDOFF[torch.bfloat16]) if quantized else u)


def bound(scale: torch.Tensor, eps_a: float | torch.Tensor, eps_b: float | torch.Tensor, dim: int) -> torch.Tensor:
    """The largest honest ‖a - b‖₂ between two computations of a row (or pair) of scale ``scale`` (S, or ‖v‖)."""
    return (eps_a + eps_b) * scale + FLOOR * math.sqrt(dim)


@dataclass(frozen=True)
class Ban:
    """Why ``peer`` was banned: its answer for a row of ``layer`` with ``experts`` differed by ``diff`` from this
    host's recomputation (``by``: "local", or the replica that recomputed it and was confirmed here), ``bound``
    being the most an honest peer could differ."""

    peer: str
    layer: int
    experts: tuple[int, ...]
    diff: float
    bound: float
    by: str
    at: float = field(default_factory=time.time)

    def reason(self) -> str:
        what = "non-finite" if not math.isfinite(self.diff) else f"{self.diff:.3g} > bound {self.bound:.3g}"
        return (f"expert results of layer {self.layer} (experts {list(self.experts)}) differ from a recomputation "
                f"({self.by}): {what}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["experts"] = list(self.experts)
        d["diff"] = self.diff if math.isfinite(self.diff) else None
        d["reason"] = self.reason()
        return d


@dataclass
class Plan:
    """One wave's checks: ``pairs`` [V] flat pair indices of the checked rows (ascending per peer), ``owner`` [V] the
    peer that answered each, ``by`` [V] its verifier (a peer id, or ``LOCAL``), ``extra`` {verifier peer: positions
    in ``pairs`` it recomputes, as extra rows of its frame}, ``local`` positions recomputed here."""

    pairs: np.ndarray
    owner: list[str]
    by: list[str]
    extra: dict[str, np.ndarray]
    local: np.ndarray

    @property
    def remote(self) -> np.ndarray:
        """[V] bool: recomputed by a replica."""
        out = np.ones(len(self.pairs), dtype=bool)
        out[self.local] = False
        return out


@dataclass
class Outcome:
    """What the checks of one wave decided: peers banned now, peers whose answers cannot be used (unsettled)."""

    banned: set[str] = field(default_factory=set)
    unsettled: set[str] = field(default_factory=set)


FETCHES_PER_S = 1.0  # experts a host may fetch per second to check rows no replica can (sustained), in bursts of
FETCH_BURST = 8.0  # ... this many: with R = 1 and large experts, checks would otherwise fetch blobs without end


class Reference:
    """This host's own computation of experts for verification: weights from ``weights(layer, expert)`` (the node
    fetches the blob), held on ``device`` in ``dtype``, at most ``max_experts`` at once (least recently used
    dropped). Separate from the routing's ``LocalExperts``, so verifying never makes this host a holder."""

    def __init__(self, spec: ExpertSpec, device: torch.device, dtype: torch.dtype,
                 weights: Callable[[int, int], ExpertWeights], max_experts: int = 64,
                 fetches_per_s: float = FETCHES_PER_S) -> None:
        if max_experts < 1:
            raise ConfigError(f"a verification reference must hold at least one expert, got {max_experts}")
        self.backend = LocalExperts(spec, device, dtype)
        self.weights = weights
        self.max_experts = max_experts
        self.fetches_per_s = fetches_per_s
        self._tokens, self._refilled = FETCH_BURST, time.monotonic()  # the fetch budget's bucket
        self.quantized = False
        self._lru: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def eps(self) -> float:
        return local_eps(self.backend.dtype, self.quantized)

    def can_check(self, layer: int, expert: int) -> bool:
        """Whether a sampled row may be recomputed here with this expert now: it is held, or the fetch budget
        (``fetches_per_s``, bursts of ``FETCH_BURST``) allows bringing it (and this takes one from the budget)."""
        with self._lock:
            if (layer, expert) in self._lru:
                return True
            now = time.monotonic()
            self._tokens = min(FETCH_BURST, self._tokens + (now - self._refilled) * self.fetches_per_s)
            self._refilled = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True

    def __call__(self, layer: int, x: torch.Tensor, experts: np.ndarray) -> torch.Tensor:
        """x [V, D] (one pair per row), experts [V] -> [V, D] fp32: expert(x) per row, unweighted. Raises what
        ``weights`` raises (``ExpertUnavailableError``) when an expert cannot be had."""
        with self._lock:  # one verification at a time: the cache's contents must not change under a computation
            need = [(layer, e) for e in sorted(set(experts.tolist()))]
            for key in need:
                if key in self._lru:
                    self._lru.move_to_end(key)
                    continue
                w = self.weights(*key)
                self.quantized = self.quantized or w.quantization() is not None
                self.backend.add(*key, w)
                self._lru[key] = None
            over = len(self._lru) - self.max_experts
            if over > 0:  # the least recently used that this call does not need (it may need more than the cap)
                wanted = set(need)
                for old in [key for key in self._lru if key not in wanted][:over]:
                    del self._lru[old]
                    self.backend.remove(*old)
            be = self.backend
            ids = torch.from_numpy(experts.astype(np.int64)).to(be.device)[:, None]  # [V, 1]
            ones = torch.ones(ids.shape, dtype=be.dtype, device=be.device)
            return be(layer, x.to(be.device, be.dtype), ids, ones).float()  # [V, D]


PROBATION_ROWS = 32  # rows of a peer checked and agreed before only the fraction f of its pairs is sampled
PROBATION_PER_WAVE = 2  # rows of a peer on probation checked in each wave it answers (at least)


class Verifier:
    """Samples pairs to check, checks them, keeps the bans. ``fraction`` in [0, 1]; ``reference``: this host's own
    computation (None: every check must be settled by replicas, and a mismatch is never decided, only refused)."""

    def __init__(self, fraction: float, reference: Reference | None, seed: int | None = None,
                 max_extra_bytes: int = 16 << 20, probation_rows: int = PROBATION_ROWS) -> None:
        if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
            raise ConfigError(f"--verify must be a fraction in [0, 1], got {fraction}")
        self.fraction = fraction
        self.probation_rows = probation_rows if fraction > 0 else 0
        self._agreed: dict[str, int] = {}  # rows of each peer checked and found within the bound
        self.reference = reference
        self.max_extra_bytes = max_extra_bytes  # extra rows per verifier frame; beyond them, verified here
        self._rng = np.random.default_rng(seed)  # seed None: from the OS
        self._lock = threading.Lock()
        self.banned: frozenset[str] = frozenset()  # replaced whole on a ban: readers need no lock
        self._bans: list[Ban] = []
        self.pairs = 0  # pairs checked (each recomputed once)
        self.rows = 0  # rows checked
        self.mismatches = 0  # rows found beyond the bound (before settling)
        self.unchecked = 0  # rows sampled but not checked (a verifier failed, or nothing could recompute them)

    # -- sampling ---------------------------------------------------------------------------------------------------

    def plan(self, groups: dict[str, np.ndarray | None], n_pairs: int, k: int, exp: np.ndarray, row_bytes: int,
             verifier_of: Callable[[int, str], str | None],
             local_ok: Callable[[int], bool] | None = None) -> Plan | None:
        """The checks of one wave over ``groups`` ({holder: its pair indices, None: all ``n_pairs``}; ``LOCAL`` is
        skipped): None when nothing is sampled. ``verifier_of(expert, peer)``: another live replica, or None.
        ``local_ok(expert)``: whether this host may recompute that expert now (``Reference.can_check``); a sampled
        row that would need one it may not is left unchecked (counted in ``unchecked``)."""
        if self.fraction <= 0.0:
            return None
        pairs_l: list[np.ndarray] = []
        owner: list[str] = []
        for peer in sorted(p for p in groups if p != LOCAL):
            got = groups[peer]
            mine = np.arange(n_pairs) if got is None else got
            if not len(mine):
                continue
            with self._lock:
                hit = self._rng.random(len(mine)) < self.fraction if self.fraction < 1.0 else None
                owed = self.probation_rows - self._agreed.get(peer, 0)
                if hit is not None and owed > 0:  # on probation: a few of its rows in every wave, whatever f
                    tokens = np.unique(mine // k)
                    some = self._rng.choice(tokens, size=min(len(tokens), PROBATION_PER_WAVE), replace=False)
                    hit |= np.isin(mine // k, some)
            if hit is not None and not hit.any():
                continue
            rows = mine if hit is None else mine[np.isin(mine // k, mine[hit] // k)]  # whole rows of sampled pairs
            pairs_l.append(rows)
            owner.extend([peer] * len(rows))
        if not pairs_l:
            return None
        pairs = np.concatenate(pairs_l)
        chosen = [verifier_of(int(exp[pair]), peer) for pair, peer in zip(pairs.tolist(), owner, strict=True)]
        if local_ok is not None:
            ok: dict[int, bool] = {}
            skipped: set[tuple[str, int]] = set()  # (peer, token): rows this host cannot recompute now
            for pair, peer, q in zip(pairs.tolist(), owner, chosen, strict=True):
                if q is None:
                    e = int(exp[pair])
                    if e not in ok:
                        ok[e] = local_ok(e)
                    if not ok[e]:
                        skipped.add((peer, pair // k))
            if skipped:
                with self._lock:
                    self.unchecked += len(skipped)
                keep = [i for i, (pair, peer) in enumerate(zip(pairs.tolist(), owner, strict=True))
                        if (peer, pair // k) not in skipped]
                if not keep:
                    return None
                pairs, owner, chosen = pairs[keep], [owner[i] for i in keep], [chosen[i] for i in keep]
        by: list[str] = []
        extra: dict[str, list[int]] = {}
        room: dict[str, int] = {}
        for i, q in enumerate(chosen):
            if q is not None and room.setdefault(q, self.max_extra_bytes) >= row_bytes:
                room[q] -= row_bytes
                extra.setdefault(q, []).append(i)
                by.append(q)
            else:
                by.append(LOCAL)
        local = np.array([i for i, b in enumerate(by) if b == LOCAL], dtype=np.int64)
        return Plan(pairs, owner, by, {q: np.array(ix, dtype=np.int64) for q, ix in extra.items()}, local)

    # -- checking ---------------------------------------------------------------------------------------------------

    def check(self, layer: int, plan: Plan, hidden: torch.Tensor, k: int, exp: np.ndarray, w: np.ndarray,
              answers: dict[str, tuple[np.ndarray | None, torch.Tensor]], got: torch.Tensor,
              have: np.ndarray) -> Outcome:
        """Checks ``plan``'s rows. ``answers`` {peer: (rows, answer)}: its answer [R, D] per row sent, ``rows`` [R]
        the tokens of those rows, ascending (None: every token in order); ``got`` [V, D] fp32 verifier outputs per
        planned pair, ``have`` [V] bool which arrived. Bans and returns what it decided; a peer missing from
        ``answers`` (failed) has no rows checked."""
        # (few small numpy / torch calls per peer: this runs in the decode loop; index_add_ and ufunc.at cost tens
        # of microseconds each on a busy core, a one-hot matmul a few)
        out = Outcome()
        d = hidden.shape[1]
        eps_here = self.reference.eps if self.reference is not None else REMOTE_EPS
        owners = np.array(plan.owner)
        by_replica = plan.remote
        for peer in sorted(set(plan.owner)):
            ans = answers.get(peer)
            sel = np.flatnonzero(owners == peer)  # positions in plan.pairs, ascending pair order
            pairs = plan.pairs[sel]
            uniq, inv = np.unique(pairs // k, return_inverse=True)  # [U] tokens of the rows, [P] row of each pair
            complete = np.bincount(inv[~have[sel]], minlength=len(uniq)) == 0  # [U] every pair recomputed
            if ans is None or not complete.any():
                with self._lock:
                    self.unchecked += len(uniq)
                continue
            n_incomplete = int((~complete).sum())
            if n_incomplete:
                keep = complete[inv]  # pairs of complete rows
                sel, pairs = sel[keep], pairs[keep]
                uniq, inv = np.unique(pairs // k, return_inverse=True)
            v = got[torch.from_numpy(sel).to(got.device)]  # [P, D] fp32
            wt = torch.from_numpy(w[pairs]).to(v.device)  # [P]
            one_hot = torch.from_numpy((inv[None, :] == np.arange(len(uniq))[:, None]).astype(np.float32))  # [U, P]
            one_hot = one_hot.to(v.device)
            ref = one_hot @ (v * wt[:, None])  # [U, D] the row's weighted sum
            scale = one_hot @ (wt.abs() * v.norm(dim=1))  # [U] S
            remote = np.bincount(inv[by_replica[sel]], minlength=len(uniq)) > 0  # [U] a replica recomputed some
            eps_ref = torch.from_numpy(np.where(remote, REMOTE_EPS, eps_here).astype(np.float32)).to(v.device)
            rows, part = ans
            at = uniq if rows is None else np.searchsorted(rows, uniq)  # the rows of these tokens in its answer
            y = part[torch.from_numpy(at).to(part.device)].to(v.device, torch.float32)  # [U, D]
            diff = (y - ref).norm(dim=1)
            lim = bound(scale, REMOTE_EPS, eps_ref, d)
            bad = ~(diff <= lim)  # NaN / inf answers are mismatches too
            n_bad = int(bad.sum())
            with self._lock:
                self.unchecked += n_incomplete
                self.pairs += len(pairs)
                self.rows += len(uniq)
                self.mismatches += n_bad
                self._agreed[peer] = self._agreed.get(peer, 0) + len(uniq) - n_bad
            if not n_bad:
                continue
            for r in torch.nonzero(bad).flatten().tolist():
                rows_pairs = pairs[inv == r]
                in_row = sel[inv == r]
                experts = tuple(int(e) for e in exp[rows_pairs])
                if not remote[r]:
                    out.banned |= self._ban(Ban(peer, layer, experts, float(diff[r]), float(lim[r]), "local"))
                    continue
                self._settle(layer, plan, hidden, k, exp, w, peer, y[r], rows_pairs, in_row, got, out)
        return out

    def _settle(self, layer: int, plan: Plan, hidden: torch.Tensor, k: int, exp: np.ndarray, w: np.ndarray,
                peer: str, answer: torch.Tensor, pairs: np.ndarray, positions: np.ndarray, got: torch.Tensor,
                out: Outcome) -> None:
        """A row checked (partly) by replicas disagreed: recompute it here and ban whoever disagrees with this
        host (the peer on its row; a replica on its pairs)."""
        verifiers = {plan.by[i] for i in positions.tolist()} - {LOCAL}
        if self.reference is None:
            out.unsettled |= {peer, *verifiers}
            return
        ref = self.reference
        tok = torch.from_numpy(pairs // k).to(hidden.device)
        try:
            mine = ref(layer, hidden.index_select(0, tok), exp[pairs])  # [P, D] fp32
        except EkmeshError as exc:
            log.warning("could not recompute expert results of layer %d here to settle a mismatch between %s and "
                        "%s: %s", layer, peer, ", ".join(sorted(verifiers)), exc)
            out.unsettled |= {peer, *verifiers}
            return
        d = hidden.shape[1]
        experts = tuple(int(e) for e in exp[pairs])
        wt = torch.from_numpy(w[pairs]).to(mine.device)
        row = (mine * wt[:, None]).sum(0)
        scale = (wt.abs() * mine.norm(dim=1)).sum()
        diff = float((answer.to(mine.device) - row).norm())
        lim = float(bound(scale, REMOTE_EPS, ref.eps, d))
        if not diff <= lim:
            out.banned |= self._ban(Ban(peer, layer, experts, diff, lim, "local"))
        theirs = got[torch.from_numpy(positions)].to(mine.device)  # [P, D] the replicas' outputs
        pair_diff = (theirs - mine).norm(dim=1)
        pair_lim = bound(mine.norm(dim=1), REMOTE_EPS, ref.eps, d)
        for j in torch.nonzero(~(pair_diff <= pair_lim)).flatten().tolist():
            q = plan.by[int(positions[j])]
            out.banned |= self._ban(Ban(q, layer, (experts[j],), float(pair_diff[j]), float(pair_lim[j]), "local"))

    def _ban(self, ban: Ban) -> set[str]:
        with self._lock:
            if ban.peer in self.banned:
                return {ban.peer}
            self._bans.append(ban)
            self.banned = self.banned | {ban.peer}
        log.warning("banned peer %s: %s", ban.peer, ban.reason())
        return {ban.peer}

    # -- reporting --------------------------------------------------------------------------------------------------

    def ban_count(self) -> int:
        """How many peers were banned so far: a generator's retraction counter (its cache may hold their
        unchecked results, ``Generator``)."""
        return len(self.banned)

    def bans(self) -> list[Ban]:
        with self._lock:
            return list(self._bans)

    def status(self) -> dict[str, Any]:
        """For ``ekmesh status --json`` and the API: the fraction, counters, and every ban with its reason."""
        with self._lock:
            return {"fraction": self.fraction, "pairs": self.pairs, "rows": self.rows,
                    "mismatches": self.mismatches, "unchecked": self.unchecked,
                    "banned": [b.as_dict() for b in self._bans]}
