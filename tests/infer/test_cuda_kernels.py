"""The decode step's kernels on CUDA agree with the plain paths they replace: the routed experts' Triton kernels,
the quantized formats' matmuls, flash-decoding over the static cache, the softmax router kernel, DeepSeek's compiled
router, and the compiled q/k-norm + RoPE that writes the cache. Whole models (graph decode against eager, the data
plane, verification) are in test_cuda.py.

These need a GPU: CI has none, so they run on the lent GPU machine (see docs/BENCHMARKS.md for the last run).
"""

from __future__ import annotations

import pytest
import torch

from ekmesh.infer.experts import LocalExperts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")


@pytest.mark.parametrize("activation,bias", [("silu", False), ("gptoss", True), ("silu", True)])
def test_decode_expert_kernels_equal_the_grouped_path(activation, bias):
    """The two decode kernels (decode_experts) against the grouped path on fresh random bf16 inputs: odd sizes,
    several tokens, repeated experts across tokens, biases, both activations; a pair whose slot is -1 adds nothing."""
    from ekmesh.infer import decode_experts
    from ekmesh.infer.expert import ExpertSpec, ExpertWeights

    g = torch.Generator(device="cuda").manual_seed(3)
    for d, inter, n, t, k in [(64, 32, 8, 1, 2), (96, 40, 16, 3, 8), (130, 70, 9, 5, 4), (2048, 768, 16, 1, 8)]:
        spec = ExpertSpec(d, inter, n, activation=activation, bias=bias)
        experts = LocalExperts(spec, "cuda", torch.bfloat16)
        def rnd(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, device="cuda", generator=g) * 0.1).bfloat16()
        for e in range(n):
            experts.add(0, e, ExpertWeights(rnd(2 * inter, d), rnd(d, inter), rnd(2 * inter) if bias else None,
                                            rnd(d) if bias else None))
        x = rnd(t, d) * 10
        ids = torch.stack([torch.randperm(n, device="cuda", generator=g)[:k] for _ in range(t)])  # [T, k]
        w = torch.rand(t, k, device="cuda", generator=g).bfloat16()
        ref = experts(0, x, ids, w).float()  # the grouped path (fusion off)
        pack = experts._pack(0)
        slots = pack.slot_of[ids]
        got = decode_experts.moe(x, slots, w, pack.gate_up, pack.down, pack.gate_up_bias, pack.down_bias,
                                 activation).float()
        diff = ((got - ref).abs().max() / ref.abs().max()).item()
        print(f"D={d} I={inter} T={t} k={k} {activation} bias={bias}: max rel diff {diff:.3g}")
        assert diff < 2e-2
        slots[0, 0] = -1  # not held: adds nothing
        alone = experts(0, x[:1], ids[:1, 1:], w[:1, 1:]).float()
        got = decode_experts.moe(x[:1], slots[:1], w[:1], pack.gate_up, pack.down, pack.gate_up_bias,
                                 pack.down_bias, activation).float()
        assert ((got - alone).abs().max() / alone.abs().max()).item() < 2e-2


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_quantized_kernels_on_cuda_match_the_reference_path(fmt):
    """q4 through tinygemm (``torch._weight_int4pack_mm``), q8 through ``torch._weight_int8pack_mm`` where it runs
    on CUDA (else the dequant path): within the bf16 tolerance of test_qtensor of fp32 dequantize + F.linear."""
    from ekmesh.infer.qkernels import pack
    from ekmesh.infer.qtensor import quantize

    g = torch.Generator().manual_seed(0)
    for o, i in [(1536, 2048), (2048, 768), (64, 64), (64, 32), (2880, 2880)]:
        qt = quantize(torch.randn(o, i, generator=g) * 0.02, fmt)
        pw = pack(qt, "cuda", torch.bfloat16)
        if fmt == "q4":
            assert pw.kernel == "cuda_int4", (o, i, pw.kernel)
        _kernel_matches_reference(qt, pw, g)


def _kernel_matches_reference(qt, pw, g):
    """``qlinear`` on CUDA (bf16) against fp32 dequantize + F.linear on the CPU, 1 and 17 rows: within 1.5e-2 of the
    output's largest magnitude (bf16 activations and output)."""
    import torch.nn.functional as F

    from ekmesh.infer.qkernels import qlinear

    o, i = qt.shape
    for n in (1, 17):
        x = torch.randn(n, i, generator=g)
        bias = torch.randn(o, generator=g) * 0.01
        ref = F.linear(x, qt.dequantize(), bias)
        got = qlinear(x.cuda().bfloat16(), pw, bias.cuda().bfloat16()).float().cpu()
        rel = ((got - ref).abs().max() / ref.abs().max()).item()
        print(f"{qt.fmt} {pw.kernel} [{o}, {i}] N={n}: max |kernel - ref| / max |ref| = {rel:.2e}")
        assert rel <= 1.5e-2, (o, i, n, rel)


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_checkpoint_format_kernels_on_cuda_match_the_reference_path(fmt):
    """The checkpoints' formats on CUDA (the dequant path, kept as stored in memory): within the bf16 tolerance of
    fp32 dequantize + F.linear on the CPU."""
    from ekmesh.infer.qkernels import pack
    from tests.infer.checkpoint_formats import to_fp8, to_mxfp4

    g = torch.Generator().manual_seed(0)
    for o, i in [(1536, 2048), (2048, 768), (2880, 2880)]:
        w = torch.randn(o, i, generator=g) * 0.02
        qt = to_fp8(w) if fmt == "fp8" else to_mxfp4(w)
        pw = pack(qt, "cuda", torch.bfloat16)
        assert pw.nbytes() == qt.nbytes(), "held as stored"
        _kernel_matches_reference(qt, pw, g)


# ------------------------------------------------------------ flash-decoding attention over the static cache

# (B, H, Hkv, T, dk, dv, S, first position, window, sinks): GQA rep 8 / 4 / 1, one token and five, the first blocks
# only and the whole cache visible, a window shorter than the context, gpt-oss's sinks (with and without a window)
_DECODE_ATTENTION_CASES = [
    (1, 32, 4, 1, 128, 128, 4096, 37, None, False),
    (1, 32, 4, 1, 128, 128, 4096, 4095, None, False),
    (1, 32, 4, 5, 128, 128, 4096, 4091, None, False),
    (1, 32, 4, 1, 128, 128, 4096, 0, None, False),
    (1, 16, 4, 5, 128, 128, 1024, 600, None, False),
    (1, 8, 8, 5, 64, 64, 512, 300, None, False),
    (2, 32, 4, 1, 64, 64, 2048, 1500, 128, False),
    (2, 32, 4, 5, 128, 128, 4096, 37, None, False),
    (1, 64, 8, 5, 64, 64, 4096, 1000, 128, True),
    (2, 64, 8, 1, 64, 64, 4096, 3000, None, True),
]


def _decode_attention_inputs(case, dtype, seed=0):
    b, h, hkv, t, dk, dv, s, pos0, window, with_sinks = case
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, t, h, dk, device="cuda", generator=g).to(dtype).transpose(1, 2)  # [B, H, T, dk] strided
    k = torch.randn(b, hkv, s, dk, device="cuda", generator=g).to(dtype)  # the static cache, as update returns it
    v = torch.randn(b, hkv, s, dv, device="cuda", generator=g).to(dtype)
    positions = torch.arange(pos0, pos0 + t, device="cuda")
    sinks = (torch.randn(h, device="cuda", generator=g) * 2).to(dtype) if with_sinks else None
    return q, k, v, positions, window, dk ** -0.5, sinks


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", _DECODE_ATTENTION_CASES)
def test_decode_attention_equals_attend_over_the_masked_static_cache(case, dtype):
    """``decode_attention.attend`` against ``attention.attend`` with the static cache's mask: fp32 within fp32
    rounding (true fp32 products, not tf32), bf16 within bf16 rounding."""
    from ekmesh.infer import decode_attention
    from ekmesh.infer.models.attention import attend
    from ekmesh.infer.models.cache import attention_mask

    q, k, v, positions, window, scaling, sinks = _decode_attention_inputs(case, dtype)
    assert decode_attention.supports(q, k, v, sinks)  # else this would test nothing
    got = decode_attention.attend(q, k, v, positions, window, scaling, sinks)
    want = attend(q, k, v, attention_mask(positions, k.shape[2], window, always=True), scaling, sinks)
    assert got.shape == want.shape and got.dtype == want.dtype
    diff = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    print(f"{case} {dtype}: max |diff| / max |attend| = {diff:.3g}")
    assert diff <= (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.timeout(300)
def test_decode_attention_in_a_cuda_graph_follows_the_positions():
    """Captured once, replayed at other positions (written in place, as the graph decoder does): each replay
    reads its positions on the device and equals ``attention.attend`` at them; the visible range grows from the
    first key block to the whole cache."""
    from ekmesh.infer import decode_attention
    from ekmesh.infer.models.attention import attend
    from ekmesh.infer.models.cache import attention_mask

    case = (1, 32, 4, 1, 128, 128, 4096, 0, None, False)
    q, k, v, positions, window, scaling, sinks = _decode_attention_inputs(case, torch.bfloat16, seed=3)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_attention.attend(q, k, v, positions, window, scaling)  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention.attend(q, k, v, positions, window, scaling)
    for pos in (0, 37, 63, 64, 1000, 4095):
        positions.fill_(pos)
        graph.replay()
        want = attend(q, k, v, attention_mask(positions, k.shape[2], window, always=True), scaling)
        diff = ((out.float() - want.float()).abs().max() / want.float().abs().max()).item()
        assert diff <= 2e-2, (pos, diff)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_kernel_equals_softmax_topk(dtype):
    """The captured step's router kernel chooses the experts torch's softmax + topk chooses, largest first, with the
    same weights up to rounding, normalised or not."""
    from ekmesh.infer import decode_experts
    from ekmesh.infer.models.common import _softmax_topk

    gen = torch.Generator(device="cuda").manual_seed(0)
    for t, e, k, normalize in [(1, 128, 8, True), (4, 60, 6, False), (2, 8, 2, True), (1, 256, 8, True)]:
        logits = torch.randn(t, e, device="cuda", generator=gen).to(dtype)
        w, ids = decode_experts.route(logits, k, normalize, dtype)
        rw, rids = _softmax_topk(logits, k, normalize, dtype)
        assert torch.equal(ids, rids), (t, e, k)
        torch.testing.assert_close(w, rw, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)


@pytest.mark.parametrize("case", ["v2_group_limited_no_q_lora", "v2_greedy_q_lora_bias", "v3_noaux_tc",
                                  "v3_yarn_half_split"])
def test_deepseek_router_compiled_on_cuda_equals_the_plain_one(case, tmp_path, caplog):
    """DeepSeek's router in the captured step (fusion on, CUDA): ``route`` compiled by Triton picks the experts its
    plain body ``_route`` picks, with the same weights up to fp32 rounding, for each routing rule of the tiny models
    and at DeepSeek-V3's width (256 experts, 8 groups, top 4 groups, 8 experts), one token and a drafting step's
    five; and ``Router.forward`` under fusion passes its check (no fallback logged) and answers as without fusion."""
    import dataclasses
    import json
    import logging

    from ekmesh.infer import fusion
    from ekmesh.infer.models import deepseek
    from tests.infer.test_deepseek import make_tiny_deepseek, routing_gap

    path, _ = make_tiny_deepseek(case, tmp_path)
    tiny = deepseek.Config.from_hf_config(json.loads((path / "config.json").read_text()))
    configs = [tiny]
    if tiny.version == 3 and tiny.n_group > 1:
        configs.append(dataclasses.replace(tiny, num_experts=256, n_group=8, topk_group=4, top_k=8))
    g = torch.Generator(device="cuda").manual_seed(5)
    for cfg in configs:
        router = deepseek.Router(cfg).cuda()
        with torch.no_grad():
            router.weight.normal_(generator=g)
            if cfg.version == 3:
                router.e_score_correction_bias.normal_(generator=g).mul_(0.1)
        rule = (cfg.version, cfg.topk_method, cfg.n_group, cfg.topk_group, cfg.top_k, cfg.norm_topk_prob,
                cfg.routed_scaling_factor)
        for t in (1, 5):
            x = torch.randn(t, cfg.hidden_size, device="cuda", generator=g).bfloat16()
            logits = torch.nn.functional.linear(x.float(), router.weight)  # [T, E] as Router.forward computes it
            bias = router.e_score_correction_bias if cfg.version == 3 else None
            with fusion.fused("compile"):
                compiled = deepseek.route(logits, bias, *rule)
            diff = routing_gap(deepseek._route(logits, bias, *rule), compiled)
            print(f"{case} E={cfg.num_experts} T={t}: max |compiled - plain| weight = {diff:.3g}")
            assert diff <= 1e-6 * cfg.routed_scaling_factor
            with caplog.at_level(logging.WARNING, logger=fusion.__name__):
                caplog.clear()
                with torch.no_grad(), fusion.fused("compile"):
                    fw, fids = router(x)
                assert not caplog.records, [r.getMessage() for r in caplog.records]
            with torch.no_grad():
                pw, pids = router(x)
            assert torch.equal(fids.sort(dim=-1).values, pids.sort(dim=-1).values)
            torch.testing.assert_close(fw.sort(dim=-1).values, pw.sort(dim=-1).values, rtol=1e-6, atol=1e-7)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("qk_norm,t", [("head", 1), (None, 1), ("head", 3)])
def test_fused_cache_store_on_cuda_equals_the_plain_path(qk_norm, t):
    """Under fusion level "all" the compiled q/k-norm + RoPE that also writes the static cache (bf16, CUDA) gives
    the plain path's q and cache within bf16 rounding, leaves the other slots as they were, writes the buffers in
    place, and launches fewer kernels than the compiled norm/RoPE plus the two index copies it replaces."""
    import re

    from torch._inductor.utils import run_and_get_code

    from ekmesh.infer import fusion
    from ekmesh.infer.models.attention import head_norm_rope, head_norm_rope_store, rope_qk, rope_qk_store
    from tests.infer.test_cache_store import _inputs

    def on_cuda():  # the store function's arguments, bf16 on CUDA; the caches are args[-3] and args[-2]
        return tuple(a.to("cuda", torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point()
                     else a.cuda() if isinstance(a, torch.Tensor) else a for a in _inputs(qk_norm, t)[0])

    fn, old = (head_norm_rope_store, head_norm_rope) if qk_norm == "head" else (rope_qk_store, rope_qk)
    before, plain, fused = on_cuda(), on_cuda(), on_cuda()
    with torch.inference_mode():
        want = fn(*plain)  # fusion off: the plain body
        pointers = (fused[-3].data_ptr(), fused[-2].data_ptr())
        with fusion.fused("all"):
            got = fn(*fused)
        assert (fused[-3].data_ptr(), fused[-2].data_ptr()) == pointers
        slots = fused[-1]
        for name, g_, w_ in (("q", got, want), ("k", fused[-3], plain[-3]), ("v", fused[-2], plain[-2])):
            diff = fusion.relative_difference(g_, w_)
            print(f"{qk_norm} T={t} {name}: max |fused - plain| / max |plain| = {diff:.3g}")
            assert diff <= 1e-2, (name, diff)
        for buf, was in ((fused[-3], before[-3]), (fused[-2], before[-2])):
            rest = torch.ones(buf.shape[2], dtype=torch.bool, device="cuda")
            rest[slots] = False
            assert torch.equal(buf[:, :, rest], was[:, :, rest])  # only the step's slots written
            assert not torch.equal(buf, was)
        # the generated code: no buffer-sized allocation or kernel, and fewer launches than before
        _, codes = run_and_get_code(torch.compile(fn.__wrapped__, fullgraph=True, dynamic=False), *on_cuda())
        args = on_cuda()
        _, old_codes = run_and_get_code(torch.compile(old.__wrapped__, fullgraph=True, dynamic=False),
                                        *args[:2], *args[3:-3])  # no v, no cache
    code = "\n".join(codes)
    kernels = code.count("async_compile.triton(")
    old_kernels = "\n".join(old_codes).count("async_compile.triton(")
    numels = [int(n) for n in re.findall(r"\b(?:[xyz]|r\d_)numel = (\d+)", code)]
    print(f"{qk_norm} T={t}: {kernels} kernels (before: {old_kernels} + 2 index copies), numels {numels}")
    assert kernels and numels and max(numels) < before[-3].shape[2], numels
    assert "empty_strided_cuda(" + str(tuple(before[-3].shape)) not in code
    assert kernels < old_kernels + 2
