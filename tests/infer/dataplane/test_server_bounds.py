"""The expert server under connection floods and stalled frames: bounded threads, connections and frame memory.

- idle TCP connections from one address (127.0.0.2, reopened as soon as the server closes one) hold at most that
  address's share of connection threads, and a pinned client on 127.0.0.1 is served meanwhile;
- a pinned peer holds at most ``max_auth_per_peer`` channels (the next is answered ERROR BUSY and closed); others
  are still served;
- members that announce near-maximal frames and stall mid-body make a real server process (RSS read from
  /proc/<pid>/status) grow by no more than the frame budget, and a legitimate request gets its exact answer
  during the stall;
- 1,000 refused connections from one address log a handful of WARNING lines, not 1,000.
Real sockets on 127.0.0.x port 0, pinned mutual TLS, a real server process for the memory test.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ekmesh.core.errors import PeerError, ProtocolError
from ekmesh.core.limits import ListenerLimits
from ekmesh.core.tls import check_peer_cert, make_context
from ekmesh.infer.dataplane.channel import ChannelPool, FrameReader, TlsIdentity
from ekmesh.infer.dataplane.frames import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    ErrorCode,
    FrameLimits,
    Kind,
    ModelLimits,
    encode_request,
)
from ekmesh.infer.dataplane.server import ExpertServer, ServerTimeouts
from tests.flood import Flood, holds_within
from tests.infer.dataplane.test_channel import MODEL, make_backend

LIMITS = ListenerLimits()
MiB = 1 << 20


def _wait(cond: Callable[[], bool], timeout: float = 30.0) -> bool:
    return holds_within(cond, timeout)


@pytest.fixture(scope="module")
def ids() -> dict[str, TlsIdentity]:
    return {name: TlsIdentity.generate(name) for name in ("server", "client", "other", "evil")}


def _ask(pool: ChannelPool, peer: str = "server") -> torch.Tensor:
    ch = pool.get(peer)
    rid = ch.next_id()
    f = ch.exchange(encode_request(rid, 1, torch.tensor([0, 1, 1]), torch.tensor([0, 2, 3]),
                                   torch.tensor([1.0, 0.5, 0.5]), torch.ones(2, 16)), rid, 10)
    assert f.kind is Kind.RESPONSE and f.hidden is not None, (f.kind, f.message)
    return f.hidden


class ThreadPeak:
    """The most connection threads of the expert server (``ekmesh-expert-conn``) seen until ``stop``."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, sum(t.name == "ekmesh-expert-conn" for t in threading.enumerate()))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        return self.peak


@pytest.mark.timeout(90)
def test_a_flood_of_idle_connections_holds_few_threads_and_others_are_served(ids) -> None:
    pins = {n: i.fingerprint for n, i in ids.items()}
    with ExpertServer(make_backend(), ids["server"], pins.get, MODEL) as srv, \
            Flood(srv.address, ["127.0.0.2"], 3 * LIMITS.max_unauth) as flood:
        peak = ThreadPeak()
        flood.wait_closed(LIMITS.max_unauth)
        pool = ChannelPool(ids["client"], pins.get, lambda p: srv.address, MODEL)
        try:
            want = make_backend()(1, torch.ones(2, 16), torch.tensor([[0, 0], [2, 3]]),
                                  torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
            for _ in range(5):
                assert torch.equal(_ask(pool), want)
        finally:
            pool.close()
            threads = peak.stop()
            print(f"flood of {flood.opened} idle connections: at most {threads} connection threads")
        # pending from the flood's address, the client's channel, and threads that left the gate but not yet ended
        assert threads <= 2 * LIMITS.max_unauth_per_source + 1, threads
        assert srv.gate.pending_from("127.0.0.2") <= LIMITS.max_unauth_per_source


def _pinned_tls(who: TlsIdentity, server: ExpertServer, pins: dict[str, bytes]) -> ssl.SSLSocket:
    raw = socket.create_connection(server.address, timeout=10)
    tls = make_context(who, server=False).wrap_socket(raw)
    check_peer_cert(tls, pins.get, "server")
    return tls


@pytest.mark.timeout(60)
def test_a_peer_holds_at_most_its_share_of_channels(ids) -> None:
    pins = {n: i.fingerprint for n, i in ids.items()}
    with ExpertServer(make_backend(), ids["server"], pins.get, MODEL) as srv:
        mine = [_pinned_tls(ids["evil"], srv, pins) for _ in range(LIMITS.max_auth_per_peer)]
        try:
            assert _wait(lambda: srv.gate.authenticated("evil") == LIMITS.max_auth_per_peer)
            extra = ChannelPool(ids["evil"], pins.get, lambda p: srv.address, MODEL)
            with pytest.raises((ProtocolError, PeerError), match="ERROR|closed"):
                _ask(extra)
            extra.close()
            pool = ChannelPool(ids["client"], pins.get, lambda p: srv.address, MODEL)
            assert _ask(pool).shape == (2, 16)
            pool.close()
        finally:
            for s in mine:
                s.close()
        assert _wait(lambda: srv.gate.authenticated("evil") == 0)
        again = ChannelPool(ids["evil"], pins.get, lambda p: srv.address, MODEL)
        assert _ask(again).shape == (2, 16)  # its channels closed: its share is back
        again.close()


@pytest.mark.timeout(90)
def test_refused_connections_are_logged_a_few_lines_per_source(ids, caplog) -> None:
    pins = {n: i.fingerprint for n, i in ids.items()}
    with caplog.at_level(logging.WARNING, logger="ekmesh.infer.dataplane.server"), \
            ExpertServer(make_backend(), ids["server"], pins.get, MODEL) as srv:
        for _ in range(1000):
            with socket.create_connection(srv.address, timeout=10) as s:
                s.sendall(b"GET / HTTP/1.1\r\n\r\n")
                try:
                    while s.recv(4096):
                        pass
                except ConnectionResetError:
                    pass  # refused: the server has counted (and logged, or not) it by now
        assert _wait(lambda: srv.stats.refused >= 1000), srv.stats.refused
    lines = [r for r in caplog.records if r.name == "ekmesh.infer.dataplane.server"]
    assert 1 <= len(lines) <= LIMITS.log_burst + 1, len(lines)


def _big_request(rid: int, tokens: int, seed: int) -> tuple[bytearray, torch.Tensor]:
    """A REQUEST for layer 1 of ``MODEL``: ``tokens`` fp32 tokens, each to experts (t % 4, (t + 1) % 4) weighted
    0.75 / 0.25; returns the frame and the answer the experts of ``make_backend`` give."""
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(seed))
    t = torch.arange(tokens)
    e = torch.stack([t % 4, (t + 1) % 4], 1)  # [T, 2]
    w = torch.tensor([0.75, 0.25]).expand(tokens, 2)
    return encode_request(rid, 1, t.repeat_interleave(2), e.flatten(), w.flatten(), x), make_backend()(1, x, e, w)


@pytest.mark.timeout(90)
def test_frame_memory_is_reserved_as_bytes_arrive_and_refused_when_the_budget_stays_full(ids) -> None:
    """A 1 MiB budget (64 KiB grains): B's 300 KB frame starts first and holds what it has read; A's ~1 MB frame
    then takes the rest of the budget and stalls; the rest of B's frame cannot be reserved before B's deadline
    (A's is later): B is answered ERROR BUSY and closed. Small frames (unmetered) are answered all along; once A is
    cut at its deadline a large frame goes through, and every reservation is released."""
    pins = {n: i.fingerprint for n, i in ids.items()}
    listen = ListenerLimits(frame_budget=MiB, frame_budget_per_peer=MiB, frame_grain=64 << 10,
                            frame_unmetered=4 << 10)
    frames = FrameLimits(max_frame_bytes=MiB)
    with ExpertServer(make_backend(), ids["server"], pins.get, MODEL, frame_limits=frames,
                      timeouts=ServerTimeouts(body_s=5.0), listen=listen) as srv:
        pool = ChannelPool(ids["client"], pins.get, lambda p: srv.address, MODEL, frames)
        b_frame, _ = _big_request(7, 4000, 1)  # 304,000 bytes of payload
        b = _pinned_tls(ids["other"], srv, pins)
        a = _pinned_tls(ids["evil"], srv, pins)
        try:
            b.sendall(b_frame[:HEADER_SIZE + 10_000])
            assert _wait(lambda: srv.budget.used("other") > 0)
            a_size = 13_000 * (12 + 16 * 4)  # 988,000 bytes
            a.sendall(HEADER.pack(MAGIC, VERSION, Kind.REQUEST, 3, 0, 1, 1, 13_000, 13_000, 16, 0, a_size))
            a.sendall(bytes(900_000))
            assert _wait(lambda: srv.budget.used() > MiB - (64 << 10))  # A holds the rest
            b.sendall(b_frame[HEADER_SIZE + 10_000:])
            assert _ask(pool).shape == (2, 16)  # a small frame meanwhile
            f = FrameReader(b, MODEL, frames, "server").read(time.monotonic() + 30)
            assert f.kind is Kind.ERROR and f.code == ErrorCode.BUSY and "budget exhausted" in f.message
            assert srv.stats.over_budget == 1
        finally:
            a.close()
            b.close()
        assert _wait(lambda: srv.budget.used() == 0)
        big, want = _big_request(9, 4000, 2)
        ch = pool.get("server")
        got = ch.exchange(big, 9, 30)
        assert got.kind is Kind.RESPONSE and got.hidden is not None and torch.equal(got.hidden, want)
        assert _wait(lambda: srv.budget.used() == 0)  # released once answered
        pool.close()


# --------------------------------------------------------------------------------------------- stalled frames

def _status(pid: int, key: str) -> int:
    """A /proc/<pid>/status field in bytes (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak(pid: int) -> bool:
    """Resets VmHWM to the current RSS (Linux ``clear_refs`` 5); False where not permitted."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _member(who: TlsIdentity, address: tuple[str, int], server_pin: bytes) -> ssl.SSLSocket:
    """A channel authenticated as ``who`` (sends nothing yet)."""
    raw = socket.create_connection(address, timeout=10)
    tls = make_context(who, server=False).wrap_socket(raw)
    check_peer_cert(tls, {"server": server_pin}.get, "server")
    return tls


def _stall(tls: ssl.SSLSocket, header: bytes, body: int, sent: list[int]) -> None:
    """Sends a frame header and ``body`` bytes of its payload, then stalls. Sending ends early when the server
    stops reading (its socket buffers fill and the send times out)."""
    chunk, n = memoryview(bytes(MiB)), 0
    tls.settimeout(5)
    try:
        tls.sendall(header)
        while n < body:
            n += tls.send(chunk[:min(MiB, body - n)])
    except OSError:
        pass  # the server stopped reading: the stall
    sent.append(n)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stalled_frames_hold_at_most_the_frame_budget(tmp_path: Path) -> None:
    """3 members x 8 channels announce ~62 MiB frames and send 12 MiB of each (288 MiB, more than the 256 MiB
    budget), then stall. Before: each header made the server allocate its whole frame (24 x 62 MiB). Now the
    server's peak RSS grows by at most the budget (+ 32 MiB for threads and buffers), and a small request from
    another member gets its exact answer meanwhile."""
    from ekmesh.infer.experts import LocalExperts
    from ekmesh.infer.loader import Checkpoint, load_experts
    from tests.infer.dataplane.expert_proc import ServerProc
    from tests.tiny_models import make_tiny

    path, _ = make_tiny("qwen3_moe", tmp_path / "m", hidden_size=256)
    ckpt = Checkpoint.open(path)
    held = [(0, 0), (0, 1), (0, 2), (2, 0)]
    host = TlsIdentity.generate("host")
    evil = [TlsIdentity.generate(f"evil{i}") for i in range(3)]
    proc = ServerProc(path, "server", held, {i.peer_id: i.fingerprint for i in [host, *evil]}).ready()
    limits = ModelLimits.from_config(ckpt.config)
    pool = ChannelPool(host, {"server": proc.fingerprint}.get, lambda p: proc.address, limits)
    local = LocalExperts(ckpt.config.expert_spec())
    load_experts(ckpt, local, held)
    conns: list[ssl.SSLSocket] = []
    try:
        def check() -> None:  # 3 tokens, 2 experts each, fp32: the server's answer equals local compute
            x = torch.randn(3, 256, generator=torch.Generator().manual_seed(len(conns)))
            e, w = torch.tensor([[0, 1], [1, 2], [2, 0]]), torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
            ch = pool.get("server")
            rid = ch.next_id()
            f = ch.exchange(encode_request(rid, 0, torch.arange(3).repeat_interleave(2), e.flatten(), w.flatten(),
                                           x), rid, 30)
            assert f.kind is Kind.RESPONSE and f.hidden is not None, (f.kind, f.message)
            assert torch.equal(f.hidden, local(0, x, e, w))

        check()
        pid = proc.proc.pid
        base = _status(pid, "VmRSS")
        peak_reset = _reset_peak(pid)
        t, p = 60_000, 60_000  # fp32 [60000, 256] + 60000 pairs: 62.2 MB, just under max_frame_bytes
        size = p * 12 + t * 256 * 4
        assert size <= 64 * MiB
        sent: list[int] = []
        conns += [_member(who, proc.address, proc.fingerprint) for who in evil
                  for _ in range(LIMITS.max_auth_per_peer)]
        header = HEADER.pack(MAGIC, VERSION, Kind.REQUEST, 3, 0, 1, 0, t, p, 256, 0, size)
        threads = [threading.Thread(target=_stall, args=(c, header, 12 * MiB, sent), daemon=True) for c in conns]
        for th in threads:
            th.start()
        grown = _wait(lambda: _status(pid, "VmRSS") - base >= LIMITS.frame_budget // 2, 60)
        check()  # during the stall
        for th in threads:
            th.join(60)
        peak = _status(pid, "VmHWM") if peak_reset else _status(pid, "VmRSS")
        growth = peak - base
        assert len(conns) == len(sent) == 24
        print(f"stalled frames: {len(sent)} channels sent {sum(sent) / MiB:.0f} MiB; server RSS grew "
              f"{growth / MiB:.0f} MiB (budget {LIMITS.frame_budget / MiB:.0f} MiB)")
        assert grown, "the stalled frames never reached the server"
        assert growth <= LIMITS.frame_budget + 32 * MiB, growth / MiB  # + threads, TLS and read buffers
    finally:
        for c in conns:
            c.close()
        pool.close()
        proc.close()
