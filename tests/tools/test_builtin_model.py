"""The shipped built-in model (``ekmesh/builtin/store``, docs/BUILTIN_MODEL.md): it resolves as ``builtin`` with an
empty ``EKMESH_HOME``, its greedy output is the same from the CLI subprocess and from one process here, its held-out
loss recomputed from the packaged blobs with ekmesh's own model code is at or below the figure the card quotes
(``ekmesh/builtin/card.json``), and the packaged store is read-only: nothing is written into the package, a
tampered blob is refused without being moved."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ekmesh.core.errors import BlobHashMismatchError, ShardError
from ekmesh.shard.store import PACKAGED_ROOT, Store, packaged_store

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
CARD = json.loads((ROOT / "ekmesh" / "builtin" / "card.json").read_text())
WINDOWS = Path(__file__).parent / "data" / "builtin_heldout_windows.json"
PROMPT = "Genesis 1"


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("EKMESH_HOME", str(home))
    return home


@pytest.mark.slow
def test_generate_builtin_offline_matches_one_process(empty_home):
    from ekmesh.infer.generate import SamplingParams
    from ekmesh.infer.session import LocalModel
    from ekmesh.registry.lookup import open_model

    before = _tree(PACKAGED_ROOT)
    env = {**os.environ, "EKMESH_HOME": str(empty_home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "ekmesh.cli", "generate", "builtin", "--prompt", PROMPT, "--chat",
                           "--max-tokens", "40", "--json"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr
    cli = json.loads(proc.stdout)

    lm = LocalModel.open(open_model("builtin"), device="cpu")
    ids = lm.encode_prompt(PROMPT, chat=True)
    here = lm.generator.generate(ids, SamplingParams(max_tokens=40, temperature=0.0))
    assert cli["prompt_ids"] == ids
    assert cli["token_ids"] == here.token_ids, (cli["text"], here.text)
    assert cli["text"] == here.text
    # Recognisable: a chapter heading, a numbered first verse, the KJV's own phrasing (the card's sample).
    assert here.text.startswith("Genesis "), here.text
    assert "\n\n1 And it came to pass" in here.text, here.text
    assert _tree(PACKAGED_ROOT) == before  # nothing written into the package
    assert not (empty_home / "store" / "manifests").exists() or not any((empty_home / "store" / "manifests").iterdir())


@pytest.mark.slow
def test_heldout_loss_at_or_below_card(empty_home):
    from ekmesh.registry.lookup import open_checkpoint
    from tools.package_builtin import heldout_loss

    windows = json.loads(WINDOWS.read_text())
    assert len(windows) == CARD["heldout_windows"]
    assert sum(len(w) - 1 for w in windows) == CARD["heldout_tokens"]
    store = packaged_store()
    assert store is not None
    loss = heldout_loss(open_checkpoint(CARD["alias"], store), windows)
    print(f"held-out loss {loss:.5f} (card {CARD['heldout_loss']}), {CARD['heldout_tokens']} tokens")
    assert math.isfinite(loss)
    assert loss <= CARD["heldout_loss"] + 5e-6, f"held-out loss {loss:.6f} above the card's {CARD['heldout_loss']}"


def test_card_matches_store():
    """The store holds the built-in's manifest, aliased ``builtin``, and, exactly when the card has a ``draft``
    entry, the draft's, aliased ``builtin-draft`` (tests/tools/test_builtin_draft.py checks the draft itself)."""
    from tools.package_draft import ALIAS, DRAFT_MAX_BYTES

    store = packaged_store()
    assert store is not None and store.read_only
    assert store.resolve("builtin") == CARD["model_id"]
    draft = {ALIAS: CARD["draft"]["model_id"]} if "draft" in CARD else {}
    assert store.aliases() == {"builtin": CARD["model_id"], **draft}
    assert store.models() == sorted([CARD["model_id"], *draft.values()])
    size = sum(p.stat().st_size for p in PACKAGED_ROOT.rglob("*") if p.is_file())
    builtin_blobs = store.load_manifest(CARD["model_id"]).blob_ids()
    draft_bytes = sum(store.manifest_path(mid).stat().st_size + sum(
        store.blob_path(b).stat().st_size for b in store.load_manifest(mid).blob_ids() - builtin_blobs)
        for mid in draft.values())  # what the draft adds: its manifest and the blobs the built-in does not use
    assert draft_bytes <= DRAFT_MAX_BYTES
    assert size == CARD["store_bytes"]
    assert size - draft_bytes <= 50_000_000
    assert sorted(p.name for p in PACKAGED_ROOT.iterdir()) == ["aliases.json", "blobs", "manifests"]


def test_user_store_alias_wins(empty_home, tmp_path):
    from ekmesh.registry.lookup import resolve_store

    assert resolve_store("builtin").read_only
    user = Store()
    user.set_alias("builtin", "blake3:" + "0" * 64)
    assert resolve_store("builtin").root == user.root


def test_read_only_store_refuses_a_tampered_blob_and_writes_nothing(tmp_path):
    root = tmp_path / "pkg"
    shutil.copytree(PACKAGED_ROOT, root)
    store = Store(root, read_only=True)
    m = store.load_manifest(store.resolve("builtin"))
    bid = m.data["dense"]["embed"]
    assert store.verify(bid, m.size(bid)) == store.blob_path(bid)
    path = store.blob_path(bid)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(BlobHashMismatchError) as err:
        store.verify(bid, m.size(bid))
    assert err.value.blob_id == bid
    assert path.is_file()  # reported, not moved
    with pytest.raises(ShardError):
        store.put([b"x"])
    with pytest.raises(ShardError):
        store.set_alias("other", m.id)
    assert sorted(p.name for p in root.iterdir()) == ["aliases.json", "blobs", "manifests"]
