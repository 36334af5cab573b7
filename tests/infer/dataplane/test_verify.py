"""Verification of remote expert results (``infer/dataplane/verify.py``) and the test-only liar (``liar.py``).

- the tolerance: unit roundoffs and bounds as the module docstring derives them; every honest pairing of dtypes
  (fp32 / fp16 / bf16 peers, float / q8 / q4 experts, bf16 wire) of a tiny model's real hidden states stays under
  the bound (the largest ratio is printed), and the liar's perturbation exceeds it on every row;
- the sampling: f = 0 plans nothing, f = 1 every remote pair, the host's own pairs never; a sampled pair's whole
  row is planned; rows are checked at the rate ``1 - (1-f)^m`` says (binomial, 6 sigma); verifiers are replicas
  when there is one, else this host, within the frame budget;
- the checks: an honest answer passes, a perturbed or non-finite one bans its peer with the reason, a replica that
  disagrees is settled by this host (the liar is banned, whichever side it was), and an unsettleable mismatch bans
  nobody;
- through real expert servers (threads, sockets on 127.0.0.1 port 0, pinned TLS): a liar among three holders is
  banned, its results are redone without it, greedy tokens equal one process, and it is never asked again; honest
  servers at f = 1 are never banned.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ekmesh.core.errors import ConfigError, ExpertUnavailableError
from ekmesh.infer.dataplane import liar
from ekmesh.infer.dataplane.channel import ChannelPool, TlsIdentity
from ekmesh.infer.dataplane.frames import ModelLimits
from ekmesh.infer.dataplane.peerstats import RemoteTimeouts
from ekmesh.infer.dataplane.remote import RemoteExperts
from ekmesh.infer.dataplane.server import ExpertServer
from ekmesh.infer.dataplane.verify import (
    FETCH_BURST,
    LOCAL,
    PROBATION_PER_WAVE,
    PROBATION_ROWS,
    REMOTE_EPS,
    K,
    Plan,
    Reference,
    Verifier,
    bound,
    local_eps,
    unit_roundoff,
)
from ekmesh.infer.expert import quantize_expert
from ekmesh.infer.experts import LocalExperts
from ekmesh.infer.generate import Generator, SamplingParams
from ekmesh.infer.loader import Checkpoint, load_all
from tests.infer.dataplane.mesh import spread
from tests.tiny_models import make_tiny

GREEDY = SamplingParams(max_tokens=24, stop_ids=frozenset())
LIE = f"{liar.MODE}0.5"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # dimensions q4's groups divide (hidden 64, expert intermediate 32), so the same model serves float, q8 and q4
    path, _ = make_tiny("qwen3_moe", tmp_path_factory.mktemp("verify") / "m", hidden_size=64, moe_intermediate_size=32)
    return path


# -- tolerance ---------------------------------------------------------------------------------------------------


def test_unit_roundoffs_and_bound() -> None:
    assert unit_roundoff(torch.float32) == 2.0 ** -24
    assert unit_roundoff(torch.bfloat16) == 2.0 ** -8
    assert unit_roundoff(torch.float16) == 2.0 ** -11
    with pytest.raises(ConfigError):
        unit_roundoff(torch.int8)
    assert REMOTE_EPS == K * 2.0 ** -8
    assert local_eps(torch.float32, quantized=False) == K * 2.0 ** -24
    assert local_eps(torch.float32, quantized=True) == K * 2.0 ** -8  # the kernels read bf16 activations
    assert local_eps(torch.bfloat16, quantized=False) == K * 2.0 ** -8
    b = bound(torch.tensor([0.0, 2.0]), REMOTE_EPS, local_eps(torch.float32, False), 64)
    assert b[0] > 0 and math.isclose(float(b[1] - b[0]), 2.0 * (REMOTE_EPS + K * 2.0 ** -24), rel_tol=1e-6)


def _moe_inputs(path: Path) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(layer, hidden [T, D], expert ids [T, k], weights [T, k]) of every MoE call of a real fp32 generation."""
    ckpt, model, experts = load_all(path)
    seen: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def record(layer: int, hidden: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        seen.append((layer, hidden.clone(), ids.clone(), w.clone()))
        return experts(layer, hidden, ids, w)

    prompt = torch.randint(0, ckpt.config.vocab_size, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    Generator(model, record).generate(prompt, GREEDY)
    return seen


def _backend(ckpt: Checkpoint, dtype: torch.dtype, fmt: str | None) -> LocalExperts:
    be = LocalExperts(ckpt.config.expert_spec(), "cpu", dtype)
    for layer, e in ckpt.expert_addresses():
        w = ckpt.read_expert(layer, e)
        be.add(layer, e, quantize_expert(w, fmt) if fmt else w)
    return be


def _per_pair(be: LocalExperts, layer: int, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[T*k, D] fp32: each pair's expert output, computed as a peer of ``be``'s dtype with a bf16 wire would."""
    t, k = ids.shape
    xs = x.repeat_interleave(k, 0).to(torch.bfloat16).to(be.dtype)  # [T*k, D] the rows as they arrive
    ones = torch.ones(t * k, 1, dtype=be.dtype)
    return be(layer, xs, ids.reshape(-1, 1), ones).to(torch.bfloat16).float()  # answered in the wire's dtype


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", [None, "q8", "q4"])
def test_honest_dtypes_stay_within_the_bound_and_the_liar_does_not(tiny: Path, fmt: str | None) -> None:
    ckpt = Checkpoint.open(tiny)
    calls = _moe_inputs(tiny)
    ref = _backend(ckpt, torch.float32, fmt)  # this host: fp32
    eps_here = local_eps(torch.float32, fmt is not None)
    lie = liar.from_env({liar.ENV: LIE})
    assert lie is not None
    worst_pair, worst_row, least_lie = 0.0, 0.0, math.inf
    d = ckpt.config.hidden_size
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        peer = _backend(ckpt, dtype, fmt)
        for layer, x, ids, w in calls:
            t, k = ids.shape
            mine = ref(layer, x.repeat_interleave(k, 0), ids.reshape(-1, 1), torch.ones(t * k, 1)).float()  # [T*k, D]
            theirs = _per_pair(peer, layer, x, ids)
            # pair by pair (a replica's outputs against this host's, when settling)
            ratio = (theirs - mine).norm(dim=1) / bound(mine.norm(dim=1), REMOTE_EPS, eps_here, d)
            worst_pair = max(worst_pair, float(ratio.max()))
            # rows (a peer's weighted sum per token against this host's)
            wt = w.reshape(-1, 1).float()
            row_ref = (mine * wt).view(t, k, d).sum(1)
            scale = (mine.norm(dim=1) * wt[:, 0]).view(t, k).sum(1)
            row = (theirs * wt).view(t, k, d).sum(1).to(torch.bfloat16).float()
            lim = bound(scale, REMOTE_EPS, eps_here, d)
            worst_row = max(worst_row, float(((row - row_ref).norm(dim=1) / lim).max()))
            lied = lie(row.to(peer.dtype)).float()
            least_lie = min(least_lie, float(((lied - row_ref).norm(dim=1) / lim).min()))
    print(f"fmt={fmt}: largest honest difference / bound: pairs {worst_pair:.3f}, rows {worst_row:.3f}; "
          f"smallest lie / bound {least_lie:.2f}")
    assert worst_pair < 0.5 and worst_row < 0.5, "an honest peer came within 2x of the bound"
    assert least_lie > 1.0, "the test liar must be caught on every checked row"


# -- the liar hook ------------------------------------------------------------------------------------------------


def test_liar_only_with_the_exact_value() -> None:
    assert liar.from_env({}) is None
    assert liar.from_env({liar.ENV: ""}) is None
    for bad in ("1", "true", "perturb-expert-outputs", f"{liar.MODE}", f"{liar.MODE}0", f"{liar.MODE}-1",
                f"{liar.MODE}nan", f"{liar.MODE}inf", f"{liar.MODE}x", f" {liar.MODE}0.5"):
        with pytest.raises(ConfigError, match=liar.ENV):
            liar.from_env({liar.ENV: bad})
    lie = liar.from_env({liar.ENV: f"{liar.MODE}0.25"})
    assert lie is not None
    y = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    rel = ((lie(y) - y).norm(dim=1) / y.norm(dim=1))
    assert 0.15 < float(rel.mean()) < 0.35  # about SCALE
    assert lie(y.bfloat16()).dtype is torch.bfloat16


# -- sampling --------------------------------------------------------------------------------------------------------


def _no_replica(_e: int, _p: str) -> str | None:
    return None


def test_plan_fractions_and_whole_rows() -> None:
    k, t = 2, 50
    exp = np.arange(t * k) % 8
    groups: dict[str, np.ndarray | None] = {"a": np.arange(0, t * k, 2), "b": np.arange(1, t * k, 2), LOCAL: None}
    assert Verifier(0.0, None).plan(groups, t * k, k, exp, 64, _no_replica) is None
    full = Verifier(1.0, None).plan(groups, t * k, k, exp, 64, _no_replica)
    assert full is not None and sorted(full.pairs.tolist()) == list(range(t * k))  # LOCAL's own pairs: never
    assert set(full.by) == {LOCAL} and len(full.local) == t * k and not full.extra
    # rows: "a" holds both pairs of tokens 0..9; one sampled pair brings its whole row
    rows = {"a": np.arange(20)}
    for seed in range(20):
        p = Verifier(0.3, None, seed=seed).plan(rows, 20, k, exp, 64, _no_replica)
        if p is not None:
            tokens = p.pairs // k
            assert all(np.count_nonzero(tokens == tok) == 2 for tok in set(tokens.tolist()))
    with pytest.raises(ConfigError):
        Verifier(1.5, None)
    with pytest.raises(ConfigError):
        Verifier(float("nan"), None)


def test_rows_are_sampled_at_the_stated_rate() -> None:
    """A peer answering m = 2 pairs per token has each row checked with probability 1 - (1-f)^2."""
    f, k, t, n = 0.05, 2, 200, 100
    v = Verifier(f, None, seed=7, probation_rows=0)  # (rows of a peer on probation: tested below)
    exp = np.zeros(t * k, dtype=np.int64)
    checked = 0
    for _ in range(n):
        p = v.plan({"liar": None}, t * k, k, exp, 64, _no_replica)
        checked += 0 if p is None else len(set((p.pairs // k).tolist()))
    rate = 1 - (1 - f) ** k
    total = t * n
    sd = math.sqrt(total * rate * (1 - rate))
    print(f"rows checked {checked} of {total}; expected {total * rate:.0f} +- {sd:.0f}")
    assert abs(checked - total * rate) < 6 * sd


def test_plan_prefers_replicas_within_the_frame_budget() -> None:
    k = 1
    exp = np.arange(10)
    v = Verifier(1.0, None, max_extra_bytes=4 * 100)  # room for 4 rows of 100 bytes per replica

    def replica(e: int, peer: str) -> str | None:
        return "q" if e % 2 == 0 and peer != "q" else None

    p = v.plan({"a": None}, 10, k, exp, 100, replica)
    assert p is not None
    assert p.by == ["q", LOCAL, "q", LOCAL, "q", LOCAL, "q", LOCAL, LOCAL, LOCAL]  # the 5th even pair: no room
    assert p.extra["q"].tolist() == [0, 2, 4, 6] and p.local.tolist() == [1, 3, 5, 7, 8, 9]


# -- checks ----------------------------------------------------------------------------------------------------------


class _Weights:
    """A weights source over a checkpoint (its experts quantized to ``fmt``) that counts reads, or fails (as a node
    whose fetch fails would)."""

    def __init__(self, ckpt: Checkpoint, fail: bool = False, fmt: str | None = None) -> None:
        self.ckpt, self.fail, self.fmt, self.reads = ckpt, fail, fmt, 0

    def __call__(self, layer: int, expert: int) -> Any:
        if self.fail:
            raise ExpertUnavailableError(layer, expert, "test: no source")
        self.reads += 1
        w = self.ckpt.read_expert(layer, expert)
        return quantize_expert(w, self.fmt) if self.fmt else w


def _layer_case(tiny: Path) -> tuple[Checkpoint, int, torch.Tensor, np.ndarray, np.ndarray, int]:
    ckpt = Checkpoint.open(tiny)
    layer = min(layer for layer, _ in ckpt.expert_addresses())
    t, k = 4, 2
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(t, ckpt.config.hidden_size, generator=g)
    exp = torch.randperm(ckpt.config.expert_spec().num_experts, generator=g)[: t * k].numpy() % 8
    w = torch.rand(t * k, generator=g).numpy().astype(np.float32)
    return ckpt, layer, hidden, exp, w, k


def _answer(ref: LocalExperts, layer: int, hidden: torch.Tensor, exp: np.ndarray, w: np.ndarray, k: int
            ) -> torch.Tensor:
    t = hidden.shape[0]
    return ref(layer, hidden, torch.from_numpy(exp.astype(np.int64)).view(t, k), torch.from_numpy(w).view(t, k))


def _plan_all(v: Verifier, n: int, k: int, exp: np.ndarray, by: str | None = None) -> Plan:
    p = v.plan({"p": None}, n, k, exp, 64, lambda _e, peer: by if by != peer else None)
    assert p is not None
    return p


def _verifier_outputs(ckpt: Checkpoint, layer: int, hidden: torch.Tensor, plan: Plan, k: int, exp: np.ndarray,
                      noise: float = 0.0) -> tuple[torch.Tensor, np.ndarray]:
    ref = Reference(ckpt.config.expert_spec(), torch.device("cpu"), torch.float32, _Weights(ckpt))
    got = ref(layer, hidden[torch.from_numpy(plan.pairs // k)], exp[plan.pairs])
    if noise:
        got = got + noise * got.norm(dim=1, keepdim=True) * torch.randn(got.shape, generator=torch.Generator())
    return got, np.ones(len(plan.pairs), dtype=bool)


@pytest.mark.timeout(60)
def test_checks_pass_honest_answers_and_ban_wrong_ones(tiny: Path) -> None:
    ckpt, layer, hidden, exp, w, k = _layer_case(tiny)
    be = _backend(ckpt, torch.float32, None)
    honest = _answer(be, layer, hidden, exp, w, k)
    for answer, banned in ((honest, False), (honest.bfloat16().float(), False), (honest * 1.3, True),
                           (torch.full_like(honest, math.nan), True)):
        weights = _Weights(ckpt)
        v = Verifier(1.0, Reference(ckpt.config.expert_spec(), torch.device("cpu"), torch.float32, weights))
        plan = _plan_all(v, len(exp), k, exp)
        got, have = _verifier_outputs(ckpt, layer, hidden, plan, k, exp)
        out = v.check(layer, plan, hidden, k, exp, w, {"p": (None, answer)}, got, have)
        assert out.banned == ({"p"} if banned else set()) and not out.unsettled
        st = v.status()
        assert st["rows"] == hidden.shape[0] and st["pairs"] == len(exp)
        if banned:
            (ban,) = st["banned"]
            assert ban["peer"] == "p" and ban["layer"] == layer and ban["by"] == "local"
            assert sorted(ban["experts"]) == sorted(set(ban["experts"]) & set(exp.tolist()))
            assert "differ from a recomputation" in ban["reason"]
            assert ban["diff"] is None or ban["diff"] > ban["bound"] > 0
            assert v.banned == frozenset({"p"})
        else:
            assert st["banned"] == [] and st["mismatches"] == 0
    # a row that some verifier did not answer goes unchecked
    v = Verifier(1.0, None)
    plan = _plan_all(v, len(exp), k, exp)
    got, have = _verifier_outputs(ckpt, layer, hidden, plan, k, exp)
    have[0] = False
    out = v.check(layer, plan, hidden, k, exp, w, {"p": (None, honest * 2)}, got, have)
    assert v.status()["unchecked"] == 1 and v.status()["rows"] == hidden.shape[0] - 1 and out.banned == {"p"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("liar_is", ["peer", "replica"])
def test_a_replica_mismatch_is_settled_here(tiny: Path, liar_is: str) -> None:
    ckpt, layer, hidden, exp, w, k = _layer_case(tiny)
    honest = _answer(_backend(ckpt, torch.float32, None), layer, hidden, exp, w, k)
    v = Verifier(1.0, Reference(ckpt.config.expert_spec(), torch.device("cpu"), torch.float32, _Weights(ckpt)))
    plan = _plan_all(v, len(exp), k, exp, by="q")
    assert set(plan.by) == {"q"}
    got, have = _verifier_outputs(ckpt, layer, hidden, plan, k, exp, noise=0.5 if liar_is == "replica" else 0.0)
    answer = honest * 1.5 if liar_is == "peer" else honest
    out = v.check(layer, plan, hidden, k, exp, w, {"p": (None, answer)}, got, have)
    assert out.banned == {"p" if liar_is == "peer" else "q"} and not out.unsettled
    assert [b["by"] for b in v.status()["banned"]] == ["local"]
    # without a way to recompute here, nobody is banned: both are left out of this call
    v = Verifier(1.0, Reference(ckpt.config.expert_spec(), torch.device("cpu"), torch.float32,
                                _Weights(ckpt, fail=True)))
    out = v.check(layer, plan, hidden, k, exp, w, {"p": (None, answer)}, got, have)
    assert out.banned == set() and out.unsettled == {"p", "q"} and v.banned == frozenset()


@pytest.mark.timeout(60)
def test_reference_holds_at_most_max_experts(tiny: Path) -> None:
    ckpt = Checkpoint.open(tiny)
    weights = _Weights(ckpt)
    ref = Reference(ckpt.config.expert_spec(), torch.device("cpu"), torch.float32, weights, max_experts=2)
    layer = min(layer for layer, _ in ckpt.expert_addresses())
    x = torch.randn(3, ckpt.config.hidden_size)
    one = ref(layer, x, np.array([0, 1, 2]))  # three needed at once: all kept for this call
    assert one.shape == (3, ckpt.config.hidden_size) and weights.reads == 3
    ref(layer, x[:1], np.array([2]))
    assert weights.reads == 3  # cached
    held = ref.backend.held()
    assert sum(len(v) for v in held.values()) <= 3
    ref(layer, x[:1], np.array([5]))
    assert sum(len(v) for v in ref.backend.held().values()) == 2 and weights.reads == 4
    with pytest.raises(ConfigError):
        Reference(ckpt.config.expert_spec(), torch.device("cpu"), torch.float32, weights, max_experts=0)


# -- through real expert servers -------------------------------------------------------------------------------------


class _Servers:
    """In-process expert servers (real sockets, pinned TLS) for a placement; ``lying`` ones lie (the env hook);
    ``where`` {peer: (device, dtype)} (default: CPU fp32); experts quantized to ``fmt`` everywhere."""

    def __init__(self, ckpt: Checkpoint, placement: dict[str, list[tuple[int, int]]], lying: set[str],
                 monkeypatch: pytest.MonkeyPatch, where: dict[str, tuple[str, torch.dtype]] | None = None,
                 fmt: str | None = None) -> None:
        self.ckpt, self.fmt = ckpt, fmt
        self.host = TlsIdentity.generate("host")
        self.limits = ModelLimits.from_config(ckpt.config)
        self.ids = {p: TlsIdentity.generate(p) for p in placement}
        self.placement = placement
        pins = {p: i.fingerprint for p, i in self.ids.items()} | {"host": self.host.fingerprint}
        self.servers: dict[str, ExpertServer] = {}
        weights = _Weights(ckpt, fmt=fmt)
        for p, items in placement.items():
            be = LocalExperts(ckpt.config.expert_spec(), *(where or {}).get(p, ("cpu", torch.float32)))
            for layer, e in items:
                be.add(layer, e, weights(layer, e))
            with monkeypatch.context() as m:
                if p in lying:
                    m.setenv(liar.ENV, LIE)
                self.servers[p] = ExpertServer(be, self.ids[p], pins.get, self.limits).start()
        self.pins = pins

    def backend(self, fraction: float, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> tuple[RemoteExperts, _Weights]:
        weights = _Weights(self.ckpt, fmt=self.fmt)
        ref = Reference(self.ckpt.config.expert_spec(), torch.device(device), dtype, weights)
        order = list(self.placement)

        def holders(layer: int, e: int) -> list[str]:
            return [p for p in order if (layer, e) in self.placement[p]]

        pool = ChannelPool(self.host, self.pins.get,
                           lambda p: self.servers[p].address if p in self.servers else None, self.limits)
        return RemoteExperts(self.limits, LocalExperts(self.ckpt.config.expert_spec(), device, dtype), holders, pool,
                             weights,
                             # (replicas check whatever their latency: a slow one is not skipped for a local check)
                             RemoteTimeouts(first_s=20.0, floor_s=2.0, check_margin_s=60.0),
                             verifier=Verifier(fraction, ref)), weights

    def close(self) -> None:
        for s in self.servers.values():
            s.stop()


@pytest.fixture
def servers(tiny: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[_Servers]:
    ckpt = Checkpoint.open(tiny)
    replicas, lying = request.param
    s = _Servers(ckpt, spread(ckpt, ["p0", "p1", "p2"], replicas), lying, monkeypatch)
    try:
        yield s
    finally:
        s.close()


def _one_process(tiny: Path, prompt: list[int]) -> list[int]:
    _, model, experts = load_all(tiny)
    return Generator(model, experts).generate(prompt, GREEDY).token_ids


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fraction", [1.0, 1e-9], ids=["f1", "probation"])
@pytest.mark.parametrize("servers", [(2, {"p1"}), (1, {"p1"})], indirect=True, ids=["R2-replicas", "R1-here"])
def test_a_lying_server_is_banned_and_the_answer_stays_exact(tiny: Path, servers: _Servers, fraction: float) -> None:
    """At f = 1 every pair is checked; at f = 1e-9 sampling alone would (almost) never check one, and probation (rows
    of every wave of a peer not yet trusted) catches the liar in the first wave it answers: exact either way."""
    _, model, _ = load_all(tiny)
    prompt = torch.randint(0, 96, (16,), generator=torch.Generator().manual_seed(2)).tolist()
    remote, _ = servers.backend(fraction)
    gen = Generator(model, remote)
    assert gen.generate(prompt, GREEDY).token_ids == _one_process(tiny, prompt)
    assert remote.verifier is not None
    st = remote.verifier.status()
    assert [b["peer"] for b in st["banned"]] == ["p1"], st
    assert {b["by"] for b in st["banned"]} == {"local"}
    before = remote.stats()["p1"].round_trips
    assert gen.generate(prompt, GREEDY).token_ids == _one_process(tiny, prompt)
    assert remote.stats()["p1"].round_trips == before  # banned: never asked again
    assert remote.verifier.status()["mismatches"] == st["mismatches"]  # nothing wrong got through since


@pytest.mark.timeout(120)
@pytest.mark.parametrize("servers", [(2, set())], indirect=True)
def test_honest_servers_are_never_banned(tiny: Path, servers: _Servers) -> None:
    _, model, _ = load_all(tiny)
    prompt = torch.randint(0, 96, (16,), generator=torch.Generator().manual_seed(4)).tolist()
    remote, weights = servers.backend(1.0)
    assert Generator(model, remote).generate(prompt, GREEDY).token_ids == _one_process(tiny, prompt)
    assert remote.verifier is not None
    st = remote.verifier.status()
    assert st["banned"] == [] and st["mismatches"] == 0 and st["rows"] > 0 and st["unchecked"] == 0
    assert weights.reads == 0  # every pair had a replica: nothing was fetched to verify it here


@pytest.mark.timeout(120)
@pytest.mark.parametrize("servers", [(2, set())], indirect=True)
def test_probation_checks_a_bounded_number_of_rows(tiny: Path, servers: _Servers) -> None:
    """f = 1e-9: the rows checked are probation's, at most PROBATION_ROWS (+ one wave's overshoot) per peer, over
    two answers; honest peers pass it."""
    _, model, _ = load_all(tiny)
    prompt = torch.randint(0, 96, (16,), generator=torch.Generator().manual_seed(4)).tolist()
    remote, _ = servers.backend(1e-9)
    gen = Generator(model, remote)
    for _ in range(2):
        assert gen.generate(prompt, GREEDY).token_ids == _one_process(tiny, prompt)
    assert remote.verifier is not None
    st = remote.verifier.status()
    print(f"rows checked over two answers at f = 1e-9: {st['rows']}")
    assert st["banned"] == [] and st["mismatches"] == 0
    assert 0 < st["rows"] <= 3 * (PROBATION_ROWS + PROBATION_PER_WAVE - 1)


@pytest.mark.timeout(60)
def test_local_checks_fetch_within_a_budget(tiny: Path) -> None:
    """With no replica to check a row (R = 1), this host fetches the expert: at most ``FETCH_BURST`` at once, then
    ``fetches_per_s``; rows that would need a fetch beyond it stay unchecked (counted) instead of fetching blobs
    without end; experts already held are always checked."""
    ckpt = Checkpoint.open(tiny)
    weights = _Weights(ckpt)
    ref = Reference(ckpt.config.expert_spec(), torch.device("cpu"), torch.float32, weights, fetches_per_s=0.0)
    layer = next(i for i, m in enumerate(ckpt.config.moe_layers) if m)
    budget = int(FETCH_BURST)
    e = ckpt.config.num_experts
    allowed = [ref.can_check(layer, x % e) if x < e else ref.can_check(layer + 1, x % e) for x in range(budget + 3)]
    assert allowed == [True] * budget + [False] * 3
    ref(layer, torch.randn(1, ckpt.config.hidden_size), np.array([0]))  # fetched: held from now on
    assert ref.can_check(layer, 0) and not ref.can_check(layer, 1)
    # a plan whose rows need experts this host may not fetch: nothing planned, the rows counted unchecked
    v = Verifier(1.0, ref)
    k, exp = 1, np.array([1, 2, 0])
    p = v.plan({"a": None}, 3, k, exp, 64, _no_replica, lambda x: ref.can_check(layer, x))
    assert p is not None and p.pairs.tolist() == [2] and v.unchecked == 2
