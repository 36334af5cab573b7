"""A peer with only the manifest and no peer to fetch from claims its experts from the hub (the partial-import path).

The hub is a stand-in (a real HTTP server on 127.0.0.1 serving the checkpoint with range reads, reached through
HF_ENDPOINT). One ``ekmesh join --model ID`` process whose store holds only the manifest: it rebuilds every blob it
needs (experts and, as attention host, the dense part) from byte ranges of the hub's files, verifies each against
its id, loads them, serves, and answers through its API exactly as one process over the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.node.servingmesh import ServingMesh, post
from tests.shard.hubstub import HubStub
from tests.tiny_models import make_tiny, random_prompt

REPO = "tiny-org/tiny-moe"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_lone_peer_with_only_the_manifest_claims_from_the_hub(tmp_path: Path, monkeypatch) -> None:
    from ekmesh.infer.generate import SamplingParams
    from ekmesh.infer.session import LocalModel
    from ekmesh.registry.imports import import_full
    from ekmesh.shard.store import Store

    src, _ = make_tiny("qwen3_moe", tmp_path / "ckpt")
    prompt = random_prompt(96)
    expected = LocalModel.open(src, "cpu", "fp32").generator.generate(
        prompt, SamplingParams(max_tokens=16, stop_ids=frozenset())).token_ids
    with HubStub({REPO: src}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        m = Store(tmp_path / "importer").load_manifest(import_full(REPO, store=Store(tmp_path / "importer")).model_id)
        home = Store(tmp_path / "n0" / "store")
        home.save_manifest(m)  # the manifest only: no blob
        assert home.all_blobs() == []
        hub.reset()
        with ServingMesh(tmp_path, m.id, [[]]) as mesh:
            snap = mesh.wait_ready(0, timeout=90)
            claim = snap["claim"]
            assert claim["self"]["ready"] == claim["experts"] == len(m.expert_ids())
            assert claim["blobs_fetched"] == 0  # no peer gave anything: it all came from the hub
            out = post(mesh.api(0) + "/completions", {"prompt": prompt, "max_tokens": 16, "temperature": 0,
                                                      "ignore_eos": True, "return_token_ids": True})
            assert out["ekmesh"]["token_ids"] == expected
        stored = set(home.all_blobs())
        wanted = set(m.expert_ids().values()) | set(m.dense_ids().values()) | set(m.file_ids().values())
        assert wanted <= stored
        for bid in wanted:
            home.verify(bid, m.size(bid))  # each one hashes to its id
        assert hub.file_bytes > 0
        assert all(method in ("GET", "HEAD") for method, _, _ in hub.requests)
