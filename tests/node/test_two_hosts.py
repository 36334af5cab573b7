"""Two attention hosts share the same expert holders and answer at the same time, each exactly as one process
(issue 16, item 8: batching across attention hosts had no test).

Four ``ekmesh join`` processes: two expert holders (R = 1, identities chosen so that each holds experts of every
MoE layer, so every layer of every token asks both) and two attention hosts (``--no-experts``). A long streamed
generation goes to host A; once it has sent a token, a shorter one goes to host B. As the client sees them, B sends
a token before A ends (run one after the other, it could not), and both equal the one-process tokens. Afterwards
each host reports round trips to both holders: while both answers were being generated, each holder computed the
frames of both hosts (an expert server groups one frame's pairs by expert, and merges the queued frames of one
layer from several connections into one batch: ``infer/dataplane/server.py``): each holder's status counts the
frames it served per peer (and how many batches merged several peers' frames, which depends on timing and is not
asserted).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from tests.node.servingmesh import ServingMesh, one_process_tokens, seeds_splitting_every_layer, stream_token_ids
from tests.tiny_models import make_tiny, random_prompt

HOST = ["--no-experts"]
HOLDER = ["--no-attention"]


def overlapping_streams(apis: dict[int, str], bodies: dict[int, dict[str, Any]], first: int,
                        timeout: float = 120.0) -> tuple[dict[int, list[int]], list[tuple[int, str]]]:
    """Streams ``bodies[k]`` to ``apis[k]``, each in its own thread: ``first`` at once, the others once it has sent
    a token. Returns the token ids of each and the events the client saw, in order: (k, "token") per chunk with
    tokens, (k, "end") when a stream ended."""
    events: list[tuple[int, str]] = []
    lock, started = threading.Lock(), threading.Event()
    got: dict[int, list[int]] = {}
    errors: dict[int, BaseException] = {}

    def stream(k: int) -> None:
        seen = 0
        try:
            for ids in stream_token_ids(apis[k], bodies[k], timeout=timeout):
                if len(ids) > seen:
                    seen = len(ids)
                    with lock:
                        events.append((k, "token"))
                    if k == first:
                        started.set()
                got[k] = list(ids)
        except Exception as exc:  # reported by the caller's assertion, with the stream it came from
            errors[k] = exc
        finally:
            with lock:
                events.append((k, "end"))
            started.set()

    threads = {k: threading.Thread(target=stream, args=(k,), daemon=True) for k in apis}
    threads[first].start()
    assert started.wait(timeout), "the first stream sent no token"
    for k, t in threads.items():
        if k != first:
            t.start()
    for t in threads.values():
        t.join(timeout)
    assert not errors and all(not t.is_alive() for t in threads.values()), (errors, events)
    return got, events


def assert_overlapped(events: list[tuple[int, str]], keys: list[int]) -> None:
    """Every stream had received a token before any of them ended."""
    started = max(events.index((k, "token")) for k in keys)
    assert started < min(events.index((k, "end")) for k in keys), f"the streams did not overlap: {events}"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_attention_hosts_share_the_holders_and_answer_at_once_exactly(tmp_path: Path) -> None:
    from ekmesh.registry.imports import import_full
    from ekmesh.shard.store import Store

    src = tmp_path / "ckpt"
    make_tiny("qwen3_moe", src, max_position_embeddings=1024)
    store = Store(tmp_path / "n0" / "store")
    model_id = import_full(str(src), store=store).model_id
    m = store.load_manifest(model_id)
    a, b = 1, 3  # the hosts' node indices
    lengths = {a: 400, b: 32}  # A is long enough to still be streaming while B starts
    prompts = {a: random_prompt(96, seed=1), b: random_prompt(96, seed=2)}
    expected = {k: one_process_tokens(src, prompts[k], n) for k, n in lengths.items()}

    h0, h2 = seeds_splitting_every_layer(m, 2, 1, 4.0, "two-hosts")
    with ServingMesh(tmp_path, model_id, [HOLDER, HOST, HOLDER, HOST], seeds=[h0, "host-a", h2, "host-b"],
                     extra=["--replicas", "1", "--memory", "4"]) as mesh:
        for k in (a, b):
            mesh.wait_ready(k, timeout=90)
        holders = {mesh.nodes[i].peer_id for i in (0, 2)}
        bodies = {k: {"prompt": prompts[k], "max_tokens": n, "temperature": 0, "ignore_eos": True}
                  for k, n in lengths.items()}
        got, events = overlapping_streams({k: mesh.api(k) for k in (a, b)}, bodies, first=a)
        assert got == expected
        assert_overlapped(events, [a, b])
        for k in (a, b):
            peers = mesh.nodes[k].status()["serving"]["peers"]
            assert all(peers.get(p, {}).get("round_trips", 0) > 0 for p in holders), (k, peers)
        # each holder's expert server computed frames of both hosts
        hosts = {mesh.nodes[k].peer_id for k in (a, b)}
        for i in (0, 2):
            server = mesh.nodes[i].status()["serving"]["server"]
            assert hosts <= {p for p, n in server["by_peer"].items() if n > 0}, server
