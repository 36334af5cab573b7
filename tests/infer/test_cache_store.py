"""The static-cache write fused into q/k-norm + RoPE (``head_norm_rope_store``, ``rope_qk_store``) computes what
projecting and then ``KVCache.update`` compute, and compiled by inductor it writes the cache buffers in place.

CPU only: the fusable functions run their plain bodies under ``fusion.fused`` here, and the compiled check calls
``torch.compile`` directly (inductor's C++ backend); the CUDA side is in test_cuda_kernels.py.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

from ekmesh.infer import fusion
from ekmesh.infer.models.attention import (
    Attention,
    AttentionSpec,
    head_norm_rope,
    head_norm_rope_store,
    rope_qk,
    rope_qk_store,
)
from ekmesh.infer.models.cache import KVCache, Step

MAX_LEN, PAST = 16, 5  # cache slots; positions written before the step under test


def _attention(qk_norm: str | None, dtype: torch.dtype = torch.float32) -> Attention:
    torch.manual_seed(0)
    attn = Attention(AttentionSpec(64, 4, 2, 16, qkv_bias=True, qk_norm=qk_norm, clip_qkv=3.0), 0, None)
    with torch.no_grad():
        for p in attn.parameters():  # norm weights and biases away from their 1 / 0 defaults
            nn.init.normal_(p, std=0.5)
    return attn.to(dtype)


def _step(cache: KVCache, t: int, dtype: torch.dtype) -> Step:
    positions = torch.arange(PAST, PAST + t)  # [T]
    cache.positions = positions
    g = torch.Generator().manual_seed(t)
    cos, sin = torch.randn(t, 16, generator=g).to(dtype), torch.randn(t, 16, generator=g).to(dtype)
    return Step(positions, cache, None, rope={"main": (cos, sin)})


def _filled_cache(dtype: torch.dtype) -> KVCache:
    """A static cache whose layer 0 already holds PAST positions (and junk beyond, as a reused cache does)."""
    cache = KVCache(1, max_len=MAX_LEN)
    g = torch.Generator().manual_seed(9)
    cache.k[0] = torch.randn(1, 2, MAX_LEN, 16, generator=g).to(dtype)
    cache.v[0] = torch.randn(1, 2, MAX_LEN, 16, generator=g).to(dtype)
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("qk_norm", ["head", "full", None])
def test_project_with_store_equals_project_then_update(qk_norm, t, dtype):
    """The fused decode path (static cache, ``fusion.kernels()``) gives the same q, the same cache contents and the
    same attention output as the plain path, bit for bit (CPU: the same ops in the same order)."""
    attn = _attention(qk_norm, dtype)
    x = torch.randn(1, t, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    plain, fused = _filled_cache(dtype), _filled_cache(dtype)
    ps, fs = _step(plain, t, dtype), _step(fused, t, dtype)
    with torch.inference_mode():
        q, k, v = attn._project(x, *ps.rope["main"])
        kbuf, vbuf = plain.update(0, k, v)
        want = attn(x, _step(_filled_cache(dtype), t, dtype))
        with fusion.fused("all"):
            fq, fk, fv = attn._project(x, *fs.rope["main"], fs.cache)
            got = attn(x, _step(_filled_cache(dtype), t, dtype))
    assert fk is fused.k[0] and fv is fused.v[0]  # the buffers themselves, written
    assert torch.equal(fq, q), (fq - q).abs().max()
    assert torch.equal(fk, kbuf) and torch.equal(fv, vbuf), ((fk - kbuf).abs().max(), (fv - vbuf).abs().max())
    assert not torch.equal(fk, _filled_cache(dtype).k[0])  # the step's slots did change
    assert torch.equal(got, want), (got - want).abs().max()


def test_static_buffers_allocate_once_per_batch_size():
    cache = KVCache(2, max_len=8)
    k, v = torch.ones(1, 2, 1, 4, dtype=torch.bfloat16), torch.ones(1, 2, 1, 6)
    kb, vb = cache.static_buffers(1, k, v)
    assert (kb.shape, kb.dtype, vb.shape, vb.dtype) == ((1, 2, 8, 4), torch.bfloat16, (1, 2, 8, 6), torch.float32)
    assert float(kb.abs().sum() + vb.abs().sum()) == 0.0 and cache.k[0] is None
    assert cache.static_buffers(1, k, v)[0] is kb  # kept
    kd, _ = cache.static_buffers(0, k, v, k_dtype=torch.float32)  # keys of another dtype than the template's
    assert kd.dtype == torch.float32
    cache.positions = torch.tensor([3])
    assert cache.update(1, k, v)[0] is kb and float(kb[:, :, 3].sum()) == 2 * 4  # update stores into them
    assert cache.static_buffers(1, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1))[0].shape == (2, 2, 8, 4)


def _inputs(qk_norm: str | None, t: int) -> tuple[tuple[object, ...], torch.Tensor, torch.Tensor]:
    """(arguments of the store function for ``qk_norm``, its k buffer, its v buffer) for a fresh cache."""
    g = torch.Generator().manual_seed(2)
    b, h, hkv, d = 1, 4, 2, 16
    kbuf, vbuf = torch.randn(b, hkv, 4096, d, generator=g), torch.randn(b, hkv, 4096, d, generator=g)
    v = torch.randn(b, t, hkv, d, generator=g).transpose(1, 2)  # [B, Hkv, T, d], strided as _project gives it
    cos, sin = torch.randn(t, d, generator=g), torch.randn(t, d, generator=g)
    positions = torch.arange(100, 100 + t)
    if qk_norm == "head":
        q, k = torch.randn(b, t, h, d, generator=g), torch.randn(b, t, hkv, d, generator=g)
        qw, kw = torch.rand(d, generator=g), torch.rand(d, generator=g)
        return (q, k, v, qw, kw, 1e-6, cos, sin, kbuf, vbuf, positions), kbuf, vbuf
    q = torch.randn(b, t, h, d, generator=g).transpose(1, 2)
    k = torch.randn(b, t, hkv, d, generator=g).transpose(1, 2)
    return (q, k, v, cos, sin, kbuf, vbuf, positions), kbuf, vbuf


@pytest.mark.slow
@pytest.mark.parametrize("qk_norm,t", [("head", 1), (None, 3)])
def test_compiled_store_writes_the_buffers_in_place(qk_norm, t):
    """Inductor (CPU backend) compiles the store into the norm/RoPE kernel writing the caller's buffers: same
    storage, the step's slots updated, no copy or allocation of a whole buffer in the generated code (a
    functionalised copy would move every slot of every layer's cache each step)."""
    fn = head_norm_rope_store if qk_norm == "head" else rope_qk_store
    args, kbuf, vbuf = _inputs(qk_norm, t)
    want_args, want_k, want_v = _inputs(qk_norm, t)
    pointers = (kbuf.data_ptr(), vbuf.data_ptr())
    with torch.inference_mode():
        want = fn.__wrapped__(*want_args)  # the plain body
        got, codes = run_and_get_code(torch.compile(fn.__wrapped__, fullgraph=True, dynamic=False), *args)
    assert (kbuf.data_ptr(), vbuf.data_ptr()) == pointers
    for name, g_, w_ in (("q", got, want), ("k cache", kbuf, want_k), ("v cache", vbuf, want_v)):
        diff = (g_ - w_).abs().max().item()
        print(f"{fn.__name__} T={t} {name}: max |compiled - plain| = {diff:.3g}")
        assert diff <= 1e-5, (name, diff)
    assert not torch.equal(kbuf, _inputs(qk_norm, t)[1]) and not torch.equal(vbuf, _inputs(qk_norm, t)[2])
    code = "\n".join(codes)
    assert "def call(" in code  # inductor's wrapper came back (the checks below read real generated code)
    whole = str(tuple(kbuf.shape))  # "(1, 2, 4096, 16)"
    # besides the input checks (and the benchmark harness inductor appends), nothing is buffer-sized
    sized = [ln.strip() for ln in code.splitlines()
             if whole in ln and "assert_size_stride" not in ln and "rand_strided" not in ln]
    assert not sized, sized
    # and no loop walks the cache (a copy of a buffer loops over its 131072 elements; the store over T*Hkv*d)
    bounds = [int(n) for n in re.findall(r"for\(.*?<static_cast<int64_t>\((\d+)L?\)", code)]
    print(f"{fn.__name__} T={t}: loop bounds {bounds}")
    assert bounds and max(bounds) < kbuf.shape[2], bounds


def test_plain_bodies_match_the_old_functions():
    """The store functions return what ``head_norm_rope`` / ``rope_qk`` return for q (their k goes to the buffer)."""
    args, kbuf, _ = _inputs("head", 3)
    q, k, _, qw, kw, eps, cos, sin, *_ = args
    want_q, want_k = head_norm_rope(q, k, qw, kw, eps, cos, sin)
    assert torch.equal(head_norm_rope_store(*args), want_q)
    assert torch.equal(kbuf[:, :, 100:103], want_k)
    args, kbuf, _ = _inputs(None, 3)
    q, k, _, cos, sin, *_ = args
    want_q, want_k = rope_qk(q, k, cos, sin)
    assert torch.equal(rope_qk_store(*args), want_q)
    assert torch.equal(kbuf[:, :, 100:103], want_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_static_cache_model_at_level_all_equals_plain(arch, dtype, tmp_path, monkeypatch):
    """A whole model over a static cache at fusion level "all" (every Attention writing its cache from the
    norm/RoPE call, never through ``update``; gpt-oss with sinks and sliding windows) gives the plain forward's
    logits and cache contents, prefill and decode steps after it."""
    from ekmesh.infer.loader import load_all
    from tests.infer.test_cuda import _build

    updates = []
    update = KVCache.update
    monkeypatch.setattr(KVCache, "update", lambda self, *a: updates.append(fusion.kernels()) or update(self, *a))
    _, model, experts = load_all(_build(arch, tmp_path / arch), "cpu", dtype)
    steps = [torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]]), torch.tensor([[5]]), torch.tensor([[3, 5, 8]])]
    with torch.inference_mode():
        plain = model.new_cache(MAX_LEN)
        want = [model(ids, plain, experts) for ids in steps]
        cache = model.new_cache(MAX_LEN)
        with fusion.fused("all"):
            got = [model(ids, cache, experts) for ids in steps]
    assert updates and not any(updates)  # the plain forward used update, the fused one never did
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w, g), (w.float() - g.float()).abs().max()
    for w, g in zip([*plain.k, *plain.v], [*cache.k, *cache.v], strict=True):
        assert w is not None and g is not None and torch.equal(w, g)
