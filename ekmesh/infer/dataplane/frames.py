"""Data-plane frames: the versioned binary format of activations between an attention host and expert peers.

A frame is a fixed 44-byte little-endian header followed by ``payload_len`` bytes::

    magic "EKDP" | version u8 | kind u8 | dtype u8 | code u8 | request_id u64 | layer u32 | n_tokens u32 |
    n_pairs u32 | hidden u32 | aux u32 | payload_len u64

- REQUEST: payload = token index int32[n_pairs] | expert id int32[n_pairs] | routing weight fp32[n_pairs] |
  hidden [n_tokens, hidden] in ``dtype``. Pair i asks for ``weight[i] * expert[i](hidden[token[i]])``.
- RESPONSE: payload = [n_tokens, hidden] in ``dtype``: per token the sum over its pairs (weighted partial sums);
  ``aux`` = the server's compute time in microseconds; n_pairs = 0.
- ERROR: payload = a UTF-8 message (≤ ``max_error_bytes``); ``code`` says why (``ErrorCode``); for NOT_HELD,
  ``layer`` and ``aux`` name the (layer, expert) that is not held. PING / PONG: no payload (liveness, first
  response of a fresh channel, latency probes). ``request_id`` is echoed by every answer.

Invariants:
- ``decode_header`` checks every header field against ``FrameLimits`` and ``ModelLimits`` and that ``payload_len``
  equals the length the counts imply, so a reader allocates at most ``max_frame_bytes`` and only after the check;
  ``decode_body`` then checks the arrays (token indices < n_tokens, expert ids < num_experts, weights finite).
  Every refusal is a ``ProtocolError`` whose message names the field.
- Decoded tensors are views over the received buffer (no copy); the host must be little-endian (as torch's
  ``frombuffer`` reads native order).
"""

from __future__ import annotations

import enum
import struct
import sys
from dataclasses import dataclass, field

import torch

from ekmesh.core.errors import ProtocolError

MAGIC = b"EKDP"
VERSION = 1
HEADER = struct.Struct("<4sBBBBQIIIIIQ")
HEADER_SIZE = HEADER.size  # 44
PAIR_BYTES = 12  # int32 token + int32 expert + fp32 weight
assert sys.byteorder == "little", "data-plane frames are little-endian"


class Kind(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    ERROR = 3
    PING = 4
    PONG = 5


class ErrorCode(enum.IntEnum):
    PROTOCOL = 1  # the frame broke the protocol; the server closes the connection after this
    BUSY = 2  # the server's queue for this connection is full; retry elsewhere or later
    NOT_HELD = 3  # the server does not hold (layer, aux)
    INTERNAL = 4  # the server failed computing a well-formed request


DTYPES: dict[int, torch.dtype] = {1: torch.bfloat16, 2: torch.float16, 3: torch.float32}
DTYPE_CODES: dict[torch.dtype, int] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class ModelLimits:
    """What a frame may address: global layer indices < num_layers that are MoE layers, experts < num_experts."""

    num_layers: int
    num_experts: int
    hidden: int
    moe_layers: tuple[bool, ...]

    @classmethod
    def from_config(cls, cfg: object) -> ModelLimits:
        """From a model family config (``num_layers``, ``num_experts``, ``hidden_size``, ``moe_layers``)."""
        return cls(int(cfg.num_layers), int(cfg.num_experts), int(cfg.hidden_size),  # type: ignore[attr-defined]
                   tuple(bool(m) for m in cfg.moe_layers))  # type: ignore[attr-defined]


@dataclass(frozen=True)
class FrameLimits:
    """Size bounds checked before any allocation."""

    max_frame_bytes: int = 64 << 20
    max_tokens: int = 1 << 16
    max_pairs: int = 1 << 20
    max_error_bytes: int = 4096


DEFAULT_LIMITS = FrameLimits()


@dataclass(frozen=True)
class Header:
    kind: Kind
    dtype_code: int
    code: int
    request_id: int
    layer: int
    n_tokens: int
    n_pairs: int
    hidden: int
    aux: int
    payload_len: int


@dataclass
class Frame:
    """A decoded frame. Array fields are set for REQUEST (all) and RESPONSE (``hidden``)."""

    kind: Kind
    request_id: int
    layer: int = 0
    dtype: torch.dtype = torch.bfloat16
    tokens: torch.Tensor | None = None  # [P] int32
    experts: torch.Tensor | None = None  # [P] int32
    weights: torch.Tensor | None = None  # [P] fp32
    hidden: torch.Tensor | None = None  # [T, D]
    code: int = 0
    aux: int = 0
    message: str = field(default="")


def _header(kind: Kind, request_id: int, *, dtype_code: int = 0, code: int = 0, layer: int = 0, n_tokens: int = 0,
            n_pairs: int = 0, hidden: int = 0, aux: int = 0, payload_len: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, dtype_code, code, request_id, layer, n_tokens, n_pairs, hidden, aux,
                       payload_len)


def _raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy())  # type: ignore[arg-type]


def encode_request(request_id: int, layer: int, tokens: torch.Tensor, experts: torch.Tensor,
                   weights: torch.Tensor, hidden: torch.Tensor) -> bytes:
    """tokens/experts/weights [P] (any int / float dtype), hidden [T, D] (bf16, fp16 or fp32) -> one frame."""
    p, (t, d) = tokens.shape[0], hidden.shape
    if hidden.dtype not in DTYPE_CODES:
        raise ProtocolError(f"hidden dtype {hidden.dtype} cannot go on the wire (bf16, fp16, fp32)")
    parts = [tokens.to(torch.int32).cpu(), experts.to(torch.int32).cpu(), weights.to(torch.float32).cpu(),
             hidden.cpu()]
    size = p * PAIR_BYTES + t * d * hidden.element_size()
    head = _header(Kind.REQUEST, request_id, dtype_code=DTYPE_CODES[hidden.dtype], layer=layer, n_tokens=t,
                   n_pairs=p, hidden=d, payload_len=size)
    return b"".join([head, *(_raw(x) for x in parts)])


def encode_response(request_id: int, layer: int, out: torch.Tensor, compute_us: int = 0) -> bytes:
    """out [T, D] weighted partial sums (in the request's dtype) -> one frame."""
    t, d = out.shape
    head = _header(Kind.RESPONSE, request_id, dtype_code=DTYPE_CODES[out.dtype], layer=layer, n_tokens=t, hidden=d,
                   aux=min(compute_us, 0xFFFFFFFF), payload_len=t * d * out.element_size())
    return head + _raw(out.cpu()).tobytes()


def encode_error(request_id: int, code: ErrorCode, message: str, layer: int = 0, aux: int = 0,
                 limits: FrameLimits = DEFAULT_LIMITS) -> bytes:
    data = message.encode("utf-8")[: limits.max_error_bytes]
    return _header(Kind.ERROR, request_id, code=code, layer=layer, aux=aux, payload_len=len(data)) + data


def encode_ping(request_id: int, pong: bool = False) -> bytes:
    return _header(Kind.PONG if pong else Kind.PING, request_id)


def decode_header(buf: bytes | bytearray | memoryview, model: ModelLimits,
                  limits: FrameLimits = DEFAULT_LIMITS) -> Header:
    """Parses and validates a header (exactly ``HEADER_SIZE`` bytes). Raises ``ProtocolError``."""
    if len(buf) != HEADER_SIZE:
        raise ProtocolError(f"frame header must be {HEADER_SIZE} bytes, got {len(buf)}")
    magic, version, kind, dtype_code, code, rid, layer, n_tokens, n_pairs, hidden, aux, plen = HEADER.unpack(buf)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise ProtocolError(f"unsupported frame version {version} (this peer speaks {VERSION})")
    if kind not in Kind._value2member_map_:
        raise ProtocolError(f"unknown frame kind {kind}")
    k = Kind(kind)
    if plen > limits.max_frame_bytes:
        raise ProtocolError(f"frame payload of {plen} bytes exceeds the limit of {limits.max_frame_bytes} bytes")
    if k in (Kind.REQUEST, Kind.RESPONSE):
        if dtype_code not in DTYPES:
            raise ProtocolError(f"unknown dtype code {dtype_code}")
        if not 0 <= layer < model.num_layers or not model.moe_layers[layer]:
            raise ProtocolError(f"layer {layer} is not a MoE layer of this model ({model.num_layers} layers)")
        if hidden != model.hidden:
            raise ProtocolError(f"hidden size {hidden} does not match the model's {model.hidden}")
        if not 0 < n_tokens <= limits.max_tokens:
            raise ProtocolError(f"n_tokens {n_tokens} outside [1, {limits.max_tokens}]")
        if k is Kind.REQUEST and not 0 < n_pairs <= limits.max_pairs:
            raise ProtocolError(f"n_pairs {n_pairs} outside [1, {limits.max_pairs}]")
        if k is Kind.RESPONSE and n_pairs != 0:
            raise ProtocolError(f"a response carries no pairs, got n_pairs {n_pairs}")
        esize = DTYPES[dtype_code].itemsize
        expect = n_pairs * PAIR_BYTES + n_tokens * hidden * esize
    else:
        if n_tokens or n_pairs or hidden or dtype_code:
            raise ProtocolError(f"a {k.name} frame carries no arrays")
        expect = plen if k is Kind.ERROR else 0
        if k is Kind.ERROR and plen > limits.max_error_bytes:
            raise ProtocolError(f"error message of {plen} bytes exceeds {limits.max_error_bytes}")
    if plen != expect:
        raise ProtocolError(f"payload length {plen} does not match the {expect} bytes the header implies")
    return Header(k, dtype_code, code, rid, layer, n_tokens, n_pairs, hidden, aux, plen)


def decode_body(h: Header, payload: bytes | bytearray | memoryview, model: ModelLimits) -> Frame:
    """Builds a frame over ``payload`` (``h.payload_len`` bytes, views, no copy) and validates its arrays."""
    if len(payload) != h.payload_len:
        raise ProtocolError(f"payload is {len(payload)} bytes, header says {h.payload_len}")
    f = Frame(h.kind, h.request_id, h.layer, code=h.code, aux=h.aux)
    if h.kind is Kind.ERROR:
        f.message = bytes(payload).decode("utf-8", errors="replace")
        return f
    if h.kind not in (Kind.REQUEST, Kind.RESPONSE):
        return f
    f.dtype = DTYPES[h.dtype_code]
    readonly = isinstance(payload, bytes) or (isinstance(payload, memoryview) and payload.readonly)
    buf = bytearray(payload) if readonly else payload  # frombuffer wants a writable buffer
    p, off = h.n_pairs, 0
    if h.kind is Kind.REQUEST:
        f.tokens = torch.frombuffer(buf, dtype=torch.int32, count=p, offset=0)
        f.experts = torch.frombuffer(buf, dtype=torch.int32, count=p, offset=4 * p)
        f.weights = torch.frombuffer(buf, dtype=torch.float32, count=p, offset=8 * p)
        off = PAIR_BYTES * p
        bad_t = (f.tokens < 0) | (f.tokens >= h.n_tokens)
        if bool(bad_t.any()):
            raise ProtocolError(f"token index {int(f.tokens[bad_t][0])} outside [0, {h.n_tokens})")
        bad_e = (f.experts < 0) | (f.experts >= model.num_experts)
        if bool(bad_e.any()):
            raise ProtocolError(f"expert id {int(f.experts[bad_e][0])} outside [0, {model.num_experts})")
        if not bool(torch.isfinite(f.weights).all()):
            raise ProtocolError("routing weights must be finite")
    n = h.n_tokens * h.hidden
    f.hidden = torch.frombuffer(buf, dtype=f.dtype, count=n, offset=off).view(h.n_tokens, h.hidden)  # [T, D]
    return f


def decode(data: bytes | bytearray | memoryview, model: ModelLimits, limits: FrameLimits = DEFAULT_LIMITS) -> Frame:
    """One whole frame from a buffer (header + payload, nothing after)."""
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"frame of {len(data)} bytes is shorter than its {HEADER_SIZE}-byte header")
    mv = memoryview(data)
    h = decode_header(mv[:HEADER_SIZE], model, limits)
    if len(data) - HEADER_SIZE != h.payload_len:
        raise ProtocolError(f"payload is {len(data) - HEADER_SIZE} bytes, header says {h.payload_len}")
    return decode_body(h, mv[HEADER_SIZE:], model)

