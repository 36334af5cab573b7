"""The expert server: answers data-plane REQUEST frames from many attention hosts with grouped expert compute.

Threads: one acceptor; one reader per connection (TLS handshake, pin check, then a read → answer loop). A reader
queues each REQUEST and writes its answer itself, so each TLS socket is only ever used by its own thread (OpenSSL
objects are not safe for concurrent read and write). Compute runs in whichever waiting reader finds nobody
computing (no handoff to a worker thread): it takes pending requests round robin over connections (per-peer
fairness) and batches every pending request for the same layer (up to ``max_batch_pairs`` pairs) into one
grouped call on the backend; one batch computes at a time. A request that finds the server idle is computed at once
without being queued, and a lone request whose pairs are k per token in token order (what a peer holding every
chosen expert receives) goes to the backend as [T, D] with [T, k] ids and weights, which weights and sums itself.
Each connection thread reads through a ``FrameReader`` (one reusable buffer) and runs in torch inference mode for its
whole life; a thread serving a client on the same machine is made SCHED_BATCH (``poll.no_wakeup_preemption``), so that
a frame waking it does not preempt the attention host before that has sent its frames to its other peers.

Bounds (``ListenerLimits``, shared with blob exchange; ``ekmesh.core.limits`` says what happens when full, and its
``GatedListener`` runs the accept loop, as the experts relay's): until
its pin check passes a connection is pending and counts against its source address (8) and the listener (64), and
its TLS handshake has one deadline (3 s); authenticated, it counts against its peer (8) and the listener (128):
beyond, it is answered ERROR BUSY and closed. One thread per admitted connection. A frame's payload is reserved from
a node-wide budget (256 MiB, 128 MiB per peer) at most a grain (1 MiB) ahead of the bytes that arrived (``Intake``)
and released once its answer is sent; payloads <= 64 KiB (decode steps) are not metered, so they are served while
the budget is full. A reader that finds no room waits until its frame's deadline (``body_s``), then is answered
ERROR BUSY and closed (the rest of its frame is unread). Refusals log at most 5 lines per source per 10 s.

Timing: the expert side of the round-trip split (``serverstats.ServerStats`` says what each span covers), read
from ``perf_counter_ns`` around each part and handed to ``ServerStats``; always on.

Invariants:
- at most ``max_pending`` requests wait for the worker; beyond that a request is answered ERROR BUSY at once;
- a malformed frame (``ProtocolError``) is logged at WARNING (rate-limited) with its reason, answered with an ERROR
  frame when the socket still allows it, and closes that connection only; a refused certificate closes it after a
  WARNING;
- a request naming an expert this server does not hold is answered ERROR NOT_HELD naming (layer, expert);
- a response is, per token, the sum over the request's pairs of ``weight * expert(hidden[token])``, weighted and
  summed in fp32 in pair order, cast to the request's dtype (for fp32 this equals ``LocalExperts`` bit for bit
  when a token's pairs are summed in the same order); the [T, k] path gives the same bits (``LocalExperts`` sums
  over k sequentially in fp32, and is used only when it computes in fp32 or in the request's dtype);
- every wait has a deadline (``ServerTimeouts``); ``stop()`` closes the listener and every connection and joins
  the threads promptly.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from ekmesh.core.errors import (
    ConfigError,
    ExpertNotLoadedError,
    OverBudgetError,
    PeerClosedError,
    PeerIdentityError,
    ProtocolError,
)
from ekmesh.core.limits import (
    DEFAULT_LISTENER,
    ByteBudget,
    Connection,
    Gate,
    GatedListener,
    ListenerLimits,
    RateLimitedLog,
    Ticket,
)
from ekmesh.infer.dataplane import liar
from ekmesh.infer.dataplane.channel import Pins, TlsIdentity, check_peer_cert, make_context
from ekmesh.infer.dataplane.frames import (
    DEFAULT_LIMITS,
    ErrorCode,
    Frame,
    FrameLimits,
    Kind,
    ModelLimits,
    encode_error,
    encode_ping,
    response_buffer,
    response_from,
)
from ekmesh.infer.dataplane.intake import Intake
from ekmesh.infer.dataplane.poll import Registration, Waits, no_wakeup_preemption, same_host
from ekmesh.infer.dataplane.serverstats import ServerStats
from ekmesh.infer.experts import LocalExperts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerTimeouts:
    """Waits on an authenticated channel (the handshake's deadline is ``ListenerLimits.handshake_s``)."""

    idle_s: float = 600.0  # waiting for the next frame on an open channel
    body_s: float = 10.0  # the rest of a frame once its header arrived
    send_s: float = 10.0  # writing one answer
    compute_s: float = 60.0  # waiting for the worker to answer one request


@dataclass
class _Job:
    conn: _Conn
    frame: Frame
    done: bool = False  # set by the computing thread, read under ``_cv`` after its notify_all
    answer: bytes | bytearray = b""


class _Conn(Connection):
    """A client connection: its peer once pinned, and its requests waiting for the worker (under ``_cv``)."""

    def __init__(self, sock: socket.socket, addr: object, ticket: Ticket) -> None:
        super().__init__(sock, addr, ticket)
        self.peer: str | None = None
        self.pending: deque[_Job] = deque()


class ExpertServer:
    """Serves the experts held in ``backend`` over the data plane. ``start()`` binds; ``address`` is (host, port)."""

    def __init__(self, backend: LocalExperts, identity: TlsIdentity, pins: Pins, limits: ModelLimits,
                 host: str = "127.0.0.1", port: int = 0, frame_limits: FrameLimits = DEFAULT_LIMITS,
                 timeouts: ServerTimeouts = ServerTimeouts(), max_pending: int = 64,
                 max_batch_pairs: int = 1 << 16, poll: bool = True, listen: ListenerLimits = DEFAULT_LISTENER) -> None:
        if listen.frame_budget_per_peer < frame_limits.max_frame_bytes:
            raise ConfigError(f"a peer's frame budget ({listen.frame_budget_per_peer} bytes) must hold one frame "
                              f"of max_frame_bytes ({frame_limits.max_frame_bytes})")
        self.backend = backend
        self._lie = liar.from_env()  # TEST ONLY (liar.py): None unless EKMESH_TEST_LIAR asks this server to lie
        self.poll = poll  # busy-poll for the next frame after an answer (``poll.py``)
        self.identity = identity
        self.pins = pins
        self.model = limits
        self.frame_limits = frame_limits
        self.timeouts = timeouts
        self.max_pending = max_pending
        self.max_batch_pairs = max_batch_pairs
        self.stats = ServerStats()
        self.listen = listen
        self._refusals = RateLimitedLog(log, listen.log_interval_s, listen.log_burst)  # per source / peer
        self.gate = Gate(listen, self._refusals, "data plane")
        self.budget = ByteBudget(listen.frame_budget, listen.frame_budget_per_peer)
        self._on_cpu = backend.device.type == "cpu"
        self._ctx = make_context(identity, server=True)
        self._cv = threading.Condition()
        # its ``conns`` (under ``_cv``): insertion order = round-robin order
        self._listener = GatedListener(self.gate, _Conn, self._serve_conn, "ekmesh-expert", host, port,
                                       lock=self._cv, wake=self._wake)
        self.address = self._listener.address
        self._n_pending = 0
        self._computing = False  # a reader is computing a batch

    @property
    def _stopping(self) -> bool:
        return self._listener.stopping

    def start(self) -> ExpertServer:
        self._listener.start()
        log.info("expert server for %s listening on %s:%d", self.identity.peer_id, *self.address)
        return self

    def __enter__(self) -> ExpertServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._listener.stop()  # (``_wake`` wakes the readers waiting for the worker or for frame memory)

    def _wake(self) -> None:
        """(Under ``_cv``, stopping.)"""
        self._cv.notify_all()
        self.budget.close()  # wakes readers waiting for frame memory

    # --- connections -------------------------------------------------------------------------------------------
    def _serve_conn(self, conn: _Conn) -> None:
        """(A connection's thread; the listener closes the socket and frees the ticket when it returns.)"""
        ticket = conn.ticket
        try:
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sock.settimeout(max(ticket.left(), 1e-3))  # the TLS handshake: one deadline inside ssl
            conn.sock = self._ctx.wrap_socket(conn.sock, server_side=True)
            conn.peer = check_peer_cert(conn.sock, self.pins)
        except PeerIdentityError as exc:
            self.stats.refused += 1
            self._refused(ticket, "refused data channel from %s: %s", conn.addr, exc)
            return
        except (OSError, ssl.SSLError) as exc:
            self.stats.refused += 1
            self._refused(ticket, "data channel from %s failed its TLS handshake: %s", conn.addr, exc)
            return
        why = self.gate.authenticate(ticket, conn.peer)
        if why is not None:  # told in an ERROR frame: the client reads it as the answer to its first PING
            self.stats.refused += 1
            self._refused(ticket, "refused data channel from %s (peer %s): %s", conn.addr, conn.peer, why)
            self._send(conn, encode_error(0, ErrorCode.BUSY, f"data channel refused: {why}",
                                          limits=self.frame_limits))
            return
        log.debug("data channel from peer %s (%s) open", conn.peer, conn.addr)
        if same_host(conn.sock):
            no_wakeup_preemption()
        with torch.inference_mode(), Registration():  # inference mode: once per thread, not per request
            self._read_loop(conn)

    def _refused(self, ticket: Ticket, msg: str, *args: object) -> None:
        if not ticket.evicted:  # (the gate logged why it closed an evicted one)
            self._refusals.warning(ticket.source, msg, *args)

    def _send(self, conn: _Conn, data: bytes | bytearray) -> bool:
        return conn.send(data, self.timeouts.send_s)

    def _read_loop(self, conn: _Conn) -> None:
        assert conn.peer is not None
        reader = Intake(conn.sock, self.model, self.frame_limits, conn.peer, self.budget, self.listen)
        waits = Waits() if self.poll else None  # this connection's waits for its next frame
        try:
            while not self._stopping:
                try:  # the next layer's frame is usually close behind an answer: poll for it a while (poll.py)
                    f = reader.read(time.monotonic() + self.timeouts.idle_s, body_timeout=self.timeouts.body_s,
                                    waits=waits)
                    if f.kind not in (Kind.REQUEST, Kind.PING):
                        raise ProtocolError(f"unexpected {f.kind.name} frame from a client")
                except OverBudgetError as exc:  # the rest of the frame is unread: the channel cannot go on
                    self.stats.over_budget += 1
                    self._refusals.warning(conn.peer, "closing data channel from peer %s: %s", conn.peer, exc)
                    self._send(conn, encode_error(0, ErrorCode.BUSY, str(exc), limits=self.frame_limits))
                    return
                except ProtocolError as exc:
                    self.stats.refused += 1
                    self._refusals.warning(conn.peer, "closing data channel from peer %s: malformed frame: %s",
                                           conn.peer, exc)
                    self._send(conn, encode_error(0, ErrorCode.PROTOCOL, str(exc), limits=self.frame_limits))
                    return
                except PeerClosedError as exc:
                    log.debug("data channel from peer %s closed: %s", conn.peer, exc)
                    return
                request = f.kind is Kind.REQUEST
                answer = self._submit(conn, f) if request else encode_ping(f.request_id, pong=True)
                del f  # its payload's memory goes with it, and its reservation below
                t0 = time.perf_counter_ns()
                sent = self._send(conn, answer)
                if request:
                    self.stats.request_timed(reader.decode_ns, time.perf_counter_ns() - t0)
                reader.release()
                if not sent:
                    return
        finally:
            reader.release()

    def _submit(self, conn: _Conn, f: Frame) -> bytes | bytearray:
        """Queues a request and waits for its answer. No worker thread: a waiting reader that finds nobody
        computing becomes the one that computes (the next batch, round robin), which saves two thread switches
        per request; the others wait for it, and batching across connections still happens."""
        job = _Job(conn, f)
        deadline = time.monotonic() + self.timeouts.compute_s
        with self._cv:
            self.stats.requests += 1
            peer = conn.peer or "?"
            self.stats.by_peer[peer] = self.stats.by_peer.get(peer, 0) + 1
            if self._n_pending >= self.max_pending:
                self.stats.busy += 1
                return encode_error(f.request_id, ErrorCode.BUSY, "expert server busy: request queue full",
                                    f.layer)
            idle = not self._computing and not self._n_pending and not self._stopping
            if idle:  # nobody computing, nothing queued: compute this one now (the single-request hot path)
                self._computing = True
            else:
                conn.pending.append(job)
                self._n_pending += 1
        if idle:
            try:
                self._run([job])
            finally:
                with self._cv:
                    self._computing = False
                    self._cv.notify_all()
            return job.answer
        while True:
            with self._cv:
                while not job.done and self._computing and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._cv.wait(left):
                        if job in conn.pending:
                            conn.pending.remove(job)
                            self._n_pending -= 1
                        return encode_error(f.request_id, ErrorCode.INTERNAL, "expert server timed out", f.layer)
                if job.done:
                    return job.answer
                if self._stopping:
                    return encode_error(f.request_id, ErrorCode.INTERNAL, "expert server stopping", f.layer)
                self._computing = True
                batch = self._take_batch()
            try:
                self._run(batch)
            finally:
                with self._cv:
                    self._computing = False
                    self._cv.notify_all()

    # --- compute ------------------------------------------------------------------------------------------------
    def _take_batch(self) -> list[_Job]:
        """(Under ``_cv``.) Round robin: the first connection with work fixes the layer; then every connection,
        in turn, adds its pending requests for that layer. The first connection moves to the back of the order."""
        conns = self._listener.conns
        order = list(conns.items())
        first = next((i for i, (_, c) in enumerate(order) if c.pending), None)
        if first is None:
            return []
        key, head = order[first]
        layer = head.pending[0].frame.layer
        batch: list[_Job] = []
        pairs = 0
        for _, c in order[first:] + order[:first]:
            keep: deque[_Job] = deque()
            while c.pending:
                job = c.pending.popleft()
                n = job.frame.n_pairs
                if job.frame.layer == layer and (not batch or pairs + n <= self.max_batch_pairs):
                    batch.append(job)
                    pairs += n
                else:
                    keep.append(job)
            c.pending = keep
        self._n_pending -= len(batch)
        conns[key] = conns.pop(key)  # to the back: the next batch starts with someone else
        return batch

    def _run(self, batch: list[_Job]) -> None:
        if not batch:
            return
        self.stats.batches += 1
        if len({job.conn.peer for job in batch}) > 1:
            self.stats.mixed_batches += 1
        try:
            self._compute(batch)
        except Exception as exc:  # supervisor: a bad batch must not kill the server
            log.exception("expert compute failed for layer %d", batch[0].frame.layer)
            for job in batch:
                if not job.done:
                    job.answer = encode_error(job.frame.request_id, ErrorCode.INTERNAL,
                                              f"expert compute failed: {exc}", job.frame.layer)
                    job.done = True

    def _compute(self, batch: list[_Job]) -> None:
        """(In inference mode: the connection threads run in it.) Computes a batch. The backend itself refuses an
        expert it does not hold, so the happy path does no per-expert check; only when it refuses are the jobs
        checked one by one (and answered NOT_HELD)."""
        try:
            if len(batch) == 1 and self._regular(batch[0].frame):
                self._compute_regular(batch[0])
            else:
                self._compute_held(batch)
        except ExpertNotLoadedError:
            self._compute_held([job for job in batch if not self._refuse_missing(job)])

    def _refuse_missing(self, job: _Job) -> bool:
        """Answers NOT_HELD when ``job`` asks for an expert this server does not hold."""
        f, be = job.frame, self.backend
        assert f.pairs is not None
        missing = [e for e in np.unique(f.pairs[1]).tolist() if not be.has(f.layer, e)]
        if not missing:
            return False
        job.answer = encode_error(f.request_id, ErrorCode.NOT_HELD, f"expert (layer={f.layer}, expert={missing[0]}) "
                                  f"is not held by peer {self.identity.peer_id}", f.layer, missing[0])
        job.done = True
        return True

    def _regular(self, f: Frame) -> bool:
        """True when pair i of ``f`` is token i // k (k pairs per token, in token order: what ``RemoteExperts`` sends
        when one peer computes every pair) and the backend's own fp32 weighting and sum give this server's answer:
        the backend computes in fp32 or in the wire dtype (one rounding either way). Its sum over a token's k
        pairs is sequential in pair order, like the index_add_ of the general path (bitwise equal, checked)."""
        assert f.pairs is not None and f.hidden is not None
        t, p = f.hidden.shape[0], f.pairs.shape[1]
        if p % t or (self.backend.dtype is not torch.float32 and self.backend.dtype is not f.dtype):
            return False
        if t == 1:  # every pair is token 0 (decode() checked the indices): regular whatever p is
            return True
        k = p // t
        return bool(np.array_equal(f.pairs[0], np.arange(p, dtype=np.int32) // k))

    def _compute_regular(self, job: _Job) -> None:
        """(In inference mode.) A regular request (see ``_regular``): one backend call over hidden [T, D] with
        expert ids and weights [T, k], which weights and sums in fp32 itself: no [P, D] gather, scale and scatter."""
        be, f = self.backend, job.frame
        assert f.pairs is not None and f.weights_np is not None and f.hidden is not None
        # as few torch calls as possible (each costs microseconds on a core that just woke up): ids and weights
        # are shaped in numpy, and on a CPU backend of the wire dtype nothing is moved or cast
        t, d = f.hidden.shape
        k = f.pairs.shape[1] // t
        x = f.hidden  # [T, D]
        w = torch.from_numpy(f.weights_np.reshape(t, k))  # [T, k] fp32
        c0 = time.perf_counter_ns()
        if x.dtype is not be.dtype or not self._on_cpu:
            x = x.to(be.device, be.dtype)
        copy_ns = time.perf_counter_ns() - c0
        few = self._on_cpu and be.pair_by_pair(t * k, x)
        rows = f.pairs[1].reshape(t, k).tolist() if few else None  # decode: expert ids as lists, no tensor
        if not few:
            e = torch.from_numpy(f.pairs[1].astype(np.int64).reshape(t, k))  # [T, k]
            if not self._on_cpu:
                e, w = e.to(be.device), w.to(be.device)
        t0 = time.perf_counter_ns()
        # [T, D]: per token, the sum of weight * expert(x) over its pairs (fp32, then be.dtype)
        y = be.few(f.layer, x, rows, w) if rows is not None else be(f.layer, x, e, w)
        self._synchronize()
        t1 = time.perf_counter_ns()
        us = (t1 - t0) // 1000
        if self._lie is not None:
            y = self._lie(y)
        if y.dtype is f.dtype and self._on_cpu and y.is_contiguous():
            job.answer = response_from(f.request_id, f.layer, y, us)
            t2 = t3 = time.perf_counter_ns()
        else:
            job.answer, view = response_buffer(f.request_id, f.layer, t, d, f.dtype, us)
            t2 = time.perf_counter_ns()
            view.copy_(y)  # cast to the wire dtype (and moved to the host) straight into the frame
            t3 = time.perf_counter_ns()
        self.stats.batch_timed(copy_ns + t3 - t2, t1 - t0, t2 - t1)
        job.done = True

    def _synchronize(self) -> None:
        """On CUDA, waits for the backend's kernels (so that their time is counted as compute, not as the copy
        after them, which would wait for them anyway)."""
        if self.backend.device.type == "cuda":
            torch.cuda.synchronize(self.backend.device)

    def _compute_held(self, batch: list[_Job]) -> None:
        """(In inference mode.) One backend call for the batch, then per job its weighted per-token sums."""
        if not batch:
            return
        be, layer = self.backend, batch[0].frame.layer
        c0 = time.perf_counter_ns()
        toks: list[torch.Tensor] = []
        xs: list[torch.Tensor] = []
        ids: list[torch.Tensor] = []
        for job in batch:
            f = job.frame
            assert f.tokens is not None and f.experts is not None and f.hidden is not None
            tok = f.tokens.to(be.device, torch.long)  # [P]
            toks.append(tok)
            xs.append(f.hidden.to(be.device, be.dtype).index_select(0, tok))  # [P, D] (4× faster than [tok])
            ids.append(f.experts.to(be.device, torch.long))  # [P]
        x = xs[0] if len(xs) == 1 else torch.cat(xs)  # [ΣP, D]
        e = (ids[0] if len(ids) == 1 else torch.cat(ids))[:, None]  # [ΣP, 1]: one pair per row, weighted below
        t0 = time.perf_counter_ns()
        y = be(layer, x, e, torch.ones(e.shape, dtype=be.dtype, device=be.device))  # [ΣP, D]
        self._synchronize()
        t1 = time.perf_counter_ns()
        us = (t1 - t0) // 1000  # the backend call only: everything else is overhead
        copy_ns, encode_ns = t0 - c0, 0  # (the gathers and the weighted sums count as copying)
        y = y.float()  # [ΣP, D] fp32 (a new tensor unless the backend is fp32: then y is ours to scale in place)
        off = 0
        for job, tok in zip(batch, toks, strict=True):
            f = job.frame
            assert f.weights is not None and f.hidden is not None
            p = tok.shape[0]
            yw = y[off:off + p].mul_(f.weights.to(be.device)[:, None])  # [P, D] weight * expert(x) in fp32
            out = torch.zeros(f.hidden.shape, dtype=torch.float32, device=be.device)  # [T, D]
            out.index_add_(0, tok, yw)  # per token, its pairs summed in pair order
            if self._lie is not None:
                out = self._lie(out)
            off += p
            t, d = f.hidden.shape
            t2 = time.perf_counter_ns()
            job.answer, view = response_buffer(f.request_id, layer, t, d, f.dtype, us)
            t3 = time.perf_counter_ns()
            view.copy_(out)  # cast to the request's dtype straight into the frame
            encode_ns += t3 - t2
            job.done = True
        self.stats.batch_timed(time.perf_counter_ns() - t1 - encode_ns + copy_ns, t1 - t0, encode_ns)
