"""The status snapshot: the JSON document behind ``ekmesh status`` (and ``--json``), built from the view.

Schema (version 1); every field is always present, ``null`` where unknown::

    {
      "schema": 1,
      "generated_at": 1767225600.0,            # unix time at the node
      "self": "12D3KooW...",                    # this node's peer id
      "addrs": ["/ip4/.../tcp/7733/p2p/12D3KooW..."],
      "mesh": {"open": true, "key_id": null},   # key_id: 12 hex chars of a hash of the mesh key when private
      "peers": [                                # this node first, then by name
        {"peer_id": str, "name": str, "version": str,
         "state": "self" | "up" | "down" | "left", "reason": str,   # why down/left ("" otherwise)
         "addrs": [str], "data_addr": str | null,
         "devices": [{"kind": str, "name": str, "memory": int}],
         "memory_total": int, "memory_free": int,                   # bytes
         "speed": float | null, "load": float,
         "rtt_ms": float | null, "last_seen_s": float,              # seconds since the last fresh advert
         "incarnation": int, "seq": int,
         "models": {model_id: int}}                                 # experts ready, per model
      ],
      "models": {
        model_id: {"layers": [lo, hi], "experts": int,
                   "holders": [[int, ...], ...],   # (hi - lo) rows × experts: live peers holding it ready
                   "coverage": float,             # share of cells with ≥ 1 holder
                   "replicated": float,           # share of cells with ≥ 2 holders
                   "per_peer": {peer_id: int},    # experts ready per live peer
                   "names": [str]}                # names live peers advertise for it (aliases, hub id)
      }
    }

A node adds beside these: ``relay``, ``bootstrap`` (``[{"peer_id", "addrs", "state", "reason"}]`` per ``--peer``:
state ``connecting``, ``connected``, ``refused`` (it listens but did not complete the handshake: another mesh key?)
or ``unreachable``), and with ``--model`` ``claim`` and ``serving``.

The shard map counts only live peers (``self`` and ``up``); a peer that advertised another grid for the same
model id is ignored for that model (the first grid, by peer id, wins).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ekmesh.discovery.advert import ModelReady
from ekmesh.discovery.names import MeshNames
from ekmesh.discovery.view import MeshView

SCHEMA = 1
LIVE = ("self", "up")


def build_snapshot(view: MeshView, addrs: list[str], mesh_open: bool, key_id: str | None) -> dict[str, Any]:
    now = view.clock()
    entries = sorted(view.peers(), key=lambda e: (e.state != "self", e.signed.advert.name, e.peer_id))
    peers = []
    for e in entries:
        a = e.signed.advert
        peers.append({
            "peer_id": a.peer_id, "name": a.name, "version": a.version, "state": e.state, "reason": e.reason,
            "addrs": list(a.addrs), "data_addr": None if a.data_addr is None else str(a.data_addr),
            "devices": [d.to_json() for d in a.devices],
            "memory_total": a.memory_total, "memory_free": a.memory_free, "speed": a.speed, "load": a.load,
            "rtt_ms": e.rtt_ms, "last_seen_s": round(max(0.0, now - e.last_heard), 3),
            "incarnation": a.incarnation, "seq": a.seq,
            "models": {m: r.count() for m, r in sorted(a.models.items())},
        })
    live = {e.peer_id: e.signed.advert.models for e in entries if e.state in LIVE}
    maps = shard_maps(live)
    names = MeshNames.of(e.signed.advert for e in entries if e.state in LIVE)
    for model_id, shard in maps.items():
        shard["names"] = names.names_of(model_id)
    return {
        "schema": SCHEMA,
        "generated_at": time.time(),
        "self": view.self_id,
        "addrs": list(addrs),
        "mesh": {"open": mesh_open, "key_id": key_id},
        "peers": peers,
        "models": maps,
    }


def shard_maps(models_by_peer: Mapping[str, Mapping[str, ModelReady]]) -> dict[str, dict[str, Any]]:
    """Per model: how many of the given peers hold each (layer, expert) ready, coverage, per-peer totals."""
    grids: dict[str, ModelReady] = {}
    for peer_id in sorted(models_by_peer):
        for model_id, ready in models_by_peer[peer_id].items():
            grids.setdefault(model_id, ready)
    out: dict[str, dict[str, Any]] = {}
    for model_id in sorted(grids):
        grid = grids[model_id]
        lo, hi = grid.layers
        holders = [[0] * grid.experts for _ in range(hi - lo)]
        per_peer: dict[str, int] = {}
        for peer_id in sorted(models_by_peer):
            held = models_by_peer[peer_id].get(model_id)
            if held is None or held.layers != grid.layers or held.experts != grid.experts:
                continue
            per_peer[peer_id] = held.count()
            for layer, experts in held.ready.items():
                for e in experts:
                    holders[layer - lo][e] += 1
        cells = (hi - lo) * grid.experts
        out[model_id] = {
            "layers": [lo, hi], "experts": grid.experts, "holders": holders,
            "coverage": sum(1 for row in holders for n in row if n >= 1) / cells,
            "replicated": sum(1 for row in holders for n in row if n >= 2) / cells,
            "per_peer": per_peer,
        }
    return out
