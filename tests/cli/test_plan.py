"""``ekmesh plan`` as real subprocesses: a tiny checkpoint whose bytes are counted by hand from its config, the
published configs of four real models against independently computed parameter counts and sizes (and the README's
"Will it fit?" table against the command's own numbers), a model from the store, bad names, and the live part
against a real ``ekmesh join`` process. Never online: ``HF_HUB_OFFLINE`` is set for every run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ekmesh.core.constants import STATUS_PATH
from ekmesh.discovery.control import get_json
from ekmesh.registry.plan import LivePeer, ModelConfigSource, mesh_fit, peers_needed, plan_model
from tests.discovery.meshproc import FAST, NodeProc, wait_until
from tests.tiny_models import make_tiny

DATA = Path(__file__).parent / "data" / "plan"
README = Path(__file__).resolve().parents[2] / "README.md"
MODELS = ("Qwen3-30B-A3B", "gpt-oss-120b", "Qwen3-235B-A22B", "DeepSeek-V3")
GIB = 1 << 30


def run_cli(home: Path, *args: str, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EKMESH_HOME": str(home), "HF_HUB_OFFLINE": "1", **(env or {})}
    env.pop("HF_ENDPOINT", None)
    return subprocess.run([sys.executable, "-m", "ekmesh.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def plan_json(home: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    r = run_cli(home, "plan", *args, "--json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # vocab 96, D 32, 3 layers (layer 1 a dense MLP of 48), 4 heads of 8, 2 KV heads, 8 experts of I 16, fp32
    return make_tiny("qwen3_moe", tmp_path_factory.mktemp("plan") / "tiny")[0]


# The tiny model, counted by hand from tests/tiny_models.py's config.
V, D, HEADS, KV, HD, I_DENSE, I_MOE, E = 96, 32, 4, 2, 8, 48, 16, 8
ATTN = D * HEADS * HD + 2 * D * KV * HD + HEADS * HD * D + 2 * HD  # q, k, v, o, q_norm and k_norm
LAYER = ATTN + 2 * D  # plus the two layer norms
TINY_DENSE = 2 * V * D + D + 3 * LAYER + 2 * E * D + 3 * D * I_DENSE  # embed, head, norm, layers, routers, MLP
TINY_EXPERTS = 2 * E  # 2 MoE layers x 8
TINY_BF16 = TINY_EXPERTS * 2 * (2 * I_MOE * D + D * I_MOE)
TINY_Q8 = TINY_EXPERTS * ((2 * I_MOE * D + 4 * 2 * I_MOE) + (D * I_MOE + 4 * D))
# gate_up's input D=32 takes q4 groups of 32; down's input I=16 takes none of 128/64/32, so down stays q8
TINY_Q4 = TINY_EXPERTS * ((2 * I_MOE * D // 2 + 4 * 2 * I_MOE * D // 32) + (D * I_MOE + 4 * D))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_tiny_model_bytes_match_a_count_by_hand(tiny: Path, tmp_path: Path) -> None:
    assert (TINY_DENSE, TINY_BF16, TINY_Q8, TINY_Q4) == (20752, 49152, 28672, 20480)
    out = plan_json(tmp_path, str(tiny))
    assert out == {
        "model": "tiny", "architecture": "Qwen3MoeForCausalLM",
        "params": {"dense": TINY_DENSE, "experts": TINY_EXPERTS * 3 * D * I_MOE},
        "dense_bytes": 2 * TINY_DENSE, "dense_stored_bytes": 4 * TINY_DENSE,  # saved in float32
        "moe_layers": 2, "experts_per_layer": E,
        "experts_bytes": {"bf16": TINY_BF16, "q8": TINY_Q8, "q4": TINY_Q4}, "q4_kept_q8": ["down"],
        "format": "bf16", "replicas": 2, "needed_bytes": 2 * TINY_DENSE + 2 * TINY_BF16, "mesh": None,
    }
    out = plan_json(tmp_path, str(tiny), "--quantize", "q4", "--replicas", "1")
    assert (out["format"], out["replicas"], out["needed_bytes"]) == ("q4", 1, 2 * TINY_DENSE + TINY_Q4)

    r = run_cli(tmp_path, "plan", str(tiny), "--quantize", "q4")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "tiny (Qwen3MoeForCausalLM)" in text
    assert "routed experts 24,576 (2 MoE layers x 8)" in text
    assert "* q4" in text and "down counted as q8" in text and "refuses this model" in text
    assert f"no node running for {tmp_path}" in text


def _by_hand_qwen3(d: int, layers: int, heads: int, kv: int, hd: int, i: int, e: int, vocab: int) -> tuple[int, int]:
    """Qwen3-MoE (no dense layers, untied head): (dense, routed expert) parameters."""
    attn = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 2 * hd
    return 2 * vocab * d + d + layers * (attn + 2 * d + e * d), layers * e * 3 * d * i


def _by_hand_deepseek_v3() -> tuple[int, int]:
    d, layers, dense_layers, vocab, heads = 7168, 61, 3, 129280, 128
    q_lora, kv_lora, nope, rope, v, i_dense, i_moe, e = 1536, 512, 128, 64, 128, 18432, 2048, 256
    mla = (d * q_lora + q_lora + q_lora * heads * (nope + rope) + d * (kv_lora + rope) + kv_lora
           + kv_lora * heads * (nope + v) + heads * v * d)
    moe_dense = e * d + e + 3 * d * i_moe  # router, its correction bias, one shared expert
    dense = (2 * vocab * d + d + layers * (mla + 2 * d) + dense_layers * 3 * d * i_dense
             + (layers - dense_layers) * moe_dense)
    return dense, (layers - dense_layers) * e * 3 * d * i_moe


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_published_configs_match_independent_counts_and_the_readme(tmp_path: Path) -> None:
    plans = {m: plan_json(tmp_path, str(DATA / m), "--peers-of", "16,32,64") for m in MODELS}

    q = plans["Qwen3-30B-A3B"]
    dense, experts = _by_hand_qwen3(2048, 48, 32, 4, 128, 768, 128, 151936)
    assert q["params"] == {"dense": dense, "experts": experts}
    assert round(experts / 1e9) == 29 and round((dense + experts) / 1e9, 1) == 30.5  # DESIGN: 29 of 30.5 B
    n = 48 * 128
    assert q["experts_bytes"] == {
        "bf16": n * 2 * 3 * 2048 * 768,
        "q8": n * (1536 * 2048 + 4 * 1536 + 2048 * 768 + 4 * 2048),
        "q4": n * (1536 * 2048 // 2 + 4 * 1536 * 2048 // 128 + 2048 * 768 // 2 + 4 * 2048 * 768 // 128),
    }
    assert q["format"] == "bf16" and q["dense_bytes"] == q["dense_stored_bytes"] == 2 * dense

    big = plans["Qwen3-235B-A22B"]
    dense, experts = _by_hand_qwen3(4096, 94, 64, 4, 128, 1536, 128, 151936)
    assert big["params"] == {"dense": dense, "experts": experts}
    assert round(sum(big["params"].values()) / 1e9) == 235

    ds = plans["DeepSeek-V3"]
    dense, experts = _by_hand_deepseek_v3()
    assert ds["params"] == {"dense": dense, "experts": experts}
    assert round((dense + experts) / 1e9) == 671  # the published total of the main model (no MTP layer)
    n = 58 * 256  # gate and up [2048, 7168], down [7168, 2048]: 1 byte a weight, a float32 per 128x128 block
    assert ds["experts_bytes"]["fp8"] == n * (3 * 7168 * 2048 + 4 * (2 * 16 * 56 + 56 * 16))
    assert ds["format"] == "fp8" and ds["dense_stored_bytes"] < ds["dense_bytes"] == 2 * dense

    oss = plans["gpt-oss-120b"]
    d = i = 2880
    assert round(sum(oss["params"].values()) / 1e9, 1) == 116.8  # "117B parameters"
    assert oss["params"]["experts"] == 36 * 128 * (3 * d * i + 2 * i + d)  # with biases
    bias = 4 * (2 * i + d)
    assert oss["experts_bytes"]["mxfp4"] == 36 * 128 * (3 * d * i // 2 + 3 * d * i // 32 + bias)
    assert oss["experts_bytes"]["q4"] == 36 * 128 * (3 * d * i // 2 + 4 * 3 * d * i // 64 + bias)  # 2880: G=64
    assert oss["format"] == "mxfp4" and oss["q4_kept_q8"] == []

    # README's table: exactly what `--peers-of 16,32,64` computes
    section = README.read_text().split("### Will it fit?", 1)[1].split("\n#", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| model")]
    assert {(r[0], r[1]) for r in rows} == {(m, f) for m in MODELS for f in
                                           (plans[m]["format"], "q8", "q4")}
    for model, fmt, _sizes, *counts in rows:
        want = [r["peers"] for r in plans[model]["peers_needed"] if r["format"] == fmt]
        assert [None if c == "—" else int(c) for c in counts] == want, (model, fmt)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_stored_or_cached_hub_model_plans_like_its_directory(tiny: Path, tmp_path: Path) -> None:
    r = run_cli(tmp_path, "import", str(tiny), "--alias", "tinyplan", "--json")
    assert r.returncode == 0, r.stderr
    by_dir, by_alias = plan_json(tmp_path, str(tiny)), plan_json(tmp_path, "tinyplan")
    assert by_alias.pop("model") == "tinyplan" and by_dir.pop("model") == "tiny"
    assert by_alias == by_dir

    # A hub id, offline: config.json from the HF cache's snapshot (the layout huggingface_hub writes).
    repo = tmp_path / "hf" / "models--Qwen--Qwen3-30B-A3B"
    sha = "0" * 40
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots" / sha / "config.json").write_text((DATA / "Qwen3-30B-A3B" / "config.json").read_text())
    by_hub = plan_json(tmp_path, "Qwen/Qwen3-30B-A3B", env={"HF_HUB_CACHE": str(tmp_path / "hf")})
    by_dir = plan_json(tmp_path, str(DATA / "Qwen3-30B-A3B"))
    assert by_hub.pop("model") == "Qwen/Qwen3-30B-A3B" and by_dir.pop("model") == "Qwen3-30B-A3B"
    assert by_hub == by_dir
    builtin = plan_json(tmp_path / "fresh", "builtin")  # the packaged store, on a fresh home
    assert builtin["architecture"] == "Qwen3MoeForCausalLM" and builtin["params"]["experts"] > 0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bad_models_and_options_fail_with_one_line(tmp_path: Path) -> None:
    def fails(*args: str, code: int = 1) -> str:
        r = run_cli(tmp_path, "plan", *args)
        assert r.returncode == code, (r.stdout, r.stderr)
        assert r.stdout == ""
        return r.stderr.strip()

    assert fails("no-such-model") == (
        "ekmesh: error: no-such-model is not a checkpoint directory, nor a model id or alias in the store "
        "(see `ekmesh models`), nor a hub id (owner/name)")
    line = fails("nobody/no-such-model")  # a hub id, offline: only the local HF cache is looked at
    assert len(line.splitlines()) == 1 and "nobody/no-such-model" in line and "HF_HUB_OFFLINE" in line
    (tmp_path / "empty").mkdir()
    assert fails(str(tmp_path / "empty")).endswith("config.json not found")
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert "unsupported architecture 'LlamaForCausalLM'" in fails(str(tmp_path / "dense"))
    cfg = json.loads((DATA / "Qwen3-30B-A3B" / "config.json").read_text())
    del cfg["num_experts"]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps(cfg))
    assert "lacks required field(s): num_experts" in fails(str(tmp_path / "broken"))
    assert fails(str(DATA / "Qwen3-30B-A3B"), "--replicas", "0") == (
        "ekmesh: error: --replicas must be at least 1, got 0")
    assert "invalid choice: 'q3'" in fails(str(DATA / "Qwen3-30B-A3B"), "--quantize", "q3", code=2)
    assert "--peers-of" in fails(str(DATA / "Qwen3-30B-A3B"), "--peers-of", "16,x", code=2)


def _fits(dense: int, experts: int, replicas: int, memories: list[int]) -> bool:
    return mesh_fit(dense, experts, replicas, [LivePeer(f"p{j}", f"p{j}", m) for j, m in enumerate(memories)]).fits


@pytest.mark.timeout(60)
def test_a_quantized_stored_model_is_planned_in_its_stored_format() -> None:
    hf = json.loads((DATA / "Qwen3-30B-A3B" / "config.json").read_text())
    for stored, quantize, want in (("q4", None, "q4"), ("q4", "q8", "q8"), (None, None, "bf16")):
        plan = plan_model(ModelConfigSource("x", hf, stored), quantize)
        assert (plan.default_format, plan.format) == (stored or "bf16", want)


@pytest.mark.timeout(60)
def test_peers_needed_is_the_fewest_peers_mesh_fit_accepts() -> None:
    cases = [(3, 54, 2, 16), (3, 54, 1, 64), (32, 609, 2, 32), (40, 10, 1, 32), (0, 5, 3, 100), (7, 0, 2, 8)]
    for dense, experts, replicas, size in cases:
        n = peers_needed(dense, experts, replicas, size)
        if dense > size:
            assert n is None
            continue
        assert n is not None
        assert _fits(dense, experts, replicas, [size] * n), (dense, experts, replicas, size, n)
        assert n == 1 or not _fits(dense, experts, replicas, [size] * (n - 1)), (dense, experts, replicas, size, n)
    # One peer with all the memory in the world still holds one copy of each expert only.
    fit = mesh_fit(10, 100, 2, [LivePeer("a", "a", 10**6)])
    assert (fit.fits, fit.missing_bytes, fit.copies_limited) == (False, 100, True)
    # The largest peer is the attention host; the others cannot make up for its lack of room.
    fit = mesh_fit(50, 10, 1, [LivePeer("a", "a", 40), LivePeer("b", "b", 30)])
    assert (fit.host and fit.host.peer_id, fit.host_short_bytes, fit.experts_short_bytes) == ("a", 10, 0)
    assert fit.offered_bytes == 70 and not fit.fits


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_live_mesh_of_one_real_node(tiny: Path, tmp_path: Path) -> None:
    home = tmp_path / "node"
    node = NodeProc(home, "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--no-dht", "--no-api", *FAST,
                    "--name", "solo", "--memory", "0.00006")  # 64,424 bytes: room for the q4 plan at R=1 only
    try:
        wait_until(lambda: bool(get_json(home, STATUS_PATH, 5)["peers"]), 20, "the node's status")
        (me,) = [p for p in get_json(home, STATUS_PATH, 5)["peers"] if p["state"] == "self"]
        memory = me["memory_total"]
        assert memory == int(0.00006 * GIB)
        dense = 2 * TINY_DENSE

        q4 = plan_json(home, str(tiny), "--quantize", "q4", "--replicas", "1")["mesh"]
        assert q4["peers"] == 1 and q4["offered_bytes"] == memory and q4["fits"] and q4["missing_bytes"] == 0
        assert q4["attention_host"] == {"peer_id": node.peer_id, "name": "solo", "memory": memory}

        bf16 = plan_json(home, str(tiny), "--replicas", "1")["mesh"]
        assert not bf16["fits"] and bf16["needed_bytes"] == dense + TINY_BF16
        assert bf16["missing_bytes"] == bf16["experts_short_bytes"] == dense + TINY_BF16 - memory

        two = plan_json(home, str(tiny), "--quantize", "q4")["mesh"]  # R=2 on one peer: one copy at most
        assert not two["fits"] and two["copies_limited"] and two["missing_bytes"] == TINY_Q4

        r = run_cli(home, "plan", str(tiny), "--quantize", "q4")
        assert r.returncode == 0, r.stderr
        assert "1 live peer offers 62.9 KiB; attention host solo (62.9 KiB)" in r.stdout
        assert "does not fit: 20.0 KiB missing" in r.stdout
        assert "2 copies of the experts need at least 2 peers" in r.stdout
    finally:
        code = node.stop()
    assert code == 0
