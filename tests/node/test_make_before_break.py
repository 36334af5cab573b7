"""Make-before-break, watched from the attention host while experts move (issue 16, item 8: it was tested only
indirectly).

An attention host (``--no-experts``) and holder A, which holds every expert (R = 1), serve; then holder B joins and
the placement over A and B gives some of the experts to B (identities chosen so that B gets experts of every MoE
layer). B is a newcomer that cannot get ready at first: its store is on a small tmpfs that a filler file has filled
(it has the model's manifest, so it claims, but no room for a blob). Once A has computed the new placement and the
host has seen A's adverts from after it, the host must still see A holding every expert (an A that gave up B's share
at once would leave it without a holder); then the filler is removed, B fetches and loads its share, and A gives it
up. From before B starts until the mesh has settled (every peer holds ready exactly what the placement assigns it),
one thread polls the host's status and another asks the host for greedy answers, one after the other.

Checked: at every poll the host sees a ready holder for every routed expert and misses none, and A and B together
hold every expert; while B could not get ready, A held everything although the placement had moved experts to B;
every answer, including those generated while the experts moved, equals one process; at the end A holds fewer
experts, B the rest, and the host made round trips to both.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from tests.discovery.meshproc import NodeProc, wait_until
from tests.diskfull import fill, tmpfs
from tests.node.servingmesh import (
    BASE,
    ServingMesh,
    _min_holders,
    one_process_tokens,
    post,
    seed_identity,
    seeds_splitting_every_layer,
)
from tests.tiny_models import make_tiny, random_prompt

HOST = ["--no-experts"]
HOLDER = ["--no-attention"]
EXTRA = ["--replicas", "1", "--memory", "4"]


def _settled(snap: dict[str, Any], model: str, peers: int) -> bool:
    """``peers`` live peers, each holding ready exactly what the placement assigns it, all but the host a share."""
    live = [p for p in snap["peers"] if p["state"] in ("self", "up")]
    holders = [p for p in live if p["assigned"].get(model, 0) > 0]
    return len(live) == peers and len(holders) == peers - 1 and all(
        p["assigned"].get(model, 0) == (p["models"].get(model) or 0) for p in live)


def _round_trips(snap: dict[str, Any], peer: str) -> int:
    return int(snap["serving"]["peers"].get(peer, {}).get("round_trips", 0))


def _seq(snap: dict[str, Any], peer: str) -> int:
    return int(next(p["seq"] for p in snap["peers"] if p["peer_id"] == peer))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_experts_move_to_a_new_holder_without_a_gap_and_answers_stay_exact(tmp_path: Path) -> None:
    from ekmesh.registry.imports import import_full
    from ekmesh.shard.store import Store

    src = tmp_path / "ckpt"
    make_tiny("qwen3_moe", src)
    store = Store(tmp_path / "n0" / "store")
    model_id = import_full(str(src), store=store).model_id
    m = store.load_manifest(model_id)
    total = len(m.expert_ids())
    prompts = [random_prompt(96, seed=s) for s in (1, 2, 3)]
    expected = [one_process_tokens(src, p, 24) for p in prompts]
    seed_a, seed_b = seeds_splitting_every_layer(m, 2, 1, 4.0, "mbb")

    with ServingMesh(tmp_path, model_id, [HOLDER, HOST], seeds=[seed_a, "mbb-host"], extra=EXTRA) as mesh:
        host, a = mesh.nodes[1], mesh.nodes[0]
        mesh.wait_ready(1, timeout=60)
        assert host.status()["models"][model_id]["per_peer"] == {a.peer_id: total}

        polls: list[dict[str, Any]] = []
        answers: list[tuple[int, list[int]]] = []
        stop = threading.Event()
        errors: list[BaseException] = []

        def poll() -> None:
            try:
                while not stop.wait(0.05):
                    polls.append(host.status())
            except Exception as exc:  # reported by the assertion below
                errors.append(exc)

        def generate() -> None:
            try:
                i = 0
                while not stop.is_set():
                    body = {"prompt": prompts[i % 3], "max_tokens": 24, "temperature": 0, "ignore_eos": True,
                            "return_token_ids": True}
                    answers.append((i % 3, post(mesh.api(1) + "/completions", body)["ekmesh"]["token_ids"]))
                    i += 1
            except Exception as exc:  # reported by the assertion below
                errors.append(exc)

        home_b = tmp_path / "n2"
        seed_identity(home_b, seed_b)
        with tmpfs(home_b / "store", 256):
            Store(home_b / "store").save_manifest(m)  # B has the manifest, so it claims; then its disk is full
            filler = fill(home_b / "store")
            threads = [threading.Thread(target=f, daemon=True) for f in (poll, generate)]
            for t in threads:
                t.start()
            b = NodeProc(home_b, *BASE, "--model", model_id, "--name", "n2", *EXTRA, *HOLDER, "--peer", a.addrs[0])
            try:
                wait_until(lambda: a.status()["claim"]["self"]["assigned"] < total, 30,
                           "A's placement giving experts to B", interval=0.1)
                seq = _seq(a.status(), a.peer_id)
                wait_until(lambda: bool(polls) and _seq(polls[-1], a.peer_id) > seq + 1, 30,
                           "the host seeing A's adverts from after its new placement", interval=0.05)
                moved = polls[-1]["models"][model_id]["per_peer"]
                # B has nothing ready (no room for a blob), so A keeps serving everything, B's share included
                assert moved.get(b.peer_id, 0) == 0 and moved[a.peer_id] == total, moved
                assert b.proc.poll() is None, "B died on its full disk"
                filler.unlink()  # space returns: B fetches and loads its share, then A gives it up
                wait_until(lambda: _settled(polls[-1], model_id, 3), 60,
                           "the experts moved and every peer holds what the placement assigns it", interval=0.1)
                # an answer that finished after the move may have started before it (on A alone): wait until the
                # host has sent B a frame, then for one more answer
                try:
                    wait_until(lambda: bool(errors) or _round_trips(host.status(), b.peer_id) > 0, 30,
                               "the host sending a frame to B after the move")
                except AssertionError as exc:  # what the host knew of B, and whom it used
                    st = host.status()
                    raise AssertionError(f"{exc}; B = {b.peer_id}; host's serving: peers {st['serving']['peers']}, "
                                         f"verify {st['serving']['verify']}; view {st['models'][model_id]}; "
                                         f"B's serving {b.status()['serving']}") from exc
                done = len(answers)
                wait_until(lambda: len(answers) > done or bool(errors), 30, "one more answer after the move")
            finally:
                stop.set()
                for t in threads:
                    t.join(30)
                b_status = b.status()["serving"] if b.proc.poll() is None else None
                b.stop()
        assert not errors, errors

        # at every poll: a ready holder for every routed expert, nothing missing, A + B hold every expert
        for snap in polls:
            view = snap["models"][model_id]
            assert _min_holders(view) >= 1 and snap["serving"]["missing_experts"] == 0, view
            per_peer = view["per_peer"]
            assert per_peer.get(a.peer_id, 0) + per_peer.get(b.peer_id, 0) >= total, per_peer
        final = polls[-1]["models"][model_id]["per_peer"]
        assert 0 < final[b.peer_id] < total and final[a.peer_id] + final[b.peer_id] == total, final
        assert b_status is not None and b_status["loaded_experts"] == final[b.peer_id], b_status

        # every answer, during the move too, equals one process; the host used both holders
        assert len(answers) >= 2 and all(got == expected[k] for k, got in answers), answers
        used = host.status()
        assert _round_trips(used, a.peer_id) > 0 and _round_trips(used, b.peer_id) > 0, used["serving"]["peers"]
