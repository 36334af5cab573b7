"""lm-evaluation-harness against a real mesh, and log-probs through the data plane.

Two real ``ekmesh join`` processes serve the built-in model on 127.0.0.1: an attention host holding no expert and an
expert holder holding none of the dense part, so every routed expert of every forward (and so every log-prob) comes
through the data plane. Against the host's API:

- lm-eval's own ``local-completions`` model (``lm_eval.simple_evaluate``, the harness's Python API) runs two tasks this
  test writes into ``tmp_path`` as YAML over local JSONL (no dataset download; HF hub and datasets offline, and any
  connection or name lookup beyond loopback fails the test): a 4-way multiple-choice task on KJV verse completion
  (verses of the chapters the built-in model was trained on: a verse's first half, its own second half against
  three other verses' second halves) whose accuracy must be above chance, and a generate-until task whose answers
  must be the one-process model's greedy text. Every log-likelihood lm-eval logged (``log_samples``) must equal the
  one-process model's over the same tokens (``Generator.logits``, fp32) within ``TOL``.
- ``/v1/completions`` with ``logprobs`` + ``echo`` and chat with ``logprobs`` / ``top_logprobs`` (the official
  ``openai`` client) answer the one-process model's tokens and log-probs within ``TOL``.
- ``ekmesh generate --mesh`` with ``--presence-penalty`` / ``--frequency-penalty`` answers one process's tokens.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.node.servingmesh import ServingMesh
from tests.requires import require_kjv

pytestmark = pytest.mark.slow

TOL = 1e-4  # the mesh's log-probs against one process (fp32 on both sides; the data plane carries fp32)
ITEMS = 24  # multiple-choice items (4 choices each: chance is 1/4)
GEN_ITEMS = 4
GEN_TOKENS = 12
HOST, HOLDER = ["--no-experts"], ["--no-attention"]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@pytest.fixture(scope="module")
def reference() -> Any:
    """The built-in model in this process, fp32 on the CPU: what the mesh must agree with."""
    from ekmesh.infer.session import LocalModel
    from ekmesh.registry.lookup import open_model

    return LocalModel.open(open_model("builtin"), "cpu", "fp32")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServingMesh]:
    with ServingMesh(tmp_path_factory.mktemp("mesh"), "builtin", [HOST, HOLDER], extra=["--replicas", "1"]) as m:
        m.wait_ready(0, timeout=120)
        yield m


def _model_logprobs(reference: Any, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) rows [T - 1, V] of the one-process model."""
    return torch.log_softmax(reference.generator.logits(ids), dim=-1)[:-1]


# -- the tasks ---------------------------------------------------------------------------------------------------

def kjv_items(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` multiple-choice items from verses of the built-in model's training chapters (``tools/builtin_data``'s
    split): context = the verse's number and first half, as a training chapter writes it; the right choice its second
    half, the others the second halves of three other picked verses."""
    from tools import builtin_data, kjv

    require_kjv()
    train, _ = builtin_data.split(kjv.read_verses(kjv.MODULE_DIR))
    pool = [v for chapter in train for v in chapter if 10 <= len(v.text.split()) <= 24]
    rng = random.Random(seed)
    picked = rng.sample(pool, n)
    halves = []
    for v in picked:
        words = v.text.split()
        halves.append((f"{v.verse} {' '.join(words[:len(words) // 2])}", " ".join(words[len(words) // 2:])))
    items = []
    for i, (context, right) in enumerate(halves):
        choices = [right, *(halves[(i + j) % n][1] for j in (1, 2, 3))]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "gold": choices.index(right),
                      "continuation": right})
    return items


def write_tasks(directory: Path, items: list[dict[str, Any]]) -> None:
    """Two lm-eval tasks over local JSONL files: ``ekmesh_kjv_mc`` (multiple choice) and ``ekmesh_kjv_gen``
    (generate until a newline)."""
    directory.mkdir(parents=True)
    mc, gen = directory / "kjv_mc.jsonl", directory / "kjv_gen.jsonl"
    mc.write_text("".join(json.dumps(it) + "\n" for it in items))
    gen.write_text("".join(json.dumps(it) + "\n" for it in items[:GEN_ITEMS]))
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: context\n"
    (directory / "kjv_mc.yaml").write_text(
        f"task: ekmesh_kjv_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(mc))}\n"
        "output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (directory / "kjv_gen.yaml").write_text(
        f"task: ekmesh_kjv_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(gen))}\n"
        "output_type: generate_until\ndoc_to_target: continuation\n"
        f"generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: {GEN_TOKENS}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")


class NoNetwork:
    """While active: a connection or name lookup for anything but loopback is refused (OSError) and recorded."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.attempts: list[str] = []
        connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

        def guarded_connect(sock: socket.socket, address: Any) -> Any:
            host = address[0] if isinstance(address, tuple) else str(address)
            if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in LOOPBACK:
                self.attempts.append(f"connect {address}")
                raise OSError(f"test: no network ({address})")
            return connect(sock, address)

        def guarded_getaddrinfo(host: Any, *args: Any, **kw: Any) -> Any:
            name = host.decode() if isinstance(host, bytes) else host
            if name is not None and name not in LOOPBACK:
                self.attempts.append(f"lookup {name}")
                raise socket.gaierror(f"test: no network ({name})")
            return getaddrinfo(host, *args, **kw)

        mp.setattr(socket.socket, "connect", guarded_connect)
        mp.setattr(socket, "getaddrinfo", guarded_getaddrinfo)


# -- lm-eval -----------------------------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_lm_eval_local_completions_against_a_mesh(mesh: ServingMesh, reference: Any, tmp_path: Path) -> None:
    items = kjv_items(ITEMS, seed=17)
    write_tasks(tmp_path / "tasks", items)
    tokenizer = tmp_path / "tokenizer"  # the built-in model's tokenizer files, for transformers' AutoTokenizer
    tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(reference.checkpoint.path / name, tokenizer / name)
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(var, "1")
        mp.setenv("HF_HOME", str(tmp_path / "hf"))  # datasets' cache of the JSONL: here, not in the user's home
        import datasets.config
        import huggingface_hub.constants

        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)  # (read at import, possibly before this test)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        guard = NoNetwork(mp)
        import lm_eval
        from lm_eval.models.openai_completions import LocalCompletionsAPI
        from lm_eval.tasks import TaskManager

        context = int(reference.checkpoint.hf_config["max_position_embeddings"])
        lm = LocalCompletionsAPI(base_url=mesh.api(0) + "/completions", model="builtin", tokenizer=str(tokenizer),
                                 tokenizer_backend="huggingface", max_length=context, batch_size=8,
                                 num_concurrent=1, max_retries=1, timeout=120)
        tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)  # (ours only: fast)
        results = lm_eval.simple_evaluate(model=lm, tasks=["ekmesh_kjv_mc", "ekmesh_kjv_gen"], task_manager=tasks,
                                          log_samples=True, bootstrap_iters=0)
    assert guard.attempts == [], guard.attempts
    assert results is not None
    samples = results["samples"]

    # every log-likelihood lm-eval used is the one-process model's over the tokens lm-eval sent
    worst, right_model = 0.0, 0
    mc = sorted(samples["ekmesh_kjv_mc"], key=lambda s: s["doc_id"])
    assert len(mc) == ITEMS
    for sample in mc:
        model_scores = []
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            ll, greedy = resp[0]
            ctx, cont = lm._encode_pair(context, continuation)
            rows = _model_logprobs(reference, ctx + cont)[len(ctx) - 1:]
            want = float(rows.gather(1, torch.tensor(cont)[:, None]).sum())
            worst = max(worst, abs(ll - want))
            assert greedy == bool((rows.argmax(-1) == torch.tensor(cont)).all())
            model_scores.append(want)
        right_model += max(range(len(model_scores)), key=model_scores.__getitem__) == sample["target"]
    accuracy = results["results"]["ekmesh_kjv_mc"]["acc,none"]
    print(f"lm-eval multiple choice: accuracy {accuracy:.3f} over {ITEMS} (chance 0.25; one process "
          f"{right_model / ITEMS:.3f}); log-likelihoods within {worst:.2e} of one process")
    assert worst <= TOL, f"max abs diff {worst:.2e}"
    assert accuracy == pytest.approx(right_model / ITEMS)
    assert accuracy > 0.25, f"accuracy {accuracy} is not above chance"

    # generate-until: it completes, with the one-process model's greedy text
    from ekmesh.infer.generate import SamplingParams

    gen = sorted(samples["ekmesh_kjv_gen"], key=lambda s: s["doc_id"])
    assert len(gen) == GEN_ITEMS and "exact_match,none" in results["results"]["ekmesh_kjv_gen"]
    for sample in gen:
        (context, kwargs), = sample["arguments"]
        prompt = reference.tokenizer.encode(context, add_special_tokens=True)
        want = reference.generator.generate(prompt, SamplingParams(max_tokens=GEN_TOKENS, stop_strings=("\n",)))
        assert sample["resps"][0][0] == want.text, (context, kwargs)


# -- log-probs through the mesh, as the openai client reads them -------------------------------------------------

PROMPT = "And God said, Let there be light: and there was light. And God said,"


@pytest.mark.timeout(180)
def test_completion_and_chat_logprobs_through_the_mesh_are_one_process(mesh: ServingMesh, reference: Any) -> None:
    import openai

    client = openai.OpenAI(base_url=mesh.api(0), api_key="unused", max_retries=0, timeout=120)
    tok = reference.tokenizer
    out = client.completions.create(model="builtin", prompt=PROMPT, max_tokens=10, temperature=0, echo=True,
                                    logprobs=5, extra_body={"return_token_ids": True, "ignore_eos": True})
    prompt = tok.encode(PROMPT, add_special_tokens=True)
    ids = out.model_extra["ekmesh"]["token_ids"]
    assert out.model_extra["ekmesh"]["peers"]  # the experts were computed by another peer
    greedy = reference.generator.generate(prompt, _greedy(10)).token_ids
    assert ids == greedy
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(prompt) + len(ids) and lp.token_logprobs[0] is None
    rows = _model_logprobs(reference, prompt + ids)
    all_ids = prompt + ids
    want = rows.gather(1, torch.tensor(all_ids[1:])[:, None])[:, 0].tolist()
    worst = max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want, strict=True))
    for top, row in zip(lp.top_logprobs[1:], rows, strict=True):  # the 5 most likely, by value
        best = torch.topk(row, 5).values.tolist()
        worst = max(worst, *(abs(a - b) for a, b in zip(top.values(), best, strict=True)))
    print(f"completion (echo) log-probs through the mesh within {worst:.2e} of one process")
    assert worst <= TOL, f"max abs diff {worst:.2e}"

    messages = [{"role": "user", "content": "Genesis 1"}]
    chat = client.chat.completions.create(model="builtin", messages=messages, max_tokens=12, temperature=0,
                                          logprobs=True, top_logprobs=3, extra_body={"return_token_ids": True})
    ids = chat.model_extra["ekmesh"]["token_ids"]
    prompt = tok.encode_chat(messages, add_generation_prompt=True)
    assert ids == reference.generator.generate(prompt, _greedy(12, stops=None)).token_ids[:len(ids)]
    content = chat.choices[0].logprobs.content
    assert len(content) == len(ids) > 0
    rows = _model_logprobs(reference, prompt + ids)[len(prompt) - 1:]
    worst = 0.0
    for c, token, row in zip(content, ids, rows, strict=True):
        worst = max(worst, abs(c.logprob - float(row[token])),
                    *(abs(t.logprob - v) for t, v in zip(c.top_logprobs, torch.topk(row, 3).values.tolist(),
                                                         strict=True)))
    print(f"chat log-probs through the mesh within {worst:.2e} of one process")
    assert worst <= TOL, f"max abs diff {worst:.2e}"


def _greedy(n: int, stops: frozenset[int] | None = frozenset()) -> Any:
    from ekmesh.infer.generate import SamplingParams

    return SamplingParams(max_tokens=n, stop_ids=stops)


@pytest.mark.timeout(120)
def test_generate_mesh_with_penalties_is_one_process(mesh: ServingMesh, reference: Any) -> None:
    """``ekmesh generate --mesh`` passes its penalty flags to the node; the answer is one process's."""
    import subprocess

    from ekmesh.infer.generate import SamplingParams
    from tests.discovery.meshproc import ekmesh_argv, env_for

    got = subprocess.run(ekmesh_argv("generate", "builtin", "--mesh", "--prompt", PROMPT, "--max-tokens", "16",
                                     "--presence-penalty", "1.5", "--frequency-penalty", "-0.5", "--json"),
                         env=env_for(mesh.nodes[0].home), capture_output=True, text=True, timeout=100)
    assert got.returncode == 0, got.stderr[-2000:]
    prompt = reference.tokenizer.encode(PROMPT, add_special_tokens=True)
    want = reference.generator.generate(prompt, SamplingParams(max_tokens=16, presence_penalty=1.5,
                                                               frequency_penalty=-0.5))
    plain = reference.generator.generate(prompt, SamplingParams(max_tokens=16))
    assert json.loads(got.stdout)["token_ids"] == want.token_ids != plain.token_ids
