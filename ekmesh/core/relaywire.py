"""The experts relay's handshake: how a process on this machine (``ekmesh.hf``) asks the node of its ``EKMESH_HOME``
to compute a model's routed experts on the mesh. Shared by the relay (``node/experts_relay.py``) and its client
(``hf/link.py``), which may not import each other; standard library only.

Where: the node writes ``node.json`` (mode 0600, ``discovery/control.py``) with, under ``NODE_JSON_KEY``,
``{"addr": "127.0.0.1:PORT", "token": HEX}``: the relay listens on 127.0.0.1 only, and the token (``TOKEN_BYTES``
random bytes, new every run) is what only a reader of that file knows.

Wire: one TCP connection per client link. The client sends a fixed-size hello::

    magic "EKRL" | version u8 | flags u8 (0) | token [32] | model fingerprint [32]

The relay answers a data-plane PONG frame (``infer/dataplane/frames.py``, request id 0) when it accepts, or an
ERROR frame whose ``aux`` is a ``Refusal`` and whose message says why, then closes. After a PONG, the client sends
REQUEST frames (one per MoE layer call, or per slice of its rows: ``n_pairs = T * k``, pair ``i`` for token
``i // k``, in order) and gets one RESPONSE (per token, the weighted sum of its experts) or ERROR per request.

Model fingerprint: what a checkpoint *is*, without reading a tensor: the SHA-256 of canonical JSON of its
config.json (verbatim), its tensor table (per tensor: file, absolute byte range, dtype, shape: what safetensors
headers and a manifest's ``tensors`` both say) and its experts format (None, or a quantized model's). The node
compares it with the fingerprint of the manifest it serves, so a checkpoint directory, its hub id and the stored
model imported from either all match, and another model (or a quantized variant) does not.

Invariants: the hello is ``HELLO.size`` bytes whatever it says, so nothing is allocated from an unauthenticated
client's input; ``decode_hello`` raises ``ProtocolError`` naming the field at fault.
"""

from __future__ import annotations

import enum
import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

from ekmesh.core.errors import ProtocolError

MAGIC = b"EKRL"
VERSION = 1
TOKEN_BYTES = 32
HELLO = struct.Struct("<4sBB32s32s")  # magic, version, flags, token, fingerprint
MAX_FRAME_BYTES = 64 << 20
"""The largest frame the relay reads; a client slices a larger call by rows."""
NODE_JSON_KEY = "experts_relay"
"""node.json's key for the relay's address and token."""


class Refusal(enum.IntEnum):
    """Why the relay refused a hello or a request (the ``aux`` of its ERROR frame)."""

    PROTOCOL = 1  # a malformed hello or frame
    TOKEN = 2  # the token is not this run's (a stale node.json, or another home's)
    MODEL = 3  # the node serves another model
    NOT_READY = 4  # the node serves no model yet, or does not host attention
    MISSING = 5  # some of the model's experts have no live holder
    BUSY = 6  # the relay's connection caps are full
    FAILED = 7  # a request could not be computed (e.g. an expert became unavailable mid-call)


@dataclass(frozen=True)
class RelayTimeouts:
    """Deadlines of the relay and its client, in seconds."""

    connect_s: float = 5.0  # client: TCP connect + hello answer
    call_s: float = 300.0  # client: one request's answer (a long prefill over a slow mesh; the node fails over)
    idle_s: float = 3600.0  # relay: a connection with no request for this long is closed (the client reconnects)
    send_s: float = 30.0  # both: writing one frame


DEFAULT_TIMEOUTS = RelayTimeouts()


def encode_hello(token: bytes, fingerprint: bytes) -> bytes:
    if len(token) != TOKEN_BYTES or len(fingerprint) != 32:
        raise ProtocolError(f"hello needs a {TOKEN_BYTES}-byte token and a 32-byte fingerprint")
    return HELLO.pack(MAGIC, VERSION, 0, token, fingerprint)


def decode_hello(buf: bytes) -> tuple[bytes, bytes]:
    """(token, fingerprint) of a hello of exactly ``HELLO.size`` bytes; ``ProtocolError`` otherwise."""
    if len(buf) != HELLO.size:
        raise ProtocolError(f"relay hello must be {HELLO.size} bytes, got {len(buf)}")
    magic, version, flags, token, fingerprint = HELLO.unpack(buf)
    if magic != MAGIC:
        raise ProtocolError(f"bad relay hello magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise ProtocolError(f"unsupported relay version {version} (this node speaks {VERSION})")
    if flags != 0:
        raise ProtocolError(f"relay hello flags must be 0, got {flags}")
    return bytes(token), bytes(fingerprint)


def fingerprint(config: dict[str, Any], tensors: dict[str, dict[str, Any]],
                experts_format: dict[str, Any] | None) -> bytes:
    """The model fingerprint (see the module docstring). ``tensors``: ``{name: {"file", "range": [begin, end],
    "dtype", "shape"}}`` as a manifest's ``tensors``."""
    table = {n: {"file": t["file"], "range": [int(t["range"][0]), int(t["range"][1])], "dtype": t["dtype"],
                 "shape": [int(s) for s in t["shape"]]} for n, t in tensors.items()}
    doc = {"config": config, "tensors": table, "experts_format": experts_format}
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(raw.encode("utf-8")).digest()
