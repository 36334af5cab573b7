"""Tests for ekmesh.infer.tokenizer against transformers' tokenizer loaded from the same directory.

Every fixture is built offline in tmp_path: a byte-level BPE trained with the tokenizers library, ChatML special
tokens, a Qwen-style tokenizer_config.json and generation_config.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from ekmesh.core.errors import ConfigError, TokenizerError
from ekmesh.infer.tokenizer import Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I'm fine, thanks.",
    "Peers join the mesh, shards load, and experts answer queries.",
    "Café, naïve, résumé, façade: accents are part of the text.",
    "Mixture-of-Experts models route each token to a few experts.",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12345 and 3.14159 appear too.",
] * 3

# Qwen2.5's split regex
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2.5-style ChatML template, with Qwen3's reasoning/enable_thinking handling and a role check.
QWEN_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions.\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(tool_turns=0) %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant', 'tool'] %}
        {{- raise_exception('Unknown role: ' + message.role) }}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.reasoning_content is defined and loop.last %}
            {{- '<think>\\n' + message.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}
        {%- endif %}
        {%- if message.content is defined %}
            {{- message.content }}
        {%- endif %}
        {%- if message.tool_calls is defined %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
                {{- tool_call.arguments | tojson }}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- set ns.tool_turns = ns.tool_turns + 1 %}
        {%- if loop.index0 == 0 or messages[loop.index0 - 1].role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello world!"}],
    [
        {"role": "system", "content": "You answer in French. Réponds en français 🇫🇷."},
        {"role": "user", "content": "How are you today?"},
        {"role": "assistant", "content": "Très bien, merci ! 😀"},
        {"role": "user", "content": "And the experts?"},
    ],
    [
        {"role": "user", "content": "What is 2+2?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": "<é>"}}}
            ],
        },
        {"role": "tool", "content": "4"},
        {"role": "tool", "content": "four"},
        {"role": "assistant", "content": "It is 4.", "reasoning": "2 plus 2 is 4"},
    ],
]


def _train_backend() -> BackendTokenizer:
    backend = BackendTokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer)
    backend.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    return backend


def _added_tokens_decoder(backend: BackendTokenizer) -> dict[str, dict[str, Any]]:
    fields = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    return {
        str(i): {f: getattr(t, f) for f in fields}
        for i, t in sorted(backend.get_added_tokens_decoder().items())
    }


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


@pytest.fixture(scope="module")
def backend() -> BackendTokenizer:
    return _train_backend()


@pytest.fixture
def qwen_dir(tmp_path: Path, backend: BackendTokenizer) -> Path:
    backend.save(str(tmp_path / "tokenizer.json"))
    _write_json(
        tmp_path / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": _added_tokens_decoder(backend),
            "bos_token": None,
            "chat_template": QWEN_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 32768,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": None,
        },
    )
    _write_json(
        tmp_path / "generation_config.json",
        {"bos_token_id": 0, "do_sample": True, "eos_token_id": [2, 0], "pad_token_id": 0, "temperature": 0.7},
    )
    return tmp_path


def _hf(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _hf_ids(hf: Any, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, **kwargs)
    # transformers v5 returns a BatchEncoding by default (return_dict=True)
    return list(out["input_ids"])


# --- chat template ----------------------------------------------------------------------------------------------


def test_chat_template_matches_transformers(qwen_dir: Path) -> None:
    ours, hf = Tokenizer.from_dir(qwen_dir), _hf(qwen_dir)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected
            assert ours.encode_chat(messages, add_generation_prompt=gen) == _hf_ids(
                hf, messages, add_generation_prompt=gen
            )
    first = ours.apply_chat_template(CONVERSATIONS[0])
    assert first == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello world!<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = ours.encode_chat(CONVERSATIONS[0])
    assert ids[0] == ours.token_to_id("<|im_start|>") and ids.count(ours.token_to_id("<|im_end|>")) == 2
    # reasoning aliased to reasoning_content, tool-call arguments through tojson without ASCII escaping
    third = ours.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=False)
    assert "<think>\n2 plus 2 is 4\n</think>\n\nIt is 4." in third
    assert '{"name": "add", "arguments": {"a": 2, "b": "<é>"}}' in third


def test_chat_template_kwargs_tools_and_thinking(qwen_dir: Path) -> None:
    ours, hf = Tokenizer.from_dir(qwen_dir), _hf(qwen_dir)
    tools = [{"type": "function", "function": {"name": "add", "description": "Add ∑", "parameters": {}}}]
    messages = CONVERSATIONS[1]
    for kwargs in (
        {"tools": tools},
        {"enable_thinking": False},
        {"enable_thinking": True},
        {"documents": []},
    ):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        assert ours.apply_chat_template(messages, **kwargs) == expected, kwargs
        assert ours.encode_chat(messages, **kwargs) == _hf_ids(
            hf, messages, add_generation_prompt=True, **kwargs
        )
    assert ours.apply_chat_template(messages, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert '\n{"type": "function", "function": {"name": "add", "description": "Add ∑"' in (
        ours.apply_chat_template(messages, tools=tools)
    )


def test_raise_exception_in_template(qwen_dir: Path) -> None:
    ours = Tokenizer.from_dir(qwen_dir)
    with pytest.raises(TokenizerError) as info:
        ours.apply_chat_template([{"role": "wizard", "content": "hi"}])
    assert str(info.value) == "chat template error: Unknown role: wizard"


def test_template_errors(qwen_dir: Path) -> None:
    ours = Tokenizer.from_dir(qwen_dir)
    with pytest.raises(TokenizerError, match=r"^chat template has a syntax error on line 1: "):
        ours.apply_chat_template(CONVERSATIONS[0], chat_template="{% if %}")
    with pytest.raises(TokenizerError, match=r"^chat template failed to render: TypeError: "):
        ours.apply_chat_template([{"role": "user", "content": 3}])  # str + int inside the template
    with pytest.raises(TokenizerError, match="empty conversation"):
        ours.apply_chat_template([])
    with pytest.raises(TokenizerError, match="must be dicts"):
        ours.apply_chat_template(["hello"])  # type: ignore[list-item]
    with pytest.raises(TokenizerError, match="JSON-schema dicts"):
        ours.apply_chat_template(CONVERSATIONS[0], tools=[len])
    # the sandbox refuses attribute escapes, as in transformers
    with pytest.raises(TokenizerError, match="SecurityError"):
        ours.apply_chat_template(CONVERSATIONS[0], chat_template="{% set ns = namespace(_x=1) %}")


def test_no_chat_template(qwen_dir: Path) -> None:
    config = json.loads((qwen_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    _write_json(qwen_dir / "tokenizer_config.json", config)
    ours = Tokenizer.from_dir(qwen_dir)
    assert ours.chat_template is None
    with pytest.raises(TokenizerError, match="has no chat template"):
        ours.apply_chat_template(CONVERSATIONS[0])
    with pytest.raises(TokenizerError, match="has no chat template"):
        ours.encode_chat(CONVERSATIONS[0])


def test_jinja_file_takes_precedence_and_named_templates(qwen_dir: Path) -> None:
    jinja = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ eos_token }}{{ pad_token }}"
    (qwen_dir / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    ours, hf = Tokenizer.from_dir(qwen_dir), _hf(qwen_dir)
    expected = "[user]Hello world!<|im_end|><|endoftext|>"
    assert ours.apply_chat_template(CONVERSATIONS[0]) == expected
    assert hf.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True) == expected

    (qwen_dir / "chat_template.jinja").unlink()
    config = json.loads((qwen_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "default", "template": "D{{ messages | length }}{{ tools is none }}"},
        {"name": "tool_use", "template": "T{{ tools | tojson(indent=2) }}"},
    ]
    _write_json(qwen_dir / "tokenizer_config.json", config)
    ours, hf = Tokenizer.from_dir(qwen_dir), _hf(qwen_dir)
    tools = [{"name": "f", "x": [1, "ü"]}]
    assert ours.apply_chat_template(CONVERSATIONS[1]) == "D4True"
    assert ours.apply_chat_template(CONVERSATIONS[1], tools=tools) == hf.apply_chat_template(
        CONVERSATIONS[1], tools=tools, tokenize=False
    )
    assert ours.apply_chat_template(CONVERSATIONS[1], chat_template="tool_use", tools=None) == "Tnull"


def test_strftime_now_and_generation_tag(qwen_dir: Path) -> None:
    ours = Tokenizer.from_dir(qwen_dir)
    template = "{{ strftime_now('%Y-%m-%d') }}|{% generation %}{{ messages[0].content }}{% endgeneration %}"
    before = datetime.now().strftime("%Y-%m-%d")
    out = ours.apply_chat_template(CONVERSATIONS[0], chat_template=template)
    after = datetime.now().strftime("%Y-%m-%d")
    assert out in {f"{before}|Hello world!", f"{after}|Hello world!"}


# --- encode / decode --------------------------------------------------------------------------------------------

UNICODE_TEXTS = [
    "Hello world! How are you today?",
    "Café naïve résumé — déjà vu, Ærøskøbing, ß, İstanbul",
    "Emoji: 😀🎉👩‍👩‍👧 🇫🇷 and CJK 日本語テキスト, 한국어",
    "<|im_start|>user\nHi<|im_end|> <think>x</think> <|endoftext|>",
    "  leading spaces\n\n\ttabs and\r\nnewlines  ",
]


def test_encode_decode_match_transformers(qwen_dir: Path) -> None:
    ours, hf = Tokenizer.from_dir(qwen_dir), _hf(qwen_dir)
    assert ours.vocab_size == len(hf)
    for text in UNICODE_TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert ours.encode(text, add_special_tokens=True) == hf.encode(text, add_special_tokens=True), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (
                text
            )
        assert ours.decode(ids, skip_special_tokens=False) == text
    special = ours.encode(UNICODE_TEXTS[3])
    assert ours.decode(special) == "user\nHi <think>x</think> "  # specials skipped, <think> is not special
    assert ours.encode("") == []
    with pytest.raises(TokenizerError):
        ours.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TokenizerError):
        ours.decode([-1])


def test_special_tokens_and_stop_ids(qwen_dir: Path) -> None:
    ours, hf = Tokenizer.from_dir(qwen_dir), _hf(qwen_dir)
    assert (ours.bos_token, ours.bos_token_id) == (None, None) == (hf.bos_token, hf.bos_token_id)
    assert (ours.eos_token, ours.eos_token_id) == ("<|im_end|>", 2) == (hf.eos_token, hf.eos_token_id)
    assert (
        ours.special_tokens
        == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        == hf.special_tokens_map
    )
    assert ours.stop_ids == frozenset({0, 2})

    # no generation_config: config.json's eos_token_id, plus the tokenizer's eos
    (qwen_dir / "generation_config.json").unlink()
    _write_json(qwen_dir / "config.json", {"eos_token_id": 1, "model_type": "qwen2"})
    assert Tokenizer.from_dir(qwen_dir).stop_ids == frozenset({1, 2})
    (qwen_dir / "config.json").unlink()
    assert Tokenizer.from_dir(qwen_dir).stop_ids == frozenset({2})

    _write_json(qwen_dir / "generation_config.json", {"eos_token_id": "2"})
    with pytest.raises(ConfigError, match="eos_token_id"):
        Tokenizer.from_dir(qwen_dir)


def test_llama_style_bos_dict_tokens_and_missing_special(tmp_path: Path, backend: BackendTokenizer) -> None:
    """BOS from a TemplateProcessing post-processor, tokens given as dicts, an eos absent from tokenizer.json."""
    llama = BackendTokenizer.from_str(backend.to_str())
    llama.add_special_tokens([AddedToken("<|begin_of_text|>", special=True, normalized=False)])
    bos_id = llama.token_to_id("<|begin_of_text|>")
    llama.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A $B",
        special_tokens=[("<|begin_of_text|>", bos_id)],
    )
    llama.save(str(tmp_path / "tokenizer.json"))
    bos = {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": False, "normalized": False,
           "rstrip": False, "single_word": False, "special": True}  # fmt: skip
    _write_json(
        tmp_path / "tokenizer_config.json",
        {
            "add_bos_token": False,  # ignored when tokenizer.json exists, by transformers and by us
            "bos_token": bos,
            "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "special": True},
            "chat_template": "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}"
            "{% endfor %}",
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    ours, hf = Tokenizer.from_dir(tmp_path), _hf(tmp_path)
    assert (
        ours.vocab_size == len(hf) == llama.get_vocab_size() + 1
    )  # <|eot_id|> was added, as transformers does
    assert (
        (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id) == (bos_id, bos_id + 1)
    )
    assert ours.stop_ids == frozenset({bos_id + 1})
    text = "Café <|eot_id|> 😀"
    assert ours.encode(text, add_special_tokens=True) == hf.encode(text) == [bos_id, *ours.encode(text)]
    assert (
        ours.decode(ours.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True) == "Café  😀"
    )
    for messages in CONVERSATIONS[:2]:
        rendered = ours.apply_chat_template(messages, add_generation_prompt=False)
        assert rendered == hf.apply_chat_template(messages, tokenize=False)
        assert rendered.startswith("<|begin_of_text|><")
        assert ours.encode_chat(messages) == _hf_ids(hf, messages)

    # transformers v5 rejects a token dict without "__type"; ekmesh reads any {"content": ...} dict
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = {"content": "<|eot_id|>"}
    _write_json(tmp_path / "tokenizer_config.json", config)
    assert Tokenizer.from_dir(tmp_path).eos_token_id == bos_id + 1


def test_sentencepiece_style_unigram_byte_fallback(tmp_path: Path) -> None:
    """Llama-2/Mistral layout: Unigram with byte fallback, a Strip decoder, BOS from the post-processor,
    special tokens from the legacy special_tokens_map.json, clean_up_tokenization_spaces on a non-BPE model."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    words = ["▁hello", "▁world", "▁the", "▁mesh", "▁is", "▁it", "'s", "▁n't", "▁,", "▁.", "▁!"]
    vocab = [(p, 0.0) for p in pieces] + [("▁", -2.0)] + [(w, -1.0) for w in words]
    vocab += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyzHW,.!'é"]
    sp = BackendTokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    sp.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    sp.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    sp.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    sp.save(str(tmp_path / "tokenizer.json"))
    _write_json(
        tmp_path / "tokenizer_config.json",
        {"clean_up_tokenization_spaces": True, "tokenizer_class": "PreTrainedTokenizerFast", "legacy": True},
    )
    _write_json(
        tmp_path / "special_tokens_map.json",
        {"bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False}, "eos_token": "</s>", "unk_token": "<unk>"},
    )  # fmt: skip
    ours, hf = Tokenizer.from_dir(tmp_path), _hf(tmp_path)
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    assert ours.special_tokens == hf.special_tokens_map == {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"
    }  # fmt: skip
    assert ours.stop_ids == frozenset({2})
    for text in ["hello world", "it 's the mesh , is n't it ! 😀 ok", "héllo wörld — 日本 </s>"]:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert ours.encode(text, add_special_tokens=True) == hf.encode(text) == [1, *ids]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids), text
    ids = ours.encode("it 's the mesh , ok !")
    assert ours.decode(ids) == "it's the mesh, ok!"  # clean_up_tokenization applied: Unigram is not BPE

    text = "hello wörld 😀 日本"
    ids = ours.encode(text)
    stream = ours.stream_decoder()
    chunks = [stream.push(i) for i in ids] + [stream.flush()]
    assert not any("\ufffd" in c for c in chunks), chunks
    assert "".join(chunks) == text == ours.decode(ids)  # the Strip decoder's leading space is removed once


# --- streaming --------------------------------------------------------------------------------------------------


def test_stream_decoder_holds_partial_characters(qwen_dir: Path) -> None:
    ours = Tokenizer.from_dir(qwen_dir)
    text = "Zoë 😀👩‍👩‍👧 日本語 <|im_end|> ok 🇫🇷!"
    ids = ours.encode(text)
    # the fixture's BPE never saw these characters, so several of them are split over byte tokens
    assert sum("\ufffd" in ours.decode([i]) for i in ids) >= 8
    for skip in (True, False):
        stream = ours.stream_decoder(skip_special_tokens=skip)
        chunks = [stream.push(i) for i in ids]
        chunks.append(stream.flush())
        assert not any("\ufffd" in c for c in chunks), chunks
        assert "".join(chunks) == ours.decode(ids, skip_special_tokens=skip)
        assert sum(c == "" for c in chunks) >= 8  # held while characters were incomplete
    assert "".join(chunks) == text

    # a truncated character is released (as U+FFFD) only by flush, matching a full decode
    stream = ours.stream_decoder()
    emoji = ours.encode("😀")
    assert [stream.push(i) for i in emoji[:-1]] == [""] * (len(emoji) - 1)
    assert stream.flush() == ours.decode(emoji[:-1]) == "\ufffd"
    assert stream.flush() == ""
    assert "".join(stream.push(i) for i in ours.encode("ok")) == "ok"


# --- files ------------------------------------------------------------------------------------------------------


def test_missing_or_invalid_files(tmp_path: Path, qwen_dir: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError, match=f"no tokenizer.json in {empty}"):
        Tokenizer.from_dir(empty)
    (empty / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerError, match="invalid .*tokenizer.json"):
        Tokenizer.from_dir(empty)
    (qwen_dir / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="cannot read .*tokenizer_config.json"):
        Tokenizer.from_dir(qwen_dir)
    _write_json(qwen_dir / "tokenizer_config.json", {"eos_token": 5})
    with pytest.raises(TokenizerError, match="eos_token"):
        Tokenizer.from_dir(qwen_dir)
    _write_json(qwen_dir / "tokenizer_config.json", {"chat_template": 5})
    with pytest.raises(TokenizerError, match="chat_template"):
        Tokenizer.from_dir(qwen_dir)


def test_module_does_not_import_transformers() -> None:
    code = "import sys, ekmesh.infer.tokenizer; sys.exit('transformers' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, timeout=60, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
