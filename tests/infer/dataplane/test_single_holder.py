"""When one peer holds every chosen expert, the server takes the [T, k] shortcut (pair i is token i // k) and the
client returns its answer as is: the result must equal the one-process grouped compute bit for bit (fp32)."""

from __future__ import annotations

import pytest
import torch

from ekmesh.infer.dataplane.channel import ChannelPool, TlsIdentity
from ekmesh.infer.dataplane.frames import ModelLimits
from ekmesh.infer.dataplane.remote import RemoteExperts
from ekmesh.infer.dataplane.server import ExpertServer
from ekmesh.infer.expert import ExpertSpec, ExpertWeights
from ekmesh.infer.experts import LocalExperts

E, D, INTER = 8, 32, 16
MODEL = ModelLimits(num_layers=2, num_experts=E, hidden=D, moe_layers=(True, True))


def _backend() -> LocalExperts:
    g = torch.Generator().manual_seed(0)
    be = LocalExperts(ExpertSpec(hidden=D, intermediate=INTER, num_experts=E))
    for layer in (0, 1):
        for e in range(E):
            be.add(layer, e, ExpertWeights(torch.randn(2 * INTER, D, generator=g), torch.randn(D, INTER, generator=g)))
    return be


@pytest.mark.timeout(60)
@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_one_holder_of_everything_equals_local_compute(k, tokens):
    ids = {n: TlsIdentity.generate(n) for n in ("server", "client")}
    pins = {n: i.fingerprint for n, i in ids.items()}
    local = _backend()
    with ExpertServer(_backend(), ids["server"], pins.get, MODEL) as srv:
        pool = ChannelPool(ids["client"], pins.get, lambda p: srv.address if p == "server" else None, MODEL)
        remote = RemoteExperts(MODEL, None, lambda layer, e: ["server"], pool)
        g = torch.Generator().manual_seed(tokens * 10 + k)
        for layer in (0, 1):
            x = torch.randn(tokens, D, generator=g)
            choice = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])  # [T, k]
            w = torch.rand(tokens, k, generator=g)
            want = local(layer, x, choice, w)
            got = remote(layer, x, choice, w)
            assert torch.equal(got, want), (layer, k, tokens, (got - want).abs().max().item())
