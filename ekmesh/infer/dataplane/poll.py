"""Busy-polling for data-plane answers: waiting on a socket without letting the core go to sleep.

A decode step makes one dependent round trip per MoE layer, and on a virtual machine most of a small round trip is
the cost of waking sleeping cores, not moving bytes: on this project's 2-core VM a 4 KiB TCP echo between two
processes takes ~100 µs when both block in ``recv`` and ~12 µs when both poll (``benchmarks/mesh_overhead.py``
prints both baselines). So a thread that expects an answer soon polls its socket (non-blocking reads, yielding the
core between them) for a bounded time before it blocks: the attention host while its frames are out, an expert
server for a short while after each answer (the next layer's frame is usually a few hundred microseconds away).

How long: each socket keeps its recent waits (``Waits``: the attention host's per peer, an expert server's per
connection). When the typical (median) wait is longer than ``EKMESH_POLL_US`` (3000 µs) the thread blocks:
waking a core costs little next to such a wait (a WiFi round trip), and the cores are better left to the peers'
compute. Otherwise it polls for up to twice the typical wait (+ 0.2 ms), at most three times ``EKMESH_POLL_US``.

Polling costs CPU and, in Python, the GIL: a polling thread retakes the GIL after every read, so another thread of
the same process that wants it can wait up to the interpreter's switch interval. Hence the rules:
- only where the process has at most one *registered* data-plane thread (``Registration``: an attention-host call in
  flight or an expert-server connection) — several conversations at once, or a node that hosts attention and serves
  other peers' frames too, never poll;
- by default only on machines with at least 4 cores (``budget``): on a 2-core machine that runs several nodes, the
  pollers take the cores the peers compute on (measured: no gain, sometimes a loss, in ``benchmarks/mesh_tokens.py``
  with 3 nodes on 2 cores); ``EKMESH_POLL_US`` set explicitly applies on any machine with 2 cores or more;
- never past the caller's deadline nor past 3 × ``EKMESH_POLL_US``; ``EKMESH_POLL_US=0`` turns polling off.

The other side of the same problem: an expert server's reader thread for a client on the same machine
(``same_host``) is made SCHED_BATCH (``no_wakeup_preemption``), so that a frame's arrival does not preempt the
attention host that sent it.

Invariants: ``recv_some`` returns at least one byte or raises exactly what a blocking read would (EOF, timeout,
broken connection as ``PeerClosedError``); it leaves the socket with a timeout set (never non-blocking).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass

from ekmesh.core.errors import ConfigError, PeerClosedError

log = logging.getLogger(__name__)

AUTO_MIN_CPUS = 4  # without EKMESH_POLL_US, poll only on machines with at least this many cores


def budget(env: str | None = None, cpus: int | None = None) -> float:
    """``MAX_POLL_S``: ``EKMESH_POLL_US`` µs when set (0: off). Unset: 3000 µs on a machine with at least
    ``AUTO_MIN_CPUS`` cores, else 0 — several ekmesh processes polling on a 2-core machine (``ekmesh demo``, the
    benchmarks) take the cores their peers compute on, which costs more than the wake-ups saved. Never on one
    core. ``env``/``cpus`` stand in for the environment variable (``None``: unset) and ``os.cpu_count()``."""
    n = (os.cpu_count() or 1) if cpus is None else cpus
    if env is None:
        return 3e-3 if n >= AUTO_MIN_CPUS else 0.0
    try:
        us = float(env)
    except ValueError:
        us = -1.0
    if not 0 <= us <= 1e6:  # also refuses nan
        raise ConfigError(f"EKMESH_POLL_US must be a number of microseconds in [0, 1000000], got {env!r}")
    return us * 1e-6 if n >= 2 else 0.0


MAX_POLL_S = budget(os.environ.get("EKMESH_POLL_US"))  # the longest typical wait worth polling for (0: never poll)
POLL_CAP_S = 3 * MAX_POLL_S  # the longest one wait polls


@dataclass
class PollStats:
    """How waits ended, process-wide (approximate under concurrency: plain increments)."""

    polled: int = 0  # data arrived while polling
    blocked: int = 0  # reads that blocked (no polling asked for or allowed, its time ran out, or a frame's rest)


STATS = PollStats()
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError)


class _Registry:
    """Counts the threads of this process that do data-plane I/O; polling is allowed while there is one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.count += n


_REGISTRY = _Registry()


class Registration:
    """``with Registration():`` around a data-plane call or connection: while two overlap, neither polls."""

    def __enter__(self) -> Registration:
        _REGISTRY.add(1)
        return self

    def __exit__(self, *exc: object) -> None:
        _REGISTRY.add(-1)


class Waits:
    """The recent waits (first byte of the next frame) on one socket, and how long the next one should poll."""

    def __init__(self, n: int = 16, warmup: int = 4) -> None:
        self._recent: deque[float] = deque(maxlen=n)
        self.warmup = warmup

    def note(self, seconds: float) -> None:
        self._recent.append(seconds)

    def budget(self) -> float:
        """Seconds to poll before blocking (see the module docstring)."""
        if MAX_POLL_S <= 0:
            return 0.0
        r = self._recent
        if len(r) < self.warmup:
            return MAX_POLL_S
        typical = sorted(r)[len(r) // 2]
        if typical > MAX_POLL_S:
            return 0.0
        return min(2 * typical + 2e-4, POLL_CAP_S)


def may_poll() -> bool:
    return MAX_POLL_S > 0 and _REGISTRY.count <= 1


def _read(sock: socket.socket, view: memoryview, peer: str | None) -> int:
    """One ``recv_into``: at least one byte; a would-block read raises as it came (``_WOULD_BLOCK``), the rest as
    ``PeerClosedError`` (EOF, timeout, broken connection)."""
    try:
        r = sock.recv_into(view)
    except _WOULD_BLOCK:
        raise
    except TimeoutError as exc:
        raise PeerClosedError(f"timed out waiting for data from peer {peer}", peer) from exc
    except (OSError, ssl.SSLError) as exc:
        raise PeerClosedError(f"connection to peer {peer} broke: {exc}", peer) from exc
    if r == 0:
        raise PeerClosedError(f"peer {peer} closed the connection", peer)
    return r


def recv_some(sock: socket.socket, view: memoryview, deadline: float, peer: str | None,
              poll_s: float = 0.0) -> int:
    """At least one byte into ``view`` before ``deadline`` (monotonic). Polls first for up to ``poll_s`` seconds
    (bounded by ``POLL_CAP_S`` and the rules above), then blocks. EOF or timeout: ``PeerClosedError``."""
    now = time.monotonic()
    if poll_s > 0 and may_poll():
        until = min(deadline, now + min(poll_s, POLL_CAP_S))
        sock.settimeout(0.0)
        try:
            while True:
                try:
                    r = _read(sock, view, peer)
                except _WOULD_BLOCK:
                    if time.monotonic() >= until or not may_poll():
                        break
                    os.sched_yield()  # lets a runnable thread of any process have this core
                    continue
                STATS.polled += 1
                return r
        finally:
            sock.settimeout(max(1e-3, deadline - time.monotonic()))
        now = time.monotonic()
    left = deadline - now
    if left <= 0:  # past the deadline, bytes that already arrived still count (a caller that waited on another
        sock.settimeout(0.0)  # peer first must not fail this one for it)
        try:
            r = _read(sock, view, peer)
        except _WOULD_BLOCK:
            raise PeerClosedError(f"timed out waiting for data from peer {peer}", peer) from None
        finally:
            sock.settimeout(1e-3)
        STATS.polled += 1
        return r
    sock.settimeout(left)
    r = _read(sock, view, peer)
    STATS.blocked += 1
    return r


def same_host(sock: socket.socket) -> bool:
    """The client runs on this machine (loopback, or our own address)."""
    try:
        peer, local = sock.getpeername()[0], sock.getsockname()[0]
        return bool(peer == local or ipaddress.ip_address(peer).is_loopback)
    except (OSError, ValueError):
        return False


def no_wakeup_preemption() -> None:
    """Makes the calling thread SCHED_BATCH (Linux; elsewhere nothing): when a frame wakes it, it does not preempt
    the thread running on that CPU. For a client on the same machine, that thread is usually the attention host,
    which has just sent this frame and is about to send the frames for its other peers: preempted, it sent them only
    after this server had computed and answered, so a layer that needs two peers took two round trips instead of
    one (measured on loopback, 2 cores: 1.17 ms → 0.97 ms a layer)."""
    setter = getattr(os, "sched_setscheduler", None)
    batch = getattr(os, "SCHED_BATCH", None)
    if setter is None or batch is None:
        return
    try:
        setter(0, batch, os.sched_param(0))  # pid 0: the calling thread
    except OSError as exc:
        log.debug("could not make the data-channel reader SCHED_BATCH: %s", exc)
