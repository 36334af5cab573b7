"""``fusion.checked``: the decode kernels are trusted per kind of call only after agreeing once with the
grouped path; a kind whose kernels fail or disagree runs the grouped path from then on, with a warning. (The
kernels themselves need CUDA: tests/infer/test_cuda_kernels.py.)"""

from __future__ import annotations

import logging

import pytest
import torch

from ekmesh.infer import decode_experts, fusion


@pytest.fixture(autouse=True)
def _fresh_verdicts(monkeypatch):
    monkeypatch.setattr(fusion, "_verdicts", {})


def test_agreeing_kernels_are_trusted_after_one_check():
    ref = torch.tensor([[1.0, -2.0]])
    calls = {"kernels": 0, "reference": 0}

    def kernels():
        calls["kernels"] += 1
        return ref + 1e-3

    def reference():
        calls["reference"] += 1
        return ref

    assert torch.equal(fusion.checked(kernels, reference, "k1"), ref + 1e-3)
    assert calls == {"kernels": 1, "reference": 1}
    for _ in range(3):
        fusion.checked(kernels, reference, "k1")
    assert calls == {"kernels": 4, "reference": 1}  # trusted: the reference is not run again


@pytest.mark.parametrize("bad", ["wrong", "raises"])
def test_failing_kernels_fall_back_for_good(bad, caplog):
    ref = torch.tensor([[1.0, -2.0]])
    calls = {"kernels": 0}

    def kernels():
        calls["kernels"] += 1
        if bad == "raises":
            raise RuntimeError("no kernel image for this device")
        return ref * 2

    with caplog.at_level(logging.WARNING, logger="ekmesh.infer.decode_experts"):
        out = fusion.checked(kernels, lambda: ref, "k2")
    assert torch.equal(out, ref)
    assert "using the plain path" in caplog.text
    for _ in range(3):
        assert torch.equal(fusion.checked(kernels, lambda: ref, "k2"), ref)
    assert calls["kernels"] == 1  # never again for this kind
    other = fusion.checked(lambda: ref, lambda: ref, "k3")  # another kind is checked on its own
    assert torch.equal(other, ref) and fusion._verdicts["k3"] is True


def test_nothing_runs_the_kernels_on_a_cpu():
    x = torch.zeros(1, 8)
    w = torch.zeros(4, 16, 8)
    assert not decode_experts.supports(x, w, torch.zeros(4, 8, 8), 2)


def test_route_difference_counts_a_different_choice_fully():
    """The router kernel's self-check: the same experts in another order (a tie) is no difference; another expert
    chosen is a difference of its whole weight."""
    w = torch.tensor([[0.6, 0.4]])
    same = decode_experts.route_difference((w, torch.tensor([[3, 1]])), (w.flip(1), torch.tensor([[1, 3]])))
    assert same == 0.0
    other = decode_experts.route_difference((w, torch.tensor([[3, 2]])), (w, torch.tensor([[3, 1]])))
    assert other == pytest.approx(0.4 / 0.6)
    assert other > fusion.CHECK_TOL


def test_route_needs_cuda():
    assert not decode_experts.routes(torch.randn(1, 8), 2)
