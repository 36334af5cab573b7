"""Faults through real nodes: SIGKILL one expert holder mid-answer, count answers that change (goal: 0 failures).

Four ``ekmesh join`` processes on 127.0.0.1 serve a tiny random checkpoint (``tests.tiny_models``): an attention
host holding no expert (``--no-experts``) and three holders (R = 2, so every expert survives one loss). Each trial,
with a seeded random prompt, streams a greedy answer of ``--tokens`` token ids from the host's API; after a random
number of tokens the holder the host has used most so far is SIGKILLed. A failure is any difference from the
one-process answer, or an error reaching the client. Then the victim is restarted (same home) and the next trial
waits until every expert is back on 2 ready holders (the heal time is reported).

    python benchmarks/faults_nodes.py [--trials 20] [--tokens 200] [--seed 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ekmesh.infer.generate import SamplingParams  # noqa: E402
from ekmesh.infer.session import LocalModel  # noqa: E402
from ekmesh.registry.imports import import_full  # noqa: E402
from ekmesh.shard.store import Store  # noqa: E402
from tests.node.servingmesh import ServingMesh, stream_token_ids  # noqa: E402
from tests.tiny_models import make_tiny, random_prompt  # noqa: E402

HOST = 3


def stream_and_kill(mesh: ServingMesh, prompt: list[int], n: int, kill_at: int) -> tuple[list[int], str, int]:
    """The answer's token ids, the victim's peer id, and after how many tokens it was killed."""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    got: list[int] = []
    victim, killed_at = "", -1
    for got in stream_token_ids(mesh.api(HOST), body):
        if not victim and len(got) >= kill_at:
            used = mesh.nodes[HOST].status()["serving"]["peers"]
            victim = max(used, key=lambda p: used[p]["round_trips"])
            next(nd for nd in mesh.nodes if nd.peer_id == victim).signal(signal.SIGKILL)
            killed_at = len(got)
    return got, victim, killed_at


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="ekmesh-faults-"))
    src, _ = make_tiny("qwen3_moe", tmp / "ckpt", max_position_embeddings=2048)
    model_id = import_full(str(src), store=Store(tmp / "n0" / "store")).model_id
    one = LocalModel.open(src, "cpu", "fp32").generator
    greedy = SamplingParams(max_tokens=args.tokens, stop_ids=frozenset())
    failures, heals, kills = 0, [], []
    with ServingMesh(tmp, model_id, [["--no-attention"]] * 3 + [["--no-experts"]],
                     extra=["--replicas", "2"]) as mesh:
        mesh.wait_ready(HOST, timeout=120, holders=2)
        for trial in range(args.trials):
            prompt = random_prompt(96, seed=args.seed * 1000 + trial)
            expected = one.generate(prompt, greedy).token_ids
            kill_at = rng.randrange(5, args.tokens // 2)
            try:
                got, victim, killed_at = stream_and_kill(mesh, prompt, args.tokens, kill_at)
                ok = got == expected
                first = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)
                why = "" if ok else f"tokens differ from {first}"
            except (OSError, RuntimeError, ValueError) as exc:
                ok, victim, killed_at, why = False, "", -1, f"error: {exc}"
            failures += not ok
            kills.append(killed_at)
            print(f"trial {trial + 1}/{args.trials}: killed {victim[-8:] or '?'} after {killed_at} tokens: "
                  f"{'ok' if ok else 'FAILED ' + why}", flush=True)
            idx = next((i for i, nd in enumerate(mesh.nodes) if nd.peer_id == victim), None)
            if idx is not None:
                t0 = time.monotonic()
                mesh.restart(idx)
                mesh.wait_ready(HOST, timeout=120, holders=2)
                heals.append(time.monotonic() - t0)
    result = {"trials": args.trials, "failures": failures, "tokens": args.tokens,
              "kill_after_tokens_median": statistics.median(kills) if kills else None,
              "restart_to_two_holders_s_median": round(statistics.median(heals), 2) if heals else None}
    print(json.dumps(result) if args.json else
          f"{failures} failures in {args.trials} trials (goal 0); victim restarted and every expert back on 2 "
          f"ready holders in a median {result['restart_to_two_holders_s_median']} s")


if __name__ == "__main__":
    main()
