"""Speculative decoding through real ``ekmesh join`` processes: a draft model on the attention host.

Three nodes on a tiny qwen3_moe (two holders, R = 1, and an attention host holding none). The host gets ``--draft``
= the target's own checkpoint directory, so every draft is the target's own choice: the answer equals one process,
every drafted token is accepted, and the data plane makes far fewer round trips per MoE layer than tokens (each
target step carries the current token and its drafts in one frame per peer per layer). A request can still ask for
plain decoding (one step per token) or prompt lookup; a draft model with another tokenizer is refused at load
with a clear error, and the host then drafts by prompt lookup.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
from pathlib import Path

import pytest

from tests.node.servingmesh import ServingMesh, one_process_tokens, post
from tests.tiny_models import make_tiny, random_prompt

HOST = ["--no-experts"]
HOLDER = ["--no-attention"]
N = 32


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_draft_model_on_the_attention_host(tmp_path: Path) -> None:
    from ekmesh.registry.imports import import_full
    from ekmesh.shard.store import Store

    src = tmp_path / "ckpt"
    make_tiny("qwen3_moe", src)
    model_id = import_full(str(src), store=Store(tmp_path / "n0" / "store")).model_id
    prompt = random_prompt(96)
    expected = one_process_tokens(src, prompt, N)
    # another draft: the same weights with a tokenizer.json the target lacks (refused: not the same tokenizer)
    other = tmp_path / "other-draft"
    shutil.copytree(src, other)
    (other / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel"}}))
    roles = [HOLDER, HOLDER, [*HOST, "--draft", str(src)], [*HOST, "--draft", str(other)]]
    with ServingMesh(tmp_path, model_id, roles, extra=["--replicas", "1", "--memory", "4"]) as mesh:
        host = 2
        mesh.wait_ready(host, timeout=90)
        body = {"prompt": prompt, "max_tokens": N, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        got = post(mesh.api(host) + "/completions", body)["ekmesh"]
        print(f"draft: {got['accepted']}/{got['drafted']} accepted, {got['steps']} steps, "
              f"{got['round_trips']} round trips per MoE layer for {N} tokens")
        assert got["token_ids"] == expected
        assert got["speculative"] == "draft"  # the default when a draft model is loaded
        assert got["drafted"] > 0 and got["accepted"] == got["drafted"]
        assert N - 1 <= got["steps"] + got["accepted"] <= N
        assert got["round_trips"] < N / 2  # (off: N, one for the prefill and one per step)

        off = post(mesh.api(host) + "/completions", {**body, "speculative": "off"})["ekmesh"]
        assert off["token_ids"] == expected and off["steps"] == N - 1 and off["round_trips"] >= N
        ngram = post(mesh.api(host) + "/completions", {**body, "speculative": "ngram"})["ekmesh"]
        assert ngram["token_ids"] == expected and ngram["speculative"] == "ngram"

        # the host with a foreign tokenizer's draft: serving, no draft model, prompt lookup by default
        mesh.wait_ready(3, timeout=90)
        assert "does not have the target's tokenizer" in mesh.nodes[3].stderr()
        fallback = post(mesh.api(3) + "/completions", body)["ekmesh"]
        assert fallback["token_ids"] == expected and fallback["speculative"] == "ngram"
        with pytest.raises(urllib.error.HTTPError) as refused:
            post(mesh.api(3) + "/completions", {**body, "speculative": "draft"})
        assert refused.value.code == 400 and "needs a draft model" in refused.value.read().decode()
