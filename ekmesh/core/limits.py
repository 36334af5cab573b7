"""Resource bounds for ekmesh's own TCP listeners (blob exchange, the data plane): what a stranger can make a node
hold, counted before authentication and per source, so that one flooding address cannot lock out the others.

Role: the one mechanism both listeners share. It knows sockets and peer ids, not their protocols.

- ``ListenerLimits``: every bound and its default, in one place.
- ``Gate``: admission. A connection is *pending* from ``accept`` until the listener's pin check passed; it counts
  against its source (``source_of``: an IPv4 address; an IPv6 /64, which one host can fill with addresses) and the
  listener's global pending cap, and must authenticate by its ``Ticket.deadline`` (``handshake_s`` after accept;
  the listener gives its socket the time left). Authenticated, it counts against its peer id and the global
  authenticated cap instead. When a cap is full:
  - the source holds ``max_unauth_per_source`` pending: the new connection is closed at once (others unaffected);
  - all ``max_unauth`` pending slots are taken: the oldest pending connection of the source that holds the most is
    shut down to make room, unless the newcomer's source already holds as many (then the newcomer is closed). A
    source can thus never take more than its share from another, and a newcomer from a quiet address always gets
    in; a legitimate handshake (milliseconds) is displaced only if a full cap's worth of newer connections from
    sources holding more arrive during it;
  - the peer holds ``max_auth_per_peer`` authenticated connections, or ``max_auth`` are open: the new one is
    refused after its handshake (the listener says so where its protocol lets it) and closed.
  Threads: a listener runs one thread per admitted connection, so these caps bound its threads too.
- ``ByteBudget``: bytes reserved from a node-wide total, at most a share per holder (peer id); ``reserve`` waits
  for room until a deadline. The data plane reserves frame memory from it as bytes arrive.
- ``RateLimitedLog``: refusal warnings, at most ``log_burst`` lines per source and 50 in all per
  ``log_interval_s``; the next line of that source says how many were suppressed.
- ``GatedListener``: the accept loop both the data plane's expert server and the experts relay run: it binds,
  admits each connection through a ``Gate`` (a refusal is closed at once, without a thread), serves each admitted
  one on a thread of its own (a ``Connection``, which leaves the gate when its thread ends), and ``stop()`` closes
  the listener, shuts every open connection down and joins the threads.

Invariants: a gate's and a budget's counts change under their own lock only; a ticket leaves its gate once
(``leave`` is idempotent); a connection shut down by the gate (evicted) is woken through a duplicate of its socket
(``shutdown`` acts on the connection, whatever thread blocks on it), which the gate closes when the ticket stops
being pending, so no socket the listener still uses is ever closed by the gate; a ``GatedListener``'s open
connections change under its lock only, and once ``stopping`` is set it starts no thread.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ekmesh.core.errors import ConfigError

log = logging.getLogger(__name__)

MiB = 1 << 20
LOG_INTERVAL_S = 10.0  # refusal logs: at most LOG_BURST lines per source per LOG_INTERVAL_S
LOG_BURST = 5
LOG_MAX_LINES = 50  # ... and at most this many in all (many sources)


@dataclass(frozen=True)
class ListenerLimits:
    """Bounds of one listener (blob exchange or the data plane), with their defaults."""

    handshake_s: float = 3.0  # accept -> authenticated (TLS + pin check + the protocol's hello): one deadline
    max_unauth: int = 64  # pending (not yet authenticated) connections in all
    max_unauth_per_source: int = 8  # pending connections from one source address (IPv6: one /64)
    max_auth: int = 128  # authenticated connections in all
    max_auth_per_peer: int = 8  # authenticated connections of one peer id
    # data plane only: memory of incoming frames
    frame_budget: int = 256 * MiB  # bytes of frames being read or waiting for their answer, node-wide
    frame_budget_per_peer: int = 128 * MiB  # of which one peer id may hold at most this much
    frame_grain: int = 1 * MiB  # a large frame reserves (and reads) its payload this many bytes at a time
    frame_unmetered: int = 64 << 10  # a payload this small is read without the budget (bounded by the conn caps)
    # refusal logs
    log_interval_s: float = LOG_INTERVAL_S
    log_burst: int = LOG_BURST  # lines per source per interval

    def __post_init__(self) -> None:
        if not (0 < self.max_unauth_per_source <= self.max_unauth and 0 < self.max_auth_per_peer <= self.max_auth
                and self.handshake_s > 0 and 0 < self.frame_budget_per_peer <= self.frame_budget
                and self.frame_grain > 0 and self.log_burst > 0):
            raise ConfigError(f"inconsistent listener limits: {self}")


DEFAULT_LISTENER = ListenerLimits()


def source_of(address: object) -> str:
    """The source a connection counts against: its IPv4 address (an IPv4-mapped IPv6 address as IPv4), or the /64
    network of an IPv6 address; anything else (a Unix socket) as its text."""
    host = address[0] if isinstance(address, tuple) and address else address
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return str(host)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass
class _Window:
    """One interval of a log key: when it started, lines logged, lines suppressed."""

    start: float
    lines: int = 0
    suppressed: int = 0


class RateLimitedLog:
    """WARNING lines keyed by source: at most ``burst`` per key and ``max_lines`` in all per ``interval_s``; a key's
    first line after a quiet spell reports how many of its lines were suppressed. At most ``max_keys`` keys are
    remembered (the oldest is forgotten, its suppressed count reported with the next line of any key)."""

    def __init__(self, logger: logging.Logger, interval_s: float = LOG_INTERVAL_S, burst: int = LOG_BURST,
                 max_lines: int = LOG_MAX_LINES, max_keys: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.interval_s, self.burst, self.max_lines = logger, interval_s, burst, max_lines
        self.max_keys, self.clock = max_keys, clock
        self._lock = threading.Lock()
        self._keys: OrderedDict[str, _Window] = OrderedDict()
        self._all = _Window(clock())
        self._forgotten = 0  # suppressed lines of keys no longer remembered
        self.suppressed = 0  # in all, for tests and status

    def warning(self, key: str, msg: str, *args: object) -> bool:
        """Logs ``msg % args`` unless ``key`` (or everyone) used the lines of this interval; returns whether it
        logged."""
        now = self.clock()
        with self._lock:
            if now - self._all.start >= self.interval_s:
                self._all = _Window(now)
            w = self._keys.get(key)
            carried = 0
            if w is None or now - w.start >= self.interval_s:
                carried = w.suppressed if w is not None else 0
                w = self._keys[key] = _Window(now)
            self._keys.move_to_end(key)
            while len(self._keys) > self.max_keys:
                _, old = self._keys.popitem(last=False)
                self._forgotten += old.suppressed
            if w.lines >= self.burst or self._all.lines >= self.max_lines:
                w.suppressed += carried + 1  # reported with this key's next line
                self.suppressed += 1
                return False
            w.lines += 1
            self._all.lines += 1
            others, self._forgotten = self._forgotten, 0
        if carried or others:  # what was left out since this source's last line
            quiet = [f"{carried} more from {key}"] if carried else []
            quiet += [f"{others} from other sources"] if others else []
            msg, args = msg + " (not logged: %s)", (*args, ", ".join(quiet))
        self.logger.warning(msg, *args)
        return True


@dataclass(eq=False)
class Ticket:
    """One admitted connection. ``deadline``: when it must have authenticated (monotonic)."""

    source: str
    address: str  # "host:port", for logs
    deadline: float
    seq: int
    peer: str | None = None
    state: str = "pending"  # pending -> auth -> gone (or pending -> gone)
    evicted: bool = False  # shut down by the gate to make room (the listener need not log its failure)
    _wake: socket.socket | None = field(default=None, repr=False)

    def left(self) -> float:
        """Seconds until the handshake deadline (may be <= 0)."""
        return self.deadline - time.monotonic()


class Gate:
    """Admission of one listener's connections (see the module docstring). ``log`` receives its refusals."""

    def __init__(self, limits: ListenerLimits, log: RateLimitedLog, what: str) -> None:
        self.limits, self.log, self.what = limits, log, what
        self._lock = threading.Lock()
        self._pending: dict[str, OrderedDict[int, Ticket]] = {}  # source -> its pending tickets, oldest first
        self._n_pending = 0
        self._auth: dict[str, int] = {}
        self._n_auth = 0
        self._seq = 0
        self.refused = 0  # connections closed by a cap (admission or authentication)
        self.evictions = 0

    # --- admission ----------------------------------------------------------------------------------------------
    def admit(self, sock: socket.socket, address: object) -> Ticket | None:
        """A ticket for a just-accepted connection, or None: refused (the caller closes ``sock``)."""
        lim = self.limits
        src = source_of(address)
        addr = f"{address[0]}:{address[1]}" if isinstance(address, tuple) and len(address) >= 2 else str(address)
        t = victim = wake = None
        with self._lock:
            mine = self._pending.get(src)
            n = len(mine) if mine else 0
            if n >= lim.max_unauth_per_source:
                why = f"{n} connections from {src} are already waiting to authenticate"
            elif self._n_pending >= lim.max_unauth and (victim := self._victim(n)) is None:
                why = f"{self._n_pending} connections are waiting to authenticate"
            else:
                try:
                    mine_wake = sock.dup()
                except OSError as exc:
                    victim, why = None, f"cannot track the connection: {exc}"
                else:
                    if victim is not None:  # make room: the oldest of the source that holds the most
                        self._drop(victim)
                        victim.evicted = True
                        wake, victim._wake = victim._wake, None
                        self.evictions += 1
                    self._seq += 1
                    t = Ticket(src, addr, time.monotonic() + lim.handshake_s, self._seq, _wake=mine_wake)
                    self._pending.setdefault(src, OrderedDict())[t.seq] = t
                    self._n_pending += 1
                    why = ""
            if why:
                self.refused += 1
        if wake is not None:  # wakes the evicted connection's thread (blocked in its handshake): it fails, leaves
            try:
                wake.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # it had closed already
            wake.close()
        if victim is not None:
            self.log.warning(victim.source, "%s: closed a connection from %s that had not authenticated yet, to "
                             "admit one from %s (%d waiting in all)", self.what, victim.address, src,
                             lim.max_unauth)
        if t is None:
            self.log.warning(src, "%s: refused a connection from %s: %s", self.what, addr, why)
        return t

    def _victim(self, newcomer_holds: int) -> Ticket | None:
        """(Under the lock, the pending cap full.) The oldest pending ticket of the source holding the most, if
        that source holds more than the newcomer's; ties between sources go to the older ticket."""
        best: Ticket | None = None
        best_n = newcomer_holds
        for tickets in self._pending.values():
            oldest = next(iter(tickets.values()))
            if len(tickets) > best_n or (best is not None and len(tickets) == best_n and oldest.seq < best.seq):
                best, best_n = oldest, len(tickets)
        return best

    def _drop(self, t: Ticket) -> None:
        """(Under the lock.) ``t`` stops being pending; its wake-up socket shuts the connection down if evicted."""
        tickets = self._pending[t.source]
        del tickets[t.seq]
        if not tickets:
            del self._pending[t.source]
        self._n_pending -= 1
        t.state = "gone"

    def authenticate(self, t: Ticket, peer: str) -> str | None:
        """Moves ``t`` from pending to ``peer``'s authenticated connections. Returns None, or why it is refused
        (a cap; or it was evicted or its deadline passed): the caller logs it (``log``), tells the peer where its
        protocol can, and closes the connection."""
        lim = self.limits
        with self._lock:
            if t.state != "pending":
                why = "it was closed to make room for others" if t.evicted else "it was closed"
            elif t.left() <= 0:
                why = f"its handshake took longer than {lim.handshake_s:g} s"
            elif self._auth.get(peer, 0) >= lim.max_auth_per_peer:
                why = f"peer {peer} has {lim.max_auth_per_peer} connections open already"
            elif self._n_auth >= lim.max_auth:
                why = f"{lim.max_auth} authenticated connections are open"
            else:
                why = None
            if t.state == "pending":
                self._drop(t)
                if why is None:
                    t.state, t.peer = "auth", peer
                    self._auth[peer] = self._auth.get(peer, 0) + 1
                    self._n_auth += 1
                else:
                    self.refused += 1
            wake, t._wake = t._wake, None
        if wake is not None:
            wake.close()
        return why

    def leave(self, t: Ticket) -> None:
        """The connection of ``t`` ended (idempotent)."""
        with self._lock:
            if t.state == "pending":
                self._drop(t)
            elif t.state == "auth":
                assert t.peer is not None
                left = self._auth[t.peer] - 1
                if left:
                    self._auth[t.peer] = left
                else:
                    del self._auth[t.peer]
                self._n_auth -= 1
                t.state = "gone"
            wake, t._wake = t._wake, None
        if wake is not None:
            wake.close()

    # --- counts ---------------------------------------------------------------------------------------------------
    def pending(self) -> int:
        with self._lock:
            return self._n_pending

    def pending_from(self, source: str) -> int:
        with self._lock:
            return len(self._pending.get(source, ()))

    def authenticated(self, peer: str | None = None) -> int:
        with self._lock:
            return self._n_auth if peer is None else self._auth.get(peer, 0)


class Connection:
    """One connection a ``GatedListener`` admitted: the socket its thread uses (a thread that wraps it in TLS puts
    the wrapped socket here, so that ``kill`` reaches it), the address it came from and its gate ticket."""

    def __init__(self, sock: socket.socket, addr: object, ticket: Ticket) -> None:
        self.sock, self.addr, self.ticket = sock, addr, ticket

    def kill(self) -> None:
        """Shuts the connection down, waking its thread (blocked in recv); the thread closes the socket."""
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)  # the descriptor's: not TLS's, which its thread owns
        except OSError:
            pass  # it had closed already

    def send(self, data: bytes | bytearray, timeout_s: float) -> bool:
        """Sends all of ``data`` within ``timeout_s``; whether it did (a failure means the connection is gone)."""
        try:
            self.sock.settimeout(timeout_s)
            self.sock.sendall(data)
            return True
        except OSError as exc:  # (ssl.SSLError is one)
            log.debug("sending to %s failed: %s", self.ticket.peer or self.ticket.address, exc)
            return False


C = TypeVar("C", bound=Connection)


class GatedListener(Generic[C]):
    """A TCP listener on ``(host, port)`` (bound here; ``address`` is (host, port)) whose connections ``gate``
    admits. ``start()`` runs the accept loop: each admitted connection becomes ``make(sock, addr, ticket)``, is kept
    in ``conns`` (admission order) and is served by ``serve(conn)`` on a thread named ``name``; when that returns,
    the connection leaves ``conns``, its socket is closed and its ticket leaves the gate. ``refused()`` is called for
    each connection the gate refused. ``conns`` and ``stopping`` change under ``lock`` only: an owner that passes its
    own lock (a ``Condition``) may use them under it. ``stop()`` sets ``stopping``, calls ``wake()`` under the lock
    (what the owner's threads wait on besides their sockets), then closes the listener, shuts every open connection
    down and joins the threads (5 s each)."""

    def __init__(self, gate: Gate, make: Callable[[socket.socket, object, Ticket], C], serve: Callable[[C], None],
                 name: str, host: str = "127.0.0.1", port: int = 0, backlog: int = 64,
                 lock: threading.Lock | threading.Condition | None = None,
                 refused: Callable[[], None] = lambda: None, wake: Callable[[], None] = lambda: None) -> None:
        self.gate, self.name = gate, name
        self._make, self._serve, self._refused, self._wake = make, serve, refused, wake
        self.lock = lock if lock is not None else threading.Lock()
        self.conns: dict[int, C] = {}  # insertion order = admission order
        self.stopping = False
        self._threads: list[threading.Thread] = []
        self._sock = socket.create_server((host, port), backlog=backlog)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]

    def start(self) -> None:
        t = threading.Thread(target=self._accept_loop, name=f"{self.name}-accept", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        with self.lock:
            if self.stopping:
                return
            self.stopping = True
            conns = list(self.conns.values())
            self._wake()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected: closing is enough
        self._sock.close()
        for c in conns:
            c.kill()
        for t in list(self._threads):
            t.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self.stopping:
            try:
                raw, addr = self._sock.accept()
            except OSError:
                return  # listener closed by stop()
            ticket = self.gate.admit(raw, addr)  # a refusal closes at once, without a thread
            if ticket is None:
                self._refused()
                raw.close()
                continue
            conn = self._make(raw, addr, ticket)
            with self.lock:
                if self.stopping:
                    raw.close()
                    self.gate.leave(ticket)
                    return
                self.conns[id(conn)] = conn
            t = threading.Thread(target=self._run, args=(conn,), name=f"{self.name}-conn", daemon=True)
            t.start()
            self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _run(self, conn: C) -> None:
        try:
            self._serve(conn)
        finally:
            with self.lock:
                self.conns.pop(id(conn), None)
            try:
                conn.sock.close()
            except OSError:
                pass  # (a TLS socket may fail to close cleanly; the descriptor is released anyway)
            self.gate.leave(conn.ticket)  # last: this connection's thread is done with everything it counted


class ByteBudget:
    """Bytes reserved by holders from ``total``, at most ``per_holder`` each. ``close()`` makes every waiting and
    later ``reserve`` fail (a stopping server)."""

    def __init__(self, total: int, per_holder: int) -> None:
        self.total, self.per_holder = total, per_holder
        self._cv = threading.Condition()
        self._used = 0
        self._by: dict[str, int] = {}
        self._closed = False

    def reserve(self, holder: str, n: int, deadline: float) -> bool:
        """Reserves ``n`` bytes for ``holder``, waiting until they fit or ``deadline`` (monotonic) passes; returns
        whether they were reserved. ``n`` larger than a holder's share never fits."""
        with self._cv:
            while True:
                if self._closed or n > self.per_holder:
                    return False
                mine = self._by.get(holder, 0)
                if self._used + n <= self.total and mine + n <= self.per_holder:
                    self._used += n
                    self._by[holder] = mine + n
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)

    def release(self, holder: str, n: int) -> None:
        if n <= 0:
            return
        with self._cv:
            left = self._by[holder] - n
            if left < 0:
                raise ValueError(f"{holder} releases {n} bytes but holds {self._by[holder]}")
            if left:
                self._by[holder] = left
            else:
                del self._by[holder]
            self._used -= n
            self._cv.notify_all()

    def used(self, holder: str | None = None) -> int:
        with self._cv:
            return self._used if holder is None else self._by.get(holder, 0)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
