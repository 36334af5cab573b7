"""Placement: which peers hold which routed experts. A pure, deterministic function of (model, live peers).

Every peer computes the same map from the same membership view, so no coordinator is needed.

Method: weighted rendezvous (highest-random-weight) hashing. For an item x = (model, layer, expert) and a peer p
with weight w_p, score(x, p) = w_p / -ln(u(x, p)), where u is a uniform hash in (0, 1) of the pair; the peers
ranked by score give x's preference list. Rendezvous hashing is what makes a join or a leave move only the items
whose top choices change: a new peer takes exactly the items it now wins, a leaving peer's items go to their next
choice, nothing else moves. The expected share of each peer is proportional to its weight (memory × speed).

Capacity and replication: each peer has a byte budget. Copies are placed in rounds: round 1 gives every item one
holder, round 2 a second, up to R; in each round items are visited in a fixed order (by hash) and each takes the
first peer in its preference list that does not hold it yet and still has room. So the mesh prefers covering every
expert once over holding some twice, never exceeds a budget, and falls back to fewer than R copies only where the
memory is not there (``Placement.under_replicated`` says which): where the rounds left an item short while some
peer still has room, a repair pass moves one copy aside to make room for it (``_repair``).

Invariants: the result does not depend on the order of the peer list; a peer never exceeds its budget; holders of
an item are distinct and ordered by preference (the first is the preferred server).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ekmesh.core.errors import ConfigError
from ekmesh.core.ids import ExpertKey

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class PeerCapacity:
    peer_id: str
    budget_bytes: int  # memory this peer gives to routed experts
    speed: float = 1.0  # relative compute speed; the weight is budget × speed

    def __post_init__(self) -> None:
        if self.budget_bytes < 0 or not self.speed > 0:
            raise ConfigError(f"peer {self.peer_id}: budget must be >= 0 and speed > 0")


@dataclass
class Placement:
    """holders[(layer, expert)] = peer ids, most preferred first."""

    holders: dict[ExpertKey, list[str]]
    replicas: int
    load_bytes: dict[str, int] = field(default_factory=dict)

    def assigned(self, peer_id: str) -> list[ExpertKey]:
        return sorted(item for item, hs in self.holders.items() if peer_id in hs)

    @property
    def under_replicated(self) -> list[ExpertKey]:
        return sorted(item for item, hs in self.holders.items() if len(hs) < self.replicas)

    @property
    def uncovered(self) -> list[ExpertKey]:
        return sorted(item for item, hs in self.holders.items() if not hs)


def _h64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised over uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def preference(model_id: str, items: Sequence[ExpertKey], peers: Sequence[PeerCapacity]) -> np.ndarray:
    """[len(items), len(peers)] peer indices, each row ordered from most to least preferred."""
    item_keys = np.array([_h64(f"{model_id}/{layer}/{expert}".encode()) for layer, expert in items],
                         dtype=np.uint64)  # [N]
    peer_keys = np.array([_h64(p.peer_id.encode()) for p in peers], dtype=np.uint64)  # [P]
    weights = np.array([max(p.budget_bytes, 1) * p.speed for p in peers], dtype=np.float64)  # [P]
    u = _mix(item_keys[:, None] ^ _mix(peer_keys)[None, :])  # [N, P] uniform 64-bit
    unit = ((u >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)  # [N, P] in (0, 1)
    score = weights[None, :] / -np.log(unit)  # [N, P], larger = preferred
    return np.argsort(-score, axis=1, kind="stable")


def place(model_id: str, items: Iterable[ExpertKey], item_bytes: dict[ExpertKey, int] | int,
          peers: Iterable[PeerCapacity], replicas: int = 2) -> Placement:
    """The placement of ``items`` (with their sizes) over ``peers`` with up to ``replicas`` copies each."""
    if replicas < 1:
        raise ConfigError(f"replicas must be >= 1, got {replicas}")
    items = sorted(set(items))
    peers = sorted(peers, key=lambda p: p.peer_id)  # input order never matters (stable sort ties by id)
    if len({p.peer_id for p in peers}) != len(peers):
        raise ConfigError("duplicate peer id in placement input")
    size = (lambda it: item_bytes) if isinstance(item_bytes, int) else (lambda it: item_bytes[it])
    holders: dict[ExpertKey, list[str]] = {it: [] for it in items}
    room = {p.peer_id: p.budget_bytes for p in peers}
    if not items or not peers:
        return Placement(holders, replicas, {p.peer_id: 0 for p in peers})
    prefs = preference(model_id, items, peers)  # [N, P]
    order = sorted(range(len(items)), key=lambda i: _h64(f"{model_id}/order/{items[i]}".encode()))
    rounds = min(replicas, len(peers))
    for _ in range(rounds):
        for i in order:
            item = items[i]
            need = size(item)
            held = holders[item]
            for j in prefs[i]:
                pid = peers[j].peer_id
                if pid not in held and room[pid] >= need:
                    held.append(pid)
                    room[pid] -= need
                    break
    _repair(items, order, prefs, peers, holders, room, size, rounds)
    # holders in preference order (round order is not preference order when capacity pushed a copy down)
    rank = {pid: r for r, pid in enumerate(p.peer_id for p in peers)}
    for i, item in enumerate(items):
        pos = {int(j): r for r, j in enumerate(prefs[i])}
        holders[item].sort(key=lambda pid: pos[rank[pid]])
    load = {p.peer_id: p.budget_bytes - room[p.peer_id] for p in peers}
    return Placement(holders, replicas, load)


def _repair(items: list[ExpertKey], order: list[int], prefs: np.ndarray, peers: list[PeerCapacity],
            holders: dict[ExpertKey, list[str]], room: dict[str, int], size: Callable[[ExpertKey], int],
            rounds: int) -> None:
    """Gives an item the rounds left short a copy by moving one copy out of the way: when every peer with room
    already holds item x, a full peer q without x hands one of its items y to a peer s with room that lacks y,
    and takes x. The rounds alone can fill two peers with the wrong items while a third has room (3 peers of
    12.8 slots for 16 items, R = 2: 3% of peer-id draws); with equal sizes one move sufficed in every draw the
    tests make. Skipped when no peer has room for the smallest item (a mesh truly short of memory)."""
    smallest = min(size(it) for it in items)
    if max(room.values()) < smallest:
        return
    held_by: dict[str, list[ExpertKey]] = {p.peer_id: [] for p in peers}
    for it in items:
        for pid in holders[it]:
            held_by[pid].append(it)
    index = {it: i for i, it in enumerate(items)}
    for i in order:
        x = items[i]
        while len(holders[x]) < rounds and max(room.values()) >= smallest:
            if not _move_one_for(x, index, prefs, peers, holders, held_by, room, size):
                break


def _move_one_for(x: ExpertKey, index: dict[ExpertKey, int], prefs: np.ndarray, peers: list[PeerCapacity],
                  holders: dict[ExpertKey, list[str]], held_by: dict[str, list[ExpertKey]], room: dict[str, int],
                  size: Callable[[ExpertKey], int]) -> bool:
    need = size(x)
    for j in prefs[index[x]]:
        q = peers[j].peer_id
        if q in holders[x]:
            continue
        if room[q] >= need:  # (a move earlier in this pass may have made room)
            holders[x].append(q)
            held_by[q].append(x)
            room[q] -= need
            return True
        for y in held_by[q]:
            if room[q] + size(y) < need:
                continue
            for k in prefs[index[y]]:
                s = peers[k].peer_id
                if s != q and s not in holders[y] and room[s] >= size(y):
                    holders[y][holders[y].index(q)] = s
                    held_by[q].remove(y)
                    held_by[s].append(y)
                    room[s] -= size(y)
                    room[q] += size(y) - need
                    holders[x].append(q)
                    held_by[q].append(x)
                    return True
    return False


def moved(before: Placement, after: Placement) -> int:
    """Copies that must be fetched to go from ``before`` to ``after``: (item, holder) pairs new in ``after``."""
    return sum(len(set(hs) - set(before.holders.get(item, []))) for item, hs in after.holders.items())
