"""Recovery of claiming after a peer restarts (issue 16, item 6): its new TLS fingerprint is accepted as soon as its
advert is in the view, even while this node is busy fetching.

Claimers run as a node runs them, without libp2p: each gets the adverts the test says it sees (``live``) and
publishes into its own advert; blob exchange is real (TLS listeners and dialers on 127.0.0.1 port 0). A "hung" peer
is a real TCP listener that never accepts or answers, as a SIGSTOPped node's blob port behaves.
"""

from __future__ import annotations

import select
import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from ekmesh.core.ids import Endpoint, Fingerprint, PeerId
from ekmesh.core.tls import TlsIdentity
from ekmesh.discovery.advert import Advert, ModelReady
from ekmesh.node.claim import ClaimConfig, Claimer, grid_of
from ekmesh.shard.store import Store
from tests.discovery.inproc import until
from tests.node.servingmesh import peer_id_for


class _Peer:
    """One ``Claimer`` and the advert a node would sign for it (incarnation ``life``)."""

    def __init__(self, home: Path, seed: str, model: str, life: int = 1, **config: Any) -> None:
        self.peer_id, self.life = peer_id_for(seed), life
        self.models: dict[str, ModelReady] = {}
        self.others: list[Advert] = []
        self.claimer = Claimer(self.peer_id, Store(home / "store"), ClaimConfig(model, **config),
                               TlsIdentity.generate(self.peer_id), self.live, self.publish)
        self.claimer.open("127.0.0.1", "127.0.0.1")

    def publish(self, models: dict[str, ModelReady]) -> None:
        self.models = dict(models)

    def advert(self) -> Advert:
        return Advert(peer_id=PeerId(self.peer_id), incarnation=self.life, seq=1, name=self.peer_id[-6:],
                      version="test", memory_total=1 << 34, models=dict(self.models),
                      blob_addr=self.claimer.blob_addr, tls_fp=self.claimer.tls_fp)

    def live(self) -> list[Advert]:
        return [self.advert(), *self.others]


@pytest.mark.timeout(60)
def test_a_restarted_peer_is_accepted_while_this_node_is_stuck_in_a_fetch(tmp_path: Path) -> None:
    """P holds the model but lacks one expert blob, which only a hung peer S advertises: P's claiming waits in that
    fetch (io 20 s, two tries). Meanwhile R restarts (new certificate, new port) and its new advert reaches P's view:
    R must get the manifest from P within seconds, not after P's fetch gives up."""
    from ekmesh.registry.imports import import_full
    from tests.tiny_models import make_tiny

    src, _ = make_tiny("qwen3_moe", tmp_path / "ckpt")
    store = Store(tmp_path / "p" / "store")
    model_id = import_full(str(src), store=store).model_id
    m = store.load_manifest(model_id)
    missing = m.expert_ids()[(0, 0)]
    store.blob_path(missing).unlink()
    assert not store.has(missing)

    hung = socket.create_server(("127.0.0.1", 0), backlog=16)  # accepts nothing, answers nothing
    layers, experts = grid_of(m)
    everything = ModelReady(layers, experts, {layer: frozenset(range(experts)) for layer in range(*layers)})
    s_id = peer_id_for("recovery-hung")
    s_advert = Advert(peer_id=PeerId(s_id), incarnation=1, seq=1, name="hung", version="test", memory_total=1 << 34,
                      models={model_id: everything}, blob_addr=Endpoint("127.0.0.1", hung.getsockname()[1]),
                      tls_fp=Fingerprint(TlsIdentity.generate(s_id).fingerprint))

    p = _Peer(tmp_path / "p", "recovery-p", model_id, io_s=20.0, replicas=2)
    r_old = _Peer(tmp_path / "r", "recovery-r", model_id)  # R's previous life: P pins this certificate
    r_old.claimer.close()
    p.others = [s_advert, r_old.advert()]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.claimer.run)
            await until(lambda: bool(select.select([hung], [], [], 0)[0]), 20, "P to dial the hung peer")
            r = _Peer(tmp_path / "r", "recovery-r", model_id, life=2, io_s=2.0)  # restarted: new cert and port
            assert r.claimer.tls_fp != r_old.claimer.tls_fp
            r.others = [p.advert(), s_advert]
            p.others = [s_advert, r.advert()]  # R's new advert arrives in P's view
            nursery.start_soon(r.claimer.run)
            took = await until(lambda: r.claimer.manifest is not None, 10, "R to get the manifest from P")
            print(f"R got the manifest {took:.2f}s after its restart")
            assert p.claimer.state == "claiming" and not p.claimer.status()["self"]["ready"]  # still stuck
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        hung.close()

