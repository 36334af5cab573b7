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
