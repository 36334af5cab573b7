"""ekmesh's one-process model == transformers: fp32 logits within 1e-4, 32 greedy tokens identical."""

from __future__ import annotations

import pytest
import torch

from ekmesh.infer.generate import Generator
from ekmesh.infer.loader import load_all
from tests.tiny_models import CONFIGS, check_matches_transformers, make_tiny, random_prompt

ARCHS = sorted(CONFIGS)
TOL = 1e-4



@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_greedy_match_transformers(arch, tmp_path):
    path, ref = make_tiny(arch, tmp_path / arch)
    check_matches_transformers(path, ref, random_prompt(ref.config.vocab_size), arch, TOL)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_fused_v5_layout_loads_identically(arch, tmp_path):
    """A checkpoint in transformers-v5 fused expert names gives the same logits as the per-expert one."""
    from safetensors.torch import save_file

    path, ref = make_tiny(arch, tmp_path / "per_expert")
    fused = tmp_path / "fused"
    fused.mkdir()
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    save_file(sd, str(fused / "model.safetensors"))
    (fused / "config.json").write_text((path / "config.json").read_text())
    prompt = random_prompt(ref.config.vocab_size)
    a = Generator(*load_all(path)[1:]).logits(prompt)
    b = Generator(*load_all(fused)[1:]).logits(prompt)
    assert torch.equal(a, b)
