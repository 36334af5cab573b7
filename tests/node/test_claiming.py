"""Claiming on real nodes: 4 ``ekmesh join --model`` processes on 127.0.0.1, the tiny model imported into one home.

The other three have neither the manifest nor a blob: they get the manifest from the mesh (a GET of the model id
over blob exchange) and the expert blobs from peers; no hub is involved. Memory is set so that no peer can hold every
expert but 3 peers can still hold 2 copies of each. Checked from the nodes' ``status --json``: every expert ready on
>= 2 live peers and no peer holding all of them; after a SIGKILL of the seeded node, every expert back on >= 2 ready
holders, and no expert ever at 0 ready holders in between.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from ekmesh.core.errors import NodeNotRunningError
from tests.discovery.meshproc import FAST, NodeProc, wait_until

GIB = 1 << 30


def _holders(snap: dict[str, Any], model_id: str, experts: Iterable[tuple[int, int]]) -> list[int] | None:
    """Ready holders of each routed expert (the grid also spans the cells of dense layers, which hold none)."""
    shard = snap["models"].get(model_id)
    if shard is None:
        return None
    lo = shard["layers"][0]
    return [shard["holders"][layer - lo][e] for layer, e in experts]


def _diagnosis(nodes: list[NodeProc], model_id: str, experts: Iterable[tuple[int, int]]) -> str:
    """What each live node believes (peers' states, assignment, holders, its claim) and its log's last lines."""
    out = []
    for n in nodes:
        try:
            snap = n.status()
        except (NodeNotRunningError, OSError) as exc:
            out.append(f"{n.peer_id}: no status ({exc})")
            continue
        shard = snap["models"].get(model_id, {})
        out.append(f"{n.peer_id}: holders {_holders(snap, model_id, experts)} per_peer {shard.get('per_peer')} "
                   f"claim {json.dumps(snap.get('claim'))[:600]}")
        out.extend(f"  peer {p['peer_id']} {p['state']} assigned {p['assigned']} models {p['models']}"
                   for p in snap["peers"])
        out.append("  log: " + "\n  log: ".join(n.stderr().splitlines()[-15:]))
    return "\n".join(out)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_four_nodes_claim_replicate_and_heal_after_a_kill(tmp_path: Path) -> None:
    from ekmesh.registry.imports import import_full
    from ekmesh.shard.store import Store
    from tests.tiny_models import make_tiny

    src, _ = make_tiny("qwen3_moe", tmp_path / "ckpt")
    seeded = Store(tmp_path / "n0" / "store")
    model_id = import_full(str(src), store=seeded).model_id
    m = seeded.load_manifest(model_id)
    experts = m.expert_ids()
    total = sum(m.size(b) for b in experts.values())
    # each peer can hold 80% of the experts: nobody holds all, 3 peers still hold 2 copies of each (2.4 >= 2)
    memory = f"{0.8 * total / GIB:.12f}"
    common = ["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--no-dht", *FAST,
              "--model", model_id, "--memory", memory]
    nodes: list[NodeProc] = []
    try:
        start = time.monotonic()
        nodes.append(NodeProc(tmp_path / "n0", *common, "--name", "n0"))
        for i in (1, 2, 3):
            nodes.append(NodeProc(tmp_path / f"n{i}", *common, "--name", f"n{i}", "--peer", nodes[0].addrs[0]))
        observer = nodes[1]

        def replicated(snap: dict[str, Any], live: int) -> bool:
            cells = _holders(snap, model_id, experts)
            per_peer = snap["models"][model_id]["per_peer"] if cells else {}
            return (cells is not None and min(cells) >= 2
                    and len(per_peer) == live and max(per_peer.values()) < len(experts))

        def settled(snap: dict[str, Any]) -> bool:
            """Every peer holds ready exactly what the observer's placement assigns it (nothing kept)."""
            return all(p["assigned"][model_id] == p["models"].get(model_id) for p in snap["peers"])

        took = wait_until(lambda: replicated(snap := observer.status(), 4) and settled(snap), 40,
                          "every expert ready on >= 2 of 4 peers, each peer holding what it is assigned",
                          interval=0.2)
        print(f"4 peers: every expert on >= 2 ready holders {took:.1f}s after the last start "
              f"({time.monotonic() - start:.1f}s after the first)")
        snap = observer.status()
        claim = snap["claim"]
        assert claim["model"] == model_id and claim["experts"] == len(experts)
        assert claim["self"]["ready"] == claim["self"]["assigned"] > 0, claim
        assert all(p["assigned"][model_id] > 0 for p in snap["peers"]), snap["peers"]
        for n in nodes[1:]:  # they fetched what they hold, from peers (the manifest too)
            assert n.status()["claim"]["bytes_fetched"] > 0
            assert Store(n.home / "store").load_manifest(model_id).id == model_id

        # SIGKILL the seeded node; poll throughout that no expert ever drops to 0 ready holders.
        victim = nodes[0]
        victim.signal(signal.SIGKILL)
        victim.proc.wait(timeout=10)
        lowest = [len(experts)]

        def healed() -> bool:
            snap = observer.status()
            cells = _holders(snap, model_id, experts)
            assert cells is not None
            lowest[0] = min(lowest[0], min(cells))
            assert min(cells) >= 1, f"an expert has no ready holder: {snap['models'][model_id]['holders']}"
            return victim.peer_id not in snap["models"][model_id]["per_peer"] and replicated(snap, 3)

        try:
            took = wait_until(healed, 30, "every expert back on >= 2 ready holders after the kill", interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_diagnosis(nodes[1:], model_id, experts)}") from None
        print(f"healed {took:.1f}s after the SIGKILL (lowest holder count seen: {lowest[0]})")
        for n in nodes[1:]:
            assert n.proc.poll() is None
    finally:
        for n in nodes:
            n.stop()
