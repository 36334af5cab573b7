"""The one-process engine (``ekmesh.api.local.LocalEngine``) answers to the names a node's API answers to: a model
imported from the hub under an alias is served by its id, its alias and the hub id it came from (issue 17: "the
``model`` field accepts the model id, a local alias, ... or the hub id it was imported from"); a name it does not go
by is refused naming what it serves. Real parts: an import through a hub stand-in on 127.0.0.1 (``HubStub``), a
real ``ApiServer`` on port 0."""

from __future__ import annotations

from pathlib import Path

import pytest

from ekmesh.api.local import LocalEngine
from tests.api.rawhttp import post, serving
from tests.shard.hubstub import HubStub
from tests.tiny_models import make_tiny

HUB_ID = "tiny-org/tiny-moe"


@pytest.mark.timeout(120)
def test_the_local_engine_answers_to_the_hub_id_a_model_came_from(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from ekmesh.registry.imports import import_full

    monkeypatch.setenv("EKMESH_HOME", str(tmp_path / "home"))
    src, _ = make_tiny("qwen3_moe", tmp_path / "ckpt")
    with HubStub({HUB_ID: src}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        model_id = import_full(HUB_ID, alias="tinyds").model_id
    engine = LocalEngine("tinyds", "cpu", "fp32")
    assert engine.model.model_id == model_id and HUB_ID in engine.model.aliases, engine.model.aliases
    with serving(engine) as srv:
        answers = {}
        for name in (model_id, "tinyds", HUB_ID):
            got = post(srv, "/v1/completions", {"model": name, "prompt": [1, 2, 3], "max_tokens": 3,
                                                "temperature": 0, "return_token_ids": True})
            assert got.status == 200, (name, got.body[:300])
            assert got.json()["model"] == model_id
            answers[name] = got.json()["ekmesh"]["token_ids"]
        assert len({tuple(a) for a in answers.values()}) == 1, answers  # one model, whatever its name
        err = post(srv, "/v1/completions", {"model": "tiny-org/other", "prompt": [1, 2, 3], "max_tokens": 1}) \
            .assert_error(404)
        assert "tiny-org/other" in err["message"] and HUB_ID in err["message"], err
