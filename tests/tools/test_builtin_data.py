"""The built-in model's data: the held-out split, held-out windows, chat documents, tokenizer files
(``tools/builtin_data.py``). Tests that read the corpus need Debian's sword-text-kjv and fail, saying so, without it."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from tests.requires import require_kjv
from tools import builtin_data as bd
from tools import kjv

pytestmark = pytest.mark.timeout(60)
needs_kjv = pytest.mark.usefixtures("kjv_installed")


@pytest.fixture
def kjv_installed() -> None:
    require_kjv()  # without the package these tests fail, saying what to install (never skip)


# The split the shipped model was trained and evaluated with (docs/BUILTIN_MODEL.md); changing the salt or the
# rate changes the held-out loss, so it is pinned here.
HELD_OUT = ("Gen.40 Exod.38 Num.11 Num.35 Deut.22 Judg.9 1Kgs.15 2Chr.14 Ps.19 Ps.29 Ps.38 Ps.87 Ps.88 Ps.98 "
            "Ps.149 Prov.2 Prov.22 Isa.23 Isa.36 Jer.47 Jer.52 Ezek.26 Ezek.38 Rev.6").split()


def held_out_refs() -> list[str]:
    return [f"{b.osis}.{c}" for b in kjv.BOOKS for c in range(1, b.chapters + 1) if bd.is_held_out(b, c)]


def test_split_is_deterministic_and_pinned():
    assert held_out_refs() == HELD_OUT
    assert held_out_refs() == held_out_refs()
    verses = sum(kjv.BOOK_BY_OSIS[r.split(".")[0]].verses[int(r.split(".")[1]) - 1] for r in HELD_OUT)
    assert 0.01 < verses / 31102 < 0.03
    # The demo's favourite chapters are trained on.
    for osis, c in (("Gen", 1), ("Ps", 23), ("John", 1), ("John", 3), ("Matt", 5), ("1Cor", 13)):
        assert not bd.is_held_out(kjv.BOOK_BY_OSIS[osis], c)


def fake_verses(book: str, chapter: int, n: int) -> list[kjv.Verse]:
    b = kjv.BOOK_BY_OSIS[book]
    return [kjv.Verse(b, chapter, v, f"Verse {v} of {b.name} {chapter} speaketh of light.") for v in range(1, n + 1)]


def test_heldout_windows_predict_every_token_once():
    class CharTok:  # one id per character, past the special tokens
        def encode(self, text, add_special_tokens=False):
            return SimpleNamespace(ids=[3 + ord(ch) % 4000 for ch in text])

    held = [fake_verses("Gen", 40, 23), fake_verses("Jude", 1, 2)]
    windows = bd.heldout_windows(CharTok(), held, seq_len=64)
    assert all(2 <= len(w) <= 65 for w in windows)
    for ch in held:  # each chapter: <eot> text <eot>, cut into windows that overlap by one token
        ids = [0, *CharTok().encode(bd.chapter_document(ch)).ids, 0]
        n = -(-(len(ids) - 1) // 64)
        mine, windows = windows[:n], windows[n:]
        assert mine[0][:1] == [0] and all(a[-1] == b[0] for a, b in zip(mine, mine[1:], strict=False))
        assert [t for i, w in enumerate(mine) for t in (w if i == 0 else w[1:])] == ids
    assert windows == []


def test_chapter_names_and_chatml():
    assert bd.chapter_name(kjv.BOOK_BY_OSIS["Ps"], 23) == "Psalm 23"
    assert bd.chapter_name(kjv.BOOK_BY_OSIS["Jude"], 1) == "Jude"
    doc = bd.chapter_document(fake_verses("Gen", 1, 2))
    assert doc.startswith("Genesis 1\n\n1 Verse 1 of Genesis 1") and "\n2 Verse 2" in doc
    assert bd.chatml("Genesis 1", "x") == "<|im_start|>user\nGenesis 1<|im_end|>\n<|im_start|>assistant\nx<|im_end|>\n"


@pytest.fixture(scope="module")
def corpus():
    return bd.split(kjv.read_verses())


@needs_kjv
def test_no_held_out_chapter_reaches_training(corpus):
    train, held = corpus
    assert len(train) + len(held) == 1189 and [f"{c[0].book.osis}.{c[0].chapter}" for c in held] == HELD_OUT
    docs = list(bd.chat_documents(train, seed=1))
    assert docs == list(bd.chat_documents(train, seed=1))  # a pure function of (verses, seed)
    text = "\n".join(docs)
    names = {bd.chapter_name(c[0].book, c[0].chapter) for c in held}
    cited = set(re.findall(r"\(((?:\d )?[A-Z][a-z]+(?: of [A-Z][a-z]+)? \d+):\d+\)", text))  # theme citations
    assert cited and not cited & {f"{c[0].book.name} {c[0].chapter}" for c in held}
    headings = set(re.findall(r"^((?:\d )?[A-Z][a-z]+(?: of [A-Z][a-z]+)? \d+)\n\n1 ", text, re.M))
    assert len(headings) == len(train) - 5 and not headings & names  # 5 one-chapter books have no number
    asked = set(re.findall(r"<\|im_start\|>user\n[^\n<]*?((?:\d )?[A-Z][a-z]+(?: of [A-Z][a-z]+)? \d+):\d", text))
    assert asked and not asked & names


@needs_kjv
def test_tokenizer_files_render_chatml_like_transformers(corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    from ekmesh.infer.tokenizer import Tokenizer

    train, _ = corpus
    tok = bd.train_tokenizer(train[:40])
    bd.write_tokenizer_files(tok, tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 0]}')
    ours = Tokenizer.from_dir(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "Recite Psalm 23"}]
    text = ours.apply_chat_template(msgs, add_generation_prompt=True)
    assert text == theirs.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nRecite Psalm 23<|im_end|>\n<|im_start|>assistant\n"
    ids = ours.encode_chat(msgs, add_generation_prompt=True)
    assert list(ids) == list(theirs.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"])
    assert ids[0] == 1 and 2 in ids
    assert theirs.eos_token == "<|im_end|>" and theirs.eos_token_id == 2
    assert set(ours.stop_ids) == {0, 2}
    sample = "In the beginning God created the heaven and the earth."
    assert tok.decode(tok.encode(sample).ids) == sample
