"""Mesh == one process: experts spread over real expert-server subprocesses, the attention host holding none.

fp32 on the wire, so logits must agree to 1e-6 and 32 greedy tokens must be identical; the same after a holder is
SIGKILLed mid-generation (R = 2: a replica answers; R = 1 with a fallback: the host computes the expert from its
source, and once the holder is back the mesh computes it again); with no replica and no fallback the error names the
(layer, expert).
"""

from __future__ import annotations

import pytest
import torch

from ekmesh.core.errors import ExpertUnavailableError
from ekmesh.infer.generate import Generator, SamplingParams
from ekmesh.infer.loader import load_all
from tests.infer.dataplane.mesh import Mesh, spread
from tests.tiny_models import make_tiny

TOL = 1e-6
GREEDY = SamplingParams(max_tokens=32, stop_ids=frozenset())


def _prompt(vocab: int, n: int = 11) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(1)).tolist()


def _stream_killing(gen: Generator, prompt: list[int], victim: Mesh, peer: str | None, after: int
                    ) -> tuple[list[int], str]:
    """Streams, killing ``peer`` after ``after`` tokens (None: the peer the backend used most so far, which its
    latency-aware choice will pick again); returns the tokens and the peer killed."""
    out = []
    for i, ev in enumerate(gen.stream(prompt, GREEDY)):
        out.append(ev.token_id)
        if i == after:
            if peer is None:
                stats = gen.experts.stats()  # type: ignore[union-attr]
                peer = max(stats, key=lambda p: stats[p].round_trips)
            victim.procs[peer].kill()
    assert peer is not None
    return out, peer


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_mesh_equals_one_process(arch, tmp_path):
    path, _ = make_tiny(arch, tmp_path / arch)
    ckpt, model, experts = load_all(path)
    one = Generator(model, experts)
    prompt = _prompt(ckpt.config.vocab_size)
    mesh = Mesh(path, spread(ckpt, ["p0", "p1"], replicas=1))
    try:
        remote = mesh.backend()
        gen = Generator(model, remote)
        diff = (gen.logits(prompt) - one.logits(prompt)).abs().max().item()
        print(f"{arch}: max |mesh - one process| logits = {diff:.3g}")
        assert diff <= TOL
        assert gen.generate(prompt, GREEDY).token_ids == one.generate(prompt, GREEDY).token_ids
        stats = remote.stats()
        assert set(stats) == {"p0", "p1"} and all(s.round_trips > 0 and s.failures == 0 for s in stats.values())
        assert not remote.local.held()  # type: ignore[union-attr]
    finally:
        mesh.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigkill_a_holder_mid_generation(tmp_path):
    path, _ = make_tiny("qwen3_moe", tmp_path / "m")
    ckpt, model, experts = load_all(path)
    prompt = _prompt(ckpt.config.vocab_size)
    expected = Generator(model, experts).generate(prompt, GREEDY).token_ids

    # R = 2 over 3 peers: a replica takes over
    mesh = Mesh(path, spread(ckpt, ["p0", "p1", "p2"], replicas=2))
    try:
        remote = mesh.backend()
        tokens, killed = _stream_killing(Generator(model, remote), prompt, mesh, None, after=8)
        assert tokens == expected
        stats = remote.stats()
        assert stats[killed].failures >= 1
        assert all(s.failures == 0 for p, s in stats.items() if p != killed)
        assert not remote.local.held()  # type: ignore[union-attr]
    finally:
        mesh.close()

    # R = 1 over 2 peers: the host fetches the lost experts from their source; without a source, a clear error
    mesh = Mesh(path, spread(ckpt, ["p0", "p1"], replicas=1))
    try:
        remote = mesh.backend(with_fallback=True)
        assert _stream_killing(Generator(model, remote), prompt, mesh, "p1", after=8)[0] == expected
        held = remote.local.held()  # type: ignore[union-attr]
        assert held and all((layer, e) in mesh.procs["p1"].experts for layer, es in held.items() for e in es)

        # p1 is back (a fresh process holding the same experts): the mesh computes them again, not this host (it
        # keeps its copies for if p1 goes again)
        mesh.restart("p1")
        here: list[int] = []
        computes = remote.local.__class__.__call__
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(type(remote.local), "__call__",
                       lambda self, layer, *a: (here.append(layer), computes(self, layer, *a))[1])
            assert Generator(model, remote).generate(prompt, GREEDY).token_ids == expected
        assert here == [] and remote.local.held() == held  # type: ignore[union-attr]
        mesh.procs["p1"].kill()

        bare = mesh.backend(with_fallback=False)
        with pytest.raises(ExpertUnavailableError) as info:
            Generator(model, bare).generate(prompt, GREEDY)
        assert (info.value.layer, info.value.expert) in mesh.procs["p1"].experts
        assert f"(layer={info.value.layer}, expert={info.value.expert})" in str(info.value)
    finally:
        mesh.close()


@pytest.mark.timeout(120)
def test_answer_deadlines_follow_the_frame_size(tmp_path):
    """The deadline of an answer comes from what the peer was measured to take: its wait (round trip less compute)
    plus its compute per row times the frame's rows, times the multiple, never below the floor; before any
    measurement, ``first_s``. A prefill's frame is not held to a decode step's latency, nor a decode step to a
    prefill's."""
    path, _ = make_tiny("qwen3_moe", tmp_path / "m")
    ckpt, model, _ = load_all(path)
    mesh = Mesh(path, spread(ckpt, ["p0", "p1"], replicas=1))
    try:
        remote = mesh.backend()
        t = remote.timeouts
        assert remote.answer_deadline_s("p0", 1) == t.first_s
        Generator(model, remote).generate(_prompt(ckpt.config.vocab_size), SamplingParams(max_tokens=8,
                                                                                          stop_ids=frozenset()))
        for peer, st in remote.stats().items():
            assert st.round_trips > 0 and st.ewma_row_s > 0 and st.ewma_wait_s > 0
            small, big, bigger = (remote.answer_deadline_s(peer, n) for n in (1, 10**6, 2 * 10**6))
            print(f"{peer}: wait {st.ewma_wait_s * 1e3:.3f} ms, {st.ewma_row_s * 1e6:.2f} us/row; deadlines "
                  f"{small:.3f} s (1 row), {big:.1f} s (1e6 rows)")
            assert small == max(t.floor_s, t.rtt_multiple * (st.ewma_wait_s + st.ewma_row_s))
            assert big > small >= t.floor_s
            # no replica to fail over to (R = 1 here): the fallback's floor
            assert remote.answer_deadline_s(peer, 1, replicated=False) == max(
                t.fallback_floor_s, t.rtt_multiple * (st.ewma_wait_s + st.ewma_row_s))
            assert bigger - big == pytest.approx(t.rtt_multiple * 10**6 * st.ewma_row_s)
    finally:
        mesh.close()
