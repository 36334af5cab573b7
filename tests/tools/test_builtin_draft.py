"""The built-in model's draft (``builtin-draft``, docs/BUILTIN_MODEL.md, *Draft model*): once shipped, it opens from the
packaged store with ekmesh, is a dense Qwen3 with the built-in's vocabulary and tokenizer blobs, and its greedy
agreement with the built-in recomputed over the held-out subset equals the card's figure. The tooling that ships it
(``tools/package_draft.py``) and the tokenizer check of ``tools/train_draft.py train`` run here on a tiny random
draft and a copy of the store.

Before a draft is shipped (``card.json`` has no ``draft`` entry), ``test_shipped_draft_matches_card`` is an
expected failure that must fail the one way it can (``ShardMissingError``: the store has no ``builtin-draft``), so
pytest reports it as xfailed, never as passed; whoever ships the draft commits the card and store together, and
the test then runs as an ordinary test (and ``test_card_matches_store`` fails on a store and card that disagree)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from ekmesh.core.errors import ShardMissingError
from ekmesh.shard.store import PACKAGED_ROOT, Store, packaged_store
from tools.package_builtin import SUBSET_STRIDE

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
CARD_PATH = ROOT / "ekmesh" / "builtin" / "card.json"
CARD = json.loads(CARD_PATH.read_text())
WINDOWS = Path(__file__).parent / "data" / "builtin_heldout_windows.json"
AGREE_SLACK = 2  # positions whose argmax may flip between CPUs (near-ties in fp32); the card counts thousands


def check_draft(store: Store, card: dict[str, Any], windows: list[list[int]]) -> dict[str, Any]:
    """Every check of a shipped draft against ``card``; returns the recomputed subset figures."""
    from ekmesh.infer.tokenizer import Tokenizer
    from ekmesh.registry.lookup import open_checkpoint
    from tools.draft_figures import TOKENIZER_FILES, heldout_figures, load_pair
    from tools.package_draft import ALIAS, ARCHITECTURE

    draft_id = store.resolve(ALIAS)  # ShardMissingError while no draft is shipped
    entry = card["draft"]
    assert draft_id == entry["model_id"]
    m, builtin = store.load_manifest(draft_id), store.load_manifest(store.resolve("builtin"))
    assert m.architecture == ARCHITECTURE and m.expert_ids() == {}
    for name in TOKENIZER_FILES:
        assert m.file_ids()[name] == builtin.file_ids()[name] == entry["tokenizer_blobs"][name], name
    dckpt, tckpt = open_checkpoint(ALIAS, store), open_checkpoint("builtin", store)
    assert dckpt.expert_addresses() == []
    vocab = tckpt.config.vocab_size
    assert dckpt.config.vocab_size == vocab == entry["config"]["vocab_size"]
    text = "<|im_start|>user\nGenesis 1<|im_end|>\n<|im_start|>assistant\n"
    assert Tokenizer.from_dir(dckpt.path).encode(text) == Tokenizer.from_dir(tckpt.path).encode(text)
    draft, target = load_pair(dckpt, tckpt)
    assert draft.model.lm_head.weight.shape[0] == vocab
    assert sum(p.numel() for p in draft.model.parameters()) == entry["params"]
    subset = windows[::SUBSET_STRIDE]
    assert entry["subset"] == f"windows[::{SUBSET_STRIDE}]" and len(subset) == entry["subset_windows"]
    fig = heldout_figures(draft, target, subset)
    print(f"draft greedy agreement over {entry['subset']}: {fig['greedy_agreement']:.5f} ({fig['agree']}/"
          f"{fig['positions']}); card {entry['greedy_agreement_subset']} ({entry['agree_subset']})")
    assert fig["positions"] == entry["positions_subset"]
    assert abs(fig["agree"] - entry["agree_subset"]) <= AGREE_SLACK, (fig["agree"], entry["agree_subset"])
    assert abs(fig["greedy_agreement"] - entry["greedy_agreement_subset"]) <= (AGREE_SLACK + 1) / fig["positions"]
    return fig


@pytest.mark.slow
@pytest.mark.xfail("draft" not in CARD, raises=ShardMissingError, strict=True,
                   reason="no draft shipped yet: card.json has no 'draft' entry (tools/package_draft.py adds it)")
def test_shipped_draft_matches_card(tmp_path, monkeypatch):
    monkeypatch.setenv("EKMESH_HOME", str(tmp_path / "home"))
    store = packaged_store()
    assert store is not None and store.read_only
    windows = json.loads(WINDOWS.read_text())
    check_draft(store, CARD, windows)
    assert CARD["draft"]["positions"] == CARD["heldout_tokens"]  # the full figure covers every held-out token


def _tiny_draft(directory: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tools.train_draft import SHAPE

    torch.manual_seed(0)
    cfg = {**SHAPE, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
           "head_dim": 32, "intermediate_size": 128}
    Qwen3ForCausalLM(Qwen3Config(**cfg)).to(torch.bfloat16).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, directory / name)
    return directory


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_package_a_draft_into_a_copy_of_the_store_and_check_it(tmp_path):
    from ekmesh.registry.lookup import open_checkpoint
    from tools.package_draft import ALIAS, package

    root, card_path = tmp_path / "store", tmp_path / "card.json"
    shutil.copytree(PACKAGED_ROOT, root)
    if ALIAS in Store(root, read_only=True).aliases():  # the shipped draft goes: the store as before any draft
        rw = Store(root)
        rw.remove_model(rw.aliases()[ALIAS])
        rw.gc()
        for sub in ("verified", "tmp", "quarantine", "imports"):
            shutil.rmtree(root / sub, ignore_errors=True)
    card = {k: v for k, v in CARD.items() if k != "draft"}  # as before any draft was shipped
    card_path.write_text(json.dumps(card))
    builtin = open_checkpoint("builtin", Store(root, read_only=True))  # kept: its files dir lives as long
    builtin_files = builtin.path
    windows = [w[:48] for w in json.loads(WINDOWS.read_text())[:8]]  # short windows keep the teacher quick
    data = tmp_path / "data"
    data.mkdir()
    (data / "heldout.json").write_text(json.dumps(windows))
    before = _tree(root)
    where: dict[str, Any] = dict(root=root, card_path=card_path, windows_file=None, timing=False, prompts=2,
                                 gen_tokens=8)

    # A draft whose tokenizer is not the built-in's is refused before anything is written.
    wrong = _tiny_draft(tmp_path / "wrong", builtin_files)
    (wrong / "tokenizer_config.json").write_text((wrong / "tokenizer_config.json").read_text().replace("2048", "4096"))
    with pytest.raises(SystemExit, match="tokenizer"):
        package(wrong, data, **where)
    assert _tree(root) == before and json.loads(card_path.read_text()) == card

    entry = package(_tiny_draft(tmp_path / "draft", builtin_files), data, **where)
    store = Store(root, read_only=True)
    written = json.loads(card_path.read_text())
    assert written["draft"] == entry and written["model_id"] == CARD["model_id"]
    assert store.aliases() == {"builtin": CARD["model_id"], ALIAS: entry["model_id"]}
    assert sorted(p.name for p in root.iterdir()) == ["aliases.json", "blobs", "manifests"]
    assert written["store_bytes"] == sum(_tree(root).values()) == sum(before.values()) + entry["added_bytes"]
    assert {k: v for k, v in _tree(root).items() if k in before and k != "aliases.json"} == \
        {k: v for k, v in before.items() if k != "aliases.json"}  # the built-in's files are untouched
    assert entry["positions"] == sum(len(w) - 1 for w in windows)
    fig = check_draft(store, written, windows)
    assert fig["agree"] == entry["agree_subset"]  # same machine: exactly the card's count

    # The check can fail: a card whose figure is off by more than the slack is caught.
    off = {**written, "draft": {**entry, "agree_subset": entry["agree_subset"] + AGREE_SLACK + 1}}
    with pytest.raises(AssertionError):
        check_draft(store, off, windows)

    # Packaging again replaces the draft: the store still holds exactly two models.
    again = package(_tiny_draft(tmp_path / "draft2", builtin_files), data, **where)
    assert Store(root, read_only=True).models() == sorted([CARD["model_id"], again["model_id"]])


def test_train_refuses_data_made_with_another_tokenizer(tmp_path):
    from ekmesh.registry.lookup import open_checkpoint
    from tools.draft_figures import check_tokenizer

    ckpt = open_checkpoint("builtin", packaged_store())  # kept: its files dir lives as long
    shipped = ckpt.path
    data = tmp_path / "data"
    (data / "tokenizer").mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(shipped / name, data / "tokenizer" / name)
    check_tokenizer(data, shipped)  # the shipped files: accepted
    tok = json.loads((shipped / "tokenizer.json").read_text())
    tok["model"]["vocab"]["Ġthe"], tok["model"]["vocab"]["Ġand"] = tok["model"]["vocab"]["Ġand"], \
        tok["model"]["vocab"]["Ġthe"]
    (data / "tokenizer" / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(SystemExit, match="refusing .*tokenizer.json"):
        check_tokenizer(data, shipped)
