"""Models shown by name, with the id shortened: the chat header and ``ekmesh status``, rendered from fixed snapshots
into a recording console without colour."""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console

from ekmesh.discovery.advert import ModelReady
from ekmesh.discovery.snapshot import shard_maps
from ekmesh.tui.chat import header, models_view
from ekmesh.tui.names import model_label, short_model_id
from ekmesh.tui.status import render_status

pytestmark = pytest.mark.timeout(30)
MODEL = "blake3:9063096d25488b374c2cb77631da968b88628e31b14fd14ae7a567d6eaacef95"
OTHER = "blake3:77aa0196d25488b374c2cb77631da968b88628e31b14fd14ae7a567d6eaace"
ME = "12D3KooWAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAalpha111"


def render(renderable: Any, width: int = 160) -> str:
    console = Console(width=width, record=True, color_system=None, force_terminal=False)
    console.print(renderable)
    return console.export_text()


def test_labels_prefer_the_name_the_user_gave_then_an_alias_then_the_hub_id():
    assert short_model_id(MODEL) == "blake3:906309…"
    assert short_model_id("tiny") == "tiny"
    assert model_label(MODEL, ["tinyds"]) == "tinyds (blake3:906309…)"
    assert model_label(MODEL, ["org/tiny", "tinyds", "a-tiny"]) == "a-tiny (blake3:906309…)"
    assert model_label(MODEL, ["org/tiny", "tinyds"], wanted="org/tiny") == "org/tiny (blake3:906309…)"
    assert model_label(MODEL, ["org/tiny"]) == "org/tiny (blake3:906309…)"
    assert model_label(MODEL, [], wanted="tinyds") == MODEL  # no name: the whole id, the user needs it
    assert model_label(MODEL, [MODEL]) == MODEL


def test_chat_header_names_the_model():
    models = [{"id": OTHER, "aliases": []}, {"id": MODEL, "aliases": ["org/tiny", "tinyds"]}]
    url = "http://127.0.0.1:7734/v1"
    assert render(header(models, MODEL, url)).strip() == f"ekmesh chat · model tinyds (blake3:906309…) · {url}"
    assert "model org/tiny (blake3:906309…)" in render(header(models, MODEL, url, wanted="org/tiny"))
    assert f"model {OTHER} · " in render(header(models, OTHER, url))
    listed = render(models_view(models, MODEL))
    assert f"* {MODEL} (org/tiny, tinyds)" in listed


def test_status_shows_the_claimed_model_and_its_shard_map_by_name():
    models = shard_maps({ME: {MODEL: ModelReady((0, 2), 2, {0: frozenset({0, 1}), 1: frozenset({0})})}})
    models[MODEL]["names"] = ["tinyds"]
    snap = {
        "schema": 1, "generated_at": 0.0, "self": ME, "addrs": [], "mesh": {"open": False, "key_id": "abc"},
        "peers": [{"peer_id": ME, "name": "alpha", "version": "0.1.0", "state": "self", "reason": "", "addrs": [],
                   "data_addr": None, "devices": [], "memory_total": 1 << 30, "memory_free": 1 << 29,
                   "speed": None, "load": 0.0, "rtt_ms": None, "last_seen_s": 0.0, "incarnation": 1, "seq": 1,
                   "models": {MODEL: 3}}],
        "models": models,
        "claim": {"model": MODEL, "names": ["tinyds"], "state": "claiming", "replicas": 2,
                  "self": {"assigned": 3, "fetched": 3, "ready": 3}},
    }
    text = render(render_status(snap))
    assert "claiming tinyds (blake3:906309…) (claiming, R=2)" in text
    assert "model tinyds (blake3:906309…)  layers [0, 2) × 2 experts" in text
    assert MODEL not in text
    # a snapshot without names (an older node): the whole id, as before
    del snap["claim"]["names"], snap["models"][MODEL]["names"]
    text = render(render_status(snap))
    assert f"claiming {MODEL} (claiming" in text and f"model {MODEL}  layers" in text
