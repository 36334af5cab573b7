"""Builds a small mesh for tests: a tiny checkpoint's experts spread over ``ServerProc`` subprocesses, and an
attention host (this process) holding none of them, using ``RemoteExperts`` over pinned channels."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ekmesh.infer.dataplane.channel import ChannelPool, TlsIdentity
from ekmesh.infer.dataplane.frames import ModelLimits
from ekmesh.infer.dataplane.peerstats import RemoteTimeouts
from ekmesh.infer.dataplane.remote import RemoteExperts
from ekmesh.infer.expert import ExpertWeights
from ekmesh.infer.experts import LocalExperts
from ekmesh.infer.loader import Checkpoint
from tests.infer.dataplane.expert_proc import ServerProc

HOST = "attention-host"


class Mesh:
    """Server subprocesses + the host's identity, pins and holder map. ``placement``: peer id -> its experts."""

    def __init__(self, ckpt_dir: Path, placement: dict[str, list[tuple[int, int]]]) -> None:
        self.ckpt = Checkpoint.open(ckpt_dir)
        self.identity = TlsIdentity.generate(HOST)
        self.procs = {p: ServerProc(ckpt_dir, p, ex, {HOST: self.identity.fingerprint})
                      for p, ex in placement.items()}
        try:
            for proc in self.procs.values():
                proc.ready()
        except BaseException:
            self.close()
            raise
        self.pins = {p: proc.fingerprint for p, proc in self.procs.items()}
        self.order = list(placement)

    def holders(self, layer: int, expert: int) -> list[str]:
        return [p for p in self.order if (layer, expert) in self.procs[p].experts]

    def address(self, peer: str) -> tuple[str, int] | None:
        proc = self.procs.get(peer)
        return proc.address if proc else None

    def fallback(self, layer: int, expert: int) -> ExpertWeights:
        return self.ckpt.family.read_expert(self.ckpt.reader, self.ckpt.config, layer, expert)

    def backend(self, with_fallback: bool = False,
                holders: Callable[[int, int], list[str]] | None = None) -> RemoteExperts:
        limits = ModelLimits.from_config(self.ckpt.config)
        pool = ChannelPool(self.identity, self.pins.get, self.address, limits)
        local = LocalExperts(self.ckpt.config.expert_spec())  # holds nothing at first
        return RemoteExperts(limits, local, holders or self.holders, pool,
                             self.fallback if with_fallback else None,
                             RemoteTimeouts(first_s=20.0, floor_s=2.0))

    def restart(self, peer: str) -> None:
        """Replaces ``peer``'s process (e.g. after a kill) with a fresh one holding the same experts. It has a new
        port and certificate, which every backend of this mesh uses from its next dial of ``peer``."""
        old = self.procs[peer]
        old.close()
        self.procs[peer] = ServerProc(old.ckpt, peer, sorted(old.experts), {HOST: self.identity.fingerprint}).ready()
        self.pins[peer] = self.procs[peer].fingerprint

    def close(self) -> None:
        for proc in self.procs.values():
            proc.close()


def spread(ckpt: Checkpoint, peers: list[str], replicas: int) -> dict[str, list[tuple[int, int]]]:
    """Expert e of every MoE layer goes to peers (e + layer + r) mod n for r < replicas: each layer uses all
    peers and each expert has ``replicas`` holders."""
    out: dict[str, list[tuple[int, int]]] = {p: [] for p in peers}
    for layer, e in ckpt.expert_addresses():
        for r in range(replicas):
            out[peers[(e + layer + r) % len(peers)]].append((layer, e))
    return out
