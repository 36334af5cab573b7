"""The fusion levels and the fused q/k/v projection compute what the plain modules compute (CPU: the fusable
functions run their plain bodies here, so these check the rewiring, not the compiled kernels; the CUDA side is in
test_cuda.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ekmesh.infer import fusion
from ekmesh.infer.models.common import Attention, AttentionSpec, add_rms_norm, head_norm_rope, rms_norm, rope_qk


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
