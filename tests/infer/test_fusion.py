"""The fusion levels and the fused q/k/v projection compute what the plain modules compute (CPU: the fusable
functions run their plain bodies here, so these check the rewiring, not the compiled kernels; the CUDA side is in
test_cuda.py and test_cuda_kernels.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ekmesh.infer import fusion
from ekmesh.infer.models.attention import Attention, AttentionSpec, head_norm_rope, rope_qk
from ekmesh.infer.models.norms import add_rms_norm, rms_norm


def test_levels_are_checked_and_nest():
    assert not fusion.enabled() and not fusion.kernels()
    with pytest.raises(ValueError, match="fusion level"), fusion.fused("fast"):
        pass
    with fusion.fused("compile"):
        assert fusion.enabled() and not fusion.kernels()
        with fusion.fused("all"):
            assert fusion.kernels()
        assert not fusion.kernels()
    assert not fusion.enabled()


@pytest.mark.parametrize("qk_norm,bias", [("head", False), (None, True), ("full", False)])
def test_fused_projection_equals_three(qk_norm, bias):
    torch.manual_seed(0)
    attn = Attention(AttentionSpec(64, 4, 2, 16, qkv_bias=bias, qk_norm=qk_norm), 0, None)
    if bias:
        for p in (attn.q_proj, attn.k_proj, attn.v_proj):
            nn.init.normal_(p.bias)
    x, cos, sin = torch.randn(1, 5, 64), torch.randn(5, 16), torch.randn(5, 16)
    with torch.no_grad():
        ref = attn._project(x, cos, sin)
        before = {n: p.detach().clone() for n, p in attn.named_parameters()}
        attn.fuse_projections()
        assert attn._qkv is not None and attn._qkv_current()
        for n, p in attn.named_parameters():  # the same values, now views of one tensor
            assert torch.equal(p, before[n]), n
        with fusion.fused("all"):
            got = attn._project(x, cos, sin)
        for r, g in zip(ref, got, strict=True):
            assert torch.allclose(r, g, atol=1e-6), (r - g).abs().max()
        attn.k_proj.weight = nn.Parameter(torch.zeros_like(attn.k_proj.weight))  # assigned anew: fusion stale
        if bias:
            attn.k_proj.bias = nn.Parameter(torch.zeros_like(attn.k_proj.bias))
        assert not attn._qkv_current()
        with fusion.fused("all"):
            k = attn._project(x, cos, sin)[1]
        assert float(k.abs().max()) == 0.0  # the new weight is used, not the fused copy


def test_fused_functions_equal_their_parts():
    torch.manual_seed(1)
    x, y, w = torch.randn(2, 3, 32), torch.randn(2, 3, 32), torch.rand(32)
    s, h = add_rms_norm(x, y, w, 1e-6)
    assert torch.equal(s, x + y) and torch.equal(h, rms_norm(x + y, w, 1e-6))
    q, k = torch.randn(1, 3, 4, 16), torch.randn(1, 3, 2, 16)
    qw, kw, cos, sin = torch.rand(16), torch.rand(16), torch.randn(3, 16), torch.randn(3, 16)
    fq, fk = head_norm_rope(q, k, qw, kw, 1e-6, cos, sin)
    rq, rk = rope_qk(rms_norm(q, qw, 1e-6).transpose(1, 2), rms_norm(k, kw, 1e-6).transpose(1, 2), cos, sin)
    assert torch.equal(fq, rq) and torch.equal(fk, rk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"])
def test_model_at_level_all_equals_plain(arch, dtype, tmp_path):
    """A whole forward at fusion level "all" (q/k/v as one matmul, each layer's residual sums chained into the next
    norm, GptOss's own norm kept) gives the plain forward's logits, prefill and a decode step after it."""
    from ekmesh.infer.loader import load_all
    from tests.infer.test_cuda import _build

    _, model, experts = load_all(_build(arch, tmp_path / arch), "cpu", dtype)
    prompt, nxt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]]), torch.tensor([[5]])
    with torch.inference_mode():
        plain_cache = model.new_cache()
        want = [model(prompt, plain_cache, experts), model(nxt, plain_cache, experts)]
        for m in model.modules():
            if isinstance(m, Attention):
                m.fuse_projections()
        cache = model.new_cache()
        with fusion.fused("all"):
            got = [model(prompt, cache, experts), model(nxt, cache, experts)]
    for w, g in zip(want, got, strict=True):
        diff = (w.float() - g.float()).abs().max().item()
        print(f"{arch} {dtype}: max |all - plain| = {diff:.3g}")
        assert diff <= (1e-5 if dtype == torch.float32 else 0.0)  # bf16: the same ops, so the same bits


def test_each_norm_fuses_its_own_formula():
    """A norm's fused residual sum uses that norm's formula: gpt-oss scales in fp32 before rounding, which in bf16
    differs from the standard norm's rounding."""
    from ekmesh.infer.models.gpt_oss import GptOssRMSNorm
    from ekmesh.infer.models.norms import RMSNorm

    torch.manual_seed(2)
    x, y = torch.randn(4, 64).bfloat16(), torch.randn(4, 64).bfloat16()
    for norm in (RMSNorm(64, 1e-5), GptOssRMSNorm(64, 1e-5)):
        with torch.no_grad():
            norm.weight.copy_(torch.rand(64) * 3)
        norm = norm.bfloat16()
        s, h = norm.add_norm(x, y)
        assert torch.equal(s, x + y) and torch.equal(h, norm(x + y)), type(norm).__name__


def test_grouped_attention_equals_gqa():
    """``attend_grouped`` (query heads of a key-value head as rows of one head) against SDPA's own GQA, with a
    causal, windowed mask over a static-cache-like key range."""
    from ekmesh.infer.models.attention import attend, attend_grouped
    from ekmesh.infer.models.cache import attention_mask

    torch.manual_seed(3)
    for h, hkv, t, s in [(8, 2, 1, 12), (8, 2, 3, 12), (4, 1, 2, 9), (6, 3, 4, 20)]:
        q, k, v = torch.randn(1, h, t, 16), torch.randn(1, hkv, s, 16), torch.randn(1, hkv, s, 16)
        mask = attention_mask(torch.arange(s - t - 2, s - 2), s, 5, always=True)  # [T, S], the last 2 unwritten
        want = attend(q, k, v, mask, 0.25)
        got = attend_grouped(q, k, v, mask.repeat(h // hkv, 1), 0.25)
        assert (want - got).abs().max().item() < 1e-5
