"""Generation: seeded sampling is reproducible, filters behave, stops end generation, bad requests are refused."""

from __future__ import annotations

import pytest
import torch

from ekmesh.core.errors import ConfigError, GenerationError
from ekmesh.infer.generate import (
    Generator,
    SamplingParams,
    _StopStringFilter,
    pick_device,
    pick_dtype,
    sample_next,
)
from ekmesh.infer.loader import load_all
from tests.tiny_models import make_tiny

PROMPT = [5, 17, 33, 2, 71, 8]


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    path, _ = make_tiny("mixtral", tmp_path_factory.mktemp("gen") / "m")
    return Generator(*load_all(path)[1:])


def test_seeded_sampling_is_reproducible(gen):
    p = SamplingParams(max_tokens=24, temperature=1.5, seed=1234, stop_ids=frozenset())
    a = gen.generate(PROMPT, p).token_ids
    b = gen.generate(PROMPT, p).token_ids
    c = gen.generate(PROMPT, SamplingParams(max_tokens=24, temperature=1.5, seed=99, stop_ids=frozenset())).token_ids
    assert a == b and len(a) == 24
    assert a != c


def test_top_k_one_is_greedy(gen):
    greedy = gen.generate(PROMPT, SamplingParams(max_tokens=16, stop_ids=frozenset())).token_ids
    k1 = gen.generate(PROMPT, SamplingParams(max_tokens=16, temperature=3.0, top_k=1, seed=5,
                                             stop_ids=frozenset())).token_ids
    assert k1 == greedy


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, SamplingParams(temperature=1.0, top_p=0.7), g) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are never drawn
    draws = {sample_next(logits, SamplingParams(temperature=1.0, top_p=0.01), g) for _ in range(50)}
    assert draws == {0}


def test_stop_id_ends_generation(gen):
    free = gen.generate(PROMPT, SamplingParams(max_tokens=12, stop_ids=frozenset())).token_ids
    stop_at = free[4]
    first = free.index(stop_at)
    res = gen.generate(PROMPT, SamplingParams(max_tokens=12, stop_ids=frozenset([stop_at])))
    assert res.token_ids == free[:first]
    assert res.finish_reason == "stop"
    assert gen.generate(PROMPT, SamplingParams(max_tokens=12, stop_ids=frozenset())).finish_reason == "length"


def test_stream_yields_each_token_and_marks_the_last(gen):
    evs = list(gen.stream(PROMPT, SamplingParams(max_tokens=5, stop_ids=frozenset())))
    assert [e.finish for e in evs] == [None, None, None, None, "length"]
    whole = gen.generate(PROMPT, SamplingParams(max_tokens=5, stop_ids=frozenset()))
    assert [e.token_id for e in evs] == whole.token_ids


def test_stop_string_filter_holds_back_prefixes():
    f = _StopStringFilter(["</end>"])
    assert f.push("hello <") == "hello "
    assert f.push("/e") == ""
    assert f.push("x") == "</ex"
    assert f.push(" bye </en") == " bye "
    assert f.push("d> after") == ""
    assert f.hit
    assert f.push("more") == ""


@pytest.mark.parametrize("params, msg", [
    (SamplingParams(temperature=-1), "temperature must be >= 0"),
    (SamplingParams(top_p=0), r"top_p must be in \(0, 1\]"),
    (SamplingParams(max_tokens=-2), "max_tokens must be >= 0"),
    (SamplingParams(stop_strings=("",)), "stop strings must not be empty"),
])
def test_bad_sampling_params(gen, params, msg):
    with pytest.raises(GenerationError, match=msg):
        list(gen.stream(PROMPT, params))


def test_bad_prompts(gen):
    with pytest.raises(GenerationError, match="the prompt is empty"):
        gen.generate([], SamplingParams())
    with pytest.raises(GenerationError, match=r"prompt token id 96 is outside the vocabulary \[0, 96\)"):
        gen.generate([1, 96], SamplingParams())


def test_device_and_dtype_choice():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_dtype(None, torch.device("cpu")) == torch.float32
    assert pick_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        pick_dtype("fp8", torch.device("cpu"))
    with pytest.raises(ConfigError, match="unsupported device 'xla'|unknown device 'xla'"):
        pick_device("xla")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            pick_device("cuda")


def test_bf16_runs_close_to_fp32(tmp_path):
    path, _ = make_tiny("qwen3_moe", tmp_path / "m")
    a = Generator(*load_all(path)[1:]).logits(PROMPT)
    b = Generator(*load_all(path, dtype=torch.bfloat16)[1:]).logits(PROMPT)
    assert b.dtype == torch.float32 and (a - b).abs().max() < 0.1
