"""Faults: SIGKILL one expert holder mid-generation and check that the output does not change (goal: 0 failures).

A tiny random checkpoint (``tests.tiny_models``; qwen3_moe by default) has its experts spread over 4 expert-server
subprocesses with R = 2 (every MoE layer uses all 4, every expert has 2 holders); this process is the attention
host and holds no expert. Each trial, with a seeded random prompt:

1. a no-fault run over the mesh (fresh backend) gives the reference tokens and per-step latencies;
2. a fault run (fresh backend) SIGKILLs, right after a random decode step, one random holder among those that
   answered in that step;
3. a failure is any difference in the 48 greedy tokens, or any exception reaching the caller.

The "hit" step is the first step after the kill in which the backend recorded a failure of the victim (the victim
may not be chosen for a few steps). Its extra latency is reported two ways: its time minus the same step's time in
the no-fault run, and its time minus the median decode step of the same fault run (less sensitive to load drift).
The killed server is restarted (same experts) between trials.

    python benchmarks/faults.py [--trials 20] [--tokens 48] [--seed 0] [--arch qwen3_moe]
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ekmesh.infer.dataplane.remote import RemoteExperts  # noqa: E402
from ekmesh.infer.generate import Generator, SamplingParams  # noqa: E402
from ekmesh.infer.loader import load_all  # noqa: E402
from tests.infer.dataplane.mesh import Mesh, spread  # noqa: E402
from tests.tiny_models import CONFIGS, make_tiny, random_prompt  # noqa: E402

PEERS = ["p0", "p1", "p2", "p3"]


class Kill:
    """Once token ``after`` is out, SIGKILLs a random peer among those that answered a request in that step (a
    holder in use, so the kill is likely to matter). ``hit`` becomes the first later step in which ``remote``
    recorded a failure of that peer."""

    def __init__(self, mesh: Mesh, remote: RemoteExperts, after: int, rng: random.Random) -> None:
        self.mesh, self.remote, self.after, self.rng = mesh, remote, after, rng
        self.victim = ""
        self.hit: int | None = None
        self._trips: dict[str, int] = {}

    def step_done(self, i: int) -> None:
        stats = self.remote.stats()
        if i == self.after:
            in_use = sorted(p for p, s in stats.items() if s.round_trips > self._trips.get(p, 0))
            self.victim = self.rng.choice(in_use or sorted(self.mesh.procs))
            self.mesh.procs[self.victim].kill()
        elif i > self.after and self.hit is None and self.victim in stats and stats[self.victim].failures:
            self.hit = i
        self._trips = {p: s.round_trips for p, s in stats.items()}


def timed_run(gen: Generator, prompt: list[int], params: SamplingParams,
              kill: Kill | None = None) -> tuple[list[int], list[float]]:
    """Tokens and the time of each step (step i: from token i-1 handed out to token i handed out; step 0 is the
    prefill). The kill and the bookkeeping are not counted in any step's time."""
    tokens: list[int] = []
    times: list[float] = []
    t0 = time.perf_counter()
    for i, ev in enumerate(gen.stream(prompt, params)):
        times.append(time.perf_counter() - t0)
        tokens.append(ev.token_id)
        if kill is not None:
            kill.step_done(i)
        t0 = time.perf_counter()
    return tokens, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", choices=sorted(CONFIGS), default="qwen3_moe")
    ap.add_argument("--verbose", action="store_true", help="show the backend's failover warnings")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR, stream=sys.stderr)
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    rng = random.Random(args.seed)
    params = SamplingParams(max_tokens=args.tokens, stop_ids=frozenset())

    with tempfile.TemporaryDirectory() as tmp:
        path, _ = make_tiny(args.arch, Path(tmp) / args.arch)
        ckpt, model, experts = load_all(path)
        one = Generator(model, experts)
        t_start = time.perf_counter()
        mesh = Mesh(path, spread(ckpt, PEERS, replicas=2))
        print(f"{args.arch} tiny ({ckpt.config.num_layers} layers, {ckpt.config.num_experts} experts), "
              f"4 expert servers, R = 2, {args.tokens} greedy tokens, {args.trials} trials, seed {args.seed}; "
              f"servers up in {time.perf_counter() - t_start:.1f} s")
        fails: list[str] = []
        extra: list[float] = []  # hit step minus the same step of the no-fault run
        extra_own: list[float] = []  # hit step minus the median decode step of the same (fault) run
        step_ms: list[float] = []
        not_hit = 0
        try:
            for trial in range(args.trials):
                prompt = random_prompt(ckpt.config.vocab_size, n=rng.randint(4, 16), seed=rng.randrange(2**31))
                after = rng.randrange(1, args.tokens - 2)
                expected = one.generate(prompt, params).token_ids
                ref_remote = mesh.backend()
                ref, ref_times = timed_run(Generator(model, ref_remote), prompt, params)
                ref_remote.channels.close()
                step_ms += [t * 1e3 for t in ref_times[1:]]
                if ref != expected:
                    fails.append(f"trial {trial}: the no-fault mesh run differs from one process")
                remote = mesh.backend()
                kill = Kill(mesh, remote, after, rng)
                try:
                    got, times = timed_run(Generator(model, remote), prompt, params, kill)
                except Exception as exc:  # noqa: BLE001 — any error reaching the caller is a counted failure
                    fails.append(f"trial {trial}: {type(exc).__name__}: {exc} (kill after step {after})")
                    got, times = ref, []
                finally:
                    remote.channels.close()
                if got != ref:
                    first = next(i for i, (a, b) in enumerate(zip(got, ref, strict=True)) if a != b)
                    fails.append(f"trial {trial}: output differs from token {first} (kill of {kill.victim} "
                                 f"after step {after})")
                if times and kill.hit is not None:
                    extra.append(times[kill.hit] - ref_times[kill.hit])
                    others = [t for i, t in enumerate(times) if i not in (0, kill.hit)]
                    extra_own.append(times[kill.hit] - statistics.median(others))
                    print(f"trial {trial:2d}: killed {kill.victim} after step {after:2d}, hit at step {kill.hit:2d}: "
                          f"{times[kill.hit] * 1e3:6.2f} ms vs {ref_times[kill.hit] * 1e3:6.2f} ms without it")
                elif times:
                    not_hit += 1
                    print(f"trial {trial:2d}: killed {kill.victim} after step {after:2d}, never asked again")
                if kill.victim:
                    mesh.restart(kill.victim)
        finally:
            mesh.close()

    for f in fails:
        print("FAILURE", f)
    print(f"failures: {len(fails)} / {args.trials} trials (goal 0); the kill hit a request in {len(extra)} trials "
          f"({not_hit} never asked the victim again)")
    if extra:
        ms = [x * 1e3 for x in extra]
        own = [x * 1e3 for x in extra_own]
        print(f"extra latency of the hit step vs the same step without the fault: mean {statistics.mean(ms):.2f} ms, "
              f"median {statistics.median(ms):.2f} ms, max {max(ms):.2f} ms; vs the median step of the same run: "
              f"mean {statistics.mean(own):.2f} ms, median {statistics.median(own):.2f} ms")
    print(f"median no-fault decode step {statistics.median(step_ms):.2f} ms")

if __name__ == "__main__":
    main()
