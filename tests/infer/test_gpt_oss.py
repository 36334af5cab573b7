"""gpt-oss == transformers: fp32 logits within 1e-4 and 32 identical greedy tokens on a prompt and a generation
longer than the sliding window, for the float checkpoint ``save_pretrained`` writes and for an MXFP4 checkpoint
quantized here by a reference quantizer. Also: the clamped SwiGLU against transformers' ``_apply_gate``,
``read_expert`` against an independent float reference, dense loading that reads no expert, shape errors.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from ekmesh.core.errors import TensorShapeError
from ekmesh.infer.expert import ExpertSpec, expert_activation
from ekmesh.infer.loader import Checkpoint, load_dense
from ekmesh.infer.models import family_for, gpt_oss
from ekmesh.infer.qtensor import QuantizedTensor
from tests.tiny_models import check_matches_transformers, random_prompt

TOL = 1e-4
WINDOW = 4
TINY: dict[str, Any] = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=WINDOW,
    max_position_embeddings=256, initializer_range=0.15, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    tie_word_embeddings=False,
)  # hidden != 2I and I != hidden so a transposed expert tensor cannot pass a shape check
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])



def make_tiny_gpt_oss(directory: Path) -> tuple[Path, Any]:
    """Saves a tiny seeded gpt-oss (fp32) whose every bias and sink matters; returns (dir, model in eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt_oss", **TINY)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        # transformers zero-initialises most biases; make every one matter. A wide gate_up bias drives a few
        # percent of the expert pre-activations past swiglu_limit, so the clamps are exercised.
        for name, p in ref.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0.0, 1.0)
            elif name.endswith("gate_up_proj_bias"):
                p.normal_(0.0, 3.0)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
    ref.save_pretrained(directory)
    return directory, ref


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A float checkpoint from ``save_pretrained`` and its transformers model (fp32, eval)."""
    path, ref = make_tiny_gpt_oss(tmp_path_factory.mktemp("gpt_oss") / "float")
    assert ref.config.layer_types[0] == "sliding_attention" and ref.config.sliding_window == WINDOW
    return path, ref


def _compare(path: Path, ref: Any, label: str) -> None:
    """Prefill logits, 32 greedy tokens, and every decode step's logits against transformers."""
    prompt = random_prompt(ref.config.vocab_size)
    assert len(prompt) > WINDOW
    gen, ref_out = check_matches_transformers(path, ref, prompt, f"gpt_oss {label}", TOL)
    assert len(set(ref_out)) > 8, "degenerate reference generation would not test much"
    model, experts = gen.model, gen.experts

    # Decode one token at a time through our KV cache (keys far outside the window) vs one full HF forward.
    seq = prompt + ref_out[:-1]
    cache = model.new_cache()
    with torch.no_grad():
        steps = [model(torch.tensor([prompt]), cache, experts)[0]]  # [P, V]
        steps += [model(torch.tensor([[tok]]), cache, experts)[0] for tok in ref_out[:-1]]  # [1, V] each
        full = ref(torch.tensor([seq])).logits[0]  # [P+31, V]
    dec = (torch.cat(steps) - full).abs().max().item()
    print(f"gpt_oss {label}: max |decode logits - transformers| = {dec:.3g}")
    assert dec <= TOL, f"{label}: decode max abs diff {dec} > {TOL}"


def test_registry_and_config(tiny: tuple[Path, Any]) -> None:
    path, _ = tiny
    hf = json.loads((path / "config.json").read_text())
    assert family_for(hf) is gpt_oss
    cfg = gpt_oss.Config.from_hf_config(hf)
    assert cfg.windows == (WINDOW, None, WINDOW, None)
    assert cfg.rope.rope_type == "yarn" and cfg.rope.truncate is False and cfg.rope.theta == 150000.0
    assert cfg.expert_spec() == ExpertSpec(64, 96, 8, activation="gptoss", bias=True, alpha=1.702, limit=7.0)
    # The released config.json style: rope_scaling + top-level rope_theta, no swiglu_alpha.
    released = {k: v for k, v in hf.items() if k not in ("rope_parameters", "swiglu_alpha", "layer_types")}
    released |= {"rope_theta": 150000, "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                        "beta_slow": 1.0, "truncate": False,
                                                        "original_max_position_embeddings": 4096}}
    old = gpt_oss.Config.from_hf_config(released)
    assert old.rope == cfg.rope and old.windows == cfg.windows and old.expert_spec() == cfg.expert_spec()


def test_expert_activation_matches_transformers(tiny: tuple[Path, Any]) -> None:
    """experts.py's "gptoss" activation on de-interleaved gate/up == transformers' _apply_gate on interleaved."""
    hf_experts = tiny[1].model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(3)
    inter = torch.randn(64, 2 * 16, generator=g) * 8.0  # [N, 2I] interleaved, well past +-limit
    with torch.no_grad():
        want = hf_experts._apply_gate(inter)  # [N, I]
    got = expert_activation(ExpertSpec(32, 16, 8, activation="gptoss", bias=True),
                            torch.cat([inter[:, 0::2], inter[:, 1::2]], dim=-1))  # [N, I]
    assert torch.equal(got, want)


@pytest.mark.slow
def test_float_checkpoint_matches_transformers(tiny: tuple[Path, Any]) -> None:
    path, ref = tiny
    _compare(path, ref, "float")


# ---------------------------------------------------------------------------------------------------- MXFP4


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference MXFP4 quantizer of ``w [..., C]``: per 32 values the smallest power-of-two scale that fits the
    block's max into e2m1's 6.0, values rounded to the nearest e2m1 value. Returns blocks ``[..., C/32, 16]``
    (low nibble = even element), E8M0 scales ``[..., C/32]`` and the dequantized values ``[..., C]``."""
    x = w.reshape(*w.shape[:-1], -1, 32)  # [..., G, 32]
    exp = torch.ceil(torch.log2(x.abs().amax(-1).clamp_min(2.0 ** -126) / 6.0))  # [..., G]
    y = x / torch.pow(2.0, exp)[..., None]  # [..., G, 32], |y| <= 6
    mag = (y.abs()[..., None] - E2M1).abs().argmin(-1)  # [..., G, 32] code of |y|
    neg = y < 0
    deq = torch.where(neg, -E2M1[mag], E2M1[mag]) * torch.pow(2.0, exp)[..., None]  # [..., G, 32]
    code = (mag + 8 * neg).to(torch.uint8)  # bit 3 = sign
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)  # [..., G, 16]
    return blocks.contiguous(), (exp + 127).to(torch.uint8), deq.reshape(w.shape)


def write_mxfp4(path: Path, ref: Any, qpath: Path) -> dict[str, torch.Tensor]:
    """The tiny model ``ref`` (saved at ``path``) written to ``qpath`` with its experts quantized to MXFP4 under the
    released names; bf16 expert biases. Returns the independent float reference per fused name: dequantized
    weights in transformers' layout (``gate_up_proj [E, D, 2I]``, ``down_proj [E, I, D]``) and the bf16-rounded
    biases."""
    out, want = {}, {}
    for name, t in ref.state_dict().items():
        t = t.detach().contiguous()
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales, deq = quantize_mxfp4(t.transpose(1, 2))  # Linear layout [E, out, in]
            out[f"{name}_blocks"], out[f"{name}_scales"] = blocks, scales
            want[name] = deq.transpose(1, 2)  # back to [E, in, out]
        elif ".experts." in name:
            out[name] = t.to(torch.bfloat16)
            want[name] = out[name].float()
        else:
            out[name] = t
    qpath.mkdir(parents=True)
    save_file(out, str(qpath / "model.safetensors"))
    hf = json.loads((path / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (qpath / "config.json").write_text(json.dumps(hf))
    return want


@pytest.fixture(scope="module")
def mxfp4(tiny: tuple[Path, Any]) -> tuple[Path, dict[str, torch.Tensor]]:
    """The tiny model in MXFP4 (``write_mxfp4``) and its float reference."""
    path, ref = tiny
    qpath = path.parent / "mxfp4"
    return qpath, write_mxfp4(path, ref, qpath)


@pytest.mark.slow
def test_mxfp4_checkpoint_matches_transformers(mxfp4: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """transformers loads the MXFP4 file (dequantize=True) to exactly our reference values; ekmesh matches it."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import Mxfp4Config

    qpath, want = mxfp4
    ref = AutoModelForCausalLM.from_pretrained(qpath, dtype=torch.float32,
                                               quantization_config=Mxfp4Config(dequantize=True)).eval()
    sd = ref.state_dict()
    for name, t in want.items():
        assert torch.equal(sd[name], t), f"transformers reads {name} differently from the reference quantizer"
    _compare(qpath, ref, "mxfp4")


@pytest.mark.parametrize("layout", ["float", "mxfp4"])
def test_read_expert_matches_independent_reference(
        tiny: tuple[Path, Any], mxfp4: tuple[Path, dict[str, torch.Tensor]], layout: str) -> None:
    path, ref = tiny
    if layout == "float":
        want = {k: v.detach() for k, v in ref.state_dict().items() if ".experts." in k}
    else:
        path, want = mxfp4
    ckpt = Checkpoint.open(path)
    layer, expert, inter = 2, 5, TINY["intermediate_size"]
    p = f"model.layers.{layer}.mlp.experts"
    w = gpt_oss.read_expert(ckpt.reader, ckpt.config, layer, expert)
    if layout == "mxfp4":  # kept as stored: MXFP4 in memory, equal to the reference once dequantized
        assert isinstance(w.gate_up, QuantizedTensor) and isinstance(w.down, QuantizedTensor)
        assert (w.gate_up.fmt, w.down.fmt) == ("mxfp4", "mxfp4")
        gate_up, down = w.gate_up.dequantize(), w.down.dequantize()
    else:
        assert isinstance(w.gate_up, torch.Tensor) and isinstance(w.down, torch.Tensor)
        gate_up, down = w.gate_up, w.down
    gu = want[f"{p}.gate_up_proj"][expert]  # [D, 2I], gate/up interleaved on the last axis
    gub = want[f"{p}.gate_up_proj_bias"][expert]  # [2I], interleaved
    assert torch.equal(gate_up[:inter], gu[:, 0::2].t()) and torch.equal(gate_up[inter:], gu[:, 1::2].t())
    assert w.gate_up_bias is not None and w.down_bias is not None
    assert torch.equal(w.gate_up_bias, torch.cat([gub[0::2], gub[1::2]]))
    assert torch.equal(down, want[f"{p}.down_proj"][expert].t())
    assert torch.equal(w.down_bias, want[f"{p}.down_proj_bias"][expert])
    # Only that expert's rows were read.
    assert ckpt.reader.read_log and all(n.endswith(f"[{expert}]") for n in ckpt.reader.read_log), \
        ckpt.reader.read_log


@pytest.mark.parametrize("layout", ["float", "mxfp4"])
def test_dense_load_reads_no_expert(
        tiny: tuple[Path, Any], mxfp4: tuple[Path, dict[str, torch.Tensor]], layout: str) -> None:
    ckpt = Checkpoint.open(tiny[0] if layout == "float" else mxfp4[0])
    load_dense(ckpt)
    assert ckpt.reader.read_log
    assert not [n for n in ckpt.reader.read_log if "experts" in n]


@pytest.mark.parametrize("layout", ["float", "mxfp4"])
def test_wrong_expert_shape_names_the_tensor(
        tiny: tuple[Path, Any], mxfp4: tuple[Path, dict[str, torch.Tensor]], layout: str) -> None:
    ckpt = Checkpoint.open(tiny[0] if layout == "float" else mxfp4[0])
    cfg = dataclasses.replace(ckpt.config, moe_intermediate_size=TINY["intermediate_size"] + 32)
    blocks = "_blocks" if layout == "mxfp4" else ""
    with pytest.raises(TensorShapeError, match=rf"model\.layers\.1\.mlp\.experts\.gate_up_proj{blocks}"):
        gpt_oss.read_expert(ckpt.reader, cfg, 1, 0)
    cfg = dataclasses.replace(ckpt.config, hidden_size=TINY["hidden_size"] + 32)
    with pytest.raises(TensorShapeError, match=r"model\.layers\.1\.mlp\.experts\."):
        gpt_oss.read_expert(ckpt.reader, cfg, 1, 0)
