"""``import --quantize``: a stored model's experts quantized into a derived model, on real stores and checkpoints.

The parent is a tiny random Qwen3-MoE imported from a ``save_pretrained`` directory (and, through the CLI, the
built-in model from the package's read-only store). Checked: the derived manifest (format, provenance, shared dense
blobs, quantized sizes), that loading keeps experts quantized and equal to quantizing the parent's experts, that the
same parent gives the same model id, that an interrupted import resumes, and the refusals.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ekmesh.core.errors import ConfigError, ManifestError
from ekmesh.infer.expert import quantize_expert
from ekmesh.infer.qtensor import QuantizedTensor
from ekmesh.registry.imports import import_full
from ekmesh.registry.lookup import open_checkpoint
from ekmesh.registry.quantize import import_quantized
from ekmesh.shard.manifest import Manifest
from ekmesh.shard.store import Store
from tests.tiny_models import make_tiny

REPO = Path(__file__).resolve().parents[2]
QUANT_DIMS = dict(hidden_size=64, moe_intermediate_size=32)  # q4 groups (32..256) must divide the input dims


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("quant")
    make_tiny("qwen3_moe", root / "ckpt", **QUANT_DIMS)
    store = Store(root / "store")
    return root, import_full(str(root / "ckpt"), alias="tiny", store=store).model_id


@pytest.mark.parametrize("fmt,ratio", [("q8", 0.30), ("q4", 0.20)])
def test_derived_model_shares_the_dense_part_and_stores_experts_quantized(parent, fmt, ratio) -> None:
    root, parent_id = parent
    store = Store(root / "store")
    res = import_quantized("tiny", fmt, store=store)
    assert (res.alias, res.format, res.experts_present, res.experts_total) == (f"tiny-{fmt}", fmt, 16, 16)
    m, p = store.load_manifest(res.model_id), store.load_manifest(parent_id)
    assert m.experts_format == {"format": fmt, "group_size": None, "derived_from": parent_id}
    assert m.dense_ids() == p.dense_ids() and m.file_ids() == p.file_ids() and m.data["config"] == p.data["config"]
    assert all(m.is_derived(b) for b in m.expert_ids().values())
    # fp32 parent: q8 is ~1/4 of its expert bytes (+ a scale per row), q4 ~1/8 (+ scale and zero per group);
    # at these tiny sizes the safetensors headers (a few hundred bytes per blob) add a few percent
    got = m.data["sizes"]["experts"] / p.data["sizes"]["experts"]
    print(f"{fmt}: expert bytes {m.data['sizes']['experts']} / fp32 {p.data['sizes']['experts']} = {got:.3f}")
    assert got < ratio
    # loading keeps the experts quantized, exactly as quantizing the parent's experts gives them
    ck, pk = open_checkpoint(res.model_id, store), open_checkpoint(parent_id, store)
    for layer, e in ck.expert_addresses()[:3]:
        w, ref = ck.read_expert(layer, e), quantize_expert(pk.read_expert(layer, e), fmt)
        for got_t, want_t in ((w.gate_up, ref.gate_up), (w.down, ref.down)):
            assert isinstance(got_t, QuantizedTensor) and got_t.fmt == fmt
            assert torch.equal(got_t.dequantize(), want_t.dequantize())


def test_same_parent_same_model_id_and_resume(parent, tmp_path) -> None:
    root, parent_id = parent
    first = import_quantized(parent_id, "q4", store=Store(root / "store"))

    class StopError(Exception):
        pass

    class StopAfter:
        def __init__(self, n: int) -> None:
            self.n = n

        def start(self, total_bytes: int, blobs: int) -> None:
            pass

        def advance(self, nbytes: int) -> None:
            self.n -= 1
            if self.n == 0:
                raise StopError

    other = Store(tmp_path / "other")
    import_full(str(root / "ckpt"), alias="tiny", store=other)
    with pytest.raises(StopError):
        import_quantized("tiny", "q4", store=other, progress=StopAfter(5))
    again = import_quantized("tiny", "q4", store=other)
    assert (again.stored, again.skipped) == (11, 5)  # the five stored before the interruption were kept
    assert again.model_id == first.model_id  # deterministic: the same parent gives the same model everywhere


def test_refusals(parent) -> None:
    root, _ = parent
    store = Store(root / "store")
    with pytest.raises(ConfigError, match="the formats are q8, q4"):
        import_quantized("tiny", "q3", store=store)
    with pytest.raises(ConfigError, match=r"--group-size 48: q4 takes one of \(32, 64, 128, 256\)"):
        import_quantized("tiny", "q4", 48, store=store)
    down_64 = r"experts\.0\.0 of model .*: down: q4 group size 64 is not one of .* dividing I = 32"
    with pytest.raises(ConfigError, match=down_64):
        import_quantized("tiny", "q4", 64, store=store)  # down's input dimension is 32
    q8 = import_quantized("tiny", "q8", store=store)
    with pytest.raises(ConfigError, match="already quantized"):
        import_quantized(q8.alias, "q4", store=store)
    # a derived blob whose format disagrees with its manifest's is refused by the manifest's own check
    data = json.loads(store.load_manifest(q8.model_id).bytes())
    bid = data["experts"][0][0]
    data["blobs"][bid]["derived"]["format"] = "q4"
    with pytest.raises(ManifestError, match=r"experts\[0\]\[0\]' names a blob derived for expert \[0, 0\] in q4"):
        Manifest.build(data)


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EKMESH_HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ekmesh.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_quantizes_the_builtin_model_offline(tmp_path) -> None:
    home = tmp_path / "home"
    r = _cli(home, "import", "builtin", "--quantize", "q4", "--alias", "builtin-q4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["alias"] == "builtin-q4" and out["format"] == "q4" and out["model_id"].startswith("blake3:")
    rows = json.loads(_cli(home, "models", "--json").stdout)
    row = next(x for x in rows if "builtin-q4" in x["aliases"])
    assert row["format"] == "q4" and row["experts_present"] == row["experts_total"] == 96
    gen = _cli(home, "generate", "builtin-q4", "--prompt", "Genesis 1", "--chat", "--max-tokens", "12", "--json")
    assert gen.returncode == 0, gen.stderr
    assert len(json.loads(gen.stdout)["token_ids"]) == 12
    bad = _cli(home, "import", "builtin", "--quantize", "q4", "--group-size", "256")
    assert bad.returncode == 1 and "ekmesh: error: experts.0.0 of model blake3:" in bad.stderr
    assert "gate_up: q4 group size 256 is not one of" in bad.stderr
    assert "dividing I = 384" in bad.stderr, bad.stderr


def test_the_parent_can_go_and_its_unquantized_experts_with_it(tmp_path) -> None:
    """``models rm PARENT`` + ``gc`` frees the parent's float experts; the quantized model keeps what it shares."""
    from ekmesh.infer.generate import SamplingParams
    from ekmesh.infer.session import LocalModel

    make_tiny("qwen3_moe", tmp_path / "ckpt", **QUANT_DIMS)
    store = Store(tmp_path / "store")
    parent = import_full(str(tmp_path / "ckpt"), alias="tiny", store=store).model_id
    q4 = import_quantized("tiny", "q4", store=store).model_id
    before = LocalModel.open(open_checkpoint(q4, store), "cpu", "fp32").generator.generate(
        [1, 2, 3], SamplingParams(max_tokens=8, stop_ids=frozenset())).token_ids
    p_experts = set(store.load_manifest(parent).expert_ids().values())
    store.remove_model(parent)
    freed = store.gc()
    assert freed.blobs == len(p_experts) and not any(store.has(b) for b in p_experts)
    after = LocalModel.open(open_checkpoint(q4, store), "cpu", "fp32").generator.generate(
        [1, 2, 3], SamplingParams(max_tokens=8, stop_ids=frozenset())).token_ids
    assert after == before


def test_from_source_in_one_pass_equals_quantizing_the_stored_model(parent, tmp_path) -> None:
    """A directory quantized in one pass gives the very model quantizing its full import gives, and the store
    never holds the unquantized experts."""
    from ekmesh.registry.quantize import import_quantized_from_source

    root, parent_id = parent
    two_steps = import_quantized(parent_id, "q4", store=Store(root / "store"))
    fresh = Store(tmp_path / "fresh")
    one_pass = import_quantized_from_source(str(root / "ckpt"), "q4", alias="tiny-q4", store=fresh)
    assert one_pass.model_id == two_steps.model_id and one_pass.alias == "tiny-q4"
    assert (one_pass.experts_present, one_pass.experts_total, one_pass.format) == (16, 16, "q4")
    p = fresh.load_manifest(parent_id)  # the parent's manifest is there, its float experts are not
    assert not any(fresh.has(b) for b in p.expert_ids().values())
    assert all(fresh.has(b) for b in [*p.dense_ids().values(), *p.file_ids().values()])
    again = import_quantized_from_source(str(root / "ckpt"), "q4", store=fresh)  # nothing quantized twice
    assert (again.model_id, again.stored, again.skipped) == (one_pass.model_id, 0, 16)


def test_from_source_reads_the_checkpoints_own_fp8(tmp_path) -> None:
    """DeepSeek's block-FP8 experts (read as stored, fp8) are quantized from their exact values: one pass and two
    steps agree."""
    from ekmesh.registry.quantize import import_quantized_from_source
    from tests.infer.test_deepseek import make_tiny_deepseek, write_fp8

    path, _ = make_tiny_deepseek("v3_noaux_tc", tmp_path / "float")
    fp8 = write_fp8(path, tmp_path / "fp8")
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    two_steps = import_quantized(import_full(str(fp8), store=a).model_id, "q8", store=a)
    one_pass = import_quantized_from_source(str(fp8), "q8", store=b)
    assert one_pass.model_id == two_steps.model_id
    m = b.load_manifest(one_pass.model_id)
    assert m.experts_format is not None and m.experts_format["format"] == "q8" and m.dense_ids()


def test_from_a_hub_id_in_one_pass(parent, tmp_path, monkeypatch) -> None:
    """``import --quantize`` of a hub id (a stand-in hub on 127.0.0.1 with range requests, via HF_ENDPOINT): one
    pass gives the very quantized expert blobs the directory gives; only the manifests' sources differ."""
    from ekmesh.registry.quantize import import_quantized_from_source
    from tests.shard.hubstub import HubStub

    root, _ = parent
    local = import_quantized_from_source(str(root / "ckpt"), "q4", store=Store(tmp_path / "dir"))
    with HubStub({"bench/tiny-moe": root / "ckpt"}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        store = Store(tmp_path / "hub")
        via_hub = import_quantized_from_source("bench/tiny-moe", "q4", store=store)
    m_hub, m_dir = store.load_manifest(via_hub.model_id), Store(tmp_path / "dir").load_manifest(local.model_id)
    assert m_hub.expert_ids() == m_dir.expert_ids() and len(m_hub.expert_ids()) == 16
    assert via_hub.model_id != local.model_id  # the provenance (hub repo and revision vs directory) differs
    assert m_hub.experts_format is not None and m_hub.experts_format["format"] == "q4"
    parent_hub = store.load_manifest(m_hub.experts_format["derived_from"])
    assert parent_hub.data["source"]["kind"] == "hub"
    assert not any(store.has(b) for b in parent_hub.expert_ids().values())
