"""Attention of one decode step on a GPU: SDPA over the key-value heads (``attention.attend_grouped``, what the
captured step ran before) vs flash-decoding (``infer/decode_attention.py``), over a static cache, in one run.

Qwen3-30B-A3B's attention shape (32 query heads, 4 KV heads, head dim 128, bf16, one query token), a static cache of
``--cache`` slots, queried at several positions (only keys up to the position are visible). Each side runs 48 calls
(a step's layers) in one CUDA graph, replayed ``--repeats`` times; the median of 5 such timings, in µs per call.
Flash-decoding is also timed at fixed split counts. Before timing, each position's outputs are compared: beyond
``TOL`` of the output's magnitude fails the run.

    python benchmarks/decode_attention.py                 # caches of 4,096 and 32,768 slots
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable

import torch

from ekmesh.infer import decode_attention
from ekmesh.infer.models.attention import attend_grouped
from ekmesh.infer.models.cache import attention_mask

CALLS = 48  # per graph: one per layer of a step
TOL = 2e-2  # bf16


def graph_time(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    """Median over 5 timings of ``repeats`` replays of a graph of CALLS calls of ``fn``, in µs per call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / repeats / CALLS * 1000)
    return statistics.median(times)


def measure(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
            scaling: float, args: argparse.Namespace) -> dict:
    """µs per call of each side at one position."""
    row = {"attend_grouped": graph_time(lambda: attend_grouped(q, k, v, rows, scaling), args.repeats),
           "decode_attention": graph_time(lambda: decode_attention.attend(q, k, v, positions, None, scaling),
                                          args.repeats)}
    for sp in args.splits:
        row[f"splits={sp}"] = graph_time(
            lambda sp=sp: decode_attention.attend(q, k, v, positions, None, scaling, splits=sp), args.repeats)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--positions", type=int, nargs="+", default=[37, 1000, 4000])
    ap.add_argument("--splits", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    torch.manual_seed(0)
    dev, h, hkv, d = torch.device("cuda"), 32, 4, 128
    scaling = d ** -0.5
    report: dict = {"device_name": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                    "shape": {"heads": h, "kv_heads": hkv, "head_dim": d, "dtype": "bfloat16"}, "us_per_call": {}}
    failed = []
    for s in args.cache:
        q = torch.randn(1, 1, h, d, device=dev, dtype=torch.bfloat16).transpose(1, 2)  # [B, H, T, d]
        k = torch.randn(1, hkv, s, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, hkv, s, d, device=dev, dtype=torch.bfloat16)
        for pos in sorted({p for p in args.positions if p < s} | {s - 1}):
            positions = torch.tensor([pos], device=dev)
            rows = attention_mask(positions, s, None, always=True).repeat(h // hkv, 1)
            ref = attend_grouped(q, k, v, rows, scaling)
            got = decode_attention.attend(q, k, v, positions, None, scaling)
            diff = float((got.float() - ref.float()).abs().max() / ref.float().abs().max())
            if not diff <= TOL:
                failed.append((s, pos, diff))
                continue
            row = measure(q, k, v, positions, rows, scaling, args)
            row["default_splits"] = decode_attention._splits(hkv, s, 64, dev)
            row["speedup"] = row["attend_grouped"] / row["decode_attention"]
            report["us_per_call"][f"cache={s} position={pos}"] = {
                key: round(val, 2) if isinstance(val, float) else val for key, val in row.items()}
    print(json.dumps(report, indent=1))
    if failed:
        sys.exit(f"outputs differ beyond {TOL}: {failed}")


if __name__ == "__main__":
    main()
