"""Loader: sharded checkpoints, dense-only loading that never reads experts, expert subsets, and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ekmesh.core.errors import (
    CheckpointError,
    ConfigError,
    ExpertNotLoadedError,
    MissingTensorError,
    TensorShapeError,
    UnsupportedArchitectureError,
)
from ekmesh.infer.expert import expert_forward
from ekmesh.infer.experts import LocalExperts
from ekmesh.infer.generate import Generator
from ekmesh.infer.loader import Checkpoint, load_all, load_dense, load_experts
from tests.tiny_models import make_tiny


def _split_experts_into_own_shard(src, dst):
    """Rewrites a checkpoint as 2 shards + index: dense tensors in one file, every expert tensor in the other."""
    dst.mkdir()
    sd = load_file(str(src / "model.safetensors"))
    dense = {k: v for k, v in sd.items() if ".experts." not in k}
    experts = {k: v for k, v in sd.items() if ".experts." in k}
    save_file(dense, str(dst / "model-00001-of-00002.safetensors"))
    save_file(experts, str(dst / "model-00002-of-00002.safetensors"))
    wm = ({k: "model-00001-of-00002.safetensors" for k in dense}
          | {k: "model-00002-of-00002.safetensors" for k in experts})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    shutil.copy(src / "config.json", dst / "config.json")
    return dense, experts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    path, ref = make_tiny("qwen3_moe", root / "single")
    sharded = root / "sharded"
    _split_experts_into_own_shard(path, sharded)
    return path, sharded, ref


def test_sharded_checkpoint_matches_single_file(tiny):
    single, sharded, _ = tiny
    prompt = [3, 14, 15, 92, 65, 35]
    a = Generator(*load_all(single)[1:]).logits(prompt)
    b = Generator(*load_all(sharded)[1:]).logits(prompt)
    assert torch.equal(a, b)


def test_dense_load_reads_no_expert_tensor(tiny, tmp_path):
    _, sharded, _ = tiny
    ckpt = Checkpoint.open(sharded)
    load_dense(ckpt)
    assert ckpt.reader.read_log, "nothing was read"
    assert [n for n in ckpt.reader.read_log if ".experts." in n] == []
    # stronger: with the expert shard gone from disk, the dense part still loads from the index's other shard
    nodisk = tmp_path / "noexperts"
    shutil.copytree(sharded, nodisk)
    (nodisk / "model-00002-of-00002.safetensors").write_bytes(b"")  # present (index check) but unreadable
    model = load_dense(Checkpoint.open(nodisk))
    assert model.model.embed_tokens.weight.shape == (96, 32)


def test_expert_subset_loads_alone(tiny):
    _, sharded, ref = tiny
    ckpt = Checkpoint.open(sharded)
    want = [(0, 3), (2, 5)]
    backend = LocalExperts(ckpt.config.expert_spec())
    assert load_experts(ckpt, backend, want) == 2
    assert backend.held() == {0: [3], 2: [5]}
    assert sorted(ckpt.reader.read_log) == sorted(
        f"model.layers.{layer}.mlp.experts.{e}.{p}.weight"
        for layer, e in want for p in ("gate_proj", "up_proj", "down_proj"))
    # the loaded expert computes what the reference expert computes
    x = torch.randn(5, 32)
    ref_e = ref.model.layers[2].mlp.experts
    gate, up = torch.nn.functional.linear(x, ref_e.gate_up_proj[5]).chunk(2, dim=-1)
    expect = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, ref_e.down_proj[5])
    got = backend(2, x, torch.full((5, 1), 5), torch.ones(5, 1))
    assert torch.allclose(got, expect, atol=1e-6)
    with pytest.raises(ExpertNotLoadedError, match=r"layer=2, expert=4"):
        backend(2, x, torch.full((5, 1), 4), torch.ones(5, 1))
    with pytest.raises(ConfigError, match="not a routed expert"):
        load_experts(ckpt, backend, [(1, 0)])  # layer 1 is dense (mlp_only_layers)


def test_grouped_compute_equals_per_expert_reference(tiny):
    ckpt = Checkpoint.open(tiny[0])
    backend = LocalExperts(ckpt.config.expert_spec())
    load_experts(ckpt, backend)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 32, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(7)])  # [7, 2]
    w = torch.rand(7, 2, generator=g)
    got = backend(0, x, ids, w)
    expect = torch.zeros_like(x)
    for t in range(7):
        for j in range(2):
            ew = ckpt.family.read_expert(ckpt.reader, ckpt.config, 0, int(ids[t, j]))
            expect[t] += w[t, j] * expert_forward(ckpt.config.expert_spec(), x[t:t + 1], ew)[0]
    assert (got - expect).abs().max() < 1e-6


def _edit(src, dst, fn):
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    fn(sd)
    save_file(sd, str(dst / "model.safetensors"))
    return dst


def test_missing_dense_tensor_is_named(tiny, tmp_path):
    bad = _edit(tiny[0], tmp_path / "bad", lambda sd: sd.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(MissingTensorError, match=r"'model\.layers\.1\.self_attn\.k_norm\.weight' is missing"):
        load_dense(Checkpoint.open(bad))


def test_missing_expert_tensor_is_named(tiny, tmp_path):
    bad = _edit(tiny[0], tmp_path / "bad", lambda sd: sd.pop("model.layers.2.mlp.experts.6.gate_proj.weight"))
    ckpt = Checkpoint.open(bad)
    load_dense(ckpt)  # the dense part does not need it
    with pytest.raises(MissingTensorError, match=r"model\.layers\.2\.mlp\.experts\.6\.gate_proj\.weight"):
        load_experts(ckpt, LocalExperts(ckpt.config.expert_spec()), [(2, 6)])


def test_wrong_shape_is_named(tiny, tmp_path):
    def shrink(sd):
        sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 32)
        sd["model.layers.0.mlp.experts.1.down_proj.weight"] = torch.zeros(32, 15)

    bad = _edit(tiny[0], tmp_path / "bad", shrink)
    with pytest.raises(TensorShapeError, match=r"'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \(16, 32\), "
                                               r"expected \(32, 32\)"):
        load_dense(Checkpoint.open(bad))
    ckpt = Checkpoint.open(bad)
    with pytest.raises(TensorShapeError, match=r"experts\.1\.down.* has shape \(32, 15\), expected \(32, 16\)"):
        load_experts(ckpt, LocalExperts(ckpt.config.expert_spec()), [(0, 1)])


def test_unsupported_architecture_lists_supported(tiny, tmp_path):
    bad = tmp_path / "llama"
    shutil.copytree(tiny[0], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["LlamaForCausalLM"], "llama"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError) as ei:
        Checkpoint.open(bad)
    msg = str(ei.value)
    assert "LlamaForCausalLM" in msg
    for arch in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM", "OlmoeForCausalLM"):
        assert arch in msg


def test_bad_files_give_checkpoint_errors(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        Checkpoint.open(tmp_path / "nope")
    d = tmp_path / "d"
    shutil.copytree(tiny[0], d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        Checkpoint.open(d)
    shutil.copy(tiny[0] / "config.json", d / "config.json")
    (d / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="cannot read safetensors file"):
        Checkpoint.open(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no safetensors files"):
        Checkpoint.open(d)
    cfg = json.loads((tiny[0] / "config.json").read_text())
    del cfg["num_experts_per_tok"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="lacks required field.*num_experts_per_tok"):
        Checkpoint.open(d)
