"""Memory a node spends on a model's routed experts, as its user sees it: the ``ekmesh join`` process's RSS.

One run: a random Qwen3-MoE checkpoint (``partial_import.build_checkpoint``: float32 tensors, no download) is
imported into one store, then ``import --quantize q8`` and ``--quantize q4`` of it (ekmesh's own code paths). For
each variant, a single real ``ekmesh join --model M --replicas 1 --no-attention --no-api`` node claims and loads
every expert; once its status says so, its resident memory (``VmRSS`` from ``/proc``) and the bytes its experts
backend reports (``loaded_bytes``) are read. The variants: the float model held in bf16 (``--dtype bf16``, the
baseline a user of a bf16 checkpoint holds) and in fp32 (the CPU default), and the q8 and q4 models (their experts
stay quantized whatever ``--dtype`` says). The floor is the same node offering too little memory for any expert
(torch, libp2p and the node's own state, no expert): expert RSS = RSS - floor, and the ratios are to bf16's
(goals: q8 <= 0.53, q4 <= 0.30). Nodes run one after another with the same arguments; the median of ``--repeats``
runs is reported.

    python benchmarks/node_memory.py [--layers 4 --experts 64 --hidden 1024 --inter 768] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from partial_import import build_checkpoint  # noqa: E402

from tests.discovery.meshproc import NodeProc, wait_until  # noqa: E402
from tests.node.servingmesh import BASE  # noqa: E402


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmRSS:"))) * 1024


def measure(home: Path, model: str, extra: list[str], experts: int, timeout: float) -> dict:
    """One node's RSS once it holds ``experts`` experts (0: the floor, a node offering too little memory for any)."""
    memory = "64" if experts else "0.0001"
    node = NodeProc(home, *BASE, "--no-api", "--model", model, "--replicas", "1", "--memory", memory,
                    "--no-attention", *extra)
    try:
        def loaded() -> bool:
            s = node.status()["serving"]
            return s["loaded_experts"] == experts and s["state"] == "serving experts"
        wait_until(loaded, timeout, f"{extra}: every expert loaded", interval=0.5)
        time.sleep(2.0)  # let the loader's temporaries go back (the status says loaded before they are freed)
        s = node.status()["serving"]
        return {"rss": rss(node.proc.pid), "loaded_bytes": s["loaded_bytes"], "format": s["experts_format"],
                "dtype": s["dtype"], "loaded_experts": s["loaded_experts"]}
    finally:
        node.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from ekmesh.registry.imports import import_full
    from ekmesh.registry.quantize import import_quantized
    from ekmesh.shard.store import Store

    with tempfile.TemporaryDirectory(prefix="node_memory_") as tmp:
        t = Path(tmp)
        build_checkpoint(t / "ckpt", args.layers, args.experts, args.hidden, args.inter, 4096, 4)
        home = t / "home"
        home.mkdir(mode=0o700)
        store = Store(home / "store")
        float_id = import_full(str(t / "ckpt"), store=store).model_id
        models = {"bf16": (float_id, ["--dtype", "bf16"]), "fp32": (float_id, ["--dtype", "fp32"])}
        for fmt in ("q8", "q4"):
            models[fmt] = (import_quantized(float_id, fmt, store=store).model_id, ["--dtype", "fp32"])
        os.environ["EKMESH_HOME"] = str(home)
        total = args.layers * args.experts
        runs: dict[str, list[dict]] = {name: [] for name in ["floor", *models]}
        for _ in range(args.repeats):  # the variants interleaved, each repeat in the same order
            runs["floor"].append(measure(home, float_id, ["--dtype", "bf16"], 0, args.timeout))
            for name, (mid, extra) in models.items():
                runs[name].append(measure(home, mid, extra, total, args.timeout))
    rss_med = {name: statistics.median(r["rss"] for r in rs) for name, rs in runs.items()}
    expert_rss = {name: rss_med[name] - rss_med["floor"] for name in models}
    gib = 1 << 30
    report = {
        "model": f"qwen3_moe random, {args.layers} layers x {args.experts} experts, hidden {args.hidden}, "
                 f"expert intermediate {args.inter}",
        "experts": total, "repeats": args.repeats, "nproc": os.cpu_count(),
        "rss_gib_median": {n: round(v / gib, 3) for n, v in rss_med.items()},
        "rss_gib_all": {n: [round(r["rss"] / gib, 3) for r in rs] for n, rs in runs.items()},
        "expert_rss_gib": {n: round(v / gib, 3) for n, v in expert_rss.items()},
        "loaded_bytes_gib": {n: round(runs[n][0]["loaded_bytes"] / gib, 3) for n in models},
        "expert_rss_vs_bf16": {n: round(expert_rss[n] / expert_rss["bf16"], 3) for n in models},
        "loaded_bytes_vs_bf16": {n: round(runs[n][0]["loaded_bytes"] / runs["bf16"][0]["loaded_bytes"], 3)
                                 for n in models},
        "formats": {n: runs[n][0]["format"] for n in models},
    }
    print(json.dumps(report) if args.json else "\n".join(f"{k:22s} {v}" for k, v in report.items()))
    if any(r["loaded_experts"] != total for n in models for r in runs[n]):
        sys.exit("FAIL: a node did not hold every expert")


if __name__ == "__main__":
    main()
