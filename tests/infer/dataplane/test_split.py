"""The round-trip split's counters (``RemoteExperts.split()``, ``ServerStats.split()``) on real sockets: they advance
with every frame (counts and bytes exact), every part is non-negative, and the parts that happen inside a round trip
add up to no more than it (the server's whole time lies between the host's send and its decoding of the answer)."""

from __future__ import annotations

import time

import pytest
import torch

from ekmesh.infer.dataplane.channel import ChannelPool, TlsIdentity
from ekmesh.infer.dataplane.frames import HEADER_SIZE, PAIR_BYTES, ModelLimits
from ekmesh.infer.dataplane.remote import RemoteExperts
from ekmesh.infer.dataplane.server import ExpertServer
from ekmesh.infer.expert import ExpertSpec, ExpertWeights
from ekmesh.infer.experts import LocalExperts

E, D, INTER, LAYER = 8, 32, 16, 1
MODEL = ModelLimits(num_layers=2, num_experts=E, hidden=D, moe_layers=(False, True))
HERE, THERE = range(4), range(4, 8)  # experts the host holds, experts the server holds


def _backend(experts: range) -> LocalExperts:
    g = torch.Generator().manual_seed(0)
    be = LocalExperts(ExpertSpec(hidden=D, intermediate=INTER, num_experts=E))
    for e in range(E):  # the same weights on both sides: the host's reference is every expert
        w = ExpertWeights(torch.randn(2 * INTER, D, generator=g), torch.randn(D, INTER, generator=g))
        if e in experts:
            be.add(LAYER, e, w)
    return be


# (expert ids [T, k], pairs that go to the server, rows the frame carries): a decode step, a regular prefill (two
# pairs per token there, in token order: the server's [T, k] path) and an irregular one (its grouped path)
CALLS = [([[0, 4, 1, 5]], 2, 1), ([[0, 4, 1, 5]] * 3, 6, 3), ([[4, 5, 6, 0], [0, 1, 2, 7], [0, 1, 2, 3]], 4, 2)]


@pytest.mark.timeout(60)
def test_split_counters_advance_and_add_up():
    ids = {n: TlsIdentity.generate(n) for n in ("server", "host")}
    pins = {n: i.fingerprint for n, i in ids.items()}
    reference = _backend(range(E))
    with ExpertServer(_backend(THERE), ids["server"], pins.get, MODEL) as srv:
        pool = ChannelPool(ids["host"], pins.get, lambda p: srv.address if p == "server" else None, MODEL)
        remote = RemoteExperts(MODEL, _backend(HERE), lambda layer, e: ["server"] if e in THERE else [], pool)
        g = torch.Generator().manual_seed(1)
        out_bytes = in_bytes = 0
        for n, (choice, pairs, rows) in enumerate(CALLS, 1):
            experts = torch.tensor(choice)  # [T, k]
            x = torch.randn(experts.shape[0], D, generator=g)
            w = torch.rand(experts.shape, generator=g)
            got = remote(LAYER, x, experts, w)
            want = reference(LAYER, x, experts, w)
            assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max().item()
            out_bytes += HEADER_SIZE + pairs * PAIR_BYTES + rows * D * 4
            in_bytes += HEADER_SIZE + rows * D * 4
            host = remote.split()
            assert (host.frames, host.bytes_out, host.bytes_in) == (n, out_bytes, in_bytes)
            assert (host.local_calls, host.copies_in) == (n, 0)  # (a CPU host copies nothing to a device)
            # the server counts a request once its answer is sent, which the host may have read before that
            # (the channel's opening PING is not a request)
            deadline = time.monotonic() + 10
            while (server := srv.stats.split())["requests"] < n and time.monotonic() < deadline:
                time.sleep(0.001)  # polling the counter, with a deadline
            assert server["requests"] == n
        parts = {k: v for k, v in vars(host).items() if k.endswith("_ns")}
        assert all(v >= 0 for v in [*parts.values(), *server.values()]), (parts, server)
        assert host.copy_out_ns == 0 and host.copy_in_ns == 0
        assert host.rtt_ns > 0 and host.wait_ns > 0 and host.decode_ns > 0 and host.send_ns > 0
        assert server["compute_ns"] > 0 and server["decode_ns"] > 0 and server["send_ns"] > 0
        # each frame: copy, encode, send then (local experts and) the wait, which contains the answer's decode
        assert host.copy_out_ns + host.encode_ns + host.send_ns + host.wait_ns <= host.rtt_ns, parts
        assert host.decode_ns <= host.wait_ns
        # the server's time for a frame starts after the host encoded it and ends before the host decodes the answer
        in_server = sum(v for k, v in server.items() if k.endswith("_ns"))
        assert host.copy_out_ns + host.encode_ns + in_server + host.decode_ns <= host.rtt_ns, (parts, server)
        pool.close()
