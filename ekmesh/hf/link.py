"""The client end of the local node's experts relay (``node/experts_relay.py``; wire in ``core/relaywire.py``).

Role: find the node of an ``EKMESH_HOME`` (its node.json, as ``ekmesh chat`` does), open one connection to its
relay for one model (token + fingerprint), and turn each MoE layer call ``(layer, hidden [T, D], ids [T, k],
weights [T, k])`` into REQUEST frames (the rows sliced so that no frame exceeds the relay's limit) whose answers
are the summed expert outputs.

Errors (``core/errors.py``): no node.json, or nothing listening at its address -> ``NodeNotRunningError``; a node
that serves no model -> ``RelayError``; a refusal -> ``RelayAuthError`` (token), ``ModelNotServedError`` (another
model), ``ExpertsMissingError`` (experts with no live holder), ``RelayError`` (not ready, busy, failed).

Invariants: one call at a time per link (a lock; a model's layers run in sequence anyway); a connection that broke
between calls is reopened once, transparently (the relay closes idle ones); one that breaks during a call fails
that call; every wait has a deadline (``RelayTimeouts``); the answer has the hidden states' dtype and device.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch

from ekmesh.core.errors import (
    ExpertsMissingError,
    ModelNotServedError,
    NodeNotRunningError,
    PeerClosedError,
    ProtocolError,
    RelayAuthError,
    RelayError,
)
from ekmesh.core.paths import ekmesh_home
from ekmesh.core.relaywire import (
    DEFAULT_TIMEOUTS,
    MAX_FRAME_BYTES,
    NODE_JSON_KEY,
    Refusal,
    RelayTimeouts,
    encode_hello,
)
from ekmesh.discovery.control import read_control_file
from ekmesh.hf.source import OpenedModel
from ekmesh.infer.dataplane.channel import FrameReader
from ekmesh.infer.dataplane.frames import (
    HEADER_SIZE,
    PAIR_BYTES,
    Frame,
    FrameLimits,
    Kind,
    ModelLimits,
    encode_request,
)
from ekmesh.infer.loader import family_config

log = logging.getLogger(__name__)

_ERRORS: dict[int, type[RelayError]] = {Refusal.TOKEN: RelayAuthError, Refusal.MODEL: ModelNotServedError,
                                        Refusal.MISSING: ExpertsMissingError}
_PEER = "the local node"


def _refusal(f: Frame, home: Path) -> RelayError:
    cls = _ERRORS.get(f.aux, RelayError)
    return cls(f"the ekmesh node of {home} refused: {f.message}")


class RelayLink:
    """The relay of the node running for ``home``, for the model of ``fingerprint`` (``limits``: its shape)."""

    def __init__(self, home: Path, fingerprint: bytes, limits: ModelLimits,
                 timeouts: RelayTimeouts = DEFAULT_TIMEOUTS) -> None:
        self.home, self.fingerprint, self.limits, self.timeouts = home, fingerprint, limits, timeouts
        self.frame_limits = FrameLimits(max_frame_bytes=MAX_FRAME_BYTES)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._reader: FrameReader | None = None
        self._ids = itertools.count(1)
        self.calls = 0  # layer calls answered
        self.connects = 0  # connections opened (a connection the relay closed while idle is reopened)
        self.frames = 0  # request frames sent (a call is sliced when its frame would be too large)

    def _address(self) -> tuple[tuple[str, int], bytes]:
        info = read_control_file(self.home)  # NodeNotRunningError when there is none
        relay = info.get(NODE_JSON_KEY)
        if not isinstance(relay, dict):
            raise RelayError(f"the ekmesh node running for {self.home} (pid {info.get('pid', '?')}) serves no "
                             "model, so it has no experts relay: start it with `ekmesh join --model MODEL` "
                             "(`--no-experts` to keep the experts on other peers)")
        try:
            host, port = str(relay["addr"]).rsplit(":", 1)
            token = bytes.fromhex(str(relay["token"]))
            return (host, int(port)), token
        except (KeyError, ValueError) as exc:
            raise RelayError(f"{self.home}/node.json has a malformed {NODE_JSON_KEY!r} entry: {exc}") from exc

    def connect(self) -> RelayLink:
        """Opens the connection now (``from_pretrained`` does, so a missing node or model fails at load time)."""
        with self._lock:
            if self._sock is None:
                self._open()
        return self

    def _open(self) -> None:
        addr, token = self._address()
        deadline = time.monotonic() + self.timeouts.connect_s
        try:
            sock = socket.create_connection(addr, timeout=self.timeouts.connect_s)
        except OSError as exc:
            raise NodeNotRunningError(f"no ekmesh node answers at {addr[0]}:{addr[1]} for {self.home} ({exc}); "
                                      "start one with `ekmesh join --model MODEL`") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(encode_hello(token, self.fingerprint))
            reader = FrameReader(sock, self.limits, self.frame_limits, _PEER)
            first = reader.read(deadline)
        except (OSError, PeerClosedError, ProtocolError) as exc:
            sock.close()
            raise RelayError(f"the experts relay of the node for {self.home} broke off its handshake: {exc}") \
                from exc
        if first.kind is Kind.ERROR:
            sock.close()
            raise _refusal(first, self.home)
        if first.kind is not Kind.PONG:
            sock.close()
            raise RelayError(f"the experts relay answered its handshake with {first.kind.name}")
        self._sock, self._reader = sock, reader
        self.connects += 1

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = self._reader = None

    def __call__(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, D], ids [T, k], weights [T, k] -> [T, D]: per token the weighted sum of its experts."""
        t, d = hidden.shape
        k = ids.shape[1]
        x = hidden.detach().to("cpu").contiguous()  # [T, D]
        ids_np = ids.detach().to("cpu").reshape(-1).numpy()  # [T*k]
        w = weights.detach().to("cpu", torch.float32).reshape(-1).contiguous()  # [T*k]
        out = torch.empty(t, d, dtype=hidden.dtype)  # [T, D]
        rows = max(1, (MAX_FRAME_BYTES - HEADER_SIZE) // (d * x.element_size() + k * PAIR_BYTES))
        with self._lock:
            for a in range(0, t, rows):
                b = min(t, a + rows)
                out[a:b] = self._slice(layer, x[a:b], ids_np[a * k:b * k], w[a * k:b * k], k)
            self.calls += 1
        return out.to(hidden.device)

    def _slice(self, layer: int, x: torch.Tensor, ids: np.ndarray, w: torch.Tensor, k: int) -> torch.Tensor:
        n = x.shape[0]
        tokens = np.repeat(np.arange(n, dtype=np.int32), k)  # [n*k]: pair i is for token i // k
        rid = next(self._ids)
        frame = encode_request(rid, layer, tokens, ids, w, x)
        fresh = self._sock is None
        for attempt in (0, 1):
            if self._sock is None:
                self._open()
                fresh = True
            sock, reader = self._sock, self._reader
            assert sock is not None and reader is not None
            try:
                sock.settimeout(self.timeouts.send_s)
                sock.sendall(frame)
                self.frames += 1
                answer = reader.read(time.monotonic() + self.timeouts.call_s)
            except (OSError, PeerClosedError) as exc:
                self._drop()
                if fresh or attempt:  # broke during this call's own connection: the node went away
                    raise RelayError(f"the ekmesh node for {self.home} closed the experts relay connection "
                                     f"(layer {layer}): {exc}") from exc
                log.debug("experts relay connection was closed while idle (%s); reconnecting", exc)
                continue
            except ProtocolError as exc:
                self._drop()
                raise RelayError(f"the experts relay sent a malformed answer (layer {layer}): {exc}") from exc
            return self._result(answer, rid, layer, x)
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _result(self, answer: Frame, rid: int, layer: int, x: torch.Tensor) -> torch.Tensor:
        if answer.kind is Kind.ERROR:
            if answer.aux == Refusal.PROTOCOL:
                self._drop()  # the relay closes the connection after a malformed frame
            raise _refusal(answer, self.home)
        ok = (answer.kind is Kind.RESPONSE and answer.request_id == rid and answer.layer == layer
              and answer.hidden is not None and tuple(answer.hidden.shape) == tuple(x.shape)
              and answer.dtype == x.dtype)
        if not ok:
            self._drop()
            raise RelayError(f"the experts relay answered request {rid} (layer {layer}) with a mismatched "
                             f"{answer.kind.name} frame")
        assert answer.hidden is not None
        return answer.hidden



def open_link(opened: OpenedModel, home: Path | None = None, timeouts: RelayTimeouts = DEFAULT_TIMEOUTS) -> RelayLink:
    """A connected link to the relay of the node running for ``home`` (default: ``$EKMESH_HOME``, as ``ekmesh
    chat`` finds its node) for ``opened``'s model."""
    _fam, cfg = family_config(opened.hf_config, f"{opened.label}/config.json")
    return RelayLink(home or ekmesh_home(), opened.fingerprint, ModelLimits.from_config(cfg), timeouts).connect()
