"""Mesh == one process for the five architectures ``test_mesh`` does not cover: Qwen2-MoE (shared expert), OLMoE
(clip_qkv), DeepSeek-V2 and V3 (MLA, dense prefix layers, grouped routing, correction bias) and gpt-oss (expert
biases, clamped SwiGLU, attention sinks).

DeepSeek runs every case of ``test_deepseek.CASES`` (V2: group-limited and greedy routing, q_lora on/off; V3:
noaux_tc with correction bias, YaRN with the half-split RoPE layout).

Per architecture one pair of expert-server subprocesses holds every expert (each MoE layer uses both, the attention
host holds none); 32 greedy tokens must be identical to one process, and the fp32 logits of the prompt plus those
tokens must agree to 1e-5 (fp32 travels on the wire, so the only difference is summation order).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ekmesh.infer.generate import Generator, SamplingParams
from ekmesh.infer.loader import load_all
from tests.infer.dataplane.mesh import Mesh, spread
from tests.infer.test_deepseek import CASES as DEEPSEEK_CASES
from tests.infer.test_deepseek import make_tiny_deepseek
from tests.infer.test_gpt_oss import make_tiny_gpt_oss
from tests.tiny_models import make_tiny, random_prompt

TOL = 1e-5
GREEDY = SamplingParams(max_tokens=32, stop_ids=frozenset())


BUILDERS: dict[str, Callable[[Path], Any]] = {
    "qwen2_moe": lambda d: make_tiny("qwen2_moe", d),
    "olmoe": lambda d: make_tiny("olmoe", d),
    "gpt_oss": make_tiny_gpt_oss,
    **{f"deepseek_{case}": functools.partial(make_tiny_deepseek, case) for case in DEEPSEEK_CASES},
}


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_mesh_equals_one_process(arch: str, tmp_path: Path) -> None:
    path = tmp_path / arch
    BUILDERS[arch](path)
    ckpt, model, experts = load_all(path)
    one = Generator(model, experts)
    prompt = random_prompt(ckpt.config.vocab_size)
    expected = one.generate(prompt, GREEDY).token_ids
    assert len(set(expected)) > 2, f"{arch}: a constant generation would not test much"

    placement = spread(ckpt, ["p0", "p1"], replicas=1)
    for peer, held in placement.items():  # every MoE layer is split over both peers
        assert {layer for layer, _ in held} == {layer for layer, _ in ckpt.expert_addresses()}, peer
    mesh = Mesh(path, placement)
    try:
        remote = mesh.backend()
        gen = Generator(model, remote)
        got = gen.generate(prompt, GREEDY).token_ids
        seq = prompt + expected
        diff = (gen.logits(seq) - one.logits(seq)).abs().max().item()
        print(f"{arch}: max |mesh - one process| logits over {len(seq)} positions = {diff:.3g}")
        assert got == expected
        assert diff <= TOL, f"{arch}: max abs diff {diff} > {TOL}"
        stats = remote.stats()
        assert set(stats) == {"p0", "p1"} and all(s.round_trips > 0 and s.failures == 0 for s in stats.values())
        assert not remote.local.held()  # type: ignore[union-attr]
    finally:
        mesh.close()
