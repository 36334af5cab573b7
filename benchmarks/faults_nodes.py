"""Faults through real nodes: one fault of a given kind in the expert holder the attention host is using, mid-answer;
count answers that change (goal: 0), errors, the stall each fault adds to an answer, and the time the mesh takes to
heal once the fault is removed.

Mesh: four ``ekmesh join`` processes serving a tiny random checkpoint (``tests.tiny_models``: 2 MoE layers, 8
experts, top-2): three expert holders (``--no-attention``, identities seeded so the placement is the same every
run) and an attention host holding no expert (``--no-experts``), R = 2, so every expert survives the loss of one
holder. The host verifies a fraction of remote results (``--verify``; the node's default unless given).

Each trial, with a seeded random prompt: (1) the no-fault answer: a greedy stream of ``--tokens`` token ids from the
host's API, its time the baseline; (2) the same prompt again, and after a random number of tokens the host's status
names the holder whose round trips grew most since the answer began (the victim: checked to have served this answer,
round trips > 0, before the fault), and the fault is injected into it; (3) the fault is removed and the trial ends
when every expert is back on R ready holders with every node settled (heal: from the removal). A changed answer is
any difference from the one-process answer (both runs are compared); an error is anything the client got instead
of tokens. Stall = the faulted answer's time minus the baseline's. Any ban of an honest peer is counted.

Kinds (``--fault``):
- ``kill``: SIGKILL; removed by restarting the node (same home) once the answer is over.
- ``stop``: SIGSTOP (a hung peer: its sockets stay open, nothing answers), SIGCONT after ``--hold`` s (default 5).
- ``partition``: the holder's link cut (``faultnet.py``: every node in a network namespace behind a user-space
  link, no iptables or netem on this kernel) for ``--hold`` s (default uniform in 5..20), then mended.
- ``slow``: every packet the holder sends delayed by ``--delay-ms`` (default 50) from the fault until the answer
  ends (same link emulator).
- ``liar``: holder 1 runs with the test hook ``EKMESH_TEST_LIAR`` (``infer/dataplane/liar.py``: relative noise
  ``--liar-scale`` on every vector it answers) from the start; the fault is the first answer itself. Reported: whether
  and after how many streamed tokens it was banned (the ban's time against the tokens' arrival), whether that answer
  stayed exact (only pairs verified before the ban are guaranteed: exact at ``--verify 1``), and whether the next
  answer (liar banned, also the baseline) is exact. Then the liar is stopped (heal: every expert back on R ready
  honest holders), and it and the host are restarted for the next trial (a ban lasts as long as the host's process).

    python benchmarks/faults_nodes.py --fault kill|stop|partition|slow|liar [--trials 20] [--tokens 200] [--seed 0]
                                      [--hold S|A:B] [--delay-ms 50] [--verify F] [--liar-scale 0.5] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import faultnet  # noqa: E402
from ekmesh.infer.dataplane import liar  # noqa: E402
from ekmesh.infer.generate import SamplingParams  # noqa: E402
from ekmesh.infer.session import LocalModel  # noqa: E402
from ekmesh.registry.imports import import_full  # noqa: E402
from ekmesh.shard.store import Store  # noqa: E402
from tests.discovery.meshproc import NodeProc, wait_until  # noqa: E402
from tests.node.servingmesh import BASE, ServingMesh, seed_identity, stream_chunks  # noqa: E402
from tests.tiny_models import COMMON, make_tiny, random_prompt  # noqa: E402

KINDS = ("kill", "stop", "partition", "slow", "liar")
NETNS = ("partition", "slow")  # kinds that need the link emulator
HOLDERS, HOST, LIAR, R = 3, 3, 1, 2  # nodes 0..2 hold experts, node 3 hosts attention; node 1 lies (``liar``)
HOLD = {"stop": (5.0, 5.0), "partition": (5.0, 20.0)}
READY_S = 180.0


@dataclass
class Answer:
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # wall clock at each token's arrival
    seconds: float = 0.0
    error: str = ""
    ekmesh: dict[str, Any] = field(default_factory=dict)

    def max_gap(self, start: float) -> float:
        marks = [start, *self.times]
        return max((b - a for a, b in zip(marks, marks[1:], strict=False)), default=0.0)


def stream(api: str, prompt: list[int], n: int, on_token: Callable[[int], None] | None = None) -> Answer:
    """A greedy streamed completion; ``on_token(count)`` after each chunk with tokens."""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    out, t0 = Answer(), time.monotonic()
    try:
        for chunk in stream_chunks(api, body, timeout=300):
            out.ekmesh = chunk.get("ekmesh", out.ekmesh)
            new = [t for c in chunk["choices"] for t in c.get("token_ids", [])]
            out.tokens += new
            out.times += [time.time()] * len(new)
            if new and on_token is not None:
                on_token(len(out.tokens))
    except (OSError, RuntimeError, ValueError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    out.seconds = time.monotonic() - t0
    return out


class FaultMesh(ServingMesh):
    """``ServingMesh`` whose node i listens on ``listen[i]`` and runs under ``prefix[i]`` (a namespace, an env)."""

    def __init__(self, tmp: Path, model: str, roles: Sequence[Sequence[str]], listen: Sequence[str],
                 prefix: Sequence[list[str] | None], seeds: Sequence[str], extra: Sequence[str]) -> None:
        i = BASE.index("--listen")
        rest = BASE[:i] + BASE[i + 2:]
        self.nodes: list[NodeProc] = []
        self.claiming = sum(1 for role in roles if "--no-experts" not in role)
        self._args = [[*rest, "--listen", listen[j], "--model", model, "--name", f"n{j}", *extra, *role]
                      for j, role in enumerate(roles)]
        self._prefix = list(prefix)
        try:
            for j in range(len(roles)):
                seed_identity(tmp / f"n{j}", seeds[j])
                boot = ["--peer", self.nodes[0].addrs[0]] if self.nodes else []
                self.nodes.append(NodeProc(tmp / f"n{j}", *self._args[j], *boot, prefix=self._prefix[j]))
        except BaseException:
            self.close()
            raise

    def restart(self, i: int) -> NodeProc:
        old = self.nodes[i]
        old.stop()
        boot = next(n for j, n in enumerate(self.nodes) if j != i and n.proc.poll() is None)
        self.nodes[i] = NodeProc(old.home, *self._args[i], "--peer", boot.addrs[0], prefix=self._prefix[i])
        return self.nodes[i]


    def peers(self) -> dict[str, dict[str, int]]:
        """The host's data-plane counters per peer (round trips, failures)."""
        got: dict[str, dict[str, int]] = self.nodes[HOST].status()["serving"]["peers"]
        return got

    def settled(self, live: set[int]) -> bool:
        """The host serves, sees exactly the nodes ``live`` up, each holding what the placement assigns it, and
        every routed expert has R ready holders among them."""
        snap = self.nodes[HOST].status()
        serving = snap["serving"]
        mid = serving["model"]
        models = snap["models"].get(mid)
        ids = {self.nodes[i].peer_id for i in live}
        up = [p for p in snap["peers"] if p["state"] in ("self", "up")]
        if not serving["ready"] or models is None or {p["peer_id"] for p in up} != ids:
            return False
        claimers = ids - {self.nodes[HOST].peer_id}
        rows = [row for row in models["holders"] if any(row)]
        return (set(models["per_peer"]) == claimers and bool(rows) and min(min(r) for r in rows) >= R
                and all(p["assigned"].get(mid, 0) == (p["models"].get(mid) or 0) for p in up)
                and all(p["assigned"].get(mid, 0) > 0 for p in up if p["peer_id"] in claimers))

    def wait_settled(self, live: set[int], timeout: float = READY_S) -> float:
        return wait_until(lambda: self.settled(live), timeout, f"every expert on {R} ready holders of {sorted(live)}",
                          interval=0.2)

    def bans(self) -> list[dict[str, Any]]:
        v = self.nodes[HOST].status()["serving"]["verify"] or {}
        out: list[dict[str, Any]] = v.get("banned", [])
        return out


class Heal:
    """From the moment a fault is removed, polls the host until the mesh is settled again (in a thread, so that a
    removal during an answer is timed from the removal)."""

    def __init__(self, mesh: FaultMesh, live: set[int], removed: float) -> None:
        self.removed, self.done, self.error = removed, 0.0, ""
        self._thread = threading.Thread(target=self._run, args=(mesh, live), daemon=True)
        self._thread.start()

    def _run(self, mesh: FaultMesh, live: set[int]) -> None:
        try:
            mesh.wait_settled(live)
            self.done = time.monotonic()
        except AssertionError as exc:
            self.error = str(exc)

    def seconds(self) -> float | None:
        self._thread.join(READY_S + 30)
        return round(self.done - self.removed, 3) if self.done else None


class Bench:
    def __init__(self, args: argparse.Namespace, mesh: FaultMesh, net: faultnet.FaultNet | None,
                 one: Any, vocab: int) -> None:
        self.args, self.mesh, self.net, self.one, self.vocab = args, mesh, net, one, vocab
        self.rng = random.Random(args.seed)
        self.greedy = SamplingParams(max_tokens=args.tokens, stop_ids=frozenset())
        self.stopped: NodeProc | None = None  # a SIGSTOPped node, to continue if the benchmark fails

    def prompt(self, trial: int) -> tuple[list[int], list[int]]:
        prompt = random_prompt(self.vocab, n=self.args.prompt_tokens, seed=self.args.seed * 1000 + trial)
        return prompt, self.one.generate(prompt, self.greedy).token_ids

    def trial(self, trial: int) -> dict[str, Any]:
        kind, mesh, args = self.args.fault, self.mesh, self.args
        prompt, expected = self.prompt(trial)
        base = stream(mesh.api(HOST), prompt, args.tokens)
        fault_at = self.rng.randrange(5, max(6, args.tokens // 2))
        lo, hi = args.hold
        hold = self.rng.uniform(lo, hi)
        rec: dict[str, Any] = {"trial": trial + 1, "fault_after_tokens": None, "victim": None, "served_trips": 0}
        s0, bans0 = mesh.peers(), len(mesh.bans())
        timers: list[threading.Timer] = []
        heal: list[Heal] = []

        def inject(count: int) -> None:
            if rec["victim"] is not None or count < fault_at:
                return
            s1 = mesh.peers()
            grew = {p: s1[p]["round_trips"] - s0.get(p, {}).get("round_trips", 0) for p in s1}
            victim = max(grew, key=lambda p: grew[p])
            idx = next(i for i, nd in enumerate(mesh.nodes) if nd.peer_id == victim)
            rec.update(victim=victim, idx=idx, served_trips=grew[victim], fault_after_tokens=count,
                       failures_before=s1[victim]["failures"], trips_at_fault=s1[victim]["round_trips"],
                       injected=time.monotonic(), injected_at=round(time.time(), 3))
            if kind == "kill":
                mesh.nodes[idx].signal(signal.SIGKILL)
            elif kind == "stop":
                self.stopped = mesh.nodes[idx]
                self.stopped.signal(signal.SIGSTOP)
                timers.append(threading.Timer(hold, self.remove, (idx, heal)))
            elif kind == "partition":
                assert self.net is not None
                self.net.cut(idx)
                timers.append(threading.Timer(hold, self.remove, (idx, heal)))
            else:
                assert self.net is not None
                self.net.delay(idx, args.delay_ms / 1e3)
            for t in timers:
                t.start()

        t0 = time.time()
        got = stream(mesh.api(HOST), prompt, args.tokens, inject)
        s2 = mesh.peers()
        for t in timers:
            t.join()
        if rec["victim"] is not None and kind in ("kill", "slow"):
            self.remove(rec["idx"], heal)
        rec.update(self._outcome(expected, base, got, t0))
        if rec["victim"] is not None:
            after = s2.get(rec["victim"], {})
            rec["victim_failures_added"] = after.get("failures", 0) - rec.pop("failures_before")
            rec["victim_trips_after_fault"] = after.get("round_trips", 0) - rec.pop("trips_at_fault")
            injected = rec.pop("injected")
            rec["fault_s"] = round(heal[0].removed - injected, 3) if heal else None
            rec["heal_s"] = heal[0].seconds() if heal else None
        rec["honest_bans"] = len(mesh.bans()) - bans0  # the list of bans only grows
        rec["hold_s"] = round(hold, 3) if kind in ("stop", "partition") else None
        return rec

    def remove(self, idx: int, heal: list[Heal]) -> None:
        """Ends the fault of node ``idx`` and starts timing the heal (called from a timer or after the answer)."""
        kind, mesh = self.args.fault, self.mesh
        removed = time.monotonic()
        if kind == "kill":
            mesh.restart(idx)
        elif kind == "stop":
            mesh.nodes[idx].signal(signal.SIGCONT)
            self.stopped = None
        elif kind == "partition":
            assert self.net is not None
            self.net.mend(idx)
        else:
            assert self.net is not None
            self.net.delay(idx, 0.0)
        heal.append(Heal(mesh, set(range(HOLDERS + 1)), removed))

    def _outcome(self, expected: list[int], base: Answer, got: Answer, t0: float) -> dict[str, Any]:
        def why(a: Answer) -> str:
            if a.error:
                return a.error
            if a.tokens != expected:
                first = next((i for i, (x, y) in enumerate(zip(a.tokens, expected, strict=False)) if x != y),
                             min(len(a.tokens), len(expected)))
                return f"tokens differ from {first} ({len(a.tokens)} of {len(expected)} received)"
            return ""
        return {"ok": why(got) == "", "why": why(got), "error": bool(got.error), "baseline_why": why(base),
                "answer_s": round(got.seconds, 3), "baseline_s": round(base.seconds, 3),
                "added_s": round(got.seconds - base.seconds, 3), "max_gap_s": round(got.max_gap(t0), 3)}

    def liar_trial(self, trial: int) -> dict[str, Any]:
        mesh, args = self.mesh, self.args
        prompt, expected = self.prompt(trial)
        lying = mesh.nodes[LIAR].peer_id
        s0 = mesh.peers()
        t0 = time.time()
        got = stream(mesh.api(HOST), prompt, args.tokens)
        s2 = mesh.peers()
        bans = mesh.bans()
        ban = next((b for b in bans if b["peer"] == lying), None)
        later = stream(mesh.api(HOST), prompt, args.tokens)  # the liar banned: the baseline, and exact again
        rec: dict[str, Any] = {"trial": trial + 1, "victim": lying, "fault_after_tokens": 0,
                               "served_trips": s2.get(lying, {}).get("round_trips", 0)
                               - s0.get(lying, {}).get("round_trips", 0)}
        rec.update(self._outcome(expected, later, got, t0))
        rec.update(banned=ban is not None, honest_bans=sum(1 for b in bans if b["peer"] != lying),
                   ban_after_tokens=sum(1 for t in got.times if t < ban["at"]) if ban else None,
                   ban_reason=ban["reason"] if ban else None, later_exact=later.tokens == expected)
        removed = time.monotonic()
        mesh.nodes[LIAR].stop()
        honest = set(range(HOLDERS + 1)) - {LIAR}
        rec["heal_s"] = Heal(mesh, honest, removed).seconds()
        if trial + 1 < args.trials:  # the next trial: the liar back, a host that has banned nobody yet
            mesh.restart(LIAR)
            mesh.restart(HOST)
            mesh.wait_settled(set(range(HOLDERS + 1)))
        return rec


def parse_hold(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(":")
    return float(lo), float(hi or lo)


def spread(xs: Sequence[float | int | None]) -> dict[str, float] | None:
    vals = [x for x in xs if x is not None]
    return {"median": round(statistics.median(vals), 3), "max": round(max(vals), 3), "n": len(vals)} if vals else None


def summarise(args: argparse.Namespace, recs: list[dict[str, Any]], fraction: float | None) -> dict[str, Any]:
    served = [r for r in recs if r["victim"] is not None]
    out = {"fault": args.fault, "trials": len(recs), "tokens": args.tokens, "prompt_tokens": args.prompt_tokens,
           "verify": fraction, "net": "namespaces" if args.fault in NETNS else "loopback",
           "hold_s": list(args.hold) if args.fault in HOLD else None,
           "delay_ms": args.delay_ms if args.fault == "slow" else None,
           "changed_answers": sum(1 for r in recs if not r["ok"] and not r["error"]),
           "errors": sum(1 for r in recs if r["error"]),
           "baseline_changed": sum(1 for r in recs if r["baseline_why"]),
           "victim_not_serving": sum(1 for r in recs if r["served_trips"] <= 0),
           "honest_bans": sum(r["honest_bans"] for r in recs),
           "added_s": spread([r["added_s"] for r in recs]), "max_gap_s": spread([r["max_gap_s"] for r in recs]),
           "heal_s": spread([r.get("heal_s") for r in served]), "heal_failed": sum(1 for r in served
                                                                                  if r.get("heal_s") is None),
           "fault_after_tokens": spread([r["fault_after_tokens"] for r in served]),
           "victim_failures_added": spread([r.get("victim_failures_added") for r in served]),
           "victim_trips_after_fault": spread([r.get("victim_trips_after_fault") for r in served])}
    if args.fault == "liar":
        out.update(banned=sum(1 for r in recs if r["banned"]),
                   ban_after_tokens=spread([r["ban_after_tokens"] for r in recs]),
                   first_answer_exact=sum(1 for r in recs if r["ok"]),
                   later_answers_exact=sum(1 for r in recs if r["later_exact"]), liar_scale=args.liar_scale)
    return {**out, "per_trial": recs}


def line(args: argparse.Namespace, r: dict[str, Any]) -> str:
    what = (f"banned after {r['ban_after_tokens']} tokens" if r.get("banned") else "NOT banned") \
        if args.fault == "liar" else f"{args.fault} {str(r['victim'])[-8:]} after {r['fault_after_tokens']} tokens"
    return (f"trial {r['trial']}/{args.trials}: {what} (it served {r['served_trips']} round trips first): "
            f"{'ok' if r['ok'] else 'FAILED ' + r['why']}; {r['added_s']:+.2f} s, longest gap {r['max_gap_s']:.2f} s,"
            f" healed in {r.get('heal_s')} s"
            + (f"; next answer exact: {r['later_exact']}" if "later_exact" in r else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fault", choices=KINDS, default="kill")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--prompt-tokens", type=int, default=11)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hold", type=parse_hold, default=None, metavar="S|A:B",
                    help="seconds a stop or partition lasts (uniform in A..B); default 5 for stop, 5:20 partition")
    ap.add_argument("--delay-ms", type=float, default=50.0)
    ap.add_argument("--verify", type=float, default=None, help="the host's --verify (default: the node's)")
    ap.add_argument("--liar-scale", type=float, default=0.5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.hold = args.hold or HOLD.get(args.fault, (0.0, 0.0))
    if args.fault in NETNS and (why := faultnet.available()):
        sys.exit(f"--fault {args.fault} {why}")
    tmp = Path(tempfile.mkdtemp(prefix="ekmesh-faults-"))
    src, _ = make_tiny("qwen3_moe", tmp / "ckpt", max_position_embeddings=2048)
    model_id = import_full(str(src), store=Store(tmp / "n0" / "store")).model_id
    one = LocalModel.open(src, "cpu", "fp32").generator
    roles = [["--no-attention"]] * HOLDERS + [["--no-experts", *(["--verify", str(args.verify)]
                                                                  if args.verify is not None else [])]]
    seeds = [f"faults-{i}" for i in range(HOLDERS + 1)]
    recs: list[dict[str, Any]] = []
    net = faultnet.FaultNet(HOLDERS, tmp).__enter__() if args.fault in NETNS else None
    bench: Bench | None = None
    try:
        listen = ([f"/ip4/{ip}/tcp/0" for ip in net.ip] + [f"/ip4/{net.host_ip}/tcp/0"] if net
                  else ["/ip4/127.0.0.1/tcp/0"] * (HOLDERS + 1))
        prefix: list[list[str] | None] = [net.prefix(i) for i in range(HOLDERS)] + [None] if net \
            else [None] * (HOLDERS + 1)
        if args.fault == "liar":
            prefix[LIAR] = ["env", f"{liar.ENV}={liar.MODE}{args.liar_scale}"]
        with FaultMesh(tmp, model_id, roles, listen, prefix, seeds, ["--replicas", str(R)]) as mesh:
            mesh.wait_settled(set(range(HOLDERS + 1)))
            bench = Bench(args, mesh, net, one, vocab=COMMON["vocab_size"])
            fraction = (mesh.nodes[HOST].status()["serving"]["verify"] or {}).get("fraction")
            for trial in range(args.trials):
                recs.append(bench.liar_trial(trial) if args.fault == "liar" else bench.trial(trial))
                print(line(args, recs[-1]), file=sys.stderr if args.json else sys.stdout, flush=True)
            result = {**summarise(args, recs, fraction), "logs": str(tmp)}
    finally:
        if bench is not None and bench.stopped is not None:
            bench.stopped.signal(signal.SIGCONT)
        if net is not None:
            net.close()
    if args.json:
        print(json.dumps(result, indent=1))
        return
    s = result
    print(f"{s['fault']}: {s['trials']} trials, {s['changed_answers']} changed answers (goal 0), {s['errors']} errors, "
          f"{s['victim_not_serving']} victims that had not served the answer, {s['honest_bans']} bans of honest "
          f"peers; added s per answer {s['added_s']}, longest gap {s['max_gap_s']}; heal s {s['heal_s']}"
          + (f"; liar banned in {s['banned']}/{s['trials']} after tokens {s['ban_after_tokens']}, first answer exact "
             f"{s['first_answer_exact']}, later answers exact {s['later_answers_exact']}" if args.fault == "liar"
             else ""))


if __name__ == "__main__":
    main()
