"""DeepSeek-V2/V3 family == transformers: fp32 logits within 1e-4 and 32 greedy tokens identical, for each routing
method, q_lora_rank on/off, both RoPE layouts and YaRN; block-FP8 checkpoints; the fused v5 expert layout; a V3
checkpoint carrying its multi-token-prediction layer; config validation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ekmesh.core.errors import ConfigError
from ekmesh.infer.generate import Generator
from ekmesh.infer.loader import Checkpoint, load_all
from ekmesh.infer.models import deepseek, family_for
from tests.tiny_models import COMMON, check_matches_transformers, random_prompt

TOL = 1e-4
FP8_BLOCK = (16, 16)
FP8_MAX = 448.0  # largest finite float8_e4m3fn

_MLA: dict[str, Any] = dict(num_hidden_layers=4, num_key_value_heads=4, first_k_dense_replace=1,
                            moe_intermediate_size=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                            v_head_dim=12, max_position_embeddings=128)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "v2_group_limited_no_q_lora": ("deepseek_v2", dict(
        q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5)),
    "v2_greedy_q_lora_bias": ("deepseek_v2", dict(
        q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2, topk_method="greedy",
        attention_bias=True, rms_norm_eps=1e-5)),
    "v3_noaux_tc": ("deepseek_v3", dict(
        q_lora_rank=24, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=1)),
    "v3_yarn_half_split": ("deepseek_v3", dict(
        q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
        routed_scaling_factor=1.7, norm_topk_prob=False, rope_interleave=False, max_position_embeddings=64,
        rope_parameters=dict(rope_type="yarn", rope_theta=500.0, factor=4.0, mscale=0.8, mscale_all_dim=0.9,
                             original_max_position_embeddings=16, beta_fast=8.0, beta_slow=1.0))),
}


def make_tiny_deepseek(case: str, directory: Path, seed: int = 0, **overrides: Any) -> tuple[Path, Any]:
    """Saves a seeded random transformers model (per-expert names) and returns (dir, model in eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, over = CASES[case]
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **_MLA, **over, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # transformers starts the V3 bias at 0; make it steer the choice
            bias = getattr(layer.mlp, "gate", None) and getattr(layer.mlp.gate, "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(torch.randn(bias.shape) * 0.05)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    return directory, model



def _ours(path: Path, prompt: list[int]) -> tuple[torch.Tensor, Generator]:
    _, model, experts = load_all(path)
    gen = Generator(model, experts)
    return gen.logits(prompt), gen


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_match_transformers(case: str, tmp_path: Path) -> None:
    path, ref = make_tiny_deepseek(case, tmp_path / case)
    check_matches_transformers(path, ref, random_prompt(ref.config.vocab_size), case, TOL)


def test_config_reads_what_transformers_built(tmp_path: Path) -> None:
    path, ref = make_tiny_deepseek("v3_yarn_half_split", tmp_path / "m")
    ckpt = Checkpoint.open(path)
    cfg = ckpt.config
    assert ckpt.family is deepseek and cfg.version == 3 and not cfg.rope_interleave
    assert cfg.moe_layers == (False, True, True, True)
    assert cfg.softmax_scale == pytest.approx(ref.model.layers[0].self_attn.scaling, rel=1e-12)
    inv, attn = cfg.rope.inv_freq()
    assert attn == pytest.approx(ref.model.rotary_emb.attention_scaling, rel=1e-12)
    assert torch.equal(inv, ref.model.rotary_emb.inv_freq)
    # the legacy spelling (rope_scaling with "type" + top-level rope_theta) gives the same model
    hf = json.loads((path / "config.json").read_text())
    params = hf.pop("rope_parameters")
    hf["rope_theta"] = params.pop("rope_theta")
    hf["rope_scaling"] = {**{k: v for k, v in params.items() if k != "rope_type"}, "type": "yarn"}
    assert deepseek.Config.from_hf_config(hf) == cfg


def test_moe_layer_freq_and_dense_prefix() -> None:
    hf = dict(architectures=["DeepseekV2ForCausalLM"], vocab_size=8, hidden_size=8, intermediate_size=8,
              num_hidden_layers=6, num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2,
              first_k_dense_replace=1, moe_layer_freq=2)
    assert deepseek.Config.from_hf_config(hf).moe_layers == (False, False, True, False, True, False)


@pytest.mark.parametrize("bad", [
    dict(topk_method="noaux_tc"),  # a V3 method in a V2 config
    dict(topk_method="group_limited_greedy", n_group=3, topk_group=1),  # 8 experts do not split into 3 groups
    dict(topk_method="group_limited_greedy", n_group=4, topk_group=5),
    dict(num_experts_per_tok=9),
    dict(hidden_act="gelu"),
    dict(mlp_bias=True),
    dict(qk_rope_head_dim=7),
])
def test_invalid_configs_are_rejected(bad: dict[str, Any]) -> None:
    hf = {**dict(model_type="deepseek_v2", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                 num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2), **bad}
    assert family_for(hf) is deepseek
    with pytest.raises(ConfigError):
        deepseek.Config.from_hf_config(hf)


# ---------------------------------------------------------------------------------------------------- checkpoints


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle is not iterable)


def _quantize_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 style block FP8: w [O, I] -> (float8_e4m3fn [O, I], scale_inv fp32 [ceil(O/bo), ceil(I/bi)])."""
    bo, bi = block
    o, i = w.shape
    no, ni = math.ceil(o / bo), math.ceil(i / bi)
    padded = torch.zeros(no * bo, ni * bi, dtype=torch.float32)
    padded[:o, :i] = w
    blocks = padded.view(no, bo, ni, bi)  # [nO, bo, nI, bi]
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX  # [nO, nI]
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)  # [nO, bo, nI, bi]
    return q.view(no * bo, ni * bi)[:o, :i].contiguous(), scale


def _dequant(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)  # [nO*bo, nI*bi]
    return q.to(torch.float32) * full[: q.shape[0], : q.shape[1]]


def write_fp8(path: Path, directory: Path) -> Path:
    """The float checkpoint at ``path`` rewritten into ``directory`` with every 2-D projection in block FP8."""
    config = json.loads((path / "config.json").read_text())
    tensors = {}
    for name, t in _read_all(path).items():
        if t.dim() == 2 and name.endswith("_proj.weight"):
            tensors[name], tensors[name + "_scale_inv"] = _quantize_fp8(t, FP8_BLOCK)
        else:
            tensors[name] = t
    qcfg = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=list(FP8_BLOCK))
    return _write(directory, tensors, {**config, "quantization_config": qcfg})


def _write(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_fp8_block_checkpoint_matches_dequantized_reference(tmp_path: Path) -> None:
    """Every projection weight (attention, dense MLP, shared and routed experts) stored as FP8 in [16, 16] blocks
    loads to the logits of transformers run on the dequantized weights."""
    from transformers import AutoModelForCausalLM

    path, _ = make_tiny_deepseek("v3_noaux_tc", tmp_path / "float")
    config = json.loads((path / "config.json").read_text())
    quantized, dequantized = {}, {}
    n_fp8 = 0
    for name, t in _read_all(path).items():
        if t.dim() == 2 and name.endswith("_proj.weight"):
            q, s = _quantize_fp8(t, FP8_BLOCK)
            quantized[name], quantized[name + "_scale_inv"] = q, s
            dequantized[name] = _dequant(q, s, FP8_BLOCK)
            n_fp8 += 1
        else:
            quantized[name] = dequantized[name] = t
    assert n_fp8 > 50 and any(".mlp.experts." in k and k.endswith("_scale_inv") for k in quantized)
    qcfg = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=list(FP8_BLOCK))
    fp8_dir = _write(tmp_path / "fp8", quantized, {**config, "quantization_config": qcfg})
    ref_dir = _write(tmp_path / "dequantized", dequantized, config)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    prompt = random_prompt(ref.config.vocab_size)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([prompt])).logits[0].float()
    logits, _ = _ours(fp8_dir, prompt)
    diff = _max_diff(logits, ref_logits)
    float_logits, _ = _ours(path, prompt)
    q_err = _max_diff(float_logits, logits)
    print(f"fp8: max |logits - transformers(dequantized)| = {diff:.3g} (quantization moved logits by {q_err:.3g})")
    assert diff <= TOL
    assert q_err > 0  # the FP8 weights really differ from the float ones


def test_mtp_layer_and_fused_layout(tmp_path: Path) -> None:
    """A V3 checkpoint with its MTP layer (model.layers.{num_hidden_layers}.*) loads without reading it, and the
    transformers-v5 fused expert layout gives the same logits as per-expert names."""
    path, ref = make_tiny_deepseek("v3_noaux_tc", tmp_path / "base")
    config = json.loads((path / "config.json").read_text())
    n = config["num_hidden_layers"]
    tensors = _read_all(path)
    mtp = {k.replace(f"model.layers.{n - 1}.", f"model.layers.{n}."): v.clone() for k, v in tensors.items()
           if k.startswith(f"model.layers.{n - 1}.")}
    d = config["hidden_size"]
    mtp.update({f"model.layers.{n}.eh_proj.weight": torch.zeros(d, 2 * d),
                f"model.layers.{n}.enorm.weight": torch.ones(d), f"model.layers.{n}.hnorm.weight": torch.ones(d),
                f"model.layers.{n}.shared_head.head.weight": torch.zeros(config["vocab_size"], d)})
    mtp_dir = _write(tmp_path / "mtp", {**tensors, **mtp}, config)
    fused_dir = _write(tmp_path / "fused", {k: v.contiguous() for k, v in ref.state_dict().items()}, config)
    assert any(k.endswith("experts.gate_up_proj") for k in _read_all(fused_dir))
    prompt = random_prompt(config["vocab_size"])
    base, _ = _ours(path, prompt)
    ckpt, model, experts = load_all(mtp_dir)
    assert all(f"layers.{n}." not in name for name in ckpt.reader.read_log)
    assert all(layer < n for layer, _ in ckpt.expert_addresses())
    with_mtp = Generator(model, experts).logits(prompt)
    fused, _ = _ours(fused_dir, prompt)
    assert torch.equal(base, with_mtp)
    assert torch.equal(base, fused)


def test_static_cache_matches_dynamic(tmp_path: Path) -> None:
    """MLA over the fixed-capacity cache used by CUDA-graph decoding: same logits as the growing cache."""
    path, ref = make_tiny_deepseek("v2_group_limited_no_q_lora", tmp_path / "m")
    _, model, experts = load_all(path)
    prompt = random_prompt(ref.config.vocab_size)
    outs = []
    with torch.no_grad():
        for cache in (model.new_cache(), model.new_cache(max_len=32)):
            logits = [model(torch.tensor([prompt]), cache, experts)[0]]  # [T, V]
            for _ in range(6):
                nxt = torch.argmax(logits[-1][-1]).reshape(1, 1)  # [B=1, T=1]
                logits.append(model(nxt, cache, experts)[0])  # [1, V]
            outs.append(torch.cat(logits))  # [T+6, V]
    diff = _max_diff(*outs)
    print(f"static vs dynamic cache: max diff {diff:.3g}")
    assert diff <= 1e-5


def test_correction_bias_stays_fp32_in_a_bf16_model(tmp_path: Path) -> None:
    path, ref = make_tiny_deepseek("v3_noaux_tc", tmp_path / "m")
    _, model, _ = load_all(path, dtype=torch.bfloat16)
    gate = model.model.layers[1].mlp.gate
    assert gate.e_score_correction_bias.dtype == torch.float32
    assert gate.weight.dtype == torch.bfloat16
    assert torch.equal(gate.e_score_correction_bias, ref.model.layers[1].mlp.gate.e_score_correction_bias)


ROUTES = {  # (version, method, n_group, topk_group, top_k, normalize, scaling)
    "v2-greedy": (2, "greedy", 1, 1, 6, False, 1.0),
    "v2-group-limited": (2, "group_limited_greedy", 4, 2, 4, False, 16.0),
    "v3-noaux": (3, "noaux_tc", 8, 4, 8, True, 2.5),
    "v3-noaux-unnormalised": (3, "noaux_tc", 4, 1, 2, False, 1.0),
}


def routing_gap(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Two routings (weights [T, k], expert ids [T, k], top-k unsorted) of the same logits: asserts that each token
    chose the same experts in both, and returns the largest difference of an expert's weight between them."""
    (w, ids), (w_b, ids_b) = a, b
    order, order_b = ids.sort(dim=-1), ids_b.sort(dim=-1)  # compared as sets, the weights alongside
    assert torch.equal(order.values, order_b.values), (ids, ids_b)
    return (w.gather(1, order.indices) - w_b.gather(1, order_b.indices)).abs().max().item()


@pytest.mark.parametrize("case", sorted(ROUTES))
def test_compiled_router_equals_the_plain_one(case: str) -> None:
    """``deepseek.route`` is ``@fusable``: in the captured decode step it runs through ``torch.compile`` (one fullgraph
    region: scores, group limits, top-k, renormalisation), once checked against the plain body ``_route``. Compiled
    here by inductor's C++ backend, it picks the same experts with the same weights as the plain body, which the
    transformers comparisons above pin down."""
    version, method, n_group, topk_group, top_k, normalize, scaling = ROUTES[case]
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 32, generator=g)  # [T, E]: a decode step with two drafts
    bias = 0.1 * torch.randn(32, generator=g) if version == 3 else None
    args = (logits, bias, version, method, n_group, topk_group, top_k, normalize, scaling)
    w_c, ids_c = torch.compile(deepseek._route, fullgraph=True, dynamic=False)(*args)
    diff = routing_gap(deepseek.route(*args), (w_c, ids_c))
    print(f"{case}: max |compiled - plain| weight = {diff:.3g}")
    assert diff <= 1e-6 * scaling
    groups = ids_c // (32 // n_group)  # [T, k]: each chosen expert's group; the limit holds in every row
    assert all(len(set(row)) <= topk_group for row in groups.tolist()), groups
