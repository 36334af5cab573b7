"""Data-plane frames: the versioned binary format of activations between an attention host and expert peers.

A frame is a fixed 44-byte little-endian header followed by ``payload_len`` bytes::

    magic "EKDP" | version u8 | kind u8 | dtype u8 | code u8 | request_id u64 | layer u32 | n_tokens u32 |
    n_pairs u32 | hidden u32 | aux u32 | payload_len u64

- REQUEST: payload = token index int32[n_pairs] | expert id int32[n_pairs] | routing weight fp32[n_pairs] |
  hidden [n_tokens, hidden] in ``dtype``. Pair i asks for ``weight[i] * expert[i](hidden[token[i]])``.
- RESPONSE: payload = [n_tokens, hidden] in ``dtype``: per token the sum over its pairs (weighted partial sums);
  ``aux`` = the server's expert compute time in microseconds (the backend call only); n_pairs = 0.
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

import numpy as np
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


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """A host numpy view of ``x`` (no copy for a contiguous CPU tensor; bf16 has no numpy dtype, so it is viewed as
    raw 16-bit words, which is all a frame needs)."""
    if isinstance(x, np.ndarray):
        return x
    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:
        x = x.view(torch.int16)
    return x.numpy()


def encode_request(request_id: int, layer: int, tokens: torch.Tensor | np.ndarray,
                   experts: torch.Tensor | np.ndarray, weights: torch.Tensor | np.ndarray,
                   hidden: torch.Tensor) -> bytearray:
    """tokens/experts/weights [P] (any int / float dtype), hidden [T, D] (bf16, fp16 or fp32) -> one frame.

    Written into one buffer (header + payload, one allocation, no intermediate tensors) so that the channel sends it
    with a single ``sendall``."""
    p, (t, d) = tokens.shape[0], hidden.shape
    if hidden.dtype not in DTYPE_CODES:
        raise ProtocolError(f"hidden dtype {hidden.dtype} cannot go on the wire (bf16, fp16, fp32)")
    if isinstance(weights, torch.Tensor) and weights.dtype != torch.float32:
        weights = weights.float()
    nh = t * d * hidden.element_size()
    size = p * PAIR_BYTES + nh
    buf = bytearray(HEADER_SIZE + size)
    HEADER.pack_into(buf, 0, MAGIC, VERSION, Kind.REQUEST, DTYPE_CODES[hidden.dtype], 0, request_id, layer, t, p, d,
                     0, size)
    o = HEADER_SIZE
    np.frombuffer(buf, np.int32, p, o)[:] = _np(tokens)  # casting assignment: any int dtype in
    np.frombuffer(buf, np.int32, p, o + 4 * p)[:] = _np(experts)
    np.frombuffer(buf, np.float32, p, o + 8 * p)[:] = _np(weights)
    np.frombuffer(buf, np.uint8, nh, o + PAIR_BYTES * p)[:] = _np(hidden.contiguous().view(torch.uint8)).reshape(-1)
    return buf


def response_buffer(request_id: int, layer: int, t: int, d: int, dtype: torch.dtype,
                    compute_us: int = 0) -> tuple[bytearray, torch.Tensor]:
    """A RESPONSE frame with its header written and a [T, D] ``dtype`` tensor over its payload, for the caller to
    fill (e.g. ``view.copy_(fp32_result)``: the cast goes straight into the frame, no intermediate tensor)."""
    size = t * d * dtype.itemsize
    buf = bytearray(HEADER_SIZE + size)
    HEADER.pack_into(buf, 0, MAGIC, VERSION, Kind.RESPONSE, DTYPE_CODES[dtype], 0, request_id, layer, t, 0, d,
                     min(compute_us, 0xFFFFFFFF), size)
    return buf, torch.frombuffer(buf, dtype=dtype, count=t * d, offset=HEADER_SIZE).view(t, d)  # [T, D]


def encode_response(request_id: int, layer: int, out: torch.Tensor, compute_us: int = 0) -> bytearray:
    """out [T, D] weighted partial sums (in the request's dtype) -> one frame (one buffer, as ``encode_request``)."""
    t, d = out.shape
    buf, view = response_buffer(request_id, layer, t, d, out.dtype, compute_us)
    view.copy_(out)
    return buf


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
    buf = bytearray(payload) if readonly else payload  # torch wants a writable buffer
    p, off = h.n_pairs, 0
    if h.kind is Kind.REQUEST:
        # numpy views and few calls (each costs microseconds when a ping-pong wakes this thread with cold caches):
        # one reduction bounds tokens and experts at once (viewed as unsigned, a negative index is huge, so
        # ``max() < n`` checks both ends), one more checks the weights. O(P), vectorised.
        ids = np.frombuffer(buf, np.int32, 2 * p, 0)  # [2P]: tokens | experts
        weights = np.frombuffer(buf, np.float32, p, 8 * p)
        off = PAIR_BYTES * p
        t_max, e_max = ids.view(np.uint32).reshape(2, p).max(axis=1).tolist()
        if t_max >= h.n_tokens:
            bad = ids[:p][(ids[:p] < 0) | (ids[:p] >= h.n_tokens)][0]
            raise ProtocolError(f"token index {int(bad)} outside [0, {h.n_tokens})")
        if e_max >= model.num_experts:
            bad = ids[p:][(ids[p:] < 0) | (ids[p:] >= model.num_experts)][0]
            raise ProtocolError(f"expert id {int(bad)} outside [0, {model.num_experts})")
        if not np.isfinite(weights).all():
            raise ProtocolError("routing weights must be finite")
        both = torch.from_numpy(ids)
        f.tokens, f.experts, f.weights = both[:p], both[p:], torch.from_numpy(weights)
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

