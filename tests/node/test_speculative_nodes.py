"""Speculative decoding through real ``ekmesh join`` processes: a draft model on the attention host.

Three nodes on a tiny qwen3_moe (two holders, R = 1, and an attention host holding none). The host gets ``--draft``
= the target's own checkpoint directory, so every draft is the target's own choice: the answer equals one process,
every drafted token is accepted, and the data plane makes far fewer round trips per MoE layer than tokens (each
target step carries the current token and its drafts in one frame per peer per layer). A request can still ask for
plain decoding (one step per token) or prompt lookup; four conversations that start at different steps are decoded
in shared batches and each equals one process; a draft model with another tokenizer is refused at load with a clear
error, and the host then drafts by prompt lookup.
"""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
from pathlib import Path

import pytest

from tests.node.servingmesh import ServingMesh, one_process_tokens, post, stream_token_ids
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

        # 4 conversations of different lengths that start at different steps, drafting or not: batched on the
        # host (its status shows batches of several), each equal to one process
        _concurrent(mesh.api(host), [(random_prompt(96, n=n, seed=n), m, mode)
                                     for n, m, mode in ((9, 48, "off"), (5, 20, "draft"), (14, 30, "ngram"),
                                                        (3, 16, "off"))], src)
        decoding = mesh.nodes[host].status()["serving"]["decoding"]
        assert decoding["max_batch"] >= 2 and decoding["active"] == 0 and decoding["draft"], decoding

        # the host with a foreign tokenizer's draft: serving, no draft model, prompt lookup by default
        mesh.wait_ready(3, timeout=90)
        assert "does not have the target's tokenizer" in mesh.nodes[3].stderr()
        fallback = post(mesh.api(3) + "/completions", body)["ekmesh"]
        assert fallback["token_ids"] == expected and fallback["speculative"] == "ngram"
        with pytest.raises(urllib.error.HTTPError) as refused:
            post(mesh.api(3) + "/completions", {**body, "speculative": "draft"})
        assert refused.value.code == 400 and "needs a draft model" in refused.value.read().decode()


def _concurrent(api: str, convs: list[tuple[list[int], int, str]], src: Path) -> None:
    """Streams each (prompt, tokens, speculative mode) on its own thread; conversation i > 1 starts once the first
    has received 4 * i tokens. Each answer must equal one process."""
    got: list[list[int]] = [[] for _ in convs]
    errors: list[BaseException] = []
    progress = threading.Condition()

    def talk(i: int) -> None:
        prompt, n, mode = convs[i]
        try:
            with progress:
                progress.wait_for(lambda: len(got[0]) >= 4 * i or bool(errors), timeout=60)
            body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "speculative": mode}
            for ids in stream_token_ids(api, body):
                with progress:
                    got[i] = ids
                    progress.notify_all()
        except BaseException as exc:  # reported below
            errors.append(exc)
            with progress:
                progress.notify_all()

    threads = [threading.Thread(target=talk, args=(i,)) for i in range(len(convs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    assert not errors, errors
    for (prompt, n, _), ids in zip(convs, got, strict=True):
        assert ids == one_process_tokens(src, prompt, n)
