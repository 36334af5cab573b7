"""Model names through the mesh (issue 17, item 3): an alias imported on one node is what another node joins, serves
and answers by; a name two peers give different models is a clear error; a name nobody serves fails after its
deadline; the API takes mesh names and refuses a conflicting one.

Real parts: ``ekmesh join`` processes on 127.0.0.1 (``ServingMesh``, ``NodeProc``), a real ``Claimer`` with a real
store and blob listener, a real API server on port 0.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from ekmesh.core.errors import AmbiguousModelNameError, ModelNameError
from tests.discovery.meshproc import NodeProc, ekmesh_argv, env_for, wait_until
from tests.node.servingmesh import BASE, ServingMesh, one_process_tokens, post
from tests.tiny_models import make_tiny, random_prompt

X = "blake3:" + "9063ab" + "0" * 58
Y = "blake3:" + "77aa01" + "1" * 58


def _import(src: Path, home: Path, alias: str, seed: int = 0) -> str:
    from ekmesh.registry.imports import import_full
    from ekmesh.shard.store import Store

    make_tiny("qwen3_moe", src, seed=seed)
    return import_full(str(src), alias=alias, store=Store(home / "store")).model_id


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        out = json.loads(resp.read())
    assert isinstance(out, dict)
    return out


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_an_alias_imported_on_one_node_is_joined_served_and_answered_on_another(tmp_path: Path) -> None:
    model_id = _import(tmp_path / "ckpt", tmp_path / "n0", "tinyds")
    from ekmesh.shard.store import Store

    m = Store(tmp_path / "n0" / "store").load_manifest(model_id)
    prompt = random_prompt(m.data["config"]["vocab_size"])
    expected = one_process_tokens(tmp_path / "ckpt", prompt, 12)
    # both nodes are started with ``--model tinyds``: n0's store knows it, n1's store is empty
    with ServingMesh(tmp_path, "tinyds", [[], []]) as mesh:
        b = mesh.nodes[1]
        snap = mesh.wait_ready(1, timeout=120)
        assert snap["claim"]["model"] == model_id and "tinyds" in snap["claim"]["names"], snap["claim"]
        assert snap["models"][model_id]["names"] == ["tinyds"]
        assert Store(b.home / "store").aliases() == {}  # n1 found it through the mesh, not through its store

        listed = _get(mesh.api(1) + "/models")["data"]
        assert [(d["id"], d["aliases"]) for d in listed] == [(model_id, ["tinyds"])]
        out = post(mesh.api(1) + "/completions", {"model": "tinyds", "prompt": prompt, "max_tokens": 12,
                                                  "temperature": 0, "ignore_eos": True, "return_token_ids": True})
        assert out["model"] == model_id and out["ekmesh"]["token_ids"] == expected

        # `ekmesh generate NAME --mesh` and `ekmesh status` on n1's home: by name, the id shortened
        gen = subprocess.run(ekmesh_argv("generate", "tinyds", "--mesh", "--prompt-ids", ",".join(map(str, prompt)),
                                         "--max-tokens", "12", "--json"),
                             env=env_for(b.home), capture_output=True, text=True, timeout=120)
        assert gen.returncode == 0, gen.stderr
        assert json.loads(gen.stdout)["token_ids"][:len(expected)] == expected
        status = subprocess.run(ekmesh_argv("status"), env={**env_for(b.home), "COLUMNS": "200"},
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        short = f"tinyds ({model_id[:len('blake3:') + 6]}…)"
        assert f"claiming {short}" in status.stdout and f"model {short}" in status.stdout, status.stdout


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_one_name_for_two_models_is_an_error_naming_both_ids_and_their_peers(tmp_path: Path) -> None:
    x = _import(tmp_path / "x", tmp_path / "a", "tinyds", seed=0)
    y = _import(tmp_path / "y", tmp_path / "c", "tinyds", seed=1)
    assert x != y
    args = [*BASE, "--model", "tinyds", "--no-attention"]
    a = NodeProc(tmp_path / "a", *args, "--name", "alpha")
    nodes = [a]
    try:
        c = NodeProc(tmp_path / "c", *args, "--name", "charlie", "--peer", a.addrs[0])
        nodes.append(c)
        for n in (a, c):  # each advertises its own model under the name, and sees the other's
            wait_until(lambda n=n: all(n.status()["models"].get(mid, {}).get("names") == ["tinyds"] for mid in (x, y)),
                       60, f"{n.peer_id} to see both models named tinyds")
        b = NodeProc(tmp_path / "b", *args, "--name", "bravo", "--peer", a.addrs[0], "--peer", c.addrs[0])
        nodes.append(b)
        rc = b.proc.wait(timeout=60)
        err = b.stderr()
        assert rc == 1, err
        line = next(ln for ln in err.splitlines() if ln.startswith("ekmesh join:"))
        for expected in (x, y, a.peer_id, c.peer_id, "alpha", "charlie", "'tinyds' names 2 different models"):
            assert expected in line, line
        assert a.proc.poll() is None and c.proc.poll() is None  # the others are not disturbed
    finally:
        for n in nodes:
            n.stop()


@pytest.mark.timeout(60)
def test_a_name_no_live_peer_serves_fails_after_its_deadline(tmp_path: Path) -> None:
    from ekmesh.core.tls import TlsIdentity
    from ekmesh.discovery.advert import Advert
    from ekmesh.node.claim import ClaimConfig, Claimer
    from ekmesh.shard.store import Store

    def peer_id() -> str:
        return str(ID.from_pubkey(create_new_key_pair().public_key).to_base58())

    me = peer_id()
    other = Advert(peer_id=peer_id(), incarnation=1, seq=1, name="other", version="0", names={"otherds": X})
    claimer = Claimer(me, Store(tmp_path / "store"),
                      ClaimConfig("tinyds", tick_s=0.05, name_wait_s=1.0, name_settle_s=0.2),
                      TlsIdentity.generate(me), live=lambda: [other], publish=lambda _m: None)
    claimer.open("127.0.0.1", "127.0.0.1")
    states: list[str] = []
    raised: list[ModelNameError] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                while True:
                    states.append(claimer.state)
                    await trio.sleep(0.05)

            async def claim() -> None:
                try:
                    await claimer.run()
                except ModelNameError as exc:
                    raised.append(exc)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            with trio.fail_after(20):
                await claim()

    trio.run(main)
    assert len(raised) == 1 and not isinstance(raised[0], AmbiguousModelNameError), raised
    msg = str(raised[0])
    assert "no model named 'tinyds'" in msg and "1 live peers" in msg and "otherds" in msg, msg
    assert any(s.startswith("waiting for a peer that serves a model named 'tinyds'") for s in states), states
    assert claimer.manifest is None and claimer.names == {}


def test_the_api_answers_to_mesh_names_and_refuses_a_conflicting_one() -> None:
    from ekmesh.api.server import ApiServer
    from ekmesh.api.types import ServedModel

    table = {"tinyds": {X: ["alpha (P1)"]}, "dup": {X: ["alpha (P1)"], Y: ["bravo (P2)"]},
             "elsewhere": {Y: ["bravo (P2)"]}}
    served = ServedModel(X, ["local", "org/tiny"], None, None, 64, mesh_names=lambda: table)  # type: ignore[arg-type]

    class Engine:
        def served(self) -> list[ServedModel]:
            return [served]

        def why_not(self) -> str:
            return "serving"

    api = ApiServer(Engine(), port=0).start()
    try:
        listed = _get(api.url + "/models")["data"]
        assert listed[0]["id"] == X and listed[0]["aliases"] == ["dup", "local", "org/tiny", "tinyds"]

        def refused(model: str) -> tuple[int, dict[str, Any]]:
            try:
                post(api.url + "/completions", {"model": model, "prompt": "hi", "max_tokens": 1})
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())["error"]
            raise AssertionError(f"{model!r} was accepted")

        code, error = refused("dup")
        assert code == 400 and error["param"] == "model", error
        for expected in (X, Y, "alpha (P1)", "bravo (P2)"):
            assert expected in error["message"], error
        code, error = refused("elsewhere")
        assert code == 404 and Y in error["message"], error
    finally:
        api.stop()

    from ekmesh.api.types import resolve

    for name in ("tinyds", "local", "org/tiny", X, X[:14]):
        assert resolve(Engine(), name) is served, name



@pytest.mark.timeout(60)
def test_a_node_advertises_the_hub_id_a_model_came_from_beside_its_aliases(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """What the claimer puts in the advert's ``names``: the store's aliases and, for a hub import, the hub id (a
    directory import has none); names an advert cannot carry are left out."""
    from ekmesh.core.tls import TlsIdentity
    from ekmesh.node.claim import ClaimConfig, Claimer
    from ekmesh.registry.imports import import_full
    from ekmesh.registry.lookup import names_of
    from ekmesh.shard.store import Store
    from tests.shard.hubstub import HubStub

    src, _ = make_tiny("qwen3_moe", tmp_path / "ckpt")
    store = Store(tmp_path / "store")
    with HubStub({"tiny-org/tiny-moe": src}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        hub_id = import_full("tiny-org/tiny-moe", alias="tinyds", store=store).model_id
    dir_id = import_full(str(src), alias="local-tiny", store=store).model_id
    store.set_alias("two words", dir_id)  # a store may hold it; an advert may not
    assert names_of(hub_id, store) == ["tinyds", "tiny-org/tiny-moe"]
    assert names_of(dir_id, store) == ["local-tiny", "two words"]

    me = str(ID.from_pubkey(create_new_key_pair().public_key).to_base58())
    for model, names in ((hub_id, {"tinyds": hub_id, "tiny-org/tiny-moe": hub_id}),
                         (dir_id, {"local-tiny": dir_id})):
        claimer = Claimer(me, store, ClaimConfig(model), TlsIdentity.generate(me), live=list,
                          publish=lambda _m: None)
        assert claimer._names_here(model) == names
