"""The routed experts of one decode step on a GPU: the grouped path vs the two decode kernels
(``ekmesh/infer/decode_experts.py``), over every MoE layer of a shape, in one run.

Each layer holds all of the shape's experts (bf16, random); one token is routed to k distinct random experts per
layer. Each side runs as one CUDA graph over the layers (so launch gaps are what a captured decode step has) and is
timed by replaying it (median of ``--repeats`` replays, device events). Before timing, every side's output is
checked against the grouped path on fresh random inputs (relative max difference; beyond ``TOL`` fails the run).
Also printed: the bytes a step must read (the chosen experts' weights), the bandwidth each side reaches with them,
and the device's copy bandwidth (a large device-to-device copy, bytes read + written) as the ceiling.

    python benchmarks/moe_kernels.py --layers 12                  # Qwen3-30B-A3B's expert shapes, 12 layers
    python benchmarks/moe_kernels.py --layers 12 --sweep          # also every block shape of SWEEP
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from ekmesh.infer import decode_experts, fusion
from ekmesh.infer.expert import ExpertSpec
from ekmesh.infer.experts import LocalExperts

TOL = 2e-2  # max |kernels - grouped| / max |grouped| (bf16 weights, rounding in different places)
SWEEP = [((bi, bd), (rd, ri), w) for bi, bd in ((8, 256), (8, 512), (16, 512), (16, 1024), (32, 256))
         for rd, ri in ((4, 512), (4, 1024), (8, 256), (8, 512), (8, 1024), (16, 256)) for w in (4, 8)]


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read + write), the median of 10."""
    a = torch.empty(2**30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    return 2 * a.numel() / statistics.median(times[2:])


def graph_time(fn, repeats: int) -> float:
    """Median seconds of one replay of ``fn`` captured in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    times = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    return statistics.median(times)


def measure(experts: LocalExperts, args: argparse.Namespace, t: int, configs: list, failed: list) -> dict:
    """One decode step's experts for ``t`` tokens per layer: the grouped path and each kernel configuration."""
    device, dt = torch.device("cuda"), torch.bfloat16
    x = torch.randn(args.layers, t, args.hidden, device=device, dtype=dt)
    ids = torch.stack([torch.stack([torch.randperm(args.experts, device=device)[:args.top_k] for _ in range(t)])
                       for _ in range(args.layers)])  # [L, T, k] distinct per token
    w = torch.rand(args.layers, t, args.top_k, device=device).softmax(-1).to(dt)
    unique = len({(layer, int(e)) for layer in range(args.layers) for e in ids[layer].flatten()})
    step_bytes = unique * 3 * args.hidden * args.intermediate * 2
    out = torch.empty(args.layers, t, args.hidden, device=device, dtype=dt)

    def grouped() -> None:
        experts.graph_mode = True
        try:
            for layer in range(args.layers):
                out[layer] = experts(layer, x[layer], ids[layer], w[layer])
        finally:
            experts.graph_mode = False

    def kernels(cfg: tuple) -> None:
        for layer in range(args.layers):
            pack = experts._pack(layer)
            slots = pack.slot_of[ids[layer].reshape(-1)].view(t, args.top_k)
            out[layer] = decode_experts.moe(x[layer], slots, w[layer], pack.gate_up, pack.down, None, None,
                                            gate_up_blocks=cfg[0], down_blocks=cfg[1], num_warps=cfg[2])

    with torch.inference_mode(), fusion.fused("compile"):
        grouped()
        ref = out.float().clone()
        rows = {"grouped": graph_time(grouped, args.repeats)}
        for cfg in configs:
            name = f"kernels gate_up{cfg[0]} down{cfg[1]} warps{cfg[2]}"
            kernels(cfg)
            diff = float((out.float() - ref).abs().max() / ref.abs().max())
            if not diff <= TOL:
                failed.append((t, name, diff))
                continue
            rows[name] = graph_time(lambda cfg=cfg: kernels(cfg), args.repeats)
    best = min((k for k in rows if k != "grouped"), key=lambda k: rows[k], default=None)
    fastest = sorted(rows.items(), key=lambda kv: kv[1])[:12]
    return {"step_bytes_MB": round(step_bytes / 1e6, 1),
            "us_per_layer": {k: round(v / args.layers * 1e6, 2) for k, v in fastest},
            "GBps": {k: round(step_bytes / v / 1e9, 1) for k, v in rows.items() if k in ("grouped", best)},
            "best": best, "speedup_best_vs_grouped": round(rows["grouped"] / rows[best], 2) if best else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda")
    dt = torch.bfloat16
    spec = ExpertSpec(args.hidden, args.intermediate, args.experts)
    g = torch.Generator(device=device).manual_seed(0)
    experts = LocalExperts(spec, device, dt)
    every = list(range(args.experts))
    for layer in range(args.layers):
        gu = torch.empty(args.experts, 2 * args.intermediate, args.hidden, device=device, dtype=dt)
        dn = torch.empty(args.experts, args.hidden, args.intermediate, device=device, dtype=dt)
        experts.set_layer(layer, every, gu.normal_(0, 0.02, generator=g), dn.normal_(0, 0.02, generator=g))
    report: dict = {"device_name": torch.cuda.get_device_name(device), "torch": torch.__version__,
                    "shape": vars(args), "copy_GBps": round(copy_bandwidth(device) / 1e9, 1), "by_tokens": {}}
    default = (decode_experts.GATE_UP_BLOCKS, decode_experts.DOWN_BLOCKS, decode_experts.NUM_WARPS)
    configs = [default] + (SWEEP if args.sweep else [])
    failed: list = []
    for t in args.tokens:
        report["by_tokens"][t] = measure(experts, args, t, configs, failed)
    print(json.dumps(report, indent=None if args.json else 1))
    if failed:
        print(f"FAIL: outputs differ from the grouped path beyond {TOL}: {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
