"""Log-probabilities in OpenAI's two answer shapes, from the (token id, log-prob, alternatives) of each token.

- ``/v1/completions`` (the legacy shape, what lm-evaluation-harness reads): ``{"tokens", "token_logprobs",
  "top_logprobs", "text_offset"}``, one entry per token; with ``echo`` the prompt's tokens come first, the first of
  them with ``null`` log-prob and alternatives (nothing precedes it). ``top_logprobs[i]`` maps token strings to
  log-probs, most likely first; ``text_offset[i]`` is where token i's first character is in the choice's ``text``.
- ``/v1/chat/completions``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
  "bytes"}]}], "refusal": null}``.

What the numbers are: the model's own distribution at temperature 1 and before top-k / top-p, whatever the request
samples with: the fp32 log-softmax of the target's logits at the token's position (``infer.generate.
token_logprobs``; a token accepted from a draft has its verification forward's logits). The same numbers whatever the
speculative mode; greedy tokens are the most likely ones.

Token strings: a token's own text (its id decoded alone, special tokens included). A token that is only part of a
UTF-8 character is written ``bytes:\\xe2\\x80`` (OpenAI's convention), with its exact ``bytes`` (from the
vocabulary's byte-level or ``<0xNN>`` string), so the bytes of consecutive tokens join into the text. A model
without a tokenizer has ``token_id:N`` strings and no bytes. Nothing here imports torch.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ekmesh.infer.tokenizer import Tokenizer

# (token id, its log-prob (None: a prompt's first token), the most likely (id, log-prob) at its position (None: ditto))
Entry = tuple[int, float | None, Sequence[tuple[int, float]] | None]

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte -> the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    for extra, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + extra)
    return {c: b for b, c in chars.items()}


_BYTE_LEVEL = _byte_level_alphabet()


class TokenTexts:
    """Each token's string and exact bytes (module docstring), remembered per id for one answer."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._known: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token: int) -> tuple[str, bytes]:
        got = self._known.get(token)
        if got is None:
            got = self._known[token] = self._of(token)
        return got

    def _of(self, token: int) -> tuple[str, bytes]:
        tok = self.tokenizer
        if tok is None:
            return f"token_id:{token}", b""
        text = tok.decode([token], skip_special_tokens=False)
        piece = tok.id_to_token(token) or ""
        if piece.startswith("\u2581") and not text.startswith(" "):
            text = " " + text  # a Metaspace decoder strips the space a sequence starts with; this token has one
        if "\ufffd" not in text:
            return text, text.encode()
        byte = _BYTE_TOKEN.fullmatch(piece)
        if byte:
            raw = bytes([int(byte[1], 16)])
        elif piece and all(c in _BYTE_LEVEL for c in piece):
            raw = bytes(_BYTE_LEVEL[c] for c in piece)
        else:
            raw = text.encode()
        try:
            return raw.decode(), raw  # (a token whose text is U+FFFD itself)
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


class CompletionLogprobs:
    """One choice's ``/v1/completions`` log-probs, built in pieces (each chunk of a stream carries its own tokens):
    ``text_offset`` goes on counting characters from one piece to the next."""

    def __init__(self, texts: TokenTexts) -> None:
        self.texts = texts
        self.offset = 0
        self._chars = codecs.getincrementaldecoder("utf-8")("replace")  # bytes -> the characters they complete

    def block(self, entries: Sequence[Entry]) -> dict[str, Any]:
        tokens, values, tops, offsets = [], [], [], []
        for token, logprob, top in entries:
            text, raw = self.texts(token)
            offsets.append(self.offset)
            self.offset += len(self._chars.decode(raw))
            tokens.append(text)
            values.append(logprob)
            tops.append(None if top is None else {self.texts(t)[0]: v for t, v in top})
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(texts: TokenTexts, entries: Sequence[Entry]) -> dict[str, Any]:
    """``/v1/chat/completions`` log-probs of ``entries`` (generated tokens: each has its log-prob)."""
    def one(token: int, logprob: float | None) -> dict[str, Any]:
        text, raw = texts(token)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**one(token, logprob), "top_logprobs": [one(t, v) for t, v in top or ()]}
                        for token, logprob, top in entries], "refusal": None}
