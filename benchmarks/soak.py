"""Load and soak through real nodes: concurrent streaming conversations, then thousands of short sequential requests,
every answer checked against one process, errors counted, and each node's RSS and thread count before and after.

Mesh: three ``ekmesh join`` processes on the built-in model (``tests.node.servingmesh``): an attention host that
holds no expert (``--no-experts``, node 0, whose API is used) and two expert holders (``--no-attention``), R = 1, so
every MoE layer of every token makes a data-plane round trip. The reference is the same model in this process
(``LocalModel``, the host's device and dtype), computed before the mesh starts.

Phase 1 (``--concurrent`` conversations for ``--concurrent-s`` seconds): each conversation is a thread replaying a
seeded script of ``--turns`` turns: turn t's prompt is the previous prompt + the reference answer + new user token
ids (so every prompt is known and its greedy answer precomputed), streamed (``stream: true``, ``--turn-tokens``
tokens, ``ignore_eos``) on a connection of its own; after the last turn the script starts again. A 429 ``busy``
(more than 16 generations at once) or ``too_many_connections`` (more than 64 connections) is documented, counted
and retried after its ``Retry-After``; anything else that is not the reference answer is an error (an error event
or status, a reset, a wrong or short answer).

Phase 2 (``--sequential`` requests, one at a time): seeded prompts (``--prompts`` distinct ones, cycled) of
``--seq-tokens`` tokens each, alternately plain and streamed, every answer compared with the reference.

Resources: VmRSS and Threads of each node from /proc/<pid>/status when the mesh is ready, after a warm-up (the
baseline: the first answers allocate KV caches, channels and pools once), after phase 1 and at the end. Goal: the
end within 10% of the warm baseline for every node, 0 errors beyond documented 429s.

    python benchmarks/soak.py [--concurrent 32] [--concurrent-s 180] [--sequential 2000] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ekmesh.infer.generate import SamplingParams  # noqa: E402
from ekmesh.infer.session import LocalModel  # noqa: E402
from ekmesh.registry.lookup import open_model  # noqa: E402
from tests.node.servingmesh import ServingMesh  # noqa: E402

DOCUMENTED = ("busy", "too_many_connections")  # the API's 429 codes
ROLES = [["--no-experts"], ["--no-attention"], ["--no-attention"]]
NAMES = ("host", "holder a", "holder b")
READY_S = 300.0
Script = list[tuple[list[int], list[int]]]  # per turn: (prompt ids, reference answer ids)


def reference(args: argparse.Namespace) -> tuple[list[Script], Script, str]:
    """The conversations' scripts and the sequential prompts with their one-process answers; the dtype used."""
    lm = LocalModel.open(open_model("builtin"), "cpu", None)
    vocab = lm.generator.vocab_size
    rng = random.Random(args.seed)

    def answer(prompt: list[int], n: int) -> list[int]:
        ids: list[int] = lm.generator.generate(prompt, SamplingParams(max_tokens=n, stop_ids=frozenset())).token_ids
        return ids

    def user() -> list[int]:
        return [rng.randrange(vocab) for _ in range(rng.randint(6, 16))]

    convs: list[Script] = []
    for _ in range(args.concurrent):
        script: Script = []
        prompt = user()
        for _ in range(args.turns):
            ids = answer(prompt, args.turn_tokens)
            script.append((prompt, ids))
            prompt = prompt + ids + user()
        convs.append(script)
    seq = [(p, answer(p, args.seq_tokens)) for p in (user() for _ in range(args.prompts))]
    return convs, seq, str(lm.dtype).removeprefix("torch.")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (KiB), Threads and open file descriptors of a process."""
    out: dict[str, int] = {"fds": len(list(Path(f"/proc/{pid}/fd").iterdir()))}
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = row.partition(":")
        if key in ("VmRSS", "Threads"):
            out["rss_kib" if key == "VmRSS" else "threads"] = int(value.split()[0])
    return out


class Outcome:
    """One request: ``kind`` is ok, wrong, 429:<code>, or error; ``detail`` for a failure; ``seconds``."""

    def __init__(self, kind: str, detail: str = "", seconds: float = 0.0, retry_after: float = 1.0) -> None:
        self.kind, self.detail, self.seconds, self.retry_after = kind, detail, seconds, retry_after


def ask(api: str, prompt: list[int], expected: list[int], streamed: bool) -> Outcome:
    """One completion of ``len(expected)`` greedy tokens, checked against ``expected``."""
    body = {"prompt": prompt, "max_tokens": len(expected), "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "stream": streamed}
    req = urllib.request.Request(api + "/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    t0 = time.monotonic()
    got: list[int] = []
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            if not streamed:
                got = json.loads(resp.read())["ekmesh"]["token_ids"]
            else:
                done = False
                for raw in resp:
                    line = raw.decode().strip()
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            return Outcome("error", f"error event: {chunk['error']}", time.monotonic() - t0)
                        got += [t for c in chunk["choices"] for t in c.get("token_ids", [])]
                if not done:
                    return Outcome("error", f"stream ended without [DONE] after {len(got)} tokens")
    except urllib.error.HTTPError as exc:
        try:
            err = json.loads(exc.read())["error"]
        except (ValueError, KeyError, TypeError, OSError):
            err = {"code": None, "message": "not OpenAI's error shape"}
        if exc.code == 429 and err.get("code") in DOCUMENTED:
            return Outcome(f"429:{err['code']}", retry_after=float(exc.headers.get("Retry-After") or 1))
        return Outcome("error", f"HTTP {exc.code}: {err}")
    except (OSError, ValueError, KeyError) as exc:
        return Outcome("error", f"{type(exc).__name__}: {exc}")
    seconds = time.monotonic() - t0
    if got != expected:
        first = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                     min(len(got), len(expected)))
        return Outcome("wrong", f"differs from token {first} ({len(got)} of {len(expected)})", seconds)
    return Outcome("ok", seconds=seconds)


class Tally:
    def __init__(self) -> None:
        self.kinds: Counter[str] = Counter()
        self.failures: list[str] = []
        self.seconds: list[float] = []
        self.tokens = 0
        self._lock = threading.Lock()

    def add(self, out: Outcome, tokens: int) -> None:
        with self._lock:
            self.kinds[out.kind] += 1
            if out.kind == "ok":
                self.seconds.append(out.seconds)
                self.tokens += tokens
            elif not out.kind.startswith("429"):
                self.failures.append(f"{out.kind}: {out.detail}")

    def summary(self, wall: float) -> dict[str, Any]:
        ok = self.kinds["ok"]
        return {"requests": sum(self.kinds.values()), "ok": ok, "wrong": self.kinds["wrong"],
                "errors": self.kinds["error"], **{f"http_429_{c}": self.kinds[f"429:{c}"] for c in DOCUMENTED},
                "wall_s": round(wall, 1), "answers_per_s": round(ok / wall, 2) if wall else None,
                "tokens_per_s": round(self.tokens / wall, 1) if wall else None,
                "latency_s": {"median": round(statistics.median(self.seconds), 3),
                              "p95": round(sorted(self.seconds)[int(0.95 * (len(self.seconds) - 1))], 3),
                              "max": round(max(self.seconds), 3)} if self.seconds else None,
                "failures": self.failures[:20]}


def concurrent(api: str, convs: list[Script], seconds: float) -> dict[str, Any]:
    tally, deadline, t0 = Tally(), time.monotonic() + seconds, time.monotonic()
    turns = Counter[int]()

    def talk(c: int) -> None:
        rng = random.Random(c)
        turn = 0
        while time.monotonic() < deadline:
            prompt, expected = convs[c][turn]
            out = ask(api, prompt, expected, streamed=True)
            tally.add(out, len(expected))
            if out.kind.startswith("429"):
                time.sleep(out.retry_after * rng.uniform(0.5, 1.5))  # as a client told to come back later would
                continue
            turns[c] += 1
            turn = (turn + 1) % len(convs[c])

    threads = [threading.Thread(target=talk, args=(c,), daemon=True) for c in range(len(convs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 600)
    out = tally.summary(time.monotonic() - t0)
    out["turns_per_conversation"] = {"min": min(turns.values(), default=0), "max": max(turns.values(), default=0)}
    return out


def sequential(api: str, seq: Script, n: int, every: int = 0,
               sample: Callable[[], list[dict[str, int]]] | None = None) -> dict[str, Any]:
    """``n`` requests one after the other; with ``sample``, the nodes' RSS and threads every ``every`` requests."""
    tally, t0, trend = Tally(), time.monotonic(), []
    for i in range(n):
        prompt, expected = seq[i % len(seq)]
        tally.add(ask(api, prompt, expected, streamed=bool(i % 2)), len(expected))
        if sample is not None and every and (i + 1) % every == 0:
            now = sample()
            trend.append({"after": i + 1, "rss_mib": [round(s["rss_kib"] / 1024) for s in now],
                          "threads": [s["threads"] for s in now]})
    return {**tally.summary(time.monotonic() - t0), **({"trend": trend} if sample is not None else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrent", type=int, default=32)
    ap.add_argument("--concurrent-s", type=float, default=180.0)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--turn-tokens", type=int, default=16)
    ap.add_argument("--sequential", type=int, default=2000)
    ap.add_argument("--seq-tokens", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--sample-every", type=int, default=250, help="RSS and threads every N sequential requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    t0 = time.monotonic()
    convs, seq, dtype = reference(args)
    say(f"references computed in {time.monotonic() - t0:.0f} s ({dtype})")
    tmp = Path(tempfile.mkdtemp(prefix="ekmesh-soak-"))
    snaps: dict[str, list[dict[str, int]]] = {}
    with ServingMesh(tmp, "builtin", ROLES, extra=["--replicas", "1"]) as mesh:
        mesh.wait_ready(0, timeout=READY_S, holders=1)
        serving = mesh.nodes[0].status()["serving"]
        if serving["dtype"] != dtype:
            sys.exit(f"the host computes in {serving['dtype']}, the reference in {dtype}")
        api = mesh.api(0)

        def snap(label: str) -> None:
            snaps[label] = [proc_status(nd.proc.pid) for nd in mesh.nodes]
            say(f"{label}: " + ", ".join(f"{n} {s['rss_kib'] / 1024:.0f} MiB {s['threads']} threads {s['fds']} fds"
                                         for n, s in zip(NAMES, snaps[label], strict=True)))

        snap("ready")
        warm = sequential(api, seq, 8)
        warm_conv = concurrent(api, convs[:4], 1.0)  # one turn of a few conversations: streams and threads once
        snap("warm")
        say(f"warm-up: {warm['ok'] + warm_conv['ok']} answers, {warm['errors'] + warm_conv['errors']} errors")
        phase1 = concurrent(api, convs, args.concurrent_s)
        say(f"concurrent: {json.dumps({k: v for k, v in phase1.items() if k != 'failures'})}")
        snap("after_concurrent")
        phase2 = sequential(api, seq, args.sequential, args.sample_every,
                            lambda: [proc_status(nd.proc.pid) for nd in mesh.nodes])
        say(f"sequential: {json.dumps({k: v for k, v in phase2.items() if k not in ('failures', 'trend')})}")
        for row in phase2["trend"]:
            say(f"  after {row['after']} requests: RSS MiB {row['rss_mib']}, threads {row['threads']}")
        snap("end")
        verify = mesh.nodes[0].status()["serving"]["verify"]

    def ratios(base: str) -> list[dict[str, Any]]:
        return [{"node": n, "rss": round(e["rss_kib"] / b["rss_kib"], 3),
                 "threads": round(e["threads"] / b["threads"], 3)}
                for n, b, e in zip(NAMES, snaps[base], snaps["end"], strict=True)]

    growth, steady = ratios("warm"), ratios("after_concurrent")
    result = {"concurrent": args.concurrent, "concurrent_s": args.concurrent_s, "turns": args.turns,
              "turn_tokens": args.turn_tokens, "sequential": args.sequential, "seq_tokens": args.seq_tokens,
              "phase1": phase1, "phase2": phase2, "errors": phase1["errors"] + phase2["errors"],
              "wrong": phase1["wrong"] + phase2["wrong"],
              "bans": len((verify or {}).get("banned", [])), "verify_fraction": (verify or {}).get("fraction"),
              "nodes": {label: dict(zip(NAMES, s, strict=True)) for label, s in snaps.items()},
              "end_over_warm": growth, "end_over_after_concurrent": steady,
              "flat_within_10pct": all(g["rss"] <= 1.1 and g["threads"] <= 1.1 for g in growth),
              "flat_within_10pct_after_concurrent": all(g["rss"] <= 1.1 and g["threads"] <= 1.1 for g in steady)}
    if result["errors"] or result["wrong"]:
        result["logs"] = str(tmp)  # the nodes' logs (<home>/node.log) are kept for a look at what went wrong
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['errors']} errors and {result['wrong']} wrong answers beyond documented 429s "
          f"(phase 1: {phase1['ok']} answers, {phase1['http_429_busy']} busy, "
          f"{phase1['http_429_too_many_connections']} too_many_connections; phase 2: {phase2['ok']}/"
          f"{phase2['requests']} answers); {result['bans']} bans; end/warm "
          + "; ".join(f"{g['node']} RSS {g['rss']}x threads {g['threads']}x" for g in growth)
          + f": flat within 10%: {result['flat_within_10pct']}; end/after phase 1 "
          + "; ".join(f"{g['node']} RSS {g['rss']}x threads {g['threads']}x" for g in steady))


if __name__ == "__main__":
    main()
