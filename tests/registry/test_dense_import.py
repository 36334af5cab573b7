"""A dense model (Qwen3ForCausalLM, no routed experts) through ``ekmesh import`` (a real CLI process) into the store,
and ``registry.lookup`` opening it again as a ``Checkpoint`` that computes exactly what the directory does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ekmesh.infer.generate import Generator, SamplingParams
from ekmesh.infer.loader import load_all
from ekmesh.registry.lookup import open_checkpoint
from ekmesh.shard.store import Store
from tests.infer.test_dense_family import make_tiny_dense
from tests.tiny_models import random_prompt


def test_import_a_dense_checkpoint_and_open_it_from_the_store(tmp_path: Path) -> None:
    path, ref = make_tiny_dense(tmp_path / "draft", tie_word_embeddings=True)
    home = tmp_path / "home"
    env = {**os.environ, "EKMESH_HOME": str(home)}
    env.pop("HF_ENDPOINT", None)
    r = subprocess.run([sys.executable, "-m", "ekmesh.cli", "import", str(path), "--json", "--alias", "draft"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["alias"] == "draft" and out["experts_present"] == out["experts_total"] == 0

    store = Store(home / "store")
    m = store.load_manifest(out["model_id"])
    assert m.architecture == "Qwen3ForCausalLM" and m.data["experts"] == [None] * 3 and m.expert_ids() == {}
    assert sorted(m.dense_ids()) == ["embed", "head", "layer.0", "layer.1", "layer.2"]
    assert m.data["sizes"]["experts"] == 0

    ckpt = open_checkpoint("draft", store)
    prompt = random_prompt(ref.config.vocab_size)
    stored = Generator(*load_all(ckpt)[1:])
    assert ckpt.expert_addresses() == []
    assert set(ckpt.reader.source.opened) == set(m.dense_ids().values())  # every tensor blob is dense
    direct = Generator(*load_all(path)[1:])
    a, b = stored.logits(prompt), direct.logits(prompt)
    assert torch.equal(a, b), f"max diff {(a - b).abs().max().item()}"
    params = SamplingParams(max_tokens=8, stop_ids=frozenset())
    assert stored.generate(prompt, params).token_ids == direct.generate(prompt, params).token_ids
