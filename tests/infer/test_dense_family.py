"""The dense Qwen3 family (Qwen3ForCausalLM) == transformers, and the KV-cache rewind speculative decoding needs.

fp32 logits within 1e-4 over a prompt and over an incremental decode (prefill, then one token at a time through
the KV cache), 16 greedy tokens identical to transformers' ``generate``; untied, tied and sliding-window configs.
``KVCache.truncate`` after k extra tokens, then different tokens, gives the logits of never having fed the extra
ones (dynamic and static caches). A dense model has no routed expert: loading reads none, reading one is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ekmesh.core.errors import ConfigError
from ekmesh.infer.generate import Generator, SamplingParams
from ekmesh.infer.loader import Checkpoint, load_all, load_dense, load_experts
from ekmesh.infer.models import family_for, qwen3
from ekmesh.infer.models.cache import KVCache
from ekmesh.infer.models.common import CausalLM
from ekmesh.infer.readplan import read_plan
from tests.tiny_models import DENSE, hf_greedy, make_tiny_dense, random_prompt

TOL = 1e-4
CASES: dict[str, dict[str, Any]] = {
    "untied": {},
    "tied": dict(tie_word_embeddings=True),
    # layers 1 and 2 attend to the last 4 keys only: shorter than the prompt and the decode
    "sliding": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Any]:
    case = request.param
    path, ref = make_tiny_dense(tmp_path_factory.mktemp(f"qwen3_{case}"), **CASES[case])
    return case, path, ref


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def test_prompt_logits_and_greedy_match_transformers(tiny: tuple[str, Path, Any]) -> None:
    case, path, ref = tiny
    prompt = random_prompt(ref.config.vocab_size)
    ckpt, model, experts = load_all(path)
    assert ckpt.family is qwen3 and not any(ckpt.config.moe_layers) and ckpt.config.num_experts == 0
    if case == "tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert not ckpt.reader.has("lm_head.weight")  # transformers saved no head: the tie is ekmesh's
    if case == "sliding":
        assert ckpt.config.windows == (None, 4, 4)
    with torch.no_grad():
        want = ref(torch.tensor([prompt])).logits[0]  # [T, V]
    for backend in (experts, None):  # the empty LocalExperts load_all gives, and no backend at all
        got = Generator(model, backend).logits(prompt)
        diff = _diff(got, want)
        print(f"qwen3 {case}: max |logits - transformers| = {diff:.3g}")
        assert diff <= TOL, f"{case}: max abs diff {diff} > {TOL}"
    ref_tokens = hf_greedy(ref, prompt, n=16)
    got_tokens = Generator(model, experts).generate(prompt, SamplingParams(max_tokens=16, stop_ids=frozenset()))
    assert got_tokens.token_ids == ref_tokens


def test_incremental_decode_matches_transformers(tiny: tuple[str, Path, Any]) -> None:
    """Prefill 5 tokens, then feed the rest of prompt + greedy continuation one at a time through the cache."""
    case, path, ref = tiny
    prompt = random_prompt(ref.config.vocab_size)
    seq = prompt + hf_greedy(ref, prompt, n=16)
    with torch.no_grad():
        want = ref(torch.tensor([seq])).logits[0]  # [S, V]
    model = load_dense(Checkpoint.open(path))
    cache = model.new_cache()
    with torch.inference_mode():
        steps = [model(torch.tensor([seq[:5]]), cache, None)[0]]  # [5, V]
        steps += [model(torch.tensor([[t]]), cache, None)[0] for t in seq[5:]]  # each [1, V]
    got = torch.cat(steps)  # [S, V]
    assert cache.length == len(seq)
    diff = _diff(got, want)
    print(f"qwen3 {case}: incremental decode, max |logits - transformers| = {diff:.3g}")
    assert diff <= TOL, f"{case}: max abs diff {diff} > {TOL}"


def _feed(model: CausalLM, cache: KVCache, ids: list[int], one_at_a_time: bool = False) -> torch.Tensor:
    """Logits [T, V] of ``ids`` continuing ``cache``, as one block (a verify step) or token by token (drafting)."""
    with torch.inference_mode():
        if one_at_a_time:
            return torch.cat([model(torch.tensor([[t]]), cache, None)[0] for t in ids])
        return model(torch.tensor([ids]), cache, None)[0]


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("one_at_a_time", [False, True], ids=["block", "drafted"])
def test_truncate_then_refeed_equals_never_fed(tiny: tuple[str, Path, Any], static: bool,
                                               one_at_a_time: bool) -> None:
    """What speculative decoding relies on: rejected positions dropped with ``truncate`` leave no trace."""
    case, path, ref = tiny
    model = load_dense(Checkpoint.open(path))
    vocab = ref.config.vocab_size
    prompt = random_prompt(vocab, n=9, seed=2)
    rejected = random_prompt(vocab, n=4, seed=3)
    accepted = random_prompt(vocab, n=3, seed=4)
    assert rejected[:len(accepted)] != accepted
    max_len = 64 if static else None

    clean = model.new_cache(max_len)
    _feed(model, clean, prompt)
    want = _feed(model, clean, accepted, one_at_a_time)

    rewound = model.new_cache(max_len)
    _feed(model, rewound, prompt)
    fed = _feed(model, rewound, rejected, one_at_a_time)
    assert rewound.length == len(prompt) + len(rejected)
    rewound.truncate(len(prompt))
    assert rewound.length == len(prompt)
    got = _feed(model, rewound, accepted, one_at_a_time)
    assert rewound.length == clean.length == len(prompt) + len(accepted)
    assert _diff(fed[:1], want[:1]) > 0  # the rejected tokens did give other logits
    diff = _diff(got, want)
    print(f"qwen3 {case} {'static' if static else 'dynamic'}: after truncate, max |diff| = {diff:.3g}")
    assert diff <= 1e-6, f"{case}: logits after truncate differ by {diff}"
    # and the rewound cache keeps decoding like the clean one
    nxt = int(want[-1].argmax())
    assert _diff(_feed(model, rewound, [nxt]), _feed(model, clean, [nxt])) <= 1e-6


def test_a_dense_model_has_no_routed_expert(tmp_path: Path) -> None:
    path, _ = make_tiny_dense(tmp_path / "dense")
    hf = json.loads((path / "config.json").read_text())
    assert family_for(hf) is qwen3 and family_for({"model_type": "qwen3"}) is qwen3
    ckpt = Checkpoint.open(path)
    assert ckpt.expert_addresses() == []
    spec = ckpt.config.expert_spec()
    assert (spec.hidden, spec.intermediate, spec.num_experts) == (64, 0, 0)
    with pytest.raises(ConfigError, match="dense model without routed experts"):
        ckpt.read_expert(0, 0)
    _, _, experts = load_all(ckpt)
    assert load_experts(ckpt, experts) == 0
    with pytest.raises(ConfigError, match="not a routed expert"):
        load_experts(ckpt, experts, [(0, 0)])
    # the read plan the registry imports with: every tensor of the checkpoint is dense, none is an expert's
    table = {n: ("F32", ckpt.reader.shape(n)) for n in ckpt.reader.names()}
    plan = read_plan(hf, table, str(path))
    assert plan.experts == {} and plan.num_experts == 0
    assert sorted(plan.dense) == sorted(table)


def test_sliding_window_from_the_older_config_fields(tmp_path: Path) -> None:
    """Without ``layer_types`` (older configs), Qwen3's rule applies: layers from ``max_window_layers`` slide."""
    path, _ = make_tiny_dense(tmp_path / "dense", **CASES["sliding"])
    hf = json.loads((path / "config.json").read_text())
    assert hf["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]
    older = {k: v for k, v in hf.items() if k != "layer_types"}
    assert qwen3.Config.from_hf_config(older).windows == qwen3.Config.from_hf_config(hf).windows == (None, 4, 4)
    off = {**older, "use_sliding_window": False}
    assert qwen3.Config.from_hf_config(off).windows == (None, None, None)


def test_config_without_intermediate_size_is_refused() -> None:
    hf = {**DENSE, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
    del hf["intermediate_size"]
    with pytest.raises(ConfigError, match="intermediate_size"):
        qwen3.Config.from_hf_config(hf)
