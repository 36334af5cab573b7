"""Tiny random MoE checkpoints built offline with transformers (the numeric reference), one per architecture.

``make_tiny(arch, dir)`` saves a seeded random model with ``save_pretrained`` (per-expert tensor names, as real
checkpoints have) and returns the directory and the transformers model in eval mode, fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

COMMON: dict[str, Any] = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, bos_token_id=None,
    eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
)

CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, head_dim=8,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1]),
    "qwen2_moe": dict(moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                      shared_expert_intermediate_size=24),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, clip_qkv=4.0),
}


def make_tiny(arch: str, directory: Path, seed: int = 0, **overrides: Any) -> tuple[Path, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(arch, **{**COMMON, **CONFIGS[arch], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    return directory, model


def random_prompt(vocab: int, n: int = 11, seed: int = 1) -> list[int]:
    """A seeded random prompt of ``n`` token ids below ``vocab``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def hf_greedy(ref: Any, prompt: list[int], n: int = 32) -> list[int]:
    """``n`` greedy tokens from a transformers model (no eos; an explicit mask so pad ids in the prompt count)."""
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def check_matches_transformers(path: Path, ref: Any, prompt: list[int], label: str,
                               tol: float = 1e-4) -> tuple[Any, list[int]]:
    """ekmesh loaded from ``path`` vs ``ref``: prefill logits within ``tol`` (max diff printed), and 32 greedy
    tokens identical. Returns ekmesh's ``Generator`` and the reference tokens."""
    from ekmesh.infer.generate import Generator, SamplingParams
    from ekmesh.infer.loader import load_all

    with torch.no_grad():
        ref_logits = ref(torch.tensor([prompt])).logits[0].float()
    ref_out = hf_greedy(ref, prompt)
    _, model, experts = load_all(path)
    gen = Generator(model, experts)
    logits = gen.logits(prompt)
    assert logits.shape == ref_logits.shape
    diff = (logits - ref_logits).abs().max().item()
    print(f"{label}: max |logits - transformers| = {diff:.3g}")
    assert diff <= tol, f"{label}: max abs diff {diff} > {tol}"
    assert gen.generate(prompt, SamplingParams(max_tokens=32, stop_ids=frozenset())).token_ids == ref_out
    return gen, ref_out


DENSE: dict[str, Any] = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.1, bos_token_id=None,
    eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
)


def make_tiny_dense(directory: Path, seed: int = 0, **overrides: Any) -> tuple[Path, Any]:
    """A seeded random transformers ``Qwen3ForCausalLM`` saved to ``directory``; returns it in eval mode, fp32."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**{**DENSE, **overrides})
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).to(torch.float32).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    return directory, model
