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


def test_generate_speculative_modes_give_the_same_tokens(tiny):
    """``--speculative ngram`` and ``--speculative draft --draft DIR`` (the model as its own draft: every draft
    accepted) answer as plain decoding; --json says how (steps, drafts); a draft mode without a draft is an error."""
    path, _ = tiny
    args = ["generate", str(path), "--prompt-ids", "4,8,15,4,8,15,4,8", "--max-tokens", "20", "--json"]
    runs = {mode: run_cli(*args, "--speculative", mode, *(["--draft", str(path)] if mode == "draft" else []))
            for mode in ("off", "ngram", "draft")}
    outs = {}
    for mode, r in runs.items():
        assert r.returncode == 0, r.stderr
        outs[mode] = json.loads(r.stdout)
        assert outs[mode]["speculative"] == mode
    assert outs["ngram"]["token_ids"] == outs["draft"]["token_ids"] == outs["off"]["token_ids"]
    assert outs["off"]["steps"] == 19 and outs["off"]["drafted"] == 0
    d = outs["draft"]
    assert d["drafted"] > 0 and d["accepted"] == d["drafted"] and d["steps"] < 19
    r = run_cli(*args, "--speculative", "draft")  # a directory has no draft by name
    assert r.returncode != 0 and "needs a draft model" in r.stderr and "Traceback" not in r.stderr


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


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Qwen3-MoE with a real byte-level BPE tokenizer, ChatML template and generation_config."""
    from tests.infer.test_tokenizer import QWEN_TEMPLATE, _added_tokens_decoder, _train_backend

    backend = _train_backend()
    path, ref = make_tiny("qwen3_moe", tmp_path_factory.mktemp("chat") / "m", vocab_size=backend.get_vocab_size())
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": _added_tokens_decoder(backend), "bos_token": None, "chat_template": QWEN_TEMPLATE,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return path, ref


def test_generate_text_prompt_json_and_stream_agree(chat_model):
    from ekmesh.infer.tokenizer import Tokenizer

    path, _ = chat_model
    tok = Tokenizer.from_dir(path)
    r = run_cli("generate", str(path), "--prompt", "In the beginning", "--max-tokens", "12", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_ids"] == tok.encode("In the beginning", add_special_tokens=True)
    assert out["text"] == tok.decode(out["token_ids"])
    assert not set(out["token_ids"]) & {0, 2}  # stop ids never appear in the output
    plain = run_cli("generate", str(path), "--prompt", "In the beginning", "--max-tokens", "12")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == out["text"] + "\n"


def test_generate_chat_uses_the_template(chat_model):
    from ekmesh.infer.tokenizer import Tokenizer

    path, _ = chat_model
    tok = Tokenizer.from_dir(path)
    r = run_cli("generate", str(path), "--prompt", "Who made the light?", "--chat", "--system", "Be brief.",
                "--max-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    expect = tok.encode_chat([{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Who made the light?"}], add_generation_prompt=True)
    assert json.loads(r.stdout)["prompt_ids"] == expect
    assert tok.decode(expect, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
