"""Training data for the built-in model: the held-out split, chat-shaped documents, the tokenizer, token arrays.

Role: turn the KJV verses (``tools/kjv.py``) into what ``tools/train_builtin.py`` trains on, on a CPU and with no
torch: a byte-level BPE tokenizer with ChatML special tokens and chat template, and uint16 token streams for
training and held-out evaluation. It does not train or evaluate a model.

Invariants:
- The held-out split is whole chapters chosen by a salted BLAKE2b hash of ``"Book.chapter"`` (~2% of verses), so
  it depends on nothing but the reference; no held-out verse appears in any training document (plain or chat),
  in the tokenizer's training text, or among the theme answers.
- ``heldout_windows`` defines the held-out loss: each held-out chapter, rendered by ``chapter_document`` and
  wrapped in ``<|endoftext|>``, is cut into windows of at most ``seq_len + 1`` tokens that overlap by one, so
  every token after a chapter's first is predicted exactly once; the loss is the mean cross-entropy over all of
  them. A test recomputing it from the shipped weights must use this function.
- Everything is a pure function of (verses, seed): the same inputs give byte-identical outputs.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from tools.kjv import Book, Verse

EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (EOT, IM_START, IM_END)  # ids 0, 1, 2
VOCAB_SIZE = 4096
HELDOUT_SALT = "kjv-heldout"
HELDOUT_PER_MILLE = 20

# The same template as Qwen's ChatML, without tools or reasoning: the model knows no system prompt of its own.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

THEMES = (
    "light darkness water fire bread wine love faith hope mercy grace peace truth wisdom understanding "
    "knowledge fear joy sorrow sin death life heaven earth sea mountain river tree garden vine fruit seed "
    "harvest shepherd sheep lamb lion eagle dove king kingdom priest prophet servant law covenant temple altar "
    "sacrifice blood spirit soul heart prayer praise glory righteousness judgment salvation forgiveness "
    "strength war sword battle enemy city gate house family father mother son daughter brother child woman "
    "widow stranger poor rich gold silver famine rain wind storm star sun moon night morning day word voice "
    "name angel devil shield rock path way door bed"
).split()
NAMES = (
    "Adam Eve Cain Abel Noah Abraham Sarah Isaac Rebekah Jacob Rachel Joseph Moses Aaron Pharaoh Joshua Gideon "
    "Samson Ruth Samuel Saul David Goliath Solomon Elijah Elisha Isaiah Jeremiah Daniel Jonah Esther Job Jesus "
    "Mary Peter John Paul Judas Pilate Herod Jerusalem Egypt Babylon Israel Zion Bethlehem Galilee Jordan"
).split()


def is_held_out(book: Book, chapter: int) -> bool:
    """Whether a chapter belongs to the held-out split (deterministic; ~2% of chapters)."""
    digest = hashlib.blake2b(f"{HELDOUT_SALT}:{book.osis}.{chapter}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 1000 < HELDOUT_PER_MILLE


def chapters(verses: Sequence[Verse]) -> list[list[Verse]]:
    """The verses grouped by chapter, in order."""
    out: list[list[Verse]] = []
    for v in verses:
        if v.verse == 1:
            out.append([])
        out[-1].append(v)
    return out


def split(verses: Sequence[Verse]) -> tuple[list[list[Verse]], list[list[Verse]]]:
    """(training chapters, held-out chapters)."""
    train, held = [], []
    for ch in chapters(verses):
        (held if is_held_out(ch[0].book, ch[0].chapter) else train).append(ch)
    return train, held


def chapter_name(book: Book, chapter: int) -> str:
    """"Genesis 1", "Psalm 23", "Jude" (a one-chapter book is named alone)."""
    name = "Psalm" if book.osis == "Ps" else book.name
    return name if book.chapters == 1 else f"{name} {chapter}"


def numbered(verses: Sequence[Verse]) -> str:
    return "\n".join(f"{v.verse} {v.text}" for v in verses)


def chapter_document(chapter: Sequence[Verse]) -> str:
    """A chapter as plain text: its name, a blank line, then one numbered verse a line."""
    return f"{chapter_name(chapter[0].book, chapter[0].chapter)}\n\n{numbered(chapter)}"


def chatml(user: str, assistant: str) -> str:
    """One exchange as the chat template renders it, followed by the assistant's end token."""
    return f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n{assistant}{IM_END}\n"


_CHAPTER_ASKS = ("{c}", "{c}", "Recite {c}.", "Read me {c}.", "Please recite {c}", "What does {c} say?",
                 "{c}, please.", "Show me {c}")
_PASSAGE_ASKS = ("{r}", "Recite {r}.", "What does {r} say?", "Quote {r}", "Read {r}")
_THEME_ASKS = ("Tell me about {w}.", "What does the Bible say about {w}?", "{w}", "Give me verses about {w}.",
               "Tell me about {w}", "Find verses on {w}.")
_NAME_ASKS = ("Who was {w}?", "Tell me about {w}.", "{w}", "What does the Bible say about {w}?")
_CONTINUE_ASKS = ("Continue: {t}", "Continue: {t}", "Finish this verse: {t}", "Complete: {t}")


def _ref(verses: Sequence[Verse]) -> str:
    first, last = verses[0], verses[-1]
    name = chapter_name(first.book, first.chapter)
    if first.book.chapters == 1:
        name = f"{name} 1"
    return f"{name}:{first.verse}" + (f"-{last.verse}" if last.verse != first.verse else "")


def _theme_index(train: Sequence[Sequence[Verse]]) -> dict[str, list[Verse]]:
    """Theme word or name -> the training verses that contain it (names case-sensitively), in canonical order."""
    index: dict[str, list[Verse]] = {w: [] for w in THEMES + NAMES}
    names, themes = set(NAMES), set(THEMES)
    for ch in train:
        for v in ch:
            words = re.findall(r"[A-Za-z]+", v.text)
            keys = {w for w in words if w in names} | {w.lower() for w in words if w.lower() in themes}
            for key in sorted(keys):
                index[key].append(v)
    return {w: vs for w, vs in index.items() if len(vs) >= 3}


def chat_documents(train: Sequence[Sequence[Verse]], seed: int) -> Iterator[str]:
    """One round of training documents: every chapter plain and as a chat answer, plus passages, themes, names and
    continuations, all from the training chapters; the choices of templates and verses depend on ``seed``."""
    rng = random.Random(seed)
    themes = _theme_index(train)
    docs: list[str] = []
    for ch in train:
        docs.append(chapter_document(ch))
        ask = rng.choice(_CHAPTER_ASKS).format(c=chapter_name(ch[0].book, ch[0].chapter))
        docs.append(chatml(ask, chapter_document(ch)))
        for _ in range(max(1, len(ch) // 6)):  # passages and continuations, about one per six verses
            a = rng.randrange(len(ch))
            b = min(len(ch), a + rng.choice((1, 1, 2, 3, 4, 6)))
            span = ch[a:b]
            answer = span[0].text if len(span) == 1 else numbered(span)
            docs.append(chatml(rng.choice(_PASSAGE_ASKS).format(r=_ref(span)), answer))
            words = ch[a].text.split()
            if len(words) >= 6:
                cut = rng.randint(3, min(10, len(words) - 2))
                rest = " ".join([" ".join(words[cut:])] + [v.text for v in ch[a + 1 : a + rng.randint(1, 3)]])
                docs.append(chatml(rng.choice(_CONTINUE_ASKS).format(t=" ".join(words[:cut])), rest))
    for w, vs in sorted(themes.items()):
        asks = _NAME_ASKS if w in NAMES else _THEME_ASKS
        for _ in range(12):
            picked = sorted(rng.sample(range(len(vs)), min(len(vs), rng.randint(2, 5))))
            answer = "\n".join(f"{vs[i].text} ({vs[i].ref})" for i in picked)
            docs.append(chatml(rng.choice(asks).format(w=w), answer))
    rng.shuffle(docs)
    yield from docs


def train_tokenizer(train: Sequence[Sequence[Verse]]):  # -> tokenizers.Tokenizer
    """A byte-level BPE (``VOCAB_SIZE`` tokens, special tokens first) trained on one round of training documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # The special tokens are matched whole at encode time; the merges need not learn their pieces.
    texts = (d.replace(IM_START, "").replace(IM_END, "\n") for d in chat_documents(train, seed=0))
    tok.train_from_iterator(texts, trainer=trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    return tok


def write_tokenizer_files(tok, directory: Path) -> None:
    """tokenizer.json + tokenizer_config.json (ChatML template, eos ``<|im_end|>``) for transformers and ekmesh."""
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    config = {"added_tokens_decoder": added, "bos_token": None, "eos_token": IM_END, "pad_token": EOT,
              "unk_token": None, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
              "model_max_length": 2048, "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def encode_stream(tok, docs: Iterator[str]) -> list[int]:
    """Documents encoded and concatenated, each followed by ``<|endoftext|>``."""
    ids: list[int] = []
    for enc in tok.encode_batch(list(docs), add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(0)
    return ids


def heldout_windows(tok, held: Sequence[Sequence[Verse]], seq_len: int = 512) -> list[list[int]]:
    """The held-out evaluation windows (see the module docstring for the definition of the held-out loss)."""
    windows = []
    for ch in held:
        ids = [0, *tok.encode(chapter_document(ch), add_special_tokens=False).ids, 0]
        for start in range(0, len(ids) - 1, seq_len):
            windows.append(ids[start : start + seq_len + 1])
    return windows
