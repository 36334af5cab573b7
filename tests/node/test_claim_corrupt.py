"""Claiming on real nodes when one peer serves rotten blobs: 3 ``ekmesh join --model`` processes on 127.0.0.1.

How a real node comes to serve bad bytes, without a test hook in it: its store trusts a blob whose stat still
matches the record ``Store.verify`` wrote when the blob last hashed right (size, mtime, ctime, inode). Flipping bytes
in place through the file system changes the ctime, which ``os.utime`` cannot set back, so the store re-hashes such a
blob, quarantines it and the server answers NOT_FOUND: a tamperer has to go through the store. Bit rot on the medium
leaves the stat as it was; the test reproduces exactly that state by flipping one byte of the tensor data of every
expert blob in the "rotten" node's store and then recording the new stat as verified (``Store.mark_verified``, what
the store itself does after a good hash), as a node whose disk rotted after verification, or whose owner lies, would
be. The rot happens while the node runs, after it loaded its experts (a node hashes every expert blob again before
loading it, so rot present at start is caught there: checked at the end by restarting the rotten node).

Order (each step waits for an observable state, never a sleep): the rotten node starts alone with the model and
loads every expert; its blobs rot; the fetcher joins through it and, knowing no other peer, asks it for every expert
blob: the first copy fails the hash, the rotten node is banned (600 s) and listed in the fetcher's
``claim.bad_peers``; the model's source directory is gone, so nothing else can help yet. Then an honest seeded node
joins; the fetcher gets every expert blob from it and never asks the banned node again. ``--replicas 3`` puts every
expert on every node, so the fetcher needs every blob (the one that failed included) whatever the placement.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import blake3
import pytest

from tests.discovery.meshproc import FAST, NodeProc, ekmesh_argv, env_for, wait_until

GIB = 1 << 30


def _rot(store: Any, blob_id: str) -> None:
    """Flips the last byte of a stored blob (tensor data, so it still loads) and records it as verified."""
    path = store.blob_path(blob_id)
    with open(path, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)[0]
        f.seek(-1, 2)
        f.write(bytes([last ^ 0xFF]))
    store.mark_verified(blob_id)


def _hash_of(path: Path) -> str:
    return "blake3:" + blake3.blake3(path.read_bytes()).hexdigest()


def _status_json(home: Path) -> dict[str, Any]:
    """``ekmesh status --json`` as a user runs it."""
    out = subprocess.run(ekmesh_argv("status", "--json"), env=env_for(home), capture_output=True, text=True,
                         timeout=30, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.mark.timeout(30)
def test_flipping_bytes_in_place_is_caught_even_with_the_mtime_restored(tmp_path: Path) -> None:
    """Why the test below records the stat itself: a tamperer that goes through the file system is caught."""
    from ekmesh.core.errors import BlobHashMismatchError
    from ekmesh.shard.store import Store

    store = Store(tmp_path / "store")
    bid = store.put([bytes(range(256)) * 64])
    path = store.blob_path(bid)
    assert store.verify(bid) == path
    before = path.stat()
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\x00")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(BlobHashMismatchError):
        store.verify(bid)
    assert not store.has(bid)  # quarantined: a server answers NOT_FOUND for it


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_node_serving_rotten_blobs_is_banned_and_bypassed(tmp_path: Path) -> None:
    from ekmesh.registry.imports import import_full
    from ekmesh.shard.store import Store
    from tests.tiny_models import make_tiny

    src, _ = make_tiny("qwen3_moe", tmp_path / "ckpt")
    honest = Store(tmp_path / "honest" / "store")
    model_id = import_full(str(src), store=honest).model_id
    m = honest.load_manifest(model_id)
    experts = m.expert_ids()
    expert_blobs = set(experts.values())
    shutil.copytree(honest.root, tmp_path / "rotten" / "store")
    rotten = Store(tmp_path / "rotten" / "store")
    shutil.rmtree(src)  # no fallback to the model's source: good copies come from the honest peer only

    total = sum(m.size(b) for b in expert_blobs)
    common = ["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--no-dht", *FAST, "--model", model_id,
              "--memory", f"{2 * total / GIB:.12f}", "--replicas", "3"]
    nodes: list[NodeProc] = []
    try:
        bad = NodeProc(tmp_path / "rotten", *common, "--name", "rotten")
        nodes.append(bad)
        wait_until(lambda: bad.status()["claim"]["self"]["ready"] == len(experts), 60,
                   "the rotten node to load and advertise every expert", interval=0.2)
        for bid in expert_blobs:  # the disk rots under the running node
            _rot(rotten, bid)
            assert rotten.verify(bid) == rotten.blob_path(bid)  # the store trusts it: same stat as recorded
            assert _hash_of(rotten.blob_path(bid)) != bid
        fetcher = NodeProc(tmp_path / "fetcher", *common, "--name", "fetcher", "--peer", bad.addrs[0])
        nodes.append(fetcher)

        def banned() -> list[list[str]]:
            return fetcher.status()["claim"]["bad_peers"]  # type: ignore[no-any-return]

        wait_until(lambda: bool(banned()), 60, "the fetcher to find the rotten node's bad bytes", interval=0.2)
        [[who, first_bad]] = banned()
        assert who == bad.peer_id and first_bad in expert_blobs
        fstore = Store(tmp_path / "fetcher" / "store")
        assert not any(fstore.has(b) for b in expert_blobs), "a rotten copy was stored"

        good = NodeProc(tmp_path / "honest", *common, "--name", "honest", "--peer", bad.addrs[0])
        nodes.append(good)

        def replicated() -> bool:
            shard = fetcher.status()["models"].get(model_id)
            if shard is None:
                return False
            lo = shard["layers"][0]
            cells = [shard["holders"][layer - lo][e] for layer, e in experts]
            per_peer = shard["per_peer"]
            return (min(cells) >= 2 and per_peer.get(fetcher.peer_id) == len(experts)
                    and per_peer.get(good.peer_id) == len(experts))

        took = wait_until(replicated, 60, "every expert ready on the fetcher and the honest node", interval=0.2)
        print(f"every expert ready on >= 2 peers (the fetcher and the honest node) {took:.1f}s after the honest "
              "node started")

        snap = _status_json(fetcher.home)
        claim = snap["claim"]
        assert claim["bad_peers"] == [[bad.peer_id, first_bad]], claim["bad_peers"]  # banned once, still banned
        assert claim["blobs_fetched"] >= len(expert_blobs)  # from peers (the source is gone)
        for bid in expert_blobs:  # the failed blob too: every copy the fetcher keeps hashes to its id
            assert _hash_of(fstore.blob_path(bid)) == bid
        assert _status_json(good.home)["claim"]["bad_peers"] == []  # it had everything: it fetched nothing
        assert _status_json(bad.home)["claim"]["bad_peers"] == []
        for bid in expert_blobs:  # nobody repaired the rotten node behind its back
            assert _hash_of(rotten.blob_path(bid)) != bid
        for n in nodes:
            assert n.proc.poll() is None

        # Restarted, the rotten node hashes each expert blob before loading it: it quarantines its rotten copies,
        # fetches good ones from its peers and serves those.
        bad.stop()
        bad = nodes[0] = NodeProc(tmp_path / "rotten", *common, "--name", "rotten", "--peer", good.addrs[0])
        wait_until(lambda: bad.status()["claim"]["self"]["ready"] == len(experts), 60,
                   "the restarted rotten node to repair and load every expert", interval=0.2)
        for bid in expert_blobs:
            assert _hash_of(rotten.blob_path(bid)) == bid
        assert len(list((rotten.root / "quarantine").iterdir())) >= len(expert_blobs)
    finally:
        for n in nodes:
            n.stop()
