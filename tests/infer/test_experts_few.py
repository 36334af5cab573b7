"""``LocalExperts``' pair-by-pair CPU path for a few pairs (decode) against its grouped path."""

from __future__ import annotations

import pytest
import torch

from ekmesh.core.errors import ExpertNotLoadedError
from ekmesh.infer import experts as experts_mod
from ekmesh.infer.expert import ExpertSpec, ExpertWeights
from ekmesh.infer.experts import LocalExperts


def _backend(spec: ExpertSpec, held: list[int]) -> LocalExperts:
    g = torch.Generator().manual_seed(0)
    be = LocalExperts(spec)
    for e in held:
        bias = spec.bias
        be.add(3, e, ExpertWeights(torch.randn(2 * spec.intermediate, spec.hidden, generator=g),
                                   torch.randn(spec.hidden, spec.intermediate, generator=g),
                                   torch.randn(2 * spec.intermediate, generator=g) if bias else None,
                                   torch.randn(spec.hidden, generator=g) if bias else None))
    return be


@pytest.mark.parametrize("spec", [ExpertSpec(32, 16, 8), ExpertSpec(32, 16, 8, activation="gptoss", bias=True)])
def test_few_pairs_equal_the_grouped_path(spec: ExpertSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    be = _backend(spec, list(range(8)))
    g = torch.Generator().manual_seed(1)
    cases = {"decode, k=2": (torch.randn(1, 32, generator=g), torch.tensor([[5, 2]])),
             "decode, k=8": (torch.randn(1, 32, generator=g), torch.tensor([[7, 6, 5, 4, 3, 2, 1, 0]])),
             "3 tokens sharing experts": (torch.randn(3, 32, generator=g), torch.tensor([[1, 2], [2, 1], [1, 4]]))}
    few = {}
    for name, (x, ids) in cases.items():
        w = torch.rand(ids.shape, generator=g)
        few[name] = (be(3, x, ids, w), x, ids, w)
    monkeypatch.setattr(experts_mod, "SMALL_PAIRS", 0)  # the grouped path for everything
    for name, (got, x, ids, w) in few.items():
        want = be(3, x, ids, w)
        if name.startswith("decode"):  # one pair per expert: the same F.linear calls, bit for bit
            assert torch.equal(got, want), name
        else:  # an expert on several rows: a [c, D] matmul there, c [1, D] ones here
            diff = (got - want).abs().max().item()
            assert diff <= 1e-6 * want.abs().max().item(), (name, diff)


def test_few_pairs_name_a_missing_expert() -> None:
    be = _backend(ExpertSpec(32, 16, 8), [0, 1, 2])
    with pytest.raises(ExpertNotLoadedError) as info:
        be(3, torch.zeros(1, 32), torch.tensor([[1, 6]]), torch.ones(1, 2))
    assert "(layer=3, expert=6)" in str(info.value)
    assert be.has(3, 1) and not be.has(3, 6)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_few_with_list_ids_is_the_call_bit_for_bit(wdtype: torch.dtype) -> None:
    """``LocalExperts.few`` (expert ids as Python lists, what an expert server has) returns exactly ``__call__``."""
    spec = ExpertSpec(32, 16, 8, activation="gptoss", bias=True)
    be = _backend(spec, list(range(8)))
    g = torch.Generator().manual_seed(2)
    for ids in ([[5, 2]], [[3]], [[1, 2], [2, 1], [1, 4]]):
        x = torch.randn(len(ids), 32, generator=g)
        w = torch.rand(len(ids), len(ids[0]), generator=g).to(wdtype)
        want = be(3, x, torch.tensor(ids), w)
        got = be.few(3, x, ids, w)
        assert got.dtype == x.dtype and torch.equal(got, want), ids
    with pytest.raises(ExpertNotLoadedError, match=r"\(layer=3, expert=6\)"):
        _backend(spec, [0, 1]).few(3, torch.zeros(1, 32), [[0, 6]], torch.ones(1, 2))
