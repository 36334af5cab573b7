"""Bad input: ≥ 100k random and mutated frames through the decoder, and a few thousand at a live expert server over
real TLS channels. Every frame is either decoded into a consistent frame or refused with ``ProtocolError``; the
server never crashes or hangs, closes only the offending connection, and then serves a good request correctly.

Hypothesis drives seeds; each example mutates many frames with a seeded ``random.Random`` so that the
per-frame cost stays tiny.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ekmesh.core.errors import ProtocolError
from ekmesh.infer.dataplane.channel import ChannelPool, TlsIdentity, make_context
from ekmesh.infer.dataplane.frames import (
    HEADER,
    HEADER_SIZE,
    ErrorCode,
    Frame,
    Kind,
    ModelLimits,
    decode,
    encode_error,
    encode_ping,
    encode_request,
    encode_response,
)
from ekmesh.infer.dataplane.server import ExpertServer
from tests.infer.dataplane.test_channel import make_backend

MODEL = ModelLimits(num_layers=2, num_experts=4, hidden=16, moe_layers=(False, True))
BOUNDARY = [0, 1, 2, 3, 4, 15, 16, 17, 255, 256, 2**16, 2**16 + 1, 2**31 - 1, 2**31, 2**32 - 1]


def _seeds() -> list[bytes]:
    g = torch.Generator().manual_seed(3)
    out = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for t, p in ((1, 1), (2, 4), (5, 7)):
            out.append(encode_request(t, 1, torch.randint(0, t, (p,), generator=g),
                                      torch.randint(0, 4, (p,), generator=g), torch.rand(p, generator=g),
                                      torch.randn(t, 16, generator=g).to(dtype)))
        out.append(encode_response(9, 1, torch.randn(2, 16).to(dtype), 5))
    out += [encode_error(3, ErrorCode.BUSY, "busy"), encode_ping(1), encode_ping(2, pong=True)]
    return out


SEEDS = _seeds()
WIDTHS = ["4s", "B", "B", "B", "B", "Q", "I", "I", "I", "I", "I", "Q"]  # HEADER's fields
assert HEADER.format == "<" + "".join(WIDTHS)


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    op = rng.randrange(7) if b else 6
    if op == 0:  # flip bits
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1 and len(b) >= HEADER_SIZE:  # one header field (not the magic) to a boundary or random value
        fields = list(HEADER.unpack(bytes(b[:HEADER_SIZE])))
        i = rng.randrange(1, len(fields))
        top = {"B": 255, "I": 2**32 - 1, "Q": 2**64 - 1}[WIDTHS[i]]
        fields[i] = min(top, rng.choice(BOUNDARY + [rng.randint(0, top)]))
        b[:HEADER_SIZE] = HEADER.pack(*fields)
    elif op in (1, 2):  # truncate
        del b[rng.randrange(len(b)):]
    elif op == 3:  # extend
        b += rng.randbytes(rng.randint(1, 64))
    elif op == 4:  # overwrite a payload span
        if len(b) > HEADER_SIZE:
            i = rng.randrange(HEADER_SIZE, len(b))
            n = min(len(b) - i, rng.randint(1, 16))
            b[i:i + n] = rng.randbytes(n)
    elif op == 5:  # random bytes behind a valid-looking header
        b = bytearray(data[:HEADER_SIZE]) + rng.randbytes(rng.randint(0, 256))
    else:  # pure random
        b = bytearray(rng.randbytes(rng.randint(0, 128)))
    return bytes(b)


def check(data: bytes) -> Frame | None:
    """Decodes or refuses; any other outcome fails. A decoded frame must respect every limit."""
    try:
        f = decode(data, MODEL)
    except ProtocolError:
        return None
    if f.kind is Kind.REQUEST:
        assert f.tokens is not None and f.experts is not None and f.weights is not None and f.hidden is not None
        assert MODEL.moe_layers[f.layer] and f.hidden.shape[1] == MODEL.hidden
        assert int(f.tokens.min()) >= 0 and int(f.tokens.max()) < f.hidden.shape[0]
        assert int(f.experts.min()) >= 0 and int(f.experts.max()) < MODEL.num_experts
        assert bool(torch.isfinite(f.weights).all())
    return f


COUNT = {"frames": 0}
PER_EXAMPLE = 100


@pytest.mark.slow
@pytest.mark.timeout(300)
@settings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**64 - 1))
def test_decoder_mutated_frames(seed):
    rng = random.Random(seed)
    for _ in range(PER_EXAMPLE):
        data = rng.choice(SEEDS)
        for _ in range(rng.randint(1, 3)):
            data = mutate(rng, data)
        check(data)
    COUNT["frames"] += PER_EXAMPLE


@pytest.mark.timeout(120)
@settings(max_examples=3000, deadline=None, database=None)
@given(data=st.binary(max_size=200))
def test_decoder_random_bytes(data):
    check(data)
    check(SEEDS[0][:HEADER_SIZE] + data)
    COUNT["frames"] += 2


def test_decoder_saw_at_least_100k_frames():
    if COUNT["frames"] == 0:
        pytest.skip("run with the fuzz tests above")
    assert COUNT["frames"] >= 100_000, COUNT


LIVE = 2000


def _throw(ctx: ssl.SSLContext, address: tuple[str, int], data: bytes) -> bytes:
    """One TLS connection, one (maybe malformed) frame, half-close, read to EOF. Returns what came back."""
    with socket.create_connection(address, timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(data)
        socket.socket.shutdown(tls, socket.SHUT_WR)  # TCP half-close: a truncated frame ends in EOF, not a wait
        got = b""
        try:
            while chunk := tls.recv(65536):
                got += chunk
        except (ssl.SSLError, ConnectionResetError):
            pass
        return got


def _frames(data: bytes) -> list[Frame]:
    out, off = [], 0
    while off < len(data):
        plen = HEADER.unpack(data[off:off + HEADER_SIZE])[-1]
        out.append(decode(data[off:off + HEADER_SIZE + plen], MODEL))
        off += HEADER_SIZE + plen
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_live_server_survives_bad_frames(caplog):
    ids = {n: TlsIdentity.generate(n) for n in ("server", "fuzzer", "client")}
    pins = {n: i.fingerprint for n, i in ids.items()}
    backend = make_backend()
    rng = random.Random(11)
    with caplog.at_level(logging.ERROR), ExpertServer(backend, ids["server"], pins.get, MODEL) as srv:
        ctx = make_context(ids["fuzzer"], server=False)
        outcomes = {"answered": 0, "refused": 0}
        t0 = time.monotonic()
        for i in range(LIVE):
            data = mutate(rng, rng.choice(SEEDS))
            if i % 10 == 0:
                data = mutate(rng, data)
            got = _throw(ctx, srv.address, data)
            answered = check(data) is not None
            outcomes["answered" if answered else "refused"] += 1
            answers = _frames(got)  # what came back is whole, well-formed frames only
            assert all(a.kind in (Kind.RESPONSE, Kind.ERROR, Kind.PONG) for a in answers)
            if answered:
                assert answers and answers[0].kind in (Kind.RESPONSE, Kind.PONG, Kind.ERROR)
        print(f"live fuzz: {outcomes} in {time.monotonic() - t0:.1f} s; server stats {srv.stats}")
        assert outcomes["refused"] > LIVE // 2
        assert srv.stats.refused > LIVE // 4  # closed for a malformed frame (the rest: EOF mid-frame)
        # another client is still served, correctly
        pool = ChannelPool(ids["client"], pins.get, lambda p: srv.address, MODEL)
        ch = pool.get("server")
        hidden = torch.randn(2, 16)
        f = ch.exchange(encode_request(1, 1, torch.tensor([0, 1, 1]), torch.tensor([0, 2, 3]),
                                       torch.tensor([1.0, 0.5, 0.25]), hidden), 1, 10)
        ref = backend(1, hidden[[0, 1, 1]], torch.tensor([[0], [2], [3]]), torch.tensor([[1.0], [0.5], [0.25]]))
        assert f.hidden is not None
        assert torch.equal(f.hidden[0], ref[0]) and torch.equal(f.hidden[1], ref[1] + ref[2])
        pool.close()
    assert "Traceback" not in caplog.text and "compute failed" not in caplog.text
