"""``ekmesh generate`` as a real subprocess: the JSON interface scripts rely on, and its error messages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.tiny_models import make_tiny


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ekmesh.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny("olmoe", tmp_path_factory.mktemp("cli") / "olmoe")


def test_generate_json_prompt_ids_matches_transformers(tiny):
    path, ref = tiny
    prompt = [4, 8, 15, 16, 23, 42]
    with torch.no_grad():
        expect = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 6, dtype=torch.long),
                              max_new_tokens=10, min_new_tokens=10, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, 6:].tolist()
    r = run_cli("generate", str(path), "--prompt-ids", "4,8,15,16,23,42", "--max-tokens", "10", "--json",
                "--device", "cpu", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["token_ids"] == expect
    assert out["text"] == ""  # no tokenizer in this checkpoint
    assert out["finish_reason"] == "length"
    assert out["prompt_ids"] == prompt and out["device"] == "cpu" and out["dtype"] == "float32"


def test_generate_plain_output_without_tokenizer_prints_ids(tiny):
    path, _ = tiny
    r = run_cli("generate", str(path), "--prompt-ids", "4,8,15", "--max-tokens", "3", "--seed", "1",
                "--temperature", "0.8")
    assert r.returncode == 0, r.stderr
    ids = [int(x) for x in r.stdout.strip().split(",")]
    assert len(ids) == 3 and all(0 <= i < 96 for i in ids)


def test_generate_errors_are_one_clear_line(tiny, tmp_path):
    path, _ = tiny
    r = run_cli("generate", str(path), "--prompt", "hello")
    assert r.returncode == 1
    assert r.stderr.strip() == f"ekmesh: error: {path} has no tokenizer.json; pass token ids instead of text"
    r = run_cli("generate", str(tmp_path / "missing"), "--prompt-ids", "1")
    assert r.returncode == 1 and "is not a checkpoint directory" in r.stderr
    r = run_cli("generate", str(path), "--prompt-ids", "1,x")
    assert r.returncode == 2 and "--prompt-ids must be comma-separated integers" in r.stderr
    r = run_cli("generate", str(path), "--prompt-ids", "1,500", "--max-tokens", "2")
    assert r.returncode == 1 and "prompt token id 500 is outside the vocabulary [0, 96)" in r.stderr
    r = run_cli("generate", str(path), "--prompt-ids", "1", "--dtype", "int4")
    assert r.returncode == 1 and "unknown dtype 'int4'" in r.stderr
