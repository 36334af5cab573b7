"""The data plane's round-trip split through real nodes: an attention host holding no expert and one holder
(``ekmesh join`` processes on 127.0.0.1); after one answer the host's ``serving.split.host`` counted one frame per
MoE layer and step, with the bytes those frames carry, and the holder's ``serving.split.server`` served as many
requests (``benchmarks/gpu_mesh.py`` reads these blocks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ekmesh.infer.dataplane.frames import HEADER_SIZE
from tests.discovery.meshproc import wait_until
from tests.node.servingmesh import ServingMesh, post
from tests.tiny_models import make_tiny, random_prompt


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_split_blocks_count_the_frames_of_an_answer(tmp_path: Path) -> None:
    from ekmesh.registry.imports import import_full
    from ekmesh.shard.store import Store

    src = tmp_path / "ckpt"
    make_tiny("qwen3_moe", src)
    model_id = import_full(str(src), store=Store(tmp_path / "n0" / "store")).model_id
    m = Store(tmp_path / "n0" / "store").load_manifest(model_id)
    cfg = m.data["config"]
    moe_layers = len({layer for layer, _ in m.expert_ids()})
    prompt = random_prompt(cfg["vocab_size"])
    tokens = 6
    # --verify 0: no sampled rows, so every frame carries exactly the step's token rows
    with ServingMesh(tmp_path, model_id, [["--no-attention"], ["--no-experts", "--verify", "0"]],
                     extra=["--replicas", "1"]) as mesh:
        mesh.wait_ready(1, timeout=90)
        host, holder = mesh.nodes[1], mesh.nodes[0]
        before = host.status()["serving"]["split"]["host"]
        assert holder.status()["serving"]["split"]["host"] is None  # (no attention there)
        served_before = holder.status()["serving"]["split"]["server"]["requests"]
        out = post(mesh.api(1) + "/completions", {"prompt": prompt, "max_tokens": tokens, "temperature": 0,
                                                  "ignore_eos": True, "return_token_ids": True,
                                                  "speculative": "off"})["ekmesh"]
        assert len(out["token_ids"]) == tokens and out["steps"] == tokens - 1
        split = host.status()["serving"]["split"]["host"]
        frames = split["frames"] - before["frames"]
        assert frames == moe_layers * tokens  # the prefill and each of the tokens - 1 decode steps, per MoE layer
        # (the holder counts a request once its answer is sent, which the host may have read before that)
        wait_until(lambda: holder.status()["serving"]["split"]["server"]["requests"] - served_before >= frames, 10,
                   "the holder counted every request")
        server = holder.status()["serving"]["split"]["server"]
    assert server["requests"] - served_before == frames
    # answers: one row per token of the step, in the model's dtype (fp32 on the CPU)
    rows = len(prompt) + tokens - 1
    assert split["bytes_in"] - before["bytes_in"] == moe_layers * (tokens * HEADER_SIZE + rows * cfg["hidden_size"] * 4)
    assert split["local_calls"] == before["local_calls"] == 0  # the host holds no expert
    for part in ("rtt_ns", "wait_ns", "decode_ns", "send_ns", "encode_ns"):
        assert split[part] > before[part] >= 0, part
    assert split["copy_out_ns"] == split["copy_in_ns"] == 0  # a CPU host copies nothing to or from a device
    for part in ("decode_ns", "compute_ns", "send_ns"):
        assert server[part] > 0, part
