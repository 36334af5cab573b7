"""Helpers for tests that serve a model from real ``ekmesh join --model`` processes and talk to their API.

``seed_identity`` writes a deterministic Ed25519 identity into a home before its node starts, so a test's peer ids,
and therefore the placement, are the same in every run. ``ServingMesh`` starts an attention host and expert holders
on 127.0.0.1, waits until the host's ``serving`` block says ready, and stops everything on exit.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.discovery.meshproc import FAST, NodeProc, wait_until

BASE = ["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--no-dht", "--api-port", "0", *FAST]


def seed_identity(home: Path, seed: str) -> None:
    """A fixed identity for ``home`` (derived from ``seed``): stable peer ids make the placement reproducible."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    kp = create_new_key_pair(hashlib.sha256(seed.encode()).digest())
    path = home / "identity.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, kp.private_key.serialize())
    finally:
        os.close(fd)


def peer_id_for(seed: str) -> str:
    """The peer id ``seed_identity(home, seed)`` gives a node."""
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    return ID.from_pubkey(create_new_key_pair(hashlib.sha256(seed.encode()).digest()).public_key).to_base58()


def seeds_splitting_every_layer(m: Any, holders: int, replicas: int, memory_gib: float, prefix: str,
                                tries: int = 200) -> list[str]:
    """Identity seeds for ``holders`` expert holders (all with ``--memory memory_gib``) under which the placement
    of model ``m`` gives every holder at least one expert in every MoE layer, so every layer uses all of them. The
    placement depends on the model id (which records the import's path), so the seeds are chosen per run by
    running the placement function the nodes run."""
    from ekmesh.shard.placement import PeerCapacity, place

    experts = m.expert_ids()
    layers = {layer for layer, _ in experts}
    sizes = {it: m.size(bid) for it, bid in experts.items()}
    for t in range(tries):
        seeds = [f"{prefix}-{t}-{i}" for i in range(holders)]
        peers = [PeerCapacity(peer_id_for(sd), int(memory_gib * (1 << 30)), 1.0) for sd in seeds]
        pl = place(m.id, list(experts), sizes, peers, replicas)
        if all({layer for layer, _ in pl.assigned(p.peer_id)} == layers for p in peers):
            return seeds
    raise AssertionError(f"no identity seeds split every layer of {m.id} over {holders} holders in {tries} tries")


def one_process_tokens(source: Any, prompt: list[int], n: int, store: Any = None) -> list[int]:
    """``n`` greedy tokens (no stop ids) of ``source`` in one process, fp32 on the CPU: a checkpoint directory, or a
    stored model id (e.g. a quantized one) of ``store``."""
    from ekmesh.infer.generate import SamplingParams
    from ekmesh.infer.session import LocalModel
    from ekmesh.registry.lookup import open_checkpoint

    lm = LocalModel.open(source if store is None else open_checkpoint(source, store), "cpu", "fp32")
    return lm.generator.generate(prompt, SamplingParams(max_tokens=n, stop_ids=frozenset())).token_ids


def post(url: str, body: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        out = json.loads(resp.read())
    assert isinstance(out, dict)
    return out


def stream_chunks(api_url: str, body: dict[str, Any], timeout: float = 300.0) -> Iterator[dict[str, Any]]:
    """Streams ``POST {api_url}/completions`` (``body`` + stream, token ids returned); yields each chunk as it
    arrives. An error event raises ``RuntimeError`` with its message. (``benchmarks/faults_nodes.py`` reads its
    answers through this too.)"""
    req = urllib.request.Request(api_url + "/completions",
                                 json.dumps({**body, "stream": True, "return_token_ids": True}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            yield chunk


def stream_token_ids(api_url: str, body: dict[str, Any], timeout: float = 300.0) -> Iterator[list[int]]:
    """``stream_chunks``, yielding the token ids received so far after each chunk."""
    got: list[int] = []
    for chunk in stream_chunks(api_url, body, timeout):
        for c in chunk["choices"]:
            got.extend(c.get("token_ids", []))
        yield got


class ServingMesh:
    """``roles``: one list of extra ``join`` arguments per node; node 0 is started first and bootstraps the rest."""

    def __init__(self, tmp: Path, model: str, roles: Sequence[Sequence[str]], seeds: Sequence[str] | None = None,
                 extra: Sequence[str] = ()) -> None:
        self.nodes: list[NodeProc] = []
        self.claiming = sum(1 for role in roles if "--no-experts" not in role)  # nodes that take experts
        self._args = [[*BASE, "--model", model, "--name", f"n{i}", *extra, *role] for i, role in enumerate(roles)]
        try:
            for i in range(len(roles)):
                home = tmp / f"n{i}"
                if seeds is not None:
                    seed_identity(home, seeds[i])
                boot = ["--peer", self.nodes[0].addrs[0]] if self.nodes else []
                self.nodes.append(NodeProc(home, *self._args[i], *boot))
        except BaseException:
            self.close()
            raise

    def restart(self, i: int) -> NodeProc:
        """Node ``i`` again (same home: same identity and store), after it stopped or was killed; it bootstraps
        from the first other node still running."""
        old = self.nodes[i]
        old.stop()
        boot = next(n for j, n in enumerate(self.nodes) if j != i and n.proc.poll() is None)
        self.nodes[i] = NodeProc(old.home, *self._args[i], "--peer", boot.addrs[0])
        return self.nodes[i]

    def api(self, i: int = 0) -> str:
        url = self.nodes[i].hello["api_url"]
        assert isinstance(url, str)
        return url

    def wait_ready(self, i: int = 0, timeout: float = 60.0, holders: int = 1) -> dict[str, Any]:
        """Until node ``i`` sees every node, serves, and every expert has ``holders`` ready holders in its view
        with every peer holding what the placement assigns it."""
        node = self.nodes[i]

        def ready() -> bool:
            snap = node.status()
            serving = snap["serving"]
            if not serving["ready"]:
                return False
            mid = serving["model"]
            models = snap["models"].get(mid)
            # settled: every peer holds ready exactly what this node's placement assigns it (nothing kept)
            live = [p for p in snap["peers"] if p["state"] in ("self", "up")]
            settled = len(live) == len(self.nodes) and all(
                p["assigned"].get(mid, 0) == (p["models"].get(mid) or 0) for p in snap["peers"])
            # ... under a placement over every claiming peer (each one has a share)
            claimed = models is not None and all(
                p["assigned"].get(mid, 0) > 0 for p in snap["peers"] if p["peer_id"] in models["per_peer"])
            return (models is not None and len(models["per_peer"]) == self.claiming and claimed
                    and _min_holders(models) >= holders and settled)

        wait_until(ready, timeout, f"node {i} serving with every expert on >= {holders} ready holders",
                   interval=0.2)
        return node.status()

    def close(self) -> None:
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> ServingMesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _min_holders(models: dict[str, Any]) -> int:
    """The fewest ready holders of any routed expert (rows of dense layers hold only zeros and are skipped)."""
    rows = [row for row in models["holders"] if any(row)]
    return min(min(row) for row in rows) if rows else 0
