"""Tokenizer and chat template for a checkpoint directory, behaving like transformers' tokenizer for it.

Role: read a Hugging Face checkpoint's tokenizer files and give generation code four things: text -> ids,
ids -> text, a conversation -> prompt text/ids through the checkpoint's chat template, and the set of ids that
end a generation. Built on ``tokenizers`` and ``jinja2`` only; transformers is never imported (the tests
compare against it). This module does not sample, batch, pad or truncate.

What is read from the directory (all optional except ``tokenizer.json``):
    tokenizer.json          the ``tokenizers`` pipeline (normalizer, pre-tokenizer, model, post-processor,
                            decoder, added tokens). Its post-processor alone decides what
                            ``add_special_tokens=True`` adds: like transformers v5, ``add_bos_token`` /
                            ``add_eos_token`` in tokenizer_config.json are ignored when tokenizer.json exists.
    tokenizer_config.json   named special tokens (strings or ``{"content": ...}`` dicts), ``added_tokens_decoder``,
                            ``chat_template`` (a string, or a list of ``{name, template}``),
                            ``clean_up_tokenization_spaces``, ``split_special_tokens``.
    special_tokens_map.json legacy; overrides the named tokens when tokenizer_config has no added_tokens_decoder.
    chat_template.jinja, chat_templates/<name>.jinja
                            newer layout; when present they replace tokenizer_config's chat_template.
    generation_config.json  ``eos_token_id`` (int or list): the ids that end a generation.
    config.json             fallback for ``eos_token_id`` when generation_config.json has none.

Invariants:
- ``encode``/``decode``/``apply_chat_template``/``encode_chat`` give what transformers'
  ``AutoTokenizer.from_pretrained(dir)`` gives for the same directory (``encode_chat`` equals its
  ``apply_chat_template(tokenize=True)["input_ids"]``); templates render in the same sandbox with the same
  globals, filters and variables.
- ``stop_ids`` = generation_config's ``eos_token_id`` (else config.json's) ∪ the tokenizer's eos id.
- ``StreamDecoder`` output, concatenated, equals ``decode`` of all pushed ids, and no chunk ends in a partial
  UTF-8 character (it is held until complete, or until ``flush``).
- Every failure is a ``TokenizerError`` (tokenizer files, template) or ``ConfigError`` (generation config), raised
  from the underlying exception.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ekmesh.core.errors import ConfigError, TokenizerError

# transformers' SPECIAL_TOKENS_ATTRIBUTES: the named tokens a chat template sees as variables.
SPECIAL_TOKEN_NAMES = tuple(f"{n}_token" for n in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"))
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
# transformers' aliases for a message's reasoning; templates read the first (gpt-oss templates read "thinking").
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# What a template can raise while rendering (undefined names, sandbox refusals, bad operand types, ...).
_RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError)


def _read_json(path: Path, what: type[Exception] = TokenizerError) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if the file does not exist."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise what(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise what(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _added_token(value: Any, where: str) -> tokenizers.AddedToken | None:
    """A token given as a string (special) or as a serialized AddedToken dict (``{"content": ..., ...}``)."""
    if value is None:
        return None
    if isinstance(value, str):
        return tokenizers.AddedToken(value, special=True)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        try:
            return tokenizers.AddedToken(**{k: value[k] for k in _ADDED_TOKEN_FIELDS if k in value})
        except TypeError as exc:
            raise TokenizerError(f"{where} has a field of the wrong type: {exc}") from exc
    raise TokenizerError(f"{where} must be a string or an object with a 'content' string, got {value!r}")


def _token_ids(value: Any, where: str) -> list[int]:
    """``eos_token_id`` as a list: an int, a list of ints, or null."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise ConfigError(f"{where} must be a token id or a list of token ids, got {value!r}")
    return list(items)


def eos_ids_in(root: Path) -> list[int]:
    """The ids that end a generation: generation_config.json's ``eos_token_id``, else config.json's (an int, a
    list, or absent). Malformed values are a ``ConfigError``. Used with or without a tokenizer."""
    generation = _read_json(root / "generation_config.json", ConfigError) or {}
    if "eos_token_id" in generation:
        return _token_ids(generation["eos_token_id"], f"eos_token_id in {root / 'generation_config.json'}")
    model_config = _read_json(root / "config.json", ConfigError) or {}
    return _token_ids(model_config.get("eos_token_id"), f"eos_token_id in {root / 'config.json'}")


def _load_chat_templates(path: Path, config: dict[str, Any]) -> str | dict[str, str] | None:
    """The chat template(s), with transformers' precedence: .jinja files replace tokenizer_config's entry."""
    files = {}
    default_file = path / "chat_template.jinja"
    named_files = (
        sorted((path / "chat_templates").glob("*.jinja")) if (path / "chat_templates").is_dir() else []
    )
    try:
        if default_file.is_file():
            files["default"] = default_file.read_text(encoding="utf-8")
        for file in named_files:
            files[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"cannot read a chat template file in {path}: {exc}") from exc
    if files:
        return files["default"] if list(files) == ["default"] else files

    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
        for t in template
    ):
        return {t["name"]: t["template"] for t in template}
    if isinstance(template, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in template.items()
    ):
        return dict(template)
    raise TokenizerError(
        f"chat_template in {path / 'tokenizer_config.json'} must be a string or a list of {{name, template}}"
    )


def _clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (only applied to non-BPE models whose config asks for it)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(before, after)
    return text


class Tokenizer:
    """A checkpoint's tokenizer and chat template. Build it with ``Tokenizer.from_dir``."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: dict[str, str],
        chat_template: str | dict[str, str] | None,
        generation_eos_ids: Sequence[int],
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        self._backend = backend
        self.special_tokens = dict(special_tokens)  # name -> token string, as chat templates see them
        self.chat_template = chat_template
        self._clean_up = clean_up_tokenization_spaces
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)  # = len(transformers tokenizer)
        self.bos_token: str | None = special_tokens.get("bos_token")
        self.eos_token: str | None = special_tokens.get("eos_token")
        self.bos_token_id: int | None = self.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id: int | None = self.token_to_id(self.eos_token) if self.eos_token else None
        stop = set(generation_eos_ids)
        if self.eos_token_id is not None:
            stop.add(self.eos_token_id)
        self.stop_ids: frozenset[int] = frozenset(stop)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load the tokenizer of the checkpoint directory ``path`` (see the module docstring for the files)."""
        root = Path(path)
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"no tokenizer.json in {root}")
        try:
            backend = tokenizers.Tokenizer.from_str(tokenizer_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"cannot read {tokenizer_file}: {exc}") from exc
        except Exception as exc:  # tokenizers raises a bare Exception for every malformed file
            raise TokenizerError(f"invalid {tokenizer_file}: {exc}") from exc
        # transformers' __call__ never truncates or pads unless asked to; neither do we.
        backend.no_truncation()
        backend.no_padding()

        config = _read_json(root / "tokenizer_config.json") or {}
        named: dict[str, Any] = {name: config.get(name) for name in SPECIAL_TOKEN_NAMES}
        if "added_tokens_decoder" not in config:
            legacy = _read_json(root / "special_tokens_map.json") or {}
            named.update({name: legacy[name] for name in SPECIAL_TOKEN_NAMES if name in legacy})
        special_tokens = {}
        for name, value in named.items():
            token = _added_token(value, f"{name} in {root}")
            if token is not None:
                special_tokens[name] = token

        # transformers re-adds tokenizer_config's added_tokens_decoder, then adds any named special token the
        # backend does not know as an added token, so they match as whole tokens and decode as special.
        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise TokenizerError(f"added_tokens_decoder in {root} must be an object")
        try:
            entries = sorted(decoder.items(), key=lambda item: int(item[0]))
        except ValueError as exc:
            raise TokenizerError(f"added_tokens_decoder in {root} has a non-integer id: {exc}") from exc
        to_add = [t for k, v in entries if (t := _added_token(v, f"added_tokens_decoder[{k}] in {root}"))]
        known = {t.content for t in to_add} | {t.content for t in backend.get_added_tokens_decoder().values()}
        for token in special_tokens.values():
            if token.content not in known:
                to_add.append(tokenizers.AddedToken(token.content, special=True))
                known.add(token.content)
        if to_add:
            backend.add_tokens(to_add)
        if config.get("split_special_tokens"):
            backend.encode_special_tokens = True

        eos_ids = eos_ids_in(root)
        is_bpe = type(backend.model).__name__ == "BPE"
        return cls(
            backend,
            {name: token.content for name, token in special_tokens.items()},
            _load_chat_templates(root, config),
            eos_ids,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces")) and not is_bpe,
        )

    # --- text <-> ids ----------------------------------------------------------------------------------------

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string, or None when the vocabulary has no such token."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary's string for one id (e.g. byte-level ``Ġthe``), or None outside the vocabulary."""
        return self._backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies tokenizer.json's post-processor (e.g. BOS)."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a string, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``. Ids outside the vocabulary are dropped, as the tokenizers library does."""
        text = self._decode_raw(ids, skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def _decode_raw(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        try:
            return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        except (TypeError, OverflowError) as exc:
            raise TokenizerError(
                f"cannot decode {list(ids)[:8]!r}: token ids must be non-negative ints"
            ) from exc

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A fresh incremental decoder for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens)

    # --- chat ------------------------------------------------------------------------------------------------

    def _select_template(self, chat_template: str | None, has_tools: bool) -> str:
        """transformers' ``get_chat_template``: a named template, the "tool_use" one when tools are given, or
        "default"; ``chat_template`` may name a template or be one."""
        templates = self.chat_template
        if isinstance(templates, dict):
            if chat_template is not None and chat_template in templates:
                return templates[chat_template]
            if chat_template is not None:
                return chat_template
            if has_tools and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise TokenizerError(
                f"the tokenizer has several chat templates and none is named 'default': {sorted(templates)}"
            )
        if chat_template is not None:
            return chat_template
        if templates is None:
            raise TokenizerError(
                "the tokenizer has no chat template (no chat_template in tokenizer_config.json, "
                "no chat_template.jinja)"
            )
        return templates

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` with the checkpoint's chat template, exactly as transformers renders them.

        ``kwargs`` become template variables (``tools``, ``documents``, ``enable_thinking``, ...) and override
        the special-token variables. ``tools`` must be JSON-schema dicts (transformers also accepts Python
        functions). Messages' None-valued keys are dropped and reasoning is aliased, as transformers does.
        """
        template = self._select_template(chat_template, kwargs.get("tools") is not None)
        if not messages:
            raise TokenizerError("cannot apply the chat template to an empty conversation")
        chat = []
        for message in messages:
            if not isinstance(message, Mapping):
                raise TokenizerError(f"chat messages must be dicts, got {message!r}")
            chat.append({k: v for k, v in message.items() if v is not None})
        chat = _alias_reasoning_fields(_plain_template_data(chat))
        tools = kwargs.pop("tools", None)
        documents = kwargs.pop("documents", None)
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise TokenizerError("tools must be JSON-schema dicts")
        if documents is not None and not all(isinstance(d, Mapping) for d in documents):
            raise TokenizerError("documents must be dicts with 'title' and 'text' keys")
        variables = {**self.special_tokens, **_plain_template_data(kwargs)}
        compiled = _compile_template(template)
        try:
            return compiled.render(
                messages=chat,
                tools=_plain_template_data(tools),
                documents=_plain_template_data(documents),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except _RENDER_ERRORS as exc:
            raise TokenizerError(f"chat template failed to render: {type(exc).__name__}: {exc}") from exc

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Prompt ids of a conversation: transformers' ``apply_chat_template(tokenize=True)`` input_ids."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))


class StreamDecoder:
    """Turns generated ids, pushed one at a time, into text chunks that never split a UTF-8 character.

    Each push decodes a short window: the ids of the last emitted chunk (as context, so decoders that strip or
    merge at sequence starts behave as in a full decode) plus the ids not yet emitted. The new text is the part
    of the window's text past the context's text; it is held while it ends in U+FFFD (an incomplete byte
    sequence). Concatenated chunks equal ``Tokenizer.decode`` of all ids, without the BPE-irrelevant
    ``clean_up_tokenization_spaces`` pass.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._window: list[int] = []  # ids of the last emitted chunk, then the pending ids
        self._emitted = 0  # ids in the window that belong to the last emitted chunk

    def _pending_text(self) -> str:
        context = self._tokenizer._decode_raw(self._window[: self._emitted], self._skip)
        text = self._tokenizer._decode_raw(self._window, self._skip)
        return text[len(context) :] if len(text) > len(context) else ""

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is incomplete or nothing is new)."""
        self._window.append(token_id)
        new = self._pending_text()
        if not new or new.endswith("\ufffd"):
            return ""
        self._window = self._window[self._emitted :]
        self._emitted = len(self._window)
        return new

    def flush(self) -> str:
        """Return whatever is still held (an incomplete character decodes as U+FFFD) and reset."""
        new = self._pending_text()
        self._window = []
        self._emitted = 0
        return new


# --- template rendering, as transformers.utils.chat_template_utils does it --------------------------------------


def _plain_template_data(value: Any) -> Any:
    """Rebuild template inputs out of plain JSON types (the sandbox cannot vet arbitrary objects' methods);
    anything else becomes a placeholder naming its type, like transformers."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_template_data(k): _plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_template_data(v) for v in value)
    if type(value).__module__ == "numpy" and type(value).__name__ != "ndarray" and hasattr(value, "item"):
        return _plain_template_data(value.item())  # numpy scalars; np.bool_(False) must stay falsy
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning_fields(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill ``reasoning_content`` (and ``thinking``, read by gpt-oss templates) from any of the reasoning names."""
    aliased = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore-prefixed attributes, like transformers' sandbox."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's Namespace signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


class _TemplateDict:
    """``dict(...)`` in templates, without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template error: {message}")


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; transformers' (and so every chat template's) does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=32)
def _compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(f"chat template has a syntax error on line {exc.lineno}: {exc.message}") from exc
