"""A model imported on an attention-only host reaches the expert holders (issue 16, item 5).

Node A imports a tiny model and runs ``ekmesh join --model ID --no-experts``: it claims no experts, so it takes no
part in the placement and advertises none ready, yet its store holds every blob. Nodes B and C start with empty
stores and ``--model ID``. They must get the manifest and their experts (and, hosting attention by default, the dense
part) from A over blob exchange, become ready, and a generation through A's API must give the greedy tokens of one
process over the same checkpoint. The checkpoint directory is deleted after the import, so no blob can come from the
model's source instead of from A.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.discovery.meshproc import wait_until
from tests.node.servingmesh import ServingMesh, one_process_tokens, post, seeds_splitting_every_layer
from tests.tiny_models import make_tiny, random_prompt


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_attention_only_importer_serves_its_model_to_the_holders(tmp_path: Path) -> None:
    from ekmesh.registry.imports import import_full
    from ekmesh.shard.store import Store

    src = tmp_path / "ckpt"
    make_tiny("qwen3_moe", src)
    store = Store(tmp_path / "n0" / "store")
    model_id = import_full(str(src), store=store).model_id
    m = store.load_manifest(model_id)
    prompt = random_prompt(m.data["config"]["vocab_size"])
    expected = one_process_tokens(src, prompt, 16)
    assert len(set(expected)) > 2, "a constant generation would not test much"
    shutil.rmtree(src)  # every blob the holders get must come from A

    # R = 1 and identities under which both holders get experts in every MoE layer: the answer needs both
    b_seed, c_seed = seeds_splitting_every_layer(m, 2, 1, 4.0, "importer")
    roles = [["--no-experts"], [], []]
    with ServingMesh(tmp_path, model_id, roles, seeds=["importer-host", b_seed, c_seed],
                     extra=["--replicas", "1", "--memory", "4"]) as mesh:
        a, holders = mesh.nodes[0], mesh.nodes[1:]

        def have_manifest() -> bool:
            return all(h.status()["claim"]["experts"] == len(m.expert_ids()) for h in holders)

        wait_until(have_manifest, 30, "B and C to get the manifest from the attention-only importer A",
                   interval=0.2)
        snap = mesh.wait_ready(0, timeout=60)
        assert snap["serving"]["loaded_experts"] == 0, snap["serving"]  # A holds no expert
        ids = {h.peer_id for h in holders}
        assert {p["peer_id"] for p in snap["peers"] if p["models"].get(model_id)} == ids
        for h in holders:
            claim = h.status()["claim"]
            assert claim["bytes_fetched"] > 0 and claim["self"]["ready"] == claim["self"]["assigned"] > 0, claim
            assert Store(h.home / "store").load_manifest(model_id).id == model_id

        out = post(mesh.api(0) + "/completions", {"prompt": prompt, "max_tokens": 16, "temperature": 0,
                                                  "ignore_eos": True, "return_token_ids": True})
        assert out["ekmesh"]["token_ids"] == expected
        assert set(out["ekmesh"]["peers"]) == ids  # the experts were computed on B and C
        assert a.proc.poll() is None


@pytest.mark.timeout(60)
def test_a_node_waiting_for_a_manifest_no_peer_has_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A node started with a model id that no live peer has: its ``claim.state`` says why it waits (no peer yet;
    then none of the peers that serve blobs has it), and once it had time to meet its peers it warns in the log."""
    import logging

    import trio

    from ekmesh.discovery.config import MeshTimeouts
    from ekmesh.node.node import Node, NodeConfig
    from ekmesh.registry.imports import import_full
    from ekmesh.shard.store import Store
    from tests.discovery.inproc import running, until

    caplog.set_level(logging.WARNING, logger="ekmesh.node.claim")
    src, _ = make_tiny("qwen3_moe", tmp_path / "ckpt")
    model_id = import_full(str(src), store=Store(tmp_path / "a" / "store")).model_id
    unknown = "blake3:" + "0" * 64
    timeouts = MeshTimeouts(connect_timeout=1.5, stream_timeout=1.5, ping_timeout=1.0, advert_interval=0.3,
                            down_after=3.0, leave_timeout=1.0, redial_interval=0.5, redial_max_interval=2.0)

    def config(home: Path, model: str, **kw: object) -> NodeConfig:
        return NodeConfig(home=home, listen=["/ip4/127.0.0.1/tcp/0"], mdns=False, dht=False, timeouts=timeouts,
                          api_port=None, model=model, attention=False, **kw)  # type: ignore[arg-type]

    def state(node: Node) -> str:
        assert node.claimer is not None
        return str(node.claimer.status()["state"])

    async def main() -> None:
        alone = Node(config(tmp_path / "alone", unknown))
        async with running(alone):
            await until(lambda: state(alone) == "waiting for the manifest: no live peer yet", 10, "'no live peer'")
        a = Node(config(tmp_path / "a", model_id))
        async with running(a):
            d = Node(config(tmp_path / "d", unknown, peers=[a.addrs[0]]))
            async with running(d):
                lacking = "waiting for the manifest: no live peer has it (peers serving blobs: 1)"
                await until(lambda: state(d) == lacking, 10, "d to say that its one peer has no such manifest")
                claim = d.claimer
                assert claim is not None and claim.manifest is None
                assert not [r for r in caplog.records if r.levelno >= logging.WARNING and unknown in r.message]
                # d was given a bootstrap peer: it warns once it had time to meet it (meet_s)
                await until(lambda: any(unknown in r.message and "no live peer has it" in r.message
                                        for r in caplog.records), claim.config.meet_s + 10, "the warning")

    trio.run(main)
