"""Frames: exact round trips in every wire dtype, one exact message per validation rule, and refusal of an
oversized header before any payload is read or allocated."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from ekmesh.core.errors import ProtocolError
from ekmesh.infer.dataplane.channel import read_frame
from ekmesh.infer.dataplane.frames import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    ErrorCode,
    FrameLimits,
    Kind,
    ModelLimits,
    decode,
    decode_header,
    encode_error,
    encode_ping,
    encode_request,
    encode_response,
    response_from,
)

MODEL = ModelLimits(num_layers=4, num_experts=8, hidden=16, moe_layers=(False, True, True, True))


def _request(dtype: torch.dtype = torch.float32, t: int = 3) -> tuple[bytes, tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.tensor([0, 1, 2, 2][: t + 1]) % t
    experts = torch.tensor([7, 0, 3, 5][: t + 1])
    weights = torch.rand(tokens.shape[0], generator=g)
    hidden = torch.randn(t, 16, generator=g).to(dtype)
    return encode_request(42, 2, tokens, experts, weights, hidden), (tokens, experts, weights, hidden)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_exact(dtype):
    data, (tokens, experts, weights, hidden) = _request(dtype)
    f = decode(data, MODEL)
    assert (f.kind, f.request_id, f.layer, f.dtype) == (Kind.REQUEST, 42, 2, dtype)
    assert f.tokens.tolist() == tokens.tolist() and f.experts.tolist() == experts.tolist()
    assert torch.equal(f.weights, weights) and torch.equal(f.hidden, hidden)
    out = torch.randn(3, 16).to(dtype)
    data = encode_response(42, 2, out, compute_us=1234)
    assert response_from(42, 2, out, compute_us=1234) == data  # the copying encoder writes the same bytes
    r = decode(data, MODEL)
    assert (r.kind, r.aux, r.dtype) == (Kind.RESPONSE, 1234, dtype) and torch.equal(r.hidden, out)
    e = decode(encode_error(9, ErrorCode.NOT_HELD, "expert (layer=2, expert=5) is not held", 2, 5), MODEL)
    assert (e.kind, e.code, e.layer, e.aux, e.message) == (Kind.ERROR, ErrorCode.NOT_HELD, 2, 5,
                                                          "expert (layer=2, expert=5) is not held")
    assert decode(encode_ping(7), MODEL).kind is Kind.PING
    assert decode(encode_ping(7, pong=True), MODEL).request_id == 7


def _patch(data: bytes, **fields: int | bytes) -> bytes:
    names = ["magic", "version", "kind", "dtype", "code", "rid", "layer", "n_tokens", "n_pairs", "hidden", "aux",
             "plen"]
    values = dict(zip(names, HEADER.unpack(data[:HEADER_SIZE]), strict=True))
    values.update(fields)
    return HEADER.pack(*(values[n] for n in names)) + data[HEADER_SIZE:]


def _payload_at(data: bytes, offset: int, raw: bytes) -> bytes:
    b = bytearray(data)
    b[HEADER_SIZE + offset: HEADER_SIZE + offset + len(raw)] = raw
    return bytes(b)


GOOD, _ = _request()
P = 4  # pairs in GOOD
CASES = [
    (GOOD[:10], "frame of 10 bytes is shorter than its 44-byte header"),
    (_patch(GOOD, magic=b"HTTP"), "bad frame magic b'HTTP' (expected b'EKDP')"),
    (_patch(GOOD, version=2), "unsupported frame version 2 (this peer speaks 1)"),
    (_patch(GOOD, kind=9), "unknown frame kind 9"),
    (_patch(GOOD, plen=2**40), f"frame payload of {2**40} bytes exceeds the limit of {64 << 20} bytes"),
    (_patch(GOOD, dtype=7), "unknown dtype code 7"),
    (_patch(GOOD, layer=0), "layer 0 is not a MoE layer of this model (4 layers)"),
    (_patch(GOOD, layer=4), "layer 4 is not a MoE layer of this model (4 layers)"),
    (_patch(GOOD, hidden=17), "hidden size 17 does not match the model's 16"),
    (_patch(GOOD, n_tokens=0), "n_tokens 0 outside [1, 65536]"),
    (_patch(GOOD, n_pairs=0), "n_pairs 0 outside [1, 1048576]"),
    (_patch(GOOD, n_pairs=5), f"payload length {len(GOOD) - HEADER_SIZE} does not match the "
                              f"{len(GOOD) - HEADER_SIZE + 12} bytes the header implies"),
    (GOOD + b"x", f"payload is {len(GOOD) - HEADER_SIZE + 1} bytes, header says {len(GOOD) - HEADER_SIZE}"),
    (_payload_at(GOOD, 4, (3).to_bytes(4, "little")), "token index 3 outside [0, 3)"),
    (_payload_at(GOOD, 0, (-1).to_bytes(4, "little", signed=True)), "token index -1 outside [0, 3)"),
    (_payload_at(GOOD, 4 * P, (8).to_bytes(4, "little")), "expert id 8 outside [0, 8)"),
    (_payload_at(GOOD, 8 * P, torch.tensor([float("nan")]).numpy().tobytes()), "routing weights must be finite"),
    (_patch(encode_response(1, 2, torch.zeros(3, 16)), n_pairs=1), "a response carries no pairs, got n_pairs 1"),
    (_patch(encode_ping(1), n_tokens=1), "a PING frame carries no arrays"),
    (_patch(encode_error(1, ErrorCode.BUSY, "x" * 10), plen=5000), "error message of 5000 bytes exceeds 4096"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("data", "message"), CASES, ids=[m.split(" ")[0] + str(i) for i, (_, m) in
                                                          enumerate(CASES)])
def test_each_validation_error_has_its_message(data, message):
    with pytest.raises(ProtocolError) as info:
        decode(data, MODEL)
    assert str(info.value) == message


@pytest.mark.timeout(30)
def test_oversized_header_refused_before_reading_or_allocating_payload():
    head = _patch(GOOD, plen=2**40)[:HEADER_SIZE]
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode_header(head, MODEL)
    # over a socket: only the header is sent; the reader must refuse at once, not wait 30 s for 1 TiB
    a, b = socket.socketpair()
    with a, b:
        a.sendall(head)
        t0 = time.monotonic()
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            read_frame(b, MODEL, FrameLimits(), time.monotonic() + 30, "peer")
        assert time.monotonic() - t0 < 1.0
    small = FrameLimits(max_frame_bytes=100)
    with pytest.raises(ProtocolError, match=f"frame payload of {len(GOOD) - HEADER_SIZE} bytes exceeds the limit "
                                            "of 100 bytes"):
        decode(GOOD, MODEL, small)
    assert MAGIC == b"EKDP"
