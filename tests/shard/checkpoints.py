"""Checkpoints for registry tests: a tiny MoE written as 2 safetensors shards + index, with a small tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from tests.tiny_models import make_tiny

WORDS = ["[UNK]", "<eos>"] + [f"w{i}" for i in range(40)]


def write_tokenizer(directory: Path) -> None:
    """A word-level tokenizer (ids < 42, inside every tiny vocab) and its config, eos ``<eos>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "bos_token": None}))


def split_in_two(src: Path, dst: Path) -> None:
    """Rewrites ``src``'s single safetensors file as two shards (expert tensors split across both) + index."""
    dst.mkdir(parents=True)
    sd = load_file(str(src / "model.safetensors"))
    names = sorted(sd)
    half = {n for i, n in enumerate(names) if i % 2}
    shards = {"model-00001-of-00002.safetensors": {n: sd[n] for n in names if n not in half},
              "model-00002-of-00002.safetensors": {n: sd[n] for n in names if n in half}}
    wm = {}
    for fname, tensors in shards.items():
        save_file(tensors, str(dst / fname))
        wm.update({n: fname for n in tensors})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    for extra in ("config.json", "generation_config.json"):
        if (src / extra).exists():
            (dst / extra).write_bytes((src / extra).read_bytes())


def make_sharded(root: Path, arch: str = "qwen3_moe", **overrides: Any) -> tuple[Path, Any]:
    """``root/<arch>``: a tiny random model as 2 shards + index + tokenizer; returns (dir, transformers model)."""
    single, ref = make_tiny(arch, root / f"{arch}-single", **overrides)
    dst = root / arch
    split_in_two(single, dst)
    write_tokenizer(dst)
    return dst, ref
