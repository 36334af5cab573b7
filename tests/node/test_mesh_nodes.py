"""Mesh == one process through real nodes, for every architecture family, and a SIGKILL mid-generation.

Exactness: per family, three ``ekmesh join`` processes: an attention host that holds no expert (``--no-experts``)
and two expert holders (R = 1, identities seeded so the placement is the same every run). The tiny checkpoint is
imported into one holder's home only; the other gets the manifest and its blobs from it, the attention host the
dense blobs. The test checks from the host's status that every MoE layer has experts on both holders and that the
host loaded none, then asks the host's API for greedy tokens (prompt as token ids) and compares them with one
process over the same checkpoint; afterwards the host must have made round trips to both holders. The same for a
q8 and a q4 model of every family (``import --quantize`` on node 0, slightly wider tiny models so q4's groups divide
their dimensions): the mesh answers as one process on that quantized model. And the same for a checkpoint whose
experts are in its own format (DeepSeek-V3 block FP8, gpt-oss MXFP4), kept as they are on the holders.

Faults: four nodes (host + three holders, R = 2); a long streamed generation; after some tokens the holder the host
used most is SIGKILLed; the generation completes with exactly the tokens of the run without a fault. The victim was
serving that answer: the host had made round trips to it before the kill (the answer is the only generation of the
mesh), and recorded a failed request to it after the kill, so the answer still needed it and went to a replica.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ekmesh.core import threads
from ekmesh.infer.dataplane import poll
from tests.families import BUILDERS
from tests.infer.test_deepseek import make_tiny_deepseek, write_fp8
from tests.infer.test_gpt_oss import make_tiny_gpt_oss, write_mxfp4
from tests.node.servingmesh import (
    ServingMesh,
    one_process_tokens,
    post,
    seeds_splitting_every_layer,
    stream_token_ids,
)
from tests.tiny_models import make_tiny, make_tiny_dense, random_prompt

# the same families with dimensions q4's groups (32..256) divide: hidden 64, expert intermediate 32 or 64
QUANT_BUILDERS: dict[str, Callable[[Path], Any]] = {
    **{arch: functools.partial(make_tiny, arch, hidden_size=64, moe_intermediate_size=32)
       for arch in ("qwen3_moe", "qwen2_moe")},
    **{arch: functools.partial(make_tiny, arch, hidden_size=64, intermediate_size=64) for arch in ("mixtral", "olmoe")},
    "deepseek_v2": functools.partial(make_tiny_deepseek, "v2_group_limited_no_q_lora", hidden_size=64,
                                     moe_intermediate_size=32),
    "deepseek_v3": functools.partial(make_tiny_deepseek, "v3_noaux_tc", hidden_size=64, moe_intermediate_size=32),
    "gpt_oss": make_tiny_gpt_oss,
}
HOST = ["--no-experts"]
HOLDER = ["--no-attention"]


def _import(src: Path, home: Path) -> str:
    from ekmesh.registry.imports import import_full
    from ekmesh.shard.store import Store

    return import_full(str(src), store=Store(home / "store")).model_id


def _one_process(src: Path) -> Callable[[list[int], int], list[int]]:
    """Greedy tokens of the checkpoint directory ``src`` in one process."""
    return functools.partial(one_process_tokens, src)


def _one_process_stored(model_id: str, store: Any) -> Callable[[list[int], int], list[int]]:
    """Greedy tokens of a stored model (e.g. a quantized one) in one process."""
    return lambda prompt, n: one_process_tokens(model_id, prompt, n, store)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_three_nodes_equal_one_process(arch: str, tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    BUILDERS[arch](src)
    model_id = _import(src, tmp_path / "n0")
    _three_nodes_equal_one_process(arch, tmp_path, model_id, _one_process(src), draft=True)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("fmt", ["q8", "q4"])
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_three_nodes_equal_one_process_quantized(arch: str, fmt: str, tmp_path: Path) -> None:
    """The same through a quantized model (its experts q8 / q4 on every node): the mesh answers as one process
    on that quantized model."""
    from ekmesh.registry.quantize import import_quantized
    from ekmesh.shard.store import Store

    src = tmp_path / "ckpt"
    QUANT_BUILDERS[arch](src)
    store = Store(tmp_path / "n0" / "store")
    model_id = import_quantized(_import(src, tmp_path / "n0"), fmt, store=store).model_id
    _three_nodes_equal_one_process(arch, tmp_path, model_id, _one_process_stored(model_id, store))


def _checkpoint_in_own_format(arch: str, directory: Path) -> Path:
    """A tiny checkpoint whose routed experts are in the checkpoint format of its family: DeepSeek-V3's block FP8
    (every projection, [16, 16] blocks) or gpt-oss's MXFP4."""
    if arch == "deepseek_v3":
        src, _ = make_tiny_deepseek("v3_noaux_tc", directory / "float")
        return write_fp8(src, directory / "fp8")
    src, ref = make_tiny_gpt_oss(directory / "float")
    write_mxfp4(src, ref, directory / "mxfp4")
    return directory / "mxfp4"


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize(("arch", "fmt"), [("deepseek_v3", "fp8"), ("gpt_oss", "mxfp4")])
def test_three_nodes_equal_one_process_checkpoint_formats(arch: str, fmt: str, tmp_path: Path) -> None:
    """A checkpoint in its own quantized format (DeepSeek block FP8, gpt-oss MXFP4) is served with its experts kept
    in that format on every holder (status says so, and the bytes held are the checkpoint's); the mesh answers as
    one process over the same checkpoint."""
    from ekmesh.shard.store import Store

    src = _checkpoint_in_own_format(arch, tmp_path / "ckpt")
    model_id = _import(src, tmp_path / "n0")
    m = Store(tmp_path / "n0" / "store").load_manifest(model_id)
    stored = {(layer, e): m.data["blobs"][b]["size"] for (layer, e), b in m.expert_ids().items()}
    mesh_status = _three_nodes_equal_one_process(arch, tmp_path, model_id, _one_process(src))
    for serving in mesh_status:
        assert serving["experts_format"] == fmt, serving
        n = serving["loaded_experts"]
        # held bytes: the checkpoint's weights and scales, not an expansion (fp32 would be 4x / 8x the blob)
        assert n > 0 and serving["loaded_bytes"] <= 1.5 * n * max(stored.values()), serving


def _three_nodes_equal_one_process(arch: str, tmp_path: Path, model_id: str,
                                   reference: Callable[[list[int], int], list[int]],
                                   draft: bool = False) -> list[dict[str, Any]]:
    """Runs the comparison; returns the holders' ``serving`` status after the answer. ``draft``: the attention
    host also gets a tiny random dense draft model with the target's vocabulary (and some padding rows), and a third
    answer drafts with it."""
    from ekmesh.shard.store import Store
    m = Store(tmp_path / "n0" / "store").load_manifest(model_id)
    moe_layers = sorted({layer for layer, _ in m.expert_ids()})
    vocab = m.data["config"]["vocab_size"]
    prompt = random_prompt(vocab)
    expected = reference(prompt, 24)
    assert len(set(expected)) > 2, f"{arch}: a constant generation would not test much"

    # node 0 (its home has the import) starts first and the others bootstrap from it; node 1 hosts attention.
    # The holders' identities are chosen so that the placement gives each of them experts in every MoE layer.
    h0, h2 = seeds_splitting_every_layer(m, 2, 1, 4.0, arch)
    draft_args = ["--draft", str(make_tiny_dense(tmp_path / "draft", vocab_size=vocab + 16)[0])] if draft else []
    roles = [HOLDER, [*HOST, *draft_args], HOLDER]
    with ServingMesh(tmp_path, model_id, roles, seeds=[h0, f"{arch}-host", h2],
                     extra=["--replicas", "1", "--memory", "4"]) as mesh:
        host = 1
        snap = mesh.wait_ready(host, timeout=90)
        holders = {p["peer_id"] for p in snap["peers"] if p["models"].get(model_id)}
        assert len(holders) == 2 and snap["serving"]["loaded_experts"] == 0, snap["serving"]
        # every MoE layer uses both holders: each holder has >= 1 expert ready in every MoE layer
        held = _ready_layers(mesh, holders)
        for peer in holders:
            assert held[peer] == set(moe_layers), f"{arch}: {peer} holds experts of layers {held[peer]} only"

        out = post(mesh.api(host) + "/completions", {"prompt": prompt, "max_tokens": 24, "temperature": 0,
                                                     "ignore_eos": True, "return_token_ids": True,
                                                     "speculative": "off"})
        assert out["ekmesh"]["token_ids"] == expected, arch
        assert set(out["ekmesh"]["peers"]) == holders
        assert out["ekmesh"]["steps"] == 23 and out["ekmesh"]["drafted"] == 0 and out["ekmesh"]["round_trips"] > 0
        # drafted by prompt lookup on a prompt that repeats itself: the same tokens, and every target step gives its
        # accepted drafts and the token after them. (Float experts only: a quantized kernel's several-row path rounds
        # otherwise than its one-row path, and q8/q4 read bf16 activations, which a step over several tokens can round
        # to another value, so a near-tie may go the other way: README's limits say so.)
        if m.experts_format_name() not in ("q8", "q4", "fp8", "mxfp4"):
            rep = prompt + prompt[:8]
            spec = post(mesh.api(host) + "/completions", {"prompt": rep, "max_tokens": 24, "temperature": 0,
                                                          "ignore_eos": True, "return_token_ids": True,
                                                          "speculative": "ngram"})["ekmesh"]
            assert spec["token_ids"] == reference(rep, 24), arch
            assert spec["speculative"] == "ngram" and spec["drafted"] > 0
            assert 23 <= spec["steps"] + spec["accepted"] <= 24
            print(f"{arch}: ngram drafts {spec['accepted']}/{spec['drafted']} accepted, {spec['steps']} steps, "
                  f"{spec['round_trips']} round trips per MoE layer for 24 tokens")
            if draft:  # the draft model (the host's default mode once one is loaded): same tokens
                body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
                        "return_token_ids": True}
                by_draft = post(mesh.api(host) + "/completions", body)["ekmesh"]
                assert by_draft["token_ids"] == expected and by_draft["speculative"] == "draft", arch
                assert by_draft["drafted"] > 0 and 23 <= by_draft["steps"] + by_draft["accepted"] <= 24
        # (on a loaded machine an answer may miss its deadline; with R = 1 the host then computes that expert
        # itself from its blob, which keeps the answer exact, so local experts after the run are not an error)
        after = mesh.nodes[host].status()["serving"]
        assert all(after["peers"][p]["round_trips"] > 0 for p in holders), after
        # verification (on by default, a sampled fraction of the results) banned no honest peer
        assert after["verify"]["banned"] == [], after["verify"]
        # every answer was read, polled or blocking, as this machine's polling setting says
        waited = after["poll"]
        assert waited["max_us"] == round(poll.budget(os.environ.get("EKMESH_POLL_US")) * 1e6), waited
        assert waited["polled"] + waited["blocked"] >= sum(after["peers"][p]["round_trips"] for p in holders)
        if waited["max_us"] == 0:
            assert waited["polled"] == 0, waited
        # torch's operator threads as core/threads.py plans them for this environment (None: OMP_NUM_THREADS rules)
        planned = threads.plan(os.environ, threads.usable_cpus())
        assert after["threads"] == (planned if planned is not None else after["threads"]) >= 1, after
        return [node.status()["serving"] for node in mesh.nodes if node.peer_id in holders]


def _ready_layers(mesh: ServingMesh, holders: set[str]) -> dict[str, set[int]]:
    """{holder: MoE layers where it has >= 1 expert loaded}, from each holder's own status."""
    out: dict[str, set[int]] = {}
    for node in mesh.nodes:
        if node.peer_id in holders:
            out[node.peer_id] = {int(layer) for layer in node.status()["serving"]["loaded_by_layer"]}
    return out


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigkill_a_holder_mid_generation(tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    make_tiny("qwen3_moe", src, max_position_embeddings=1024)
    model_id = _import(src, tmp_path / "n0")
    prompt = random_prompt(96)
    n = 400
    expected = _one_process(src)(prompt, n)
    roles = [HOLDER, HOLDER, HOLDER, HOST]
    with ServingMesh(tmp_path, model_id, roles, extra=["--replicas", "2"]) as mesh:
        host = mesh.nodes[3]
        mesh.wait_ready(3, timeout=90, holders=2)
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
        got: list[int] = []
        victim = None
        for got in stream_token_ids(mesh.api(3), body, timeout=120):
            if victim is None and len(got) >= 20:
                used = host.status()["serving"]["peers"]
                name = max(used, key=lambda p: used[p]["round_trips"])
                before = used[name]
                victim = next(nd for nd in mesh.nodes if nd.peer_id == name)
                victim.signal(signal.SIGKILL)
                killed_at = len(got)
        assert victim is not None
        first = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)
        assert got == expected, f"diverged at token {first}"
        assert killed_at < n - 50, "the kill should land well before the end"
        after = host.status()["serving"]["peers"][victim.peer_id]
        # the victim served this answer before the kill, and the answer sent it requests after the kill, which
        # failed and went to a replica (a peer the answer no longer needed would show no new failure)
        assert before["round_trips"] > 0, before
        assert after["failures"] > before["failures"], (before, after)
