"""The experts relay: a node's local listener through which a process on this machine (``ekmesh.hf``: a
transformers model whose dense part runs in that process) has its MoE layers' routed experts computed on the mesh.

Role: accept clients on 127.0.0.1, check their token and model (``core/relaywire.py``: hello, fingerprint,
refusals), then answer one data-plane REQUEST frame per MoE layer call with the summed expert output computed by
the node's experts backend (for an attention host: ``Serving.remote``, the ``RemoteExperts`` with its failover and
verification), as the node's own generator does. ``serving_resolver`` is how a node's ``Serving`` answers "which
backend serves this fingerprint".

Not responsible for: the mesh (``RemoteExperts``), the model's dense part (the client runs it), where the token is
written (the node puts address and token in node.json).

Bounds (``core/limits.py``, counted before authentication and per source address, as every listener): a connection
is pending from accept until its hello's token checked (8 per source, 64 in all, one 3 s deadline for the whole
hello); the hello has a fixed size, so nothing is allocated from an unauthenticated client's input; authenticated
connections count against the listener (``RELAY_LISTENER``: 64 in all, all of them one "peer"); a frame's header
is checked against ``RELAY_FRAMES`` and the served model before its payload is allocated. One thread per admitted
connection (``GatedListener``: the accept loop the data plane's expert server runs too). Refusals log at most 5
lines per source per 10 s.

Invariants: every refusal reaches the client as an ERROR frame whose ``aux`` is a ``Refusal`` (a malformed frame
closes the connection after it; a request that failed to compute does not); a request's pairs must be k per token
in token order (what ``hf`` sends); the answer is cast back to the request's dtype; every wait has a deadline
(``RelayTimeouts``); ``stop()`` closes the listener and every connection and joins the threads.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ekmesh.core.errors import (
    EkmeshError,
    ExpertsMissingError,
    ExpertUnavailableError,
    ModelNotServedError,
    PeerClosedError,
    ProtocolError,
    RelayError,
)
from ekmesh.core.limits import Connection, Gate, GatedListener, ListenerLimits, RateLimitedLog
from ekmesh.core.relaywire import (
    DEFAULT_TIMEOUTS,
    HELLO,
    MAX_FRAME_BYTES,
    NODE_JSON_KEY,
    TOKEN_BYTES,
    Refusal,
    RelayTimeouts,
    decode_hello,
    fingerprint,
)
from ekmesh.infer.dataplane.channel import FrameReader
from ekmesh.infer.dataplane.frames import (
    ErrorCode,
    Frame,
    FrameLimits,
    Kind,
    ModelLimits,
    encode_error,
    encode_ping,
    response_from,
)
from ekmesh.infer.experts import ExpertsBackend

if TYPE_CHECKING:
    from ekmesh.node.serving import Serving

log = logging.getLogger(__name__)

RELAY_LISTENER = ListenerLimits(max_auth=64, max_auth_per_peer=64)  # all clients are one local "peer"
RELAY_FRAMES = FrameLimits(max_frame_bytes=MAX_FRAME_BYTES)  # a client slices larger calls by rows
_CLIENT = "local"  # the peer name every authenticated client counts against


@dataclass(frozen=True)
class RelayTarget:
    """What serves one fingerprint: the experts backend, the model's frame limits, and the backend's dtype (hidden
    states are cast to it, as the node's own generator hands them over)."""

    backend: ExpertsBackend
    limits: ModelLimits
    dtype: torch.dtype


Resolver = Callable[[bytes], RelayTarget]
"""fingerprint -> its target; raises ``RelayError`` (or ``ModelNotServedError`` / ``ExpertsMissingError``)."""


@dataclass
class RelayStats:
    accepted: int = 0  # connections past their hello
    refused: int = 0  # connections refused (cap, token, model, protocol)
    requests: int = 0
    failed: int = 0  # requests answered with an ERROR
    by_refusal: dict[str, int] = field(default_factory=dict)


class ExpertsRelay:
    """The listener. ``start()`` binds 127.0.0.1; ``address`` is (host, port); ``token`` is this run's secret."""

    def __init__(self, resolve: Resolver, token: bytes | None = None, host: str = "127.0.0.1", port: int = 0,
                 listen: ListenerLimits = RELAY_LISTENER, frame_limits: FrameLimits = RELAY_FRAMES,
                 timeouts: RelayTimeouts = DEFAULT_TIMEOUTS) -> None:
        self.resolve = resolve
        self.token = token if token is not None else secrets.token_bytes(TOKEN_BYTES)
        self.listen, self.frame_limits, self.timeouts = listen, frame_limits, timeouts
        self.stats = RelayStats()
        self._refusals = RateLimitedLog(log, listen.log_interval_s, listen.log_burst)
        self.gate = Gate(listen, self._refusals, "experts relay")
        self._listener = GatedListener(self.gate, Connection, self._serve, "ekmesh-relay", host, port,
                                       refused=self._refused_at_accept)
        self.address = self._listener.address

    @classmethod
    def for_serving(cls, serving: Serving) -> ExpertsRelay:
        """The relay of a node's ``Serving`` (``serving_resolver``), not started."""
        return cls(serving_resolver(serving))

    @property
    def addr(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def node_json(self) -> dict[str, dict[str, str]]:
        """What the node writes in node.json (mode 0600) for clients: address and token."""
        return {NODE_JSON_KEY: {"addr": self.addr, "token": self.token.hex()}}

    def start(self) -> ExpertsRelay:
        self._listener.start()
        log.info("experts relay listening on %s", self.addr)
        return self

    def stop(self) -> None:
        self._listener.stop()

    def __enter__(self) -> ExpertsRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- connections -------------------------------------------------------------------------------------------
    def _refused_at_accept(self) -> None:
        self.stats.refused += 1

    def _serve(self, conn: Connection) -> None:
        """(A connection's thread; the listener closes the socket and frees the ticket when it returns.)"""
        target = self._hello(conn)
        if target is not None:
            self.stats.accepted += 1
            with torch.inference_mode():
                self._loop(conn, target)

    def _refuse(self, conn: Connection, why: Refusal, message: str) -> None:
        ticket = conn.ticket
        self.stats.refused += 1
        self.stats.by_refusal[why.name] = self.stats.by_refusal.get(why.name, 0) + 1
        if why in (Refusal.PROTOCOL, Refusal.TOKEN, Refusal.BUSY) and not ticket.evicted:
            self._refusals.warning(ticket.source, "experts relay: refused %s: %s", ticket.address, message)
        else:
            log.info("experts relay: refused %s: %s", ticket.address, message)
        self._send(conn, encode_error(0, ErrorCode.PROTOCOL, message, aux=why, limits=self.frame_limits))

    def _hello(self, conn: Connection) -> RelayTarget | None:
        """Reads and checks the hello within the ticket's deadline; the target, or None (refused and told)."""
        sock, ticket = conn.sock, conn.ticket
        buf = bytearray()
        try:
            while len(buf) < HELLO.size:
                left = ticket.left()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                chunk = sock.recv(HELLO.size - len(buf))
                if not chunk:
                    return None  # the client left
                buf += chunk
        except (TimeoutError, OSError):
            if not ticket.evicted:
                self._refusals.warning(ticket.source, "experts relay: %s sent no hello within %g s", ticket.address,
                                       self.listen.handshake_s)
            self.stats.refused += 1
            return None
        try:
            token, fp = decode_hello(bytes(buf))
        except ProtocolError as exc:
            self._refuse(conn, Refusal.PROTOCOL, str(exc))
            return None
        if not hmac.compare_digest(token, self.token):
            self._refuse(conn, Refusal.TOKEN, "wrong relay token: node.json is from another run or "
                                              "another EKMESH_HOME")
            return None
        why = self.gate.authenticate(ticket, _CLIENT)
        if why is not None:
            self._refuse(conn, Refusal.BUSY, f"experts relay busy: {why}")
            return None
        try:
            target = self.resolve(fp)
        except ModelNotServedError as exc:
            self._refuse(conn, Refusal.MODEL, str(exc))
            return None
        except ExpertsMissingError as exc:
            self._refuse(conn, Refusal.MISSING, str(exc))
            return None
        except RelayError as exc:
            self._refuse(conn, Refusal.NOT_READY, str(exc))
            return None
        return target if self._send(conn, encode_ping(0, pong=True)) else None

    def _loop(self, conn: Connection, target: RelayTarget) -> None:
        reader = FrameReader(conn.sock, target.limits, self.frame_limits, _CLIENT)
        while not self._listener.stopping:
            try:
                f = reader.read(time.monotonic() + self.timeouts.idle_s, body_timeout=self.timeouts.send_s)
                if f.kind is Kind.PING:
                    if not self._send(conn, encode_ping(f.request_id, pong=True)):
                        return
                    continue
                if f.kind is not Kind.REQUEST:
                    raise ProtocolError(f"unexpected {f.kind.name} frame from a relay client")
                hidden, ids, weights = _regular(f)
            except ProtocolError as exc:
                self.stats.failed += 1
                self._refusals.warning(_CLIENT, "experts relay: closing a client connection: malformed frame: %s",
                                       exc)
                self._send(conn, encode_error(0, ErrorCode.PROTOCOL, str(exc), aux=Refusal.PROTOCOL,
                                              limits=self.frame_limits))
                return
            except PeerClosedError as exc:
                log.debug("experts relay client closed: %s", exc)
                return
            self.stats.requests += 1
            try:
                out = target.backend(f.layer, hidden.to(target.dtype), ids, weights)  # [T, D]
                answer: bytes | bytearray = response_from(f.request_id, f.layer, out.to(f.dtype).contiguous())
            except EkmeshError as exc:  # e.g. an expert with no live holder left: the client raises it
                self.stats.failed += 1
                why = Refusal.MISSING if isinstance(exc, ExpertUnavailableError) else Refusal.FAILED
                log.warning("experts relay: layer %d failed: %s", f.layer, exc)
                answer = encode_error(f.request_id, ErrorCode.INTERNAL, str(exc), layer=f.layer, aux=why,
                                      limits=self.frame_limits)
            if not self._send(conn, answer):
                return

    def _send(self, conn: Connection, data: bytes | bytearray) -> bool:
        return conn.send(data, self.timeouts.send_s)


def _regular(f: Frame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A request's (hidden [T, D], expert ids [T, k], weights [T, k]); ``ProtocolError`` unless its pairs are k per
    token in token order."""
    assert f.hidden is not None and f.pairs is not None and f.weights_np is not None
    t, p = f.hidden.shape[0], f.n_pairs
    if p % t:
        raise ProtocolError(f"n_pairs {p} is not a multiple of n_tokens {t}")
    k = p // t
    if not np.array_equal(f.pairs[0], np.repeat(np.arange(t, dtype=np.int32), k)):
        raise ProtocolError("relay requests carry k pairs per token, in token order")
    ids = torch.from_numpy(f.pairs[1].astype(np.int64)).view(t, k)  # [T, k]
    weights = torch.from_numpy(f.weights_np.copy()).view(t, k)  # [T, k] fp32
    return f.hidden, ids, weights


def serving_resolver(serving: Serving) -> Resolver:
    """The relay's resolver over a node's ``Serving``: its manifest's fingerprint must match; the node must host
    attention and have loaded it (its ``remote`` backend), and every routed expert must have a live holder."""
    cache: dict[str, bytes] = {}

    def resolve(fp: bytes) -> RelayTarget:
        m = serving.manifest
        if m is None:
            raise RelayError(f"the local node has no model yet ({serving.state})")
        mine = cache.get(m.id)
        if mine is None:
            mine = cache[m.id] = fingerprint(m.data["config"], m.data["tensors"], m.experts_format)
        if not hmac.compare_digest(fp, mine):
            raise ModelNotServedError(f"the local node serves model {m.id} ({m.architecture}, format "
                                      f"{m.experts_format_name()}), not this checkpoint (its config or tensors "
                                      "differ); start the node with `ekmesh join --model` for this model")
        remote, limits = serving.remote, serving.limits
        if remote is None or limits is None:
            raise RelayError(f"the local node cannot compute experts for model {m.id} yet: {serving.why_not()}")
        missing = serving.missing()
        if missing:
            few = ", ".join(f"({layer}, {e})" for layer, e in missing[:5])
            raise ExpertsMissingError(f"{len(missing)} routed experts of model {m.id} have no live holder in the "
                                      f"mesh (e.g. (layer, expert) {few}); start nodes that serve them (`ekmesh "
                                      f"join --model {m.id}`)", len(missing))
        return RelayTarget(remote, limits, serving.dtype)

    return resolve
