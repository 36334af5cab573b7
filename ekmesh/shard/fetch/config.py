"""Blob exchange, the client's settings and outcome: ``FetchConfig`` (caps, sizes, deadlines) and ``FetchReport``
(what one ``Fetcher.fetch`` call stored, received and asked for, and which peers lied).

Role: plain data shared by every module of the client; it imports nothing from ``ekmesh.shard.fetch``, so the
other modules import it from below. ``ekmesh.shard.fetch.fetcher`` documents what the settings mean.

Invariants: a ``FetchConfig`` is frozen; a ``FetchReport`` belongs to one ``fetch`` call and is changed only under
the peer state's condition variable (``PeerSlots.cv``) while that call's workers run.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FetchConfig:
    max_per_peer: int = 2
    max_total: int = 8
    split_at: int = 8 << 20  # blobs at least this big are fetched by ranges from several holders
    range_size: int = 8 << 20
    ban_s: float = 600.0
    io_s: float = 30.0  # one message
    record_every: int = 8 << 20
    max_failures: int = 2  # broken transfers of one blob from one peer before that peer is skipped for it
    max_blob: int = 1 << 40


@dataclass
class FetchReport:
    stored: dict[str, str] = field(default_factory=dict)  # blob id -> "present" | "peers" | "fallback"
    received: dict[str, int] = field(default_factory=dict)  # data bytes per peer
    requests: list[tuple[str, str, int, int, str]] = field(default_factory=list)  # peer, blob, offset, len, status
    bad_peers: list[tuple[str, str]] = field(default_factory=list)  # (peer, blob id) that served corrupt bytes
