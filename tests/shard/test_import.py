"""Import into the store and load from it: same logits as the directory for plain, 2-shard, FP8 (DeepSeek-V3),
fused v5 and gpt-oss MXFP4 checkpoints; dense loading opens only dense blobs and an expert only its blob; a
flipped byte in any blob (dense, expert, tokenizer) fails loading with the blob's id and quarantines it; partial
imports take exactly the chosen experts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from ekmesh.core.errors import BlobHashMismatchError, ConfigError, NodeNotRunningError, ShardMissingError
from ekmesh.infer.experts import LocalExperts
from ekmesh.infer.generate import Generator, SamplingParams
from ekmesh.infer.loader import load_all, load_dense, load_experts
from ekmesh.infer.session import LocalModel
from ekmesh.registry.imports import import_full, import_partial
from ekmesh.registry.lookup import open_checkpoint
from ekmesh.shard.importer import parse_experts
from ekmesh.shard.store import Store
from tests.infer.test_deepseek import _write, make_tiny_deepseek, write_fp8
from tests.infer.test_gpt_oss import TINY as GPT_OSS_TINY
from tests.infer.test_gpt_oss import quantize_mxfp4
from tests.shard.checkpoints import make_sharded

PROMPT = [3, 14, 15, 9, 26, 5, 35]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sharded(tmp_path_factory.mktemp("ck"))[0]


def _same_logits(directory: Path, ref: str) -> None:
    a = Generator(*load_all(directory)[1:]).logits(PROMPT)
    b = Generator(*load_all(open_checkpoint(ref))[1:]).logits(PROMPT)
    assert torch.equal(a, b), f"max diff {(a - b).abs().max().item()}"


def test_sharded_import_generates_exactly_as_the_directory(sharded: Path) -> None:
    res = import_full(str(sharded))
    assert res.alias == sharded.name and res.experts_present == res.experts_total == 16
    assert res.stored == res.blobs - 4  # 4 file blobs: config, generation_config, tokenizer, tokenizer_config
    params = SamplingParams(max_tokens=12, stop_ids=frozenset())
    want = LocalModel.open(sharded, device="cpu", dtype="fp32").generator.generate(PROMPT, params).token_ids
    lm = LocalModel.open(open_checkpoint(res.alias), device="cpu", dtype="fp32")
    assert lm.tokenizer is not None and lm.encode_prompt("w1 w2") == [3, 4]
    assert lm.generator.generate(PROMPT, params).token_ids == want
    _same_logits(sharded, res.model_id)
    again = import_full(str(sharded))
    assert again.model_id == res.model_id and again.stored == 0 and again.skipped == res.stored


def test_dense_opens_only_dense_blobs_and_an_expert_only_its_blob(sharded: Path) -> None:
    res = import_full(str(sharded))
    m = Store().load_manifest(res.model_id)
    ckpt = open_checkpoint(res.model_id)
    load_dense(ckpt)
    assert set(ckpt.reader.source.opened) == set(m.dense_ids().values())
    assert set(m.dense_ids()) == {"embed", "layer.0", "layer.1", "layer.2", "head"}
    assert m.data["experts"][1] is None and len(m.data["experts"][0]) == 8
    ckpt = open_checkpoint(res.model_id)
    load_experts(ckpt, LocalExperts(ckpt.config.expert_spec(), "cpu", torch.float32), [(2, 5)])
    assert ckpt.reader.source.opened == [m.data["experts"][2][5]]
    # release() unmaps what was opened (a whole-model pass keeps one blob mapped at a time); reads reopen
    ckpt.reader.source.release()
    load_experts(ckpt, LocalExperts(ckpt.config.expert_spec(), "cpu", torch.float32), [(2, 5), (2, 6)])
    assert ckpt.reader.source.opened == [m.data["experts"][2][5]] * 2 + [m.data["experts"][2][6]]


@pytest.mark.parametrize("kind", ["dense", "expert", "tokenizer", "truncated"])
def test_damaged_blob_fails_loading_with_its_id(sharded: Path, kind: str) -> None:
    res = import_full(str(sharded))
    store = Store()
    m = store.load_manifest(res.model_id)
    bid = {"dense": m.dense_ids()["layer.0"], "expert": m.data["experts"][0][3],
           "tokenizer": m.file_ids()["tokenizer.json"], "truncated": m.dense_ids()["head"]}[kind]
    path = store.blob_path(bid)
    data = bytearray(path.read_bytes())
    if kind == "truncated":
        data = data[:-4]
    else:
        data[-1] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(BlobHashMismatchError) as ei:
        load_all(open_checkpoint(res.model_id))
    assert ei.value.blob_id == bid and bid in str(ei.value)
    assert not path.exists() and any(p.name.startswith(bid[7:]) for p in (store.root / "quarantine").iterdir())
    again = import_full(str(sharded))  # a re-import repairs the store
    assert again.stored == (0 if kind == "tokenizer" else 1)
    _same_logits(sharded, res.model_id)


def test_fp8_and_fused_deepseek_import_to_the_same_logits(tmp_path: Path) -> None:
    path, ref = make_tiny_deepseek("v3_noaux_tc", tmp_path / "float")
    config = json.loads((path / "config.json").read_text())
    fp8 = write_fp8(path, tmp_path / "fp8")
    res = import_full(str(fp8))
    m = Store().load_manifest(res.model_id)
    expert_blob = Store().blob_path(m.data["experts"][1][0])
    from safetensors import safe_open
    with safe_open(str(expert_blob), framework="pt") as f:  # stays FP8 in the store
        assert f.get_slice("model.layers.1.mlp.experts.0.gate_proj.weight").get_dtype() == "F8_E4M3"
    _same_logits(fp8, res.model_id)
    fused = _write(tmp_path / "fused", {k: v.contiguous() for k, v in ref.state_dict().items()}, config)
    res = import_full(str(fused))
    keys = Store().load_manifest(res.model_id).data["blobs"][Store().load_manifest(res.model_id).data["experts"][2][7]]
    assert keys["keys"] == ["model.layers.2.mlp.experts.down_proj[7]", "model.layers.2.mlp.experts.gate_up_proj[7]"]
    _same_logits(fused, res.model_id)


def test_gpt_oss_mxfp4_imports_to_the_same_logits(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    ref: Any = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt_oss", **GPT_OSS_TINY),
                                                dtype=torch.float32).eval()
    out = {}
    for name, t in ref.state_dict().items():
        t = t.detach().contiguous()
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales, _ = quantize_mxfp4(t.transpose(1, 2))
            out[f"{name}_blocks"], out[f"{name}_scales"] = blocks, scales
        else:
            out[name] = t.to(torch.bfloat16) if ".experts." in name else t
    qpath = tmp_path / "mxfp4"
    qpath.mkdir()
    save_file(out, str(qpath / "model.safetensors"))
    hf = ref.config.to_dict() | {"quantization_config": {"quant_method": "mxfp4"}}
    (qpath / "config.json").write_text(json.dumps(hf))
    res = import_full(str(qpath))
    m = Store().load_manifest(res.model_id)
    assert sorted(m.data["blobs"][m.data["experts"][0][2]]["keys"]) == sorted(
        f"model.layers.0.mlp.experts.{n}[2]" for n in
        ("gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias", "down_proj_blocks", "down_proj_scales",
         "down_proj_bias"))
    _same_logits(qpath, res.model_id)


def test_partial_import_from_a_directory_manifest(sharded: Path, tmp_path: Path, monkeypatch) -> None:
    res = import_full(str(sharded))
    src = Store()
    m = src.load_manifest(res.model_id)
    monkeypatch.setenv("EKMESH_HOME", str(tmp_path / "peer"))
    peer = Store()
    (peer.root / "manifests" / f"{res.model_id[7:]}.json").write_bytes(m.bytes())
    part = import_partial(str(sharded), "0:1,2:6")
    assert (part.experts_present, part.experts_total) == (2, 16)
    assert peer.has(m.data["experts"][0][1]) and not peer.has(m.data["experts"][0][2])
    ckpt = open_checkpoint(sharded.name)
    experts = LocalExperts(ckpt.config.expert_spec(), "cpu", torch.float32)
    load_dense(ckpt)
    load_experts(ckpt, experts, [(0, 1), (2, 6)])
    with pytest.raises(ShardMissingError, match=m.data["experts"][0][2]):
        load_experts(ckpt, experts, [(0, 2)])
    assert import_partial(res.model_id, "0:1").stored == 0
    with pytest.raises(NodeNotRunningError, match="no ekmesh node is running"):
        import_partial(res.model_id, "assigned")  # 'assigned' asks the running node for the live mesh
    with pytest.raises(ConfigError, match="needs the running mesh node"):
        parse_experts("assigned", m)
    quarter = parse_experts("0.25", m)
    assert len(quarter) == 4 and quarter == parse_experts("0.25", m)
    for bad in ("1:0", "0:8", "0.0", "1.5", "x"):
        with pytest.raises(ConfigError):
            parse_experts(bad, m)
