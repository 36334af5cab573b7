"""One-process decode speed: ekmesh vs transformers on the same random Qwen3-MoE weights, in one run.

The transformers model is built from a config (no download), its weights filled with random values on the target
device, and ekmesh's model is assembled from the very same tensors (no copy), so both read identical weights
and the ratio is measured under identical conditions. Decode time per token is the difference between generating
N+1 and 1 tokens, divided by N, so prefill cancels out.

    python benchmarks/local_decode.py                                  # CPU, a small shape
    python benchmarks/local_decode.py --shape qwen3-30b-a3b --device cuda   # the lent GPU, all 48 layers
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ekmesh.infer.experts import LocalExperts
from ekmesh.infer.generate import Generator, SamplingParams, pick_device, pick_dtype
from ekmesh.infer.models import qwen3_moe

SHAPES = {
    # Qwen/Qwen3-30B-A3B's config.json
    "qwen3-30b-a3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, moe_intermediate_size=768,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, rms_norm_eps=1e-6,
                          max_position_embeddings=40960, rope_theta=1000000.0),
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, moe_intermediate_size=256,
                  num_experts=32, num_experts_per_tok=4, norm_topk_prob=True, rms_norm_eps=1e-6,
                  max_position_embeddings=4096),
}


def build_pair(shape: dict, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3_moe", **shape, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    hf.to_empty(device=device)
    # to_empty leaves non-persistent buffers (RoPE inv_freq) uninitialised: rebuild the rotary module
    rot = hf.model.rotary_emb
    with torch.device(device):
        hf.model.rotary_emb = type(rot)(config=cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    hf.eval()

    ours_cfg = qwen3_moe.Config.from_hf_config(cfg.to_dict())
    with torch.device("meta"):
        ours = qwen3_moe.build(ours_cfg)
    sd = hf.state_dict()
    dense = {k: v for k, v in sd.items() if ".experts." not in k}
    ours.load_state_dict(dense, strict=True, assign=True)  # shares the tensors, no copy
    ours.requires_grad_(False).eval()
    experts = LocalExperts(ours_cfg.expert_spec(), device, dtype)
    every = list(range(ours_cfg.num_experts))
    for layer in range(ours_cfg.num_layers):
        pre = f"model.layers.{layer}.mlp.experts"
        experts.set_layer(layer, every, sd[f"{pre}.gate_up_proj"], sd[f"{pre}.down_proj"])
    return hf, ours, experts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def per_token(fn_n, n: int, device: torch.device, repeats: int) -> float:
    """Seconds per decoded token: (T(n+1 tokens) - T(1 token)) / n, each the minimum over interleaved repeats
    (the minimum is the run least disturbed by anything else on the machine)."""
    fn_n(2)  # warm-up (allocations, graph capture, kernel selection)
    fn_n(n + 1)
    long, short = [], []
    for _ in range(repeats):
        long.append(timed(lambda: fn_n(n + 1), device))
        short.append(timed(lambda: fn_n(1), device))
    return (min(long) - min(short)) / n


def profile_step(gen: Generator, ids: list[int]) -> dict:
    """Kernels in one captured decode step and their summed GPU time (what a replay must at least take)."""
    from torch.profiler import ProfilerActivity, profile

    from ekmesh.infer import fusion

    runner = gen._graph_for(len(ids) + 8)
    runner.prefill(ids)
    with fusion.fused(), torch.inference_mode():
        runner._run_static()  # the same code the graph captured, run eagerly once to count its kernels
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runner._run_static()
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_ms = sum(e.device_time for e in kernels) / 1000
    top: dict[str, float] = {}
    for e in kernels:
        top[e.name[:60]] = top.get(e.name[:60], 0.0) + e.device_time / 1000
    return {"kernels_per_step": len(kernels), "gpu_busy_ms_per_step": round(busy_ms, 3),
            "top_kernels_ms": {k: round(v, 3) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:8]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--tokens", type=int, default=32, help="decoded tokens per timing")
    ap.add_argument("--prompt", type=int, default=16, help="prompt length")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    torch.manual_seed(args.seed)
    hf, ours, experts = build_pair(shape, device, dtype, args.seed)
    prompt = torch.randint(0, shape["vocab_size"], (1, args.prompt), device=device)
    mask = torch.ones_like(prompt)

    def hf_gen(n: int) -> list[int]:
        with torch.inference_mode():
            out = hf.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        return out[0, args.prompt:].tolist()

    results = {}
    gens = {"ekmesh": Generator(ours, experts)}
    if device.type == "cuda":
        gens["ekmesh_eager"] = Generator(ours, experts, cuda_graphs=False)
    ids = prompt[0].tolist()
    for name, gen in gens.items():
        def run(n: int, gen: Generator = gen) -> list[int]:
            return gen.generate(ids, SamplingParams(max_tokens=n, stop_ids=frozenset())).token_ids
        results[name] = per_token(run, args.tokens, device, args.repeats)
    results["transformers"] = per_token(hf_gen, args.tokens, device, args.repeats)

    a, b = gens["ekmesh"].generate(ids, SamplingParams(max_tokens=16, stop_ids=frozenset())).token_ids, hf_gen(16)
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), 16)
    report = {
        "shape": args.shape, "layers": shape["num_hidden_layers"], "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "prompt": args.prompt,
        "tokens": args.tokens,
        "ms_per_token": {k: round(v * 1000, 3) for k, v in results.items()},
        "tok_per_s": {k: round(1 / v, 2) for k, v in results.items()},
        "speedup_vs_transformers": round(results["transformers"] / results["ekmesh"], 2),
        "greedy_tokens_identical_prefix": same,
    }
    if device.type == "cuda":
        report["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        report.update(profile_step(gens["ekmesh"], ids))
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:32s} {v}")


if __name__ == "__main__":
    main()
