"""``ekmesh.core.limits``: the admission gate (per-source and global pending caps, who is displaced when the global
cap is full, per-peer and global authenticated caps), the byte budget, source keys, and the rate-limited refusal
log. Real sockets (socket pairs) where the gate needs one; a fake clock only for the log's intervals."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from ekmesh.core.errors import ConfigError
from ekmesh.core.limits import ByteBudget, Gate, ListenerLimits, RateLimitedLog, source_of

log = logging.getLogger("tests.core.limits")


class Socks:
    """Socket pairs standing in for accepted connections; ``closed(i)`` tells whether the gate shut one down."""

    def __init__(self) -> None:
        self.pairs: list[tuple[socket.socket, socket.socket]] = []

    def new(self) -> socket.socket:
        a, b = socket.socketpair()
        b.settimeout(5)
        self.pairs.append((a, b))
        return a

    def shut(self, i: int) -> bool:
        """The far end of connection ``i`` sees EOF (the gate shut it down)."""
        a, b = self.pairs[i]
        b.setblocking(False)
        try:
            return b.recv(1) == b""
        except BlockingIOError:
            return False

    def close(self) -> None:
        for a, b in self.pairs:
            a.close()
            b.close()


@pytest.fixture
def socks():
    s = Socks()
    yield s
    s.close()


def gate(**kw: object) -> Gate:
    return Gate(ListenerLimits(**kw), RateLimitedLog(log), "test")  # type: ignore[arg-type]


@pytest.mark.timeout(10)
def test_per_source_cap_refuses_only_that_source(socks) -> None:
    g = gate(max_unauth=10, max_unauth_per_source=3)
    tickets = [g.admit(socks.new(), ("10.0.0.1", 1000 + i)) for i in range(3)]
    assert all(tickets)
    assert g.admit(socks.new(), ("10.0.0.1", 2000)) is None  # its 4th
    assert g.admit(socks.new(), ("10.0.0.2", 2000)) is not None  # another source
    assert (g.pending_from("10.0.0.1"), g.pending(), g.refused) == (3, 4, 1)
    g.leave(tickets[0])
    g.leave(tickets[0])  # idempotent
    assert g.pending_from("10.0.0.1") == 2
    assert g.admit(socks.new(), ("10.0.0.1", 2001)) is not None


@pytest.mark.timeout(10)
def test_full_global_cap_displaces_the_oldest_of_the_biggest_holder(socks) -> None:
    g = gate(max_unauth=6, max_unauth_per_source=4)
    a = [g.admit(socks.new(), ("10.0.0.1", i)) for i in range(4)]  # connections 0-3
    b = [g.admit(socks.new(), ("10.0.0.2", i)) for i in range(2)]  # 4-5: the cap is full
    assert g.pending() == 6
    c = g.admit(socks.new(), ("10.0.0.3", 1))  # 6: a newcomer holding none displaces 10.0.0.1's oldest
    assert c is not None and a[0] is not None and a[0].evicted and socks.shut(0)
    assert not any(socks.shut(i) for i in range(1, 6))
    assert (g.pending_from("10.0.0.1"), g.pending(), g.evictions) == (3, 6, 1)
    assert g.authenticate(a[0], "p") is not None  # the evicted one cannot authenticate
    # 10.0.0.2 holds 2 < 3: it may displace 10.0.0.1's next oldest; 10.0.0.1 itself (the biggest) may not
    assert g.admit(socks.new(), ("10.0.0.1", 9)) is None
    d = g.admit(socks.new(), ("10.0.0.2", 9))
    assert d is not None and a[1] is not None and a[1].evicted
    assert {s: g.pending_from(s) for s in ("10.0.0.1", "10.0.0.2", "10.0.0.3")} == {
        "10.0.0.1": 2, "10.0.0.2": 3, "10.0.0.3": 1}
    assert all(t is not None and not t.evicted for t in b)


@pytest.mark.timeout(10)
def test_equal_holders_keep_their_connections(socks) -> None:
    """Every source holds one and the cap is full: a newcomer from a source that already holds one is refused (no
    source takes from an equal), one from a new source displaces the oldest."""
    g = gate(max_unauth=3, max_unauth_per_source=2)
    first = [g.admit(socks.new(), (f"10.0.1.{i}", 1)) for i in range(3)]
    assert g.admit(socks.new(), ("10.0.1.1", 2)) is None
    assert g.admit(socks.new(), ("10.0.1.9", 1)) is not None
    assert [t is not None and t.evicted for t in first] == [True, False, False]


@pytest.mark.timeout(10)
def test_authenticated_caps_per_peer_and_in_all(socks) -> None:
    g = gate(max_unauth=8, max_unauth_per_source=8, max_auth=3, max_auth_per_peer=2)
    t = [g.admit(socks.new(), ("10.0.0.1", i)) for i in range(5)]
    assert all(t)
    assert g.authenticate(t[0], "p") is None and g.authenticate(t[1], "p") is None
    why = g.authenticate(t[2], "p")
    assert why is not None and "peer p has 2" in why
    assert g.authenticate(t[3], "q") is None
    why = g.authenticate(t[4], "r")
    assert why is not None and "3 authenticated" in why
    assert (g.authenticated(), g.authenticated("p"), g.pending(), g.refused) == (3, 2, 0, 2)
    g.leave(t[0])
    assert (g.authenticated(), g.authenticated("p")) == (2, 1)
    assert not any(socks.shut(i) for i in range(5))  # the gate shuts down only evicted connections


@pytest.mark.timeout(10)
def test_a_ticket_past_its_deadline_cannot_authenticate(socks) -> None:
    g = gate(handshake_s=0.05)
    t = g.admit(socks.new(), ("10.0.0.1", 1))
    assert t is not None
    deadline, tick = time.monotonic() + 5, threading.Event()
    while t.left() >= 0 and time.monotonic() < deadline:  # until its deadline has passed
        tick.wait(0.01)
    why = g.authenticate(t, "p")
    assert why is not None and "longer than" in why and g.authenticated() == 0 and g.pending() == 0


def test_limits_are_checked() -> None:
    with pytest.raises(ConfigError):
        ListenerLimits(max_unauth=4, max_unauth_per_source=8)
    with pytest.raises(ConfigError):
        ListenerLimits(frame_budget=1 << 20, frame_budget_per_peer=2 << 20)


def test_source_keys() -> None:
    assert source_of(("192.0.2.7", 5000)) == "192.0.2.7"
    assert source_of(("::ffff:192.0.2.7", 5000, 0, 0)) == "192.0.2.7"
    a = source_of(("2001:db8:1:2:aaaa::1", 5000, 0, 0))
    assert a == source_of(("2001:db8:1:2:ffff::9", 1, 0, 0)) == "2001:db8:1:2::/64"  # one /64, one source
    assert source_of(("2001:db8:1:3::1", 1, 0, 0)) != a
    assert source_of(("fe80::1%eth0", 1, 0, 2)) == "fe80::/64"


@pytest.mark.timeout(10)
def test_byte_budget_total_share_and_wait() -> None:
    b = ByteBudget(total=100, per_holder=60)
    soon = time.monotonic()  # already passed: no waiting
    assert b.reserve("p", 60, soon) and not b.reserve("p", 1, soon)  # p's share
    assert b.reserve("q", 40, soon) and not b.reserve("r", 1, soon)  # the total
    assert not b.reserve("r", 61, time.monotonic() + 5)  # more than a share never fits (no wait)
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(b.reserve("r", 30, time.monotonic() + 10)))
    waiter.start()
    b.release("p", 30)  # room: the waiter gets it
    waiter.join(10)
    assert got == [True] and (b.used(), b.used("p"), b.used("r")) == (100, 30, 30)
    with pytest.raises(ValueError):
        b.release("q", 41)
    late: list[bool] = []
    waiter = threading.Thread(target=lambda: late.append(b.reserve("s", 10, time.monotonic() + 10)))
    waiter.start()
    b.close()  # a stopping server: waiters give up at once
    waiter.join(10)
    assert late == [False]


def test_rate_limited_log_counts_and_reports_suppressed(caplog) -> None:
    now = [1000.0]
    rl = RateLimitedLog(log, interval_s=10.0, burst=3, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger=log.name):
        logged = sum(rl.warning("10.0.0.1", "refused %s", i) for i in range(1000))
        assert logged == 3 and len(caplog.records) == 3 and rl.suppressed == 997
        assert rl.warning("10.0.0.2", "refused other")  # another source has its own lines
        now[0] += 10.0
        assert rl.warning("10.0.0.1", "refused again")
    last = caplog.records[-1].getMessage()
    assert "refused again" in last and "997 more from 10.0.0.1" in last
    assert len(caplog.records) == 5


def test_rate_limited_log_forgets_old_sources_but_not_their_counts(caplog) -> None:
    now = [0.0]
    rl = RateLimitedLog(log, interval_s=10.0, burst=1, max_keys=2, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger=log.name):
        for _ in range(5):
            rl.warning("a", "x")  # 1 line, 4 suppressed
        rl.warning("b", "y")
        rl.warning("c", "z")  # "a" is forgotten: its 4 go to the next line of any source
        rl.warning("d", "w")
    assert len(caplog.records) == 4
    assert "4 from other sources" in caplog.records[2].getMessage()


def test_rate_limited_log_caps_lines_across_sources(caplog) -> None:
    """1,000 sources (a botnet) refused once each: ``max_lines`` lines, not 1,000; a source's suppressed line is
    reported with its next one."""
    now = [0.0]
    rl = RateLimitedLog(log, interval_s=10.0, burst=5, max_lines=20, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger=log.name):
        logged = sum(rl.warning(f"10.1.{i // 250}.{i % 250}", "refused") for i in range(1000))
        assert logged == 20 and rl.suppressed == 980
        now[0] += 10.0
        assert rl.warning("10.1.3.249", "refused again")
    assert len(caplog.records) == 21 and "1 more from 10.1.3.249" in caplog.records[-1].getMessage()
