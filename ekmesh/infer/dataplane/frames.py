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
- Decoded arrays are views over the received buffer (no copy); the host must be little-endian (as torch's
  ``frombuffer`` reads native order). A request's pair arrays are kept as numpy views and turned into tensors only
  when asked for (``Frame.tokens`` etc.): on the hot path every torch call costs microseconds, more so on a core
  that just woke up, so encoding, decoding and validation use as few of them as they can.
"""

from __future__ import annotations

import enum
import math
import struct
import sys
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ekmesh.core.errors import ProtocolError
from ekmesh.infer.models.family import ModelConfig

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
    def from_config(cls, cfg: ModelConfig) -> ModelLimits:
        """From a model family config (``num_layers``, ``num_experts``, ``hidden_size``, ``moe_layers``)."""
        return cls(int(cfg.num_layers), int(cfg.num_experts), int(cfg.hidden_size),
                   tuple(bool(m) for m in cfg.moe_layers))


@dataclass(frozen=True)
class FrameLimits:
    """Size bounds checked before any allocation."""

    max_frame_bytes: int = 64 << 20
    max_tokens: int = 1 << 16
    max_pairs: int = 1 << 20
    max_error_bytes: int = 4096


DEFAULT_LIMITS = FrameLimits()


class Header(NamedTuple):
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


class Frame:
    """A decoded frame. A REQUEST carries its pairs (``pairs`` [2, P] int32 numpy: token indices, expert ids;
    ``weights_np`` [P] fp32 numpy) and ``hidden`` [T, D]; a RESPONSE carries ``hidden``. ``tokens``, ``experts`` and
    ``weights`` are torch views of the pair arrays, made when asked for."""

    __slots__ = ("kind", "request_id", "layer", "dtype", "hidden", "code", "aux", "message", "pairs", "weights_np")

    def __init__(self, kind: Kind, request_id: int, layer: int = 0, dtype: torch.dtype = torch.bfloat16,
                 hidden: torch.Tensor | None = None, code: int = 0, aux: int = 0, message: str = "",
                 pairs: np.ndarray | None = None, weights_np: np.ndarray | None = None) -> None:
        self.kind = kind
        self.request_id = request_id
        self.layer = layer
        self.dtype = dtype
        self.hidden = hidden  # [T, D]
        self.code = code
        self.aux = aux
        self.message = message
        self.pairs = pairs  # [2, P] int32
        self.weights_np = weights_np  # [P] fp32

    @property
    def tokens(self) -> torch.Tensor | None:
        """[P] int32 token index of each pair (REQUEST)."""
        return None if self.pairs is None else torch.from_numpy(self.pairs[0])

    @property
    def experts(self) -> torch.Tensor | None:
        """[P] int32 expert id of each pair (REQUEST)."""
        return None if self.pairs is None else torch.from_numpy(self.pairs[1])

    @property
    def weights(self) -> torch.Tensor | None:
        """[P] fp32 routing weight of each pair (REQUEST)."""
        return None if self.weights_np is None else torch.from_numpy(self.weights_np)

    @property
    def n_pairs(self) -> int:
        return 0 if self.pairs is None else int(self.pairs.shape[1])


def _header(kind: Kind, request_id: int, *, dtype_code: int = 0, code: int = 0, layer: int = 0, n_tokens: int = 0,
            n_pairs: int = 0, hidden: int = 0, aux: int = 0, payload_len: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, dtype_code, code, request_id, layer, n_tokens, n_pairs, hidden, aux,
                       payload_len)


SMALL_PAIRS = 64  # up to this many pairs, pair arrays are packed and checked with struct / memoryview built-ins
_NP_WIRE = {torch.bfloat16: np.int16, torch.float16: np.float16, torch.float32: np.float32}  # numpy view per dtype


def as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """A host numpy view of ``x`` (no copy for a contiguous CPU tensor; bf16 has no numpy dtype, so it is viewed as
    raw 16-bit words, which is all a frame needs). One or two torch calls on the CPU, no-grad path."""
    if isinstance(x, np.ndarray):
        return x
    if not x.is_cpu or x.requires_grad:
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
    code = DTYPE_CODES.get(hidden.dtype)
    if code is None:
        raise ProtocolError(f"hidden dtype {hidden.dtype} cannot go on the wire (bf16, fp16, fp32)")
    if isinstance(weights, torch.Tensor) and weights.dtype != torch.float32:
        weights = weights.float()
    n = t * d
    size = p * PAIR_BYTES + n * hidden.itemsize
    buf = bytearray(HEADER_SIZE + size)
    HEADER.pack_into(buf, 0, MAGIC, VERSION, Kind.REQUEST, code, 0, request_id, layer, t, p, d, 0, size)
    o = HEADER_SIZE
    tok, exp, w = as_numpy(tokens), as_numpy(experts), as_numpy(weights)
    if w.dtype != np.float32:
        w = w.astype(np.float32)  # rounded as the wire will carry them (and never an overflow error below)
    if p <= SMALL_PAIRS:  # one struct call (the values are exact: ints, and fp32 values through Python floats)
        struct.pack_into(f"<{2 * p}i{p}f", buf, o, *tok.tolist(), *exp.tolist(), *w.tolist())
    else:
        ids = np.frombuffer(buf, np.int32, 2 * p, o)  # [2P]: tokens | experts
        ids[:p] = tok  # casting assignment: any int dtype in
        ids[p:] = exp
        np.frombuffer(buf, np.float32, p, o + 8 * p)[:] = w
    x = as_numpy(hidden)  # [T, D]
    o += PAIR_BYTES * p
    if x.flags.c_contiguous:
        buf[o:] = x.data.cast("B")
    else:
        np.frombuffer(buf, _NP_WIRE[hidden.dtype], n, o).reshape(t, d)[:] = x
    return buf


def _response_frame(request_id: int, layer: int, t: int, d: int, dtype: torch.dtype, compute_us: int) -> bytearray:
    """A RESPONSE frame of a [T, D] ``dtype`` payload: header written, payload zeroed for the caller to fill."""
    size = t * d * dtype.itemsize
    buf = bytearray(HEADER_SIZE + size)
    HEADER.pack_into(buf, 0, MAGIC, VERSION, Kind.RESPONSE, DTYPE_CODES[dtype], 0, request_id, layer, t, 0, d,
                     min(compute_us, 0xFFFFFFFF), size)
    return buf


def response_buffer(request_id: int, layer: int, t: int, d: int, dtype: torch.dtype,
                    compute_us: int = 0) -> tuple[bytearray, torch.Tensor]:
    """A RESPONSE frame with its header written and a [T, D] ``dtype`` tensor over its payload, for the caller to
    fill (e.g. ``view.copy_(fp32_result)``: the cast goes straight into the frame, no intermediate tensor)."""
    buf = _response_frame(request_id, layer, t, d, dtype, compute_us)
    return buf, torch.frombuffer(buf, dtype=dtype, count=t * d, offset=HEADER_SIZE).view(t, d)  # [T, D]


def response_from(request_id: int, layer: int, out: torch.Tensor, compute_us: int = 0) -> bytearray:
    """out [T, D], a contiguous CPU tensor already in the wire dtype -> one RESPONSE frame, its payload copied
    from ``out``'s memory (one torch call, where ``response_buffer`` + ``copy_`` take three)."""
    t, d = out.shape
    buf = _response_frame(request_id, layer, t, d, out.dtype, compute_us)
    buf[HEADER_SIZE:] = as_numpy(out).data.cast("B")
    return buf


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


_KINDS = {int(k): k for k in Kind}


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
    k = _KINDS.get(kind)
    if k is None:
        raise ProtocolError(f"unknown frame kind {kind}")
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
    if h.kind is Kind.ERROR:
        return Frame(h.kind, h.request_id, h.layer, code=h.code, aux=h.aux,
                     message=bytes(payload).decode("utf-8", errors="replace"))
    if h.kind is not Kind.REQUEST and h.kind is not Kind.RESPONSE:
        return Frame(h.kind, h.request_id, h.layer, code=h.code, aux=h.aux)
    dtype = DTYPES[h.dtype_code]
    readonly = isinstance(payload, bytes) or (isinstance(payload, memoryview) and payload.readonly)
    buf = bytearray(payload) if readonly else payload  # torch wants a writable buffer
    p, off = h.n_pairs, 0
    pairs = weights = None
    if h.kind is Kind.REQUEST:
        _check_pairs(buf, p, h.n_tokens, model.num_experts)
        pairs = np.frombuffer(buf, np.int32, 2 * p, 0).reshape(2, p)  # [2, P]: tokens, experts
        weights = np.frombuffer(buf, np.float32, p, 8 * p)  # [P]
        off = PAIR_BYTES * p
    n = h.n_tokens * h.hidden
    if dtype is torch.bfloat16:  # numpy has no bf16: torch reads the buffer itself
        hidden = torch.frombuffer(buf, dtype=dtype, count=n, offset=off).view(h.n_tokens, h.hidden)
    else:  # one torch call instead of two (each costs microseconds on a cold core)
        hidden = torch.from_numpy(np.frombuffer(buf, _NP_WIRE[dtype], n, off).reshape(h.n_tokens, h.hidden))
    return Frame(h.kind, h.request_id, h.layer, dtype, hidden, h.code, h.aux, "", pairs, weights)  # [T, D] hidden


def _check_pairs(buf: bytes | bytearray | memoryview, p: int, n_tokens: int, num_experts: int) -> None:
    """Token indices < n_tokens, expert ids < num_experts, weights finite; O(P). Viewed as unsigned, a negative
    index is huge, so ``max() < n`` bounds both ends. Finite weights: a sum (in float64) of finite fp32 values
    cannot overflow, and one inf or nan makes it non-finite. Few pairs (decode): memoryview built-ins, one call
    each; many: numpy."""
    if p <= SMALL_PAIRS:
        mv = memoryview(buf)
        ids = mv[:8 * p].cast("I")  # [2P] tokens | experts, unsigned
        t_max, e_max = max(ids[:p]), max(ids[p:])
        finite = math.isfinite(sum(mv[8 * p:12 * p].cast("f")))
    else:
        both = np.frombuffer(buf, np.uint32, 2 * p, 0).reshape(2, p)
        t_max, e_max = both.max(axis=1).tolist()
        finite = bool(np.isfinite(np.frombuffer(buf, np.float32, p, 8 * p)).all())
    if t_max >= n_tokens or e_max >= num_experts or not finite:
        ids_np = np.frombuffer(buf, np.int32, 2 * p, 0)
        tok, exp = ids_np[:p], ids_np[p:]
        if t_max >= n_tokens:
            bad = tok[(tok < 0) | (tok >= n_tokens)][0]
            raise ProtocolError(f"token index {int(bad)} outside [0, {n_tokens})")
        if e_max >= num_experts:
            bad = exp[(exp < 0) | (exp >= num_experts)][0]
            raise ProtocolError(f"expert id {int(bad)} outside [0, {num_experts})")
        raise ProtocolError("routing weights must be finite")


def decode(data: bytes | bytearray | memoryview, model: ModelLimits, limits: FrameLimits = DEFAULT_LIMITS) -> Frame:
    """One whole frame from a buffer (header + payload, nothing after)."""
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"frame of {len(data)} bytes is shorter than its {HEADER_SIZE}-byte header")
    mv = memoryview(data)
    h = decode_header(mv[:HEADER_SIZE], model, limits)
    if len(data) - HEADER_SIZE != h.payload_len:
        raise ProtocolError(f"payload is {len(data) - HEADER_SIZE} bytes, header says {h.payload_len}")
    return decode_body(h, mv[HEADER_SIZE:], model)

