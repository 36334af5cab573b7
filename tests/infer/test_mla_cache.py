"""DeepSeek MLA's latent KV cache: what it holds, and that it changes no logit.

- the cache holds, per layer and position, the normed latent (``kv_lora_rank``) and the rotary key
  (``qk_rope_head_dim``), one copy shared by every head: ``num_layers * (r + dr)`` values per token, against the
  expanded ``num_layers * H * (dn + dr + dv)`` that ``mla_cache="expanded"`` keeps;
- over it, prefill and many decode steps give transformers' logits (1e-4, fp32) and the expanded cache's, with the
  attention computed absorbed (q_nope through W_UK into latent space, out through W_UV), expanded, or chosen by
  cost (the default), for every case of ``test_deepseek.CASES`` (V2 and V3, q_lora on/off, both RoPE layouts,
  YaRN);
- speculative verification (k tokens per forward, rejected positions cut with ``KVCache.truncate`` and written
  again), batched steps (``CausalLM.forward_many``) and the static cache of CUDA-graph decoding (positions written
  through ``cache.positions``) agree as well.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from ekmesh.infer.generate import Generator, SamplingParams
from ekmesh.infer.loader import Checkpoint, load_all
from ekmesh.infer.models.cache import KVCache
from ekmesh.infer.models.common import CausalLM
from tests.infer.test_deepseek import CASES, make_tiny_deepseek
from tests.tiny_models import random_prompt

TOL = 1e-4
CONTINUATION = 20  # teacher-forced tokens after the prompt

pytestmark = pytest.mark.timeout(300)


def _cached_values_per_token(cache: KVCache) -> int:
    """Values one position of one sequence holds in the cache, over every layer (read from the buffers)."""
    return sum(t.shape[1] * t.shape[3] for t in (*cache.k, *cache.v) if t is not None)


def _load(path: Path, **mla: str) -> tuple[Checkpoint, CausalLM, Any]:
    """The checkpoint loaded with its DeepSeek config's MLA settings replaced by ``mla`` (none: the defaults)."""
    ckpt = Checkpoint.open(path)
    if mla:
        ckpt = dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, **mla))
    return load_all(ckpt)


def _sequence(vocab: int) -> tuple[list[int], list[int]]:
    """(prompt, teacher-forced continuation): seeded random ids."""
    prompt = random_prompt(vocab)
    g = torch.Generator().manual_seed(7)
    return prompt, torch.randint(0, vocab, (CONTINUATION,), generator=g).tolist()


def _reference(ref: Any, ids: list[int]) -> torch.Tensor:
    """transformers' logits [T, V] over the whole sequence in one forward."""
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float()


def _prefill_then_decode(model: CausalLM, experts: Any, prompt: list[int], rest: list[int],
                         cache: KVCache | None = None) -> torch.Tensor:
    """Logits [len(prompt) + len(rest), V]: the prompt in one forward, then one token per step."""
    cache = model.new_cache() if cache is None else cache
    with torch.inference_mode():
        out = [model(torch.tensor([prompt]), cache, experts)[0]]  # [T, V]
        for tok in rest:
            out.append(model(torch.tensor([[tok]]), cache, experts)[0])  # [1, V]
    return torch.cat(out)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_the_cache_holds_the_latent_and_the_rotary_key(tmp_path: Path) -> None:
    path, ref = make_tiny_deepseek("v3_noaux_tc", tmp_path / "m")
    c = ref.config
    _, model, experts = load_all(path)
    prompt, rest = _sequence(c.vocab_size)
    cache = model.new_cache()
    _prefill_then_decode(model, experts, prompt, rest[:3], cache)
    latent = c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim)
    expanded = c.num_hidden_layers * c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim
                                                              + c.v_head_dim)
    print(f"values per cached token: {_cached_values_per_token(cache)} (latent {latent}, expanded {expanded})")
    assert _cached_values_per_token(cache) == latent
    assert cache.bytes_per_token() == latent * 4  # fp32
    assert cache.length == len(prompt) + 3
    attn, r = model.model.layers[0].self_attn, c.kv_lora_rank  # layer 0's input is known: the embeddings, normed
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor([prompt])))  # [1, T, D]
        latent = attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(h)[..., :r])  # [1, T, r]
    assert cache.k[0] is not None and torch.allclose(cache.k[0][0, 0, :len(prompt), :r], latent[0], atol=1e-6)

    _, old, _ = _load(path, mla_cache="expanded")
    other = old.new_cache()
    _prefill_then_decode(old, experts, prompt, rest[:3], other)
    assert _cached_values_per_token(other) == expanded and other.bytes_per_token() == expanded * 4


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_and_decode_equal_transformers_and_the_expanded_cache(case: str, tmp_path: Path) -> None:
    path, ref = make_tiny_deepseek(case, tmp_path / case)
    prompt, rest = _sequence(ref.config.vocab_size)
    want = _reference(ref, prompt + rest)
    _, expanded, experts = _load(path, mla_cache="expanded")
    base = _prefill_then_decode(expanded, experts, prompt, rest)
    for absorb in ("auto", "always", "never"):
        _, model, _ = _load(path, mla_absorb=absorb)
        got = _prefill_then_decode(model, experts, prompt, rest)
        to_hf, to_expanded = _max_diff(got, want), _max_diff(got, base)
        print(f"{case} absorb={absorb}: max |latent - transformers| {to_hf:.3g}, |latent - expanded| "
              f"{to_expanded:.3g}")
        assert to_hf <= TOL and to_expanded <= TOL, (absorb, to_hf, to_expanded)


@pytest.mark.parametrize("case", ["v2_greedy_q_lora_bias", "v3_yarn_half_split"])
def test_speculative_verification_with_truncation(case: str, tmp_path: Path) -> None:
    """Steps of k+1 tokens (the true next token and k drafts, some wrong); the wrong drafts' positions are cut and
    written again by the next step: every kept position's logits equal transformers' over the true sequence."""
    path, ref = make_tiny_deepseek(case, tmp_path / case)
    vocab = ref.config.vocab_size
    prompt, rest = _sequence(vocab)
    want = _reference(ref, prompt + rest)
    g = torch.Generator().manual_seed(11)
    for absorb in ("auto", "always", "never"):
        _, model, experts = _load(path, mla_absorb=absorb)
        cache = model.new_cache()
        truncated = 0
        with torch.inference_mode():
            got = [model(torch.tensor([prompt]), cache, experts)[0]]  # [T, V]
            done = 0
            while done < len(rest):
                k = int(torch.randint(1, 5, (1,), generator=g))
                good = min(int(torch.randint(0, k + 1, (1,), generator=g)), len(rest) - done - 1)
                fed = rest[done:done + 1 + good]  # the true next token and the drafts that will be accepted
                fed += torch.randint(0, vocab, (k - good,), generator=g).tolist()  # rejected drafts
                before = cache.length
                out = model(torch.tensor([fed]), cache, experts)[0]  # [1 + k, V]
                assert cache.length == before + len(fed)
                got.append(out[:1 + good])
                cache.truncate(before + 1 + good)
                truncated += len(fed) - 1 - good
                done += 1 + good
        diff = _max_diff(torch.cat(got), want)
        print(f"{case} absorb={absorb}: {truncated} positions truncated, max |latent - transformers| {diff:.3g}")
        assert truncated > 0 and diff <= TOL, (absorb, diff)


def test_greedy_with_drafts_equals_the_expanded_cache(tmp_path: Path) -> None:
    """Through the generator: greedy with prompt-lookup drafts (verification and truncation) over the latent cache
    gives the expanded cache's tokens."""
    path, ref = make_tiny_deepseek("v3_noaux_tc", tmp_path / "m")
    half = random_prompt(ref.config.vocab_size, 12)
    prompt = half + half[:9]  # repeats itself: prompt lookup has something to propose
    greedy = SamplingParams(max_tokens=32, stop_ids=frozenset())
    _, expanded, experts = _load(path, mla_cache="expanded")
    _, latent, _ = _load(path)
    want = Generator(expanded, experts).generate(prompt, greedy).token_ids
    got = Generator(latent, experts, speculative="ngram").generate(prompt, greedy)
    assert got.stats.drafted > 0
    assert got.token_ids == want


def test_batched_steps_equal_steps_alone_and_the_expanded_cache(tmp_path: Path) -> None:
    path, _ = make_tiny_deepseek("v2_group_limited_no_q_lora", tmp_path / "m")
    _, latent, experts = _load(path)
    _, expanded, _ = _load(path, mla_cache="expanded")
    g = torch.Generator().manual_seed(5)
    vocab = latent.config.vocab_size

    def ids(n: int) -> torch.Tensor:
        return torch.randint(0, vocab, (1, n), generator=g)

    histories, news, nxt = [ids(9), ids(0), ids(14)], [ids(1), ids(6), ids(4)], ids(2)
    with torch.inference_mode():
        outs = {}
        for name, model in (("latent", latent), ("expanded", expanded)):
            caches = [model.new_cache() for _ in histories]
            for hist, cache in zip(histories, caches, strict=True):
                if hist.shape[1]:
                    model(hist, cache, experts)
            outs[name] = model.forward_many(list(zip(news, caches, strict=True)), experts)
            outs[name] += [model(nxt, cache, experts)[0] for cache in caches]  # the caches continue correctly
    diff = max(_max_diff(a, b) for a, b in zip(outs["latent"], outs["expanded"], strict=True))
    print(f"batched, latent vs expanded cache: max diff {diff:.3g}")
    assert diff <= TOL


@pytest.mark.parametrize("absorb", ["auto", "always", "never"])
def test_static_latent_cache_equals_transformers(absorb: str, tmp_path: Path) -> None:
    """The fixed-capacity cache CUDA-graph decoding uses (every slot attended, a mask hiding unwritten ones)."""
    path, ref = make_tiny_deepseek("v3_noaux_tc", tmp_path / "m")
    prompt, rest = _sequence(ref.config.vocab_size)
    want = _reference(ref, prompt + rest)
    _, model, experts = _load(path, mla_absorb=absorb)
    cache = model.new_cache(max_len=64)
    got = _prefill_then_decode(model, experts, prompt, rest, cache)
    assert cache.k[0] is not None and cache.k[0].shape[2] == 64
    diff = _max_diff(got, want)
    print(f"static cache, absorb={absorb}: max |latent - transformers| {diff:.3g}")
    assert diff <= TOL


def test_absorbing_is_chosen_for_few_new_tokens_over_a_long_cache() -> None:
    """With DeepSeek-V3's dims: decode and verification steps absorb, a prefill expands (crossover ~170 tokens)."""
    from ekmesh.infer.models.deepseek_mla import MLASpec, absorb_pays

    v3 = MLASpec(hidden_size=7168, num_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                 qk_rope_head_dim=64, v_head_dim=128, attention_bias=False, rope_interleave=True, softmax_scale=0.1)
    assert v3.cached_values_per_token() == 576
    assert dataclasses.replace(v3, mla_cache="expanded").cached_values_per_token() == 128 * 320
    for s in (4096, 32768):
        assert absorb_pays(v3, 1, s) and absorb_pays(v3, 8, s) and absorb_pays(v3, 128, s)
        assert not absorb_pays(v3, 256, s) and not absorb_pays(v3, 1024, s + 1024)
    assert not absorb_pays(v3, 4096, 4096)


def test_bad_mla_settings_are_refused(tmp_path: Path) -> None:
    from ekmesh.core.errors import ConfigError

    path, _ = make_tiny_deepseek("v2_group_limited_no_q_lora", tmp_path / "m")
    for bad in (dict(mla_cache="compressed"), dict(mla_absorb="sometimes")):
        with pytest.raises(ConfigError):
            _load(path, **bad)
