"""One-process decode speed: ekmesh vs transformers on the same random Qwen3-MoE weights, in one run.

The transformers model is built from a config (no download), its weights filled with random values on the target
device, and ekmesh's model is assembled from the very same tensors (no copy), so both read identical weights
and the ratio is measured under identical conditions. Decode time per token is the difference between generating
N+1 and 1 tokens, divided by N, so prefill cancels out.

    python benchmarks/local_decode.py                                  # CPU, a small shape
    python benchmarks/local_decode.py --shape qwen3-30b-a3b --device cuda   # the lent GPU, all 48 layers

``--quantize q8 q4`` measures instead the routed-expert compute of one decode step (every MoE layer of the shape,
k experts for one token, through ``LocalExperts``) with float experts (today's path: fp32 on the CPU, the device's
dtype elsewhere) and with the same experts quantized, in one run, with the same torch threads for every side: the
median over repeats (the sides interleaved) and the ratio to float. Each layer holds exactly the k experts its
token is routed to, all distinct, so every step streams the same bytes a real model's step would (fp32 at
qwen3-30b-a3b: 7.2 GB). Before timing, every quantized output is checked against a float computation with the
dequantized weights (fp32, ``expert_forward``): a difference beyond ``QUANT_TOL`` of the output's magnitude fails
the run (exit status 1).

    python benchmarks/local_decode.py --shape qwen3-30b-a3b --quantize q8 q4              # CPU
    python benchmarks/local_decode.py --shape qwen3-30b-a3b --quantize q4 --device cuda    # bf16 vs q4 on a GPU

``--quantize`` also takes ``fp8`` and ``mxfp4``: the same experts in DeepSeek's block FP8 (128 x 128) and gpt-oss's
MXFP4, as a checkpoint in those formats holds them and ekmesh keeps them in memory.

``--quantize ... --whole-model`` times whole decode steps instead: ekmesh's model (dense part in the device's dtype,
through its CUDA graph on a GPU) with its float experts and with the same experts quantized, ms per token and the
experts' bytes in memory, in one run; greedy tokens are reported, not required to match (quantization changes
them). ``--layers`` keeps a 30B-class shape within one GPU's memory next to its quantized copies.

``--context N [N ...]`` (DeepSeek shapes: ``deepseek-v3``, DeepSeek-V3's config with 4 layers, 3 dense and 1 MoE;
``deepseek-small`` for a CPU smoke run) measures MLA's KV cache: for the latent cache (the default) and the expanded
per-head keys and values, KV bytes per cached token (read from the cache), then at each context N the cache filled
to N tokens (a prefill in ``--chunk``-token forwards, timed) and ``--tokens`` decode steps after it (through the
CUDA graph on a GPU, eager elsewhere; the minimum over ``--repeats``, the cache cut back to N between them): ms per
token and tokens/s. Random weights; no transformers side. ``--absorb always|never`` forces the latent cache's
attention path (default: chosen per forward by cost) to compare prefill both ways.

    python benchmarks/local_decode.py --shape deepseek-v3 --context 4096 32768 --device cuda
    python benchmarks/local_decode.py --shape deepseek-small --context 64 256 --tokens 4    # CPU smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

from ekmesh.infer.cuda_graph import GraphDecoder
from ekmesh.infer.expert import ExpertSpec, ExpertWeights, expert_forward
from ekmesh.infer.experts import LocalExperts
from ekmesh.infer.generate import Generator, SamplingParams, pick_device, pick_dtype
from ekmesh.infer.models import deepseek, qwen3_moe
from ekmesh.infer.models.cache import KVCache
from ekmesh.infer.models.common import CausalLM
from ekmesh.infer.qtensor import QuantizedTensor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests.infer.checkpoint_formats import in_format  # noqa: E402  (fp8 / mxfp4 as a checkpoint holds them)

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


# DeepSeek shapes for --context (config.json fields; deepseek.Config reads them)
_V3 = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=129280, hidden_size=7168,
           intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=4, first_k_dense_replace=3,
           num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
           num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
           q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
           rms_norm_eps=1e-6, max_position_embeddings=163840, rope_theta=10000.0,
           rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                             beta_slow=1, mscale=1.0, mscale_all_dim=1.0))
DEEPSEEK_SHAPES = {
    # deepseek-ai/DeepSeek-V3's config.json, 4 of its 61 layers (its first 3 are dense, then 1 MoE layer)
    "deepseek-v3": _V3,
    # the same architecture, small enough for a CPU smoke run (no YaRN)
    "deepseek-small": {**{k: v for k, v in _V3.items() if k != "rope_scaling"},
                       **dict(vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                              num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=8,
                              num_key_value_heads=8, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                              topk_group=2, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
                              qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=65536)},
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


def build_deepseek(shape: dict, device: torch.device, dtype: torch.dtype, seed: int, absorb: str = "auto"
                   ) -> tuple[dict[str, CausalLM], LocalExperts]:
    """ekmesh's DeepSeek model with random weights, once per MLA cache kind ("latent", "expanded") sharing the same
    tensors, and every routed expert in one backend. ``absorb``: how the latent one computes attention."""
    cfg = deepseek.Config.from_hf_config(shape)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        proto = deepseek.build(cfg)
    state = {}
    for name, p in proto.named_parameters():
        keep32 = any(name.endswith(s) for s in deepseek.KEEP_FP32)
        t = torch.empty(p.shape, device=device, dtype=torch.float32 if keep32 else dtype)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        elif keep32:
            t.zero_()
        else:
            t.normal_(0.0, 0.02, generator=g)
        state[name] = t
    models = {}
    for kind in ("latent", "expanded"):
        with torch.device("meta"):
            model = deepseek.build(dataclasses.replace(cfg, mla_cache=kind, mla_absorb=absorb))
        model.load_state_dict(state, strict=True, assign=True)  # shares the tensors, no copy
        models[kind] = model.requires_grad_(False).eval()
    spec = cfg.expert_spec()
    experts = LocalExperts(spec, device, dtype)
    every = list(range(spec.num_experts))
    for layer in (i for i, moe in enumerate(cfg.moe_layers) if moe):
        gate_up = torch.empty(spec.num_experts, 2 * spec.intermediate, spec.hidden, device=device, dtype=dtype)
        down = torch.empty(spec.num_experts, spec.hidden, spec.intermediate, device=device, dtype=dtype)
        experts.set_layer(layer, every, gate_up.normal_(0.0, 0.02, generator=g), down.normal_(0.0, 0.02, generator=g))
    return models, experts


def decode_at_context(model: CausalLM, experts: LocalExperts, context: int, args: argparse.Namespace,
                      device: torch.device) -> dict:
    """The cache filled to ``context`` tokens, then ``args.tokens`` decode steps: prefill seconds, ms per token
    (minimum over ``args.repeats``), the cache's bytes per token."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(1)).to(device)
    runner = GraphDecoder(model, experts, context + args.tokens + 1) if device.type == "cuda" else None
    cache: KVCache = runner.cache if runner is not None else model.new_cache()
    with torch.inference_mode():

        def fill() -> None:
            cache.length = 0
            for i in range(0, context, args.chunk):
                model(ids[:, i:i + args.chunk], cache, experts, last_only=True)

        prefill_s = timed(fill, device)

        def decode() -> None:
            cache.truncate(context)
            for j in range(args.tokens):
                if runner is not None:
                    runner.step(j % vocab)
                else:
                    model(torch.tensor([[j % vocab]], device=device), cache, experts, last_only=True)

        decode()  # warm-up (the graph captured on a GPU)
        best = min(timed(decode, device) for _ in range(args.repeats)) / args.tokens
        kernels = {}
        if runner is not None:  # the captured step's kernels (cache at context + tokens: the slot after is free)
            prof = profile_runner(runner)
            kernels = {k: prof[k] for k in ("kernels_per_step", "gpu_busy_ms_per_step", "top_kernels_ms")}
    return {"prefill_s": round(prefill_s, 3), "ms_per_token": round(best * 1000, 3),
            "tok_per_s": round(1 / best, 2), "kv_bytes_per_token": cache.bytes_per_token(),
            "kv_gib_at_context": round(cache.bytes_per_token() * context / 2**30, 4), **kernels}


def mla_context(shape: dict, device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> dict:
    """KV bytes per token and decode speed at each context, latent vs expanded MLA cache (module docstring)."""
    models, experts = build_deepseek(shape, device, dtype, args.seed, args.absorb)
    runs: dict[str, dict[str, dict]] = {kind: {} for kind in models}
    for context in args.context:
        for kind, model in models.items():
            runs[kind][str(context)] = decode_at_context(model, experts, context, args, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    per_token = {kind: next(iter(r.values()))["kv_bytes_per_token"] for kind, r in runs.items()}
    return {"mode": "MLA KV cache: latent vs expanded", "shape": args.shape,
            "layers": shape["num_hidden_layers"], "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "decode_tokens": args.tokens, "prefill_chunk": args.chunk,
            "latent_absorb": args.absorb,
            "kv_bytes_per_token": per_token,
            "kv_bytes_per_token_per_layer": {k: v // shape["num_hidden_layers"] for k, v in per_token.items()},
            "expanded_over_latent": round(per_token["expanded"] / per_token["latent"], 1),
            **{f"{kind}_by_context": r for kind, r in runs.items()},
            "latent_speedup_by_context": {c: round(runs["expanded"][c]["ms_per_token"]
                                                   / runs["latent"][c]["ms_per_token"], 2) for c in runs["latent"]},
            **({"peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}
               if device.type == "cuda" else {})}


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
    runner = gen._graph_for(len(ids) + 8)
    runner.prefill(ids)
    return profile_runner(runner)


def profile_runner(runner: GraphDecoder) -> dict:
    """``profile_step`` for a graph decoder whose cache already holds the context (the step writes its next slot,
    which the next real step overwrites)."""
    from torch.profiler import ProfilerActivity, profile

    from ekmesh.infer import fusion

    runner.pos.fill_(runner.cache.length)
    runner.experts.graph_mode = True  # as while capturing: no missing-expert check (a sync the graph has not)
    try:
        with fusion.fused(runner.fuse), torch.inference_mode():
            runner._run_static()  # the same code the graph captured, run eagerly once to count its kernels
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                runner._run_static()
                torch.cuda.synchronize()
    finally:
        runner.experts.graph_mode = False
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_ms = sum(e.device_time for e in kernels) / 1000
    top: dict[str, float] = {}
    count: dict[str, int] = {}
    for e in kernels:
        top[e.name[:60]] = top.get(e.name[:60], 0.0) + e.device_time / 1000
        count[e.name[:60]] = count.get(e.name[:60], 0) + 1
    return {"kernels_per_step": len(kernels), "gpu_busy_ms_per_step": round(busy_ms, 3),
            "top_kernels_ms": {k: round(v, 3) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:12]},
            "kernels_by_count": {k: [n, round(top[k], 3)]
                                 for k, n in sorted(count.items(), key=lambda kv: -kv[1])[:30]}}


def capture(fn, experts: LocalExperts) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph with ``experts`` in graph mode (as ``cuda_graph.GraphDecoder`` does)."""
    experts.graph_mode = True
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # warm-up
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    finally:
        experts.graph_mode = False
    return graph


# transformers' experts implementations tried on CUDA (its fastest is the baseline)
HF_EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "batched_mm")
QUANT_TOL = 3e-2  # max |quantized - dequantized reference| / max |reference| per layer output (tests: the same)


def expert_compute(shape: dict, formats: list[str], device: torch.device, dtype: torch.dtype, repeats: int,
                   steps: int, seed: int) -> dict:
    """Routed-expert compute of one decode step, float vs each quantized format (see the module docstring)."""
    d, inter, k = shape["hidden_size"], shape["moe_intermediate_size"], shape["num_experts_per_tok"]
    n_layers, n_experts = shape["num_hidden_layers"], shape["num_experts"]
    spec = ExpertSpec(d, inter, n_experts)
    g = torch.Generator().manual_seed(seed)
    gd = torch.Generator(device=device).manual_seed(seed)
    sides = {"float": LocalExperts(spec, device, dtype)} | {f: LocalExperts(spec, device, dtype) for f in formats}
    inputs, worst, qerr = [], dict.fromkeys(formats, 0.0), dict.fromkeys(formats, 0.0)
    refs: dict[str, list[torch.Tensor]] = {f: [] for f in formats}
    for layer in range(n_layers):
        chosen = torch.randperm(n_experts, generator=g)[:k].tolist()
        x = torch.randn(1, d, generator=gd, device=device).to(dtype)  # [1, D]
        w = torch.softmax(torch.randn(1, k, generator=gd, device=device), dim=-1)  # [1, k]
        inputs.append((x, torch.tensor([chosen], device=device), w))
        ref = {f: torch.zeros(1, d, device=device) for f in formats}
        for j, e in enumerate(chosen):
            fw = ExpertWeights(torch.randn(2 * inter, d, generator=gd, device=device).mul_(0.02).to(dtype),
                               torch.randn(d, inter, generator=gd, device=device).mul_(0.02).to(dtype))
            sides["float"].add(layer, e, fw)
            for f in formats:
                q = in_format(fw, f)
                sides[f].add(layer, e, q)
                assert isinstance(q.gate_up, QuantizedTensor) and isinstance(q.down, QuantizedTensor)
                deq = ExpertWeights(q.gate_up.dequantize().to(device), q.down.dequantize().to(device))
                ref[f] += w[0, j] * expert_forward(spec, x.float(), deq)  # [1, D] fp32
        for f in formats:
            refs[f].append(ref[f])
    with torch.inference_mode():
        for f in formats:  # correctness first: a quantized side that disagrees is not worth timing
            for layer, (x, ids, w) in enumerate(inputs):
                got = sides[f](layer, x, ids, w).float()
                scale = refs[f][layer].abs().max().item()
                worst[f] = max(worst[f], (got - refs[f][layer]).abs().max().item() / scale)
                exact = sides["float"](layer, x, ids, w).float()  # the unquantized experts
                qerr[f] = max(qerr[f], (got - exact).abs().max().item() / exact.abs().max().item())

        def step(be: LocalExperts) -> None:
            for layer, (x, ids, w) in enumerate(inputs):
                be(layer, x, ids, w)

        times: dict[str, list[float]] = {name: [] for name in sides}
        names = list(sides)
        for name in names:
            step(sides[name])  # warm-up (packs built, kernels chosen)
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
                t = timed(lambda name=name: [step(sides[name]) for _ in range(steps)], device)
                times[name].append(t / steps)
        graph_ms = {}
        if device.type == "cuda":  # how a decode step runs there: captured in a CUDA graph (graph-mode paths)
            for name, be in sides.items():
                graph = capture(lambda be=be: step(be), be)
                graph.replay()
                reps = [timed(lambda graph=graph: [graph.replay() for _ in range(steps)], device) / steps
                        for _ in range(repeats)]
                graph_ms[name] = round(statistics.median(reps) * 1000, 3)
                del graph
    med = {name: statistics.median(ts) for name, ts in times.items()}
    graphs = {} if not graph_ms else {
        "ms_per_step_cuda_graph_median": graph_ms,
        "graph_speedup_vs_float": {f: round(graph_ms["float"] / graph_ms[f], 2) for f in formats}}
    return graphs | {
        "mode": "expert compute per decode step", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "float_dtype": str(dtype).removeprefix("torch."), "layers": n_layers, "k": k, "hidden": d,
        "moe_intermediate": inter, "repeats": repeats, "steps_per_repeat": steps,
        "ms_per_step_median": {n: round(v * 1000, 2) for n, v in med.items()},
        "ms_per_step_min": {n: round(min(ts) * 1000, 2) for n, ts in times.items()},
        "speedup_vs_float": {f: round(med["float"] / med[f], 2) for f in formats},
        "held_gib": {n: round(be.nbytes() / 2**30, 3) for n, be in sides.items()},
        "max_rel_diff_vs_dequantized_ref": {f: float(f"{v:.3g}") for f, v in worst.items()},
        "tolerance": QUANT_TOL,
        "max_rel_diff_vs_unquantized": {f: float(f"{v:.3g}") for f, v in qerr.items()},
    }


def whole_model(shape: dict, formats: list[str], device: torch.device, dtype: torch.dtype,
                args: argparse.Namespace) -> dict:
    """ms per decoded token of ekmesh's model with float experts and with each quantized format (one run)."""
    _, ours, experts = build_pair(shape, device, dtype, args.seed)
    spec = experts.spec
    sides = {"float": experts}
    for f in formats:
        q = LocalExperts(spec, device, dtype)
        for layer, ids in experts.held().items():
            for e in ids:
                fw = experts._unpack(layer)[e]  # the float expert's weights (views of the stacked layer)
                assert isinstance(fw, ExpertWeights)
                q.add(layer, e, in_format(fw, f))
        sides[f] = q
    ids = torch.randint(0, shape["vocab_size"], (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    ms, tokens = {}, {}
    for name, be in sides.items():
        gen = Generator(ours, be)

        def run(n: int, gen: Generator = gen) -> list[int]:
            return gen.generate(ids, SamplingParams(max_tokens=n, stop_ids=frozenset())).token_ids
        ms[name] = round(per_token(run, args.tokens, device, args.repeats) * 1000, 3)
        tokens[name] = run(8)
    return {"mode": "whole decode step, float vs quantized experts", "shape": args.shape,
            "layers": shape["num_hidden_layers"], "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "tokens": args.tokens, "ms_per_token": ms,
            "vs_float": {f: round(ms["float"] / ms[f], 2) for f in formats},
            "experts_gib": {k: round(be.nbytes() / 2**30, 3) for k, be in sides.items()},
            "first_8_tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES) + sorted(DEEPSEEK_SHAPES), default="small")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--tokens", type=int, default=32, help="decoded tokens per timing")
    ap.add_argument("--prompt", type=int, default=16, help="prompt length")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quantize", nargs="+", choices=["q8", "q4", "fp8", "mxfp4"], default=None,
                    help="measure routed-expert compute per decode step: float vs these formats (fp8 / mxfp4: the "
                         "checkpoint formats, kept as stored)")
    ap.add_argument("--steps", type=int, default=3, help="--quantize: decode steps per timing")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--whole-model", action="store_true",
                    help="--quantize: time whole decode steps (dense part + experts) instead of the experts alone")
    ap.add_argument("--context", type=int, nargs="+", default=None,
                    help="DeepSeek shapes: KV bytes per token and decode speed with the cache filled to each N "
                         "tokens, latent vs expanded MLA cache")
    ap.add_argument("--chunk", type=int, default=1024, help="--context: tokens per prefill forward")
    ap.add_argument("--absorb", choices=["auto", "always", "never"], default="auto",
                    help="--context: the latent cache's attention (always: absorbed even in prefill; never: expanded)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if (args.context is None) != (args.shape not in DEEPSEEK_SHAPES):
        ap.error("--context goes with a DeepSeek shape (" + ", ".join(sorted(DEEPSEEK_SHAPES)) + ") and they with it")
    shape = dict(SHAPES[args.shape] if args.context is None else DEEPSEEK_SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    if args.context is not None:
        report = mla_context(shape, device, dtype, args)
        print(json.dumps(report) if args.json else "\n".join(f"{k:32s} {v}" for k, v in report.items()))
        return
    if args.quantize and args.whole_model:
        whole = whole_model(shape, args.quantize, device, dtype, args)
        print(json.dumps(whole) if args.json else "\n".join(f"{k:32s} {v}" for k, v in whole.items()))
        return
    if args.quantize:
        report = expert_compute(shape, args.quantize, device, dtype, args.repeats, args.steps, args.seed)
        report["shape"] = args.shape
        print(json.dumps(report) if args.json else "\n".join(f"{k:34s} {v}" for k, v in report.items()))
        bad = {f: v for f, v in report["max_rel_diff_vs_dequantized_ref"].items() if not v <= QUANT_TOL}
        if bad:
            print(f"FAIL: quantized outputs differ from the dequantized reference beyond {QUANT_TOL}: {bad}",
                  file=sys.stderr)
            sys.exit(1)
        return
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
    if device.type == "cuda":  # the same graph with fewer fused kernels, and no graph at all
        gens["ekmesh_compile_only"] = Generator(ours, experts, fuse="compile")
        gens["ekmesh_eager"] = Generator(ours, experts, cuda_graphs=False)
    ids = prompt[0].tolist()
    for name, gen in gens.items():
        def run(n: int, gen: Generator = gen) -> list[int]:
            return gen.generate(ids, SamplingParams(max_tokens=n, stop_ids=frozenset())).token_ids
        results[name] = per_token(run, args.tokens, device, args.repeats)
    hf_impls: dict[str, float] = {}
    for impl in HF_EXPERTS_IMPLEMENTATIONS if device.type == "cuda" else (None,):
        if impl is not None:
            hf.set_experts_implementation(impl)
        hf_impls[impl or "default"] = per_token(hf_gen, args.tokens, device, args.repeats)
    best_impl = min(hf_impls, key=lambda k: hf_impls[k])
    if device.type == "cuda":
        hf.set_experts_implementation(best_impl)
    results["transformers"] = hf_impls[best_impl]

    a, b = gens["ekmesh"].generate(ids, SamplingParams(max_tokens=16, stop_ids=frozenset())).token_ids, hf_gen(16)
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), 16)
    report = {
        "shape": args.shape, "layers": shape["num_hidden_layers"], "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "prompt": args.prompt,
        "tokens": args.tokens,
        "ms_per_token": {k: round(v * 1000, 3) for k, v in results.items()},
        "tok_per_s": {k: round(1 / v, 2) for k, v in results.items()},
        "transformers_experts_implementation": best_impl,
        "transformers_ms_per_token_by_experts_implementation": {k: round(v * 1000, 3) for k, v in hf_impls.items()},
        "speedup_vs_transformers": round(results["transformers"] / results["ekmesh"], 2),
        "greedy_tokens_identical_prefix": same,
    }
    if device.type == "cuda":
        report["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        report.update(profile_step(gens["ekmesh"], ids))
        report["compile_only"] = profile_step(gens["ekmesh_compile_only"], ids)
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:32s} {v}")


if __name__ == "__main__":
    main()
