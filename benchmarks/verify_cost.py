"""What verifying remote expert results costs per token (``ekmesh join --verify F``), through real nodes.

Four ``ekmesh join`` processes on 127.0.0.1 serve the built-in model: three expert holders (R = 2) and an attention
host that holds no expert (``--no-experts``). For each fraction F the host is restarted with ``--verify F`` (the
holders keep running) and answers ``--requests`` greedy requests of ``--tokens`` tokens each (a fixed prompt); the
decode time per token is read from each answer's ``ekmesh`` block (median over requests), with the verification
counters of the same answers. Fractions run in ``--rounds`` interleaved rounds (F1 F2 ... F1 F2 ...) so that a
drift of the machine affects them alike, and both the median and the fastest answer per fraction are reported (on a
shared machine other processes' bursts inflate medians; the fastest is each fraction at its best); every answer must
equal the first answer at F = 0 (verification must not change a token), and nobody may be banned.

    python benchmarks/verify_cost.py [--fractions 0,0.01,0.05,0.1,1] [--tokens 64] [--requests 3] [--rounds 2]

With ``--tolerance`` it prints instead, for the built-in model's real hidden states, the largest honest difference
between an fp32 computation and fp32 / fp16 / bf16 ones (float and q4 experts, bf16 wire, on the CPU and on CUDA when
there is one), as a ratio to the bound ``verify.py`` uses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HOST = 3
PROMPT = "And God said, Let there be light"


def _mesh_cost(args: argparse.Namespace) -> None:
    from tests.node.servingmesh import ServingMesh, post

    class Mesh(ServingMesh):
        def restart_host(self, fraction: float) -> None:
            assert self._args[HOST][-2] == "--verify"  # the host's role ends its arguments
            self._args[HOST][-1] = str(fraction)
            self.restart(HOST)

    fractions = [float(f) for f in args.fractions.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="ekmesh-verify-cost-"))
    results: dict[float, list[float]] = {f: [] for f in fractions}
    checks: dict[float, list[int]] = {f: [] for f in fractions}
    reference: list[int] | None = None
    with Mesh(tmp, "builtin", [["--no-attention"]] * 3 + [["--no-experts", "--verify", "0"]],
              extra=["--replicas", "2"]) as mesh:
        mesh.wait_ready(HOST, timeout=180, holders=2)
        for rnd in range(args.rounds):
            for f in fractions:
                mesh.restart_host(f)
                mesh.wait_ready(HOST, timeout=180, holders=2)
                body = {"prompt": PROMPT, "max_tokens": args.tokens, "temperature": 0, "ignore_eos": True,
                        "return_token_ids": True}
                post(mesh.api(HOST) + "/completions", {**body, "max_tokens": 4})  # warm up
                for _ in range(args.requests):
                    block: dict[str, Any] = post(mesh.api(HOST) + "/completions", body, timeout=300)["ekmesh"]
                    reference = reference or block["token_ids"]
                    if block["token_ids"] != reference:
                        raise SystemExit(f"F={f}: the answer changed under verification")
                    if block["verify"]["banned"]:
                        raise SystemExit(f"F={f}: an honest peer was banned: {block['verify']}")
                    results[f].append(1e3 / block["tokens_per_s"])
                    checks[f].append(block["verify"]["rows"])
                print(f"round {rnd + 1}: F={f}: {statistics.median(results[f][-args.requests:]):.2f} ms/token, "
                      f"{statistics.median(checks[f][-args.requests:])} rows checked per answer", flush=True)
    base, fastest = statistics.median(results[fractions[0]]), min(results[fractions[0]])
    out = {str(f): {"ms_per_token_median": round(statistics.median(results[f]), 3),
                    "extra_median": round(statistics.median(results[f]) - base, 3),
                    "ms_per_token_fastest": round(min(results[f]), 3),
                    "extra_fastest": round(min(results[f]) - fastest, 3),
                    "rows_checked_per_token": round(statistics.median(checks[f]) / args.tokens, 3)}
           for f in fractions}
    print(json.dumps(out) if args.json else "\n".join(
        f"--verify {f}: median {v['ms_per_token_median']:.2f} ms/token ({v['extra_median']:+.2f}), fastest "
        f"{v['ms_per_token_fastest']:.2f} ({v['extra_fastest']:+.2f}); {v['rows_checked_per_token']} rows checked "
        "per token" for f, v in out.items()))


def _tolerance() -> None:
    import torch

    from ekmesh.infer.dataplane.verify import REMOTE_EPS, bound, local_eps
    from ekmesh.infer.expert import quantize_expert
    from ekmesh.infer.experts import LocalExperts
    from ekmesh.infer.generate import Generator, SamplingParams
    from ekmesh.infer.session import LocalModel
    from ekmesh.registry.lookup import open_model

    lm = LocalModel.open(open_model("builtin"), "cpu", "fp32")
    calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def record(layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        calls.append((layer, x.clone(), ids.clone()))
        return lm.experts(layer, x, ids, w)

    gen = Generator(lm.model, record, lm.tokenizer, default_stop_ids=())
    assert lm.tokenizer is not None
    for i, text in enumerate(["In the beginning", "And the LORD spake unto Moses, saying", PROMPT]):
        gen.generate(lm.tokenizer.encode(text), SamplingParams(max_tokens=48, temperature=1.0, seed=i,
                                                                stop_ids=frozenset()))
    ck, spec = lm.checkpoint, lm.checkpoint.config.expert_spec()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    def backend(dtype: torch.dtype, fmt: str | None, device: str) -> LocalExperts:
        be = LocalExperts(spec, device, dtype)
        for layer, e in ck.expert_addresses():
            w = ck.read_expert(layer, e)
            be.add(layer, e, quantize_expert(w, fmt) if fmt else w)
        return be

    d = ck.config.hidden_size
    for fmt in (None, "q8", "q4"):
        ref = backend(torch.float32, fmt, "cpu")
        lim_eps = local_eps(torch.float32, fmt is not None)
        for device in devices:
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                peer, worst, n = backend(dtype, fmt, device), 0.0, 0
                for layer, x, ids in calls:
                    t, k = ids.shape
                    xs = x.repeat_interleave(k, 0)
                    ones = torch.ones(t * k, 1)
                    mine = ref(layer, xs, ids.reshape(-1, 1), ones).float()
                    theirs = peer(layer, xs.bfloat16().to(device, dtype), ids.reshape(-1, 1).to(device),
                                  ones.to(device, dtype)).bfloat16().float().cpu()
                    ratio = (theirs - mine).norm(dim=1) / bound(mine.norm(dim=1), REMOTE_EPS, lim_eps, d)
                    worst, n = max(worst, float(ratio.max())), n + len(ratio)
                print(f"experts {fmt or 'float'}, peer {str(dtype)[6:]} on {device}: largest honest difference "
                      f"{worst:.3f} of the bound over {n} pairs", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fractions", default="0,0.01,0.05,0.1,1")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tolerance", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.tolerance:
        _tolerance()
    else:
        _mesh_cost(args)


if __name__ == "__main__":
    main()
