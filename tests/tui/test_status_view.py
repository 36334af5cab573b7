"""The status view rendered from a fixed snapshot into a recording console without colour."""

from __future__ import annotations

from rich.console import Console

from ekmesh.discovery.advert import ModelReady
from ekmesh.discovery.snapshot import shard_maps
from ekmesh.tui.status import render_status

A, B, C = ("12D3KooWAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAalpha111",
           "12D3KooWBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBbravo222",
           "12D3KooWCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCcharl333")
GIB = 1 << 30


def peer(pid, name, state, **kw):
    base = {"peer_id": pid, "name": name, "version": "0.1.0", "state": state, "reason": "",
            "addrs": [f"/ip4/192.168.1.{len(name)}/tcp/7733/p2p/{pid}"], "data_addr": None,
            "devices": [{"kind": "cuda", "name": "RTX 4090", "memory": 24 * GIB}], "memory_total": 32 * GIB,
            "memory_free": 20 * GIB, "speed": None, "load": 0.5, "rtt_ms": 1.25, "last_seen_s": 0.4,
            "incarnation": 1, "seq": 9, "models": {}}
    return {**base, **kw}


def snapshot():
    # Layers [2, 4) x 4 experts. alpha holds all of layer 2 and expert 0 of layer 3; bravo layer 2 experts 0-1.
    models = shard_maps({
        A: {"tiny": ModelReady((2, 4), 4, {2: frozenset(range(4)), 3: frozenset({0})})},
        B: {"tiny": ModelReady((2, 4), 4, {2: frozenset({0, 1})})},
    })
    return {
        "schema": 1, "generated_at": 0.0, "self": A, "addrs": [], "mesh": {"open": False, "key_id": "abc123def456"},
        "peers": [peer(A, "alpha", "self", rtt_ms=None, devices=[]), peer(B, "bravo", "up"),
                  peer(C, "charlie", "down", reason="2 pings failed", last_seen_s=12.0)],
        "models": models,
    }


def render(snap, width=120) -> str:
    console = Console(width=width, record=True, color_system=None, force_terminal=False)
    console.print(render_status(snap))
    return console.export_text()


def test_peers_table_and_header():
    text = render(snapshot())
    assert "private mesh (key id abc123def456)" in text
    assert "2 of 3 peers up" in text
    lines = {name: next(line for line in text.splitlines() if f" {name} " in f" {line} ") for name in
             ("alpha", "bravo", "charlie")}
    assert "…alpha111" in lines["alpha"] and "self" in lines["alpha"] and "now" in lines["alpha"]
    assert "192.168.1.5:7733" in lines["bravo"] and "cuda" in lines["bravo"] and "20.0/32.0G" in lines["bravo"]
    assert "1.2ms" in lines["bravo"] or "1.3ms" in lines["bravo"]
    assert "down" in lines["charlie"] and "12s" in lines["charlie"]


def test_shard_map_counts_coverage_and_totals():
    snap = snapshot()
    tiny = snap["models"]["tiny"]
    assert tiny["holders"] == [[2, 2, 1, 1], [1, 0, 0, 0]]
    assert tiny["coverage"] == 5 / 8 and tiny["replicated"] == 2 / 8
    assert tiny["per_peer"] == {A: 5, B: 2}
    text = render(snap)
    assert "model tiny  layers [2, 4) × 4 experts · coverage 62.5% · replicated 25.0%" in text
    assert "L2 2211" in text and "L3 1···" in text
    alpha_total = next(line for line in text.splitlines() if "…alpha111" in line and "62.5%" in line)
    assert " 5 " in alpha_total


def test_open_mesh_is_called_out_and_narrow_terminals_still_render():
    snap = {**snapshot(), "mesh": {"open": True, "key_id": None}, "models": {}}
    text = render(snap, width=80)
    assert "open mesh" in text and "anyone" in text
    assert "model" not in text


def test_claiming_progress_line():
    snap = snapshot()
    snap["claim"] = {"model": "blake3:abcd", "state": "claiming", "replicas": 2, "experts": 8,
                     "self": {"assigned": 5, "fetched": 4, "ready": 3, "kept": 1},
                     "under_replicated": [[2, 1], [3, 0]], "bytes_fetched": 3 * (1 << 20) + 512 * 1024,
                     "blobs_fetched": 4, "rate_bps": 2 * (1 << 20), "bad_peers": [[B, "blake3:ff"]]}
    text = " ".join(render(snap, width=400).split())
    assert ("claiming blake3:abcd (claiming, R=2) · this node: 3 ready / 4 fetched / 5 assigned "
            "(+1 kept until their new holders are ready) · fetched 4 blobs, 3.5 MiB at 2.0 MiB/s · "
            "2 experts under-replicated (the mesh has too little memory for 2 copies) · "
            "1 peers served bad bytes") in text
    assert "claiming" not in render(snapshot())


def test_serving_line():
    snap = snapshot()
    snap["serving"] = {"model": "blake3:abcd", "attention": True, "state": "serving", "ready": True,
                       "missing_experts": 0, "device": "cpu", "dtype": "float32", "loaded_experts": 5,
                       "api_url": "http://127.0.0.1:7734/v1",
                       "peers": {B: {"round_trips": 40, "mean_rtt_ms": 0.4125, "failures": 1}}}
    text = " ".join(render(snap, width=400).split())
    assert ("serving 5 experts loaded on cpu (float32) · attention host: ready · API http://127.0.0.1:7734/v1 · "
            "round trips: bravo 0.41 ms (1 failed)") in text
    snap["serving"] = {**snap["serving"], "attention": False, "peers": {}, "api_url": None}
    assert "serving 5 experts loaded on cpu (float32) · no attention (--no-attention)" in " ".join(
        render(snap, width=400).split())
    snap["serving"] = {**snap["serving"], "experts_format": "q4", "loaded_bytes": 3 << 20}
    assert "serving 5 experts (q4, 3.0 MiB) loaded on cpu (float32)" in " ".join(render(snap, width=400).split())
    snap["serving"] = {**snap["serving"], "attention": True, "ready": False, "state": "loading the dense part",
                       "missing_experts": 3}
    assert "attention host: loading the dense part · 3 experts have no live holder" in " ".join(
        render(snap, width=400).split())


def test_a_bootstrap_peer_that_refuses_this_node_is_called_out():
    snap = {**snapshot(), "peers": [peer(A, "alpha", "self", rtt_ms=None, devices=[])], "models": {}}
    snap["bootstrap"] = [
        {"peer_id": B, "addrs": "/ip4/10.0.0.2/tcp/7733", "state": "refused",
         "reason": "/ip4/10.0.0.2/tcp/7733 accepts TCP connections but did not complete the handshake: it is "
                   "probably on another mesh key (or not an ekmesh node)"},
        {"peer_id": C, "addrs": "/ip4/10.0.0.3/tcp/7733", "state": "connected", "reason": ""},
    ]
    text = render(snap, width=200)
    line = next(line for line in text.splitlines() if "bootstrap peer" in line)
    assert "refused" in line and "another mesh key" in line and "this node is alone" in line
    assert "…charl333" not in line and text.count("bootstrap peer") == 1  # connected ones are not lines


def test_verification_and_bans_on_the_serving_line():
    snap = snapshot()
    ban = {"peer": C, "layer": 3, "experts": [1], "diff": 0.9, "bound": 0.05, "by": "local", "at": 0.0,
           "reason": "layer 3 experts [1]: answer differs by 0.9 > bound 0.05 (recomputed locally)"}
    snap["serving"] = {"model": "blake3:abcd", "attention": True, "state": "serving", "ready": True,
                       "missing_experts": 0, "device": "cpu", "dtype": "float32", "loaded_experts": 0,
                       "api_url": None, "peers": {},
                       "verify": {"fraction": 0.05, "pairs": 120, "rows": 60, "mismatches": 1, "unchecked": 0,
                                  "banned": [ban]}}
    text = " ".join(render(snap, width=400).split())
    assert "verified 120 results (5% sampled)" in text
    assert "banned charlie: layer 3 experts [1]: answer differs by 0.9 > bound 0.05" in text


def test_decoding_on_the_serving_line():
    snap = snapshot()
    snap["serving"] = {"model": "blake3:abcd", "attention": True, "state": "serving", "ready": True,
                       "missing_experts": 0, "device": "cpu", "dtype": "float32", "loaded_experts": 0,
                       "api_url": None, "peers": {},
                       "decoding": {"speculative": "draft", "draft": True, "active": 3, "recent_steps": 200,
                                    "mean_batch": 2.4, "max_batch": 4}}
    text = " ".join(render(snap, width=400).split())
    assert "decoding: draft (draft model), 3 active, batch 2.4 mean / 4 max" in text
