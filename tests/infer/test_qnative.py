"""The checkpoints' own formats kept as stored (``qnative``, ``QuantizedTensor.fp8`` / ``.mxfp4``): exact
dequantization against ``quant.py``'s reference functions, row joins and reorders, the compiled CPU kernels and
``LocalExperts`` holding such experts, each against the float path on the dequantized weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ekmesh.core.errors import CheckpointError, ConfigError, TensorShapeError
from ekmesh.infer.expert import ExpertSpec, ExpertWeights, quantize_expert
from ekmesh.infer.experts import LocalExperts
from ekmesh.infer.qkernels import pack, qlinear
from ekmesh.infer.qnative import COMPILED_MIN
from ekmesh.infer.qtensor import QuantizedTensor, cat_rows, take_rows
from ekmesh.infer.quant import dequant_fp8_block, dequant_mxfp4


def _fp8(o: int, i: int, block: tuple[int, int], seed: int = 0) -> QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    # every FP8 code but NaN, subnormals included, and scales spanning several binades
    codes = torch.randint(0, 256, (o, i), generator=g, dtype=torch.uint8)
    codes = torch.where((codes & 0x7F) == 0x7F, codes ^ 0x01, codes)
    scale = torch.exp2(torch.randint(-12, -4, (math.ceil(o / block[0]), math.ceil(i / block[1])), generator=g)
                       .float()) * (1 + torch.rand(math.ceil(o / block[0]), math.ceil(i / block[1]), generator=g))
    return QuantizedTensor.fp8(codes.view(torch.float8_e4m3fn), scale, block)


def _mxfp4(o: int, i: int, seed: int = 0) -> QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (o, i // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(115, 131, (o, i // 32), generator=g, dtype=torch.uint8)
    return QuantizedTensor.mxfp4(blocks, scales)


@pytest.mark.parametrize(("o", "i", "block"), [(48, 80, (16, 16)), (40, 72, (16, 32)), (256, 512, (128, 128))])
def test_fp8_dequantize_equals_the_reference_bit_for_bit(o: int, i: int, block: tuple[int, int]) -> None:
    qt = _fp8(o, i, block)
    want = dequant_fp8_block(qt.qweight, qt.scale, block)
    assert torch.equal(qt.dequantize(), want)
    assert qt.nbytes() == o * i + 4 * math.ceil(o / block[0]) * math.ceil(i / block[1])  # as the checkpoint


def test_mxfp4_dequantize_equals_the_reference_bit_for_bit() -> None:
    qt = _mxfp4(24, 96)
    want = dequant_mxfp4(qt.qweight.view(24, 3, 16), qt.scale)
    assert torch.equal(qt.dequantize(), want)
    assert qt.nbytes() == 24 * 96 // 2 + 24 * 3  # half a byte a value, a byte per 32


def test_rows_joined_and_reordered_as_stored() -> None:
    """gate and up joined (fp8 blocks whole where they tile the rows, per-row scales where not), gpt-oss's rows
    reordered: always equal to the same operation on the dequantized weights."""
    for a, b in [(_fp8(32, 64, (16, 16), 1), _fp8(32, 64, (16, 16), 2)),
                 (_fp8(24, 64, (16, 16), 1), _fp8(24, 64, (16, 16), 2)),
                 (_mxfp4(8, 64, 1), _mxfp4(8, 64, 2))]:
        joined = cat_rows([a, b])
        assert torch.equal(joined.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
        index = torch.randperm(joined.shape[0], generator=torch.Generator().manual_seed(0))
        assert torch.equal(take_rows(joined, index).dequantize(), joined.dequantize()[index])
    assert cat_rows([_fp8(32, 64, (16, 16)), _fp8(32, 64, (16, 16))]).block_rows == 16  # blocks kept whole
    assert cat_rows([_fp8(24, 64, (16, 16)), _fp8(24, 64, (16, 16))]).block_rows == 1
    with pytest.raises(ConfigError, match="cannot concatenate"):
        cat_rows([_fp8(32, 64, (16, 16)), _mxfp4(32, 64)])


def test_bad_checkpoint_tensors_are_named() -> None:
    w = torch.zeros(32, 64, dtype=torch.float8_e4m3fn)
    with pytest.raises(TensorShapeError, match="w_scale_inv"):
        QuantizedTensor.fp8(w, torch.ones(2, 3), (16, 16), "w")
    with pytest.raises(TensorShapeError, match="'w'"):
        QuantizedTensor.fp8(w.float(), torch.ones(2, 4), (16, 16), "w")
    with pytest.raises(CheckpointError, match="w_scale_inv"):
        QuantizedTensor.fp8(w, torch.full((2, 4), float("nan")), (16, 16), "w")
    with pytest.raises(TensorShapeError, match="m_scales"):
        QuantizedTensor.mxfp4(torch.zeros(4, 2, 16, dtype=torch.uint8), torch.zeros(4, 3, dtype=torch.uint8), "m")
    with pytest.raises(TensorShapeError, match="m_blocks"):
        QuantizedTensor.mxfp4(torch.zeros(4, 2, 8, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.uint8), "m")
    with pytest.raises(ConfigError, match="unknown quantization format 'fp8'"):
        from ekmesh.infer.qtensor import quantize
        quantize(torch.zeros(4, 64), "fp8")


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_compiled_cpu_kernels_match_the_reference(fmt: str) -> None:
    """A weight large enough for the compiled kernels: one row (fused) and several (dequantized once) against
    ``F.linear`` on the dequantized weight, in float32. Tolerance: 1e-5 of the output's largest magnitude (the
    kernels sum in another order)."""
    o, i = 256, 512
    assert o * i >= COMPILED_MIN
    qt = _fp8(o, i, (128, 128)) if fmt == "fp8" else _mxfp4(o, i)
    pw = pack(qt, "cpu", torch.bfloat16)
    assert pw.kernel == f"cpu_{fmt}", "the compiled kernel must be built here (CI has a C++ compiler)"
    assert pw.nbytes() == qt.nbytes()  # packed as stored: no float copy
    bias = torch.randn(o)
    for rows in (1, 5):
        x = torch.randn(rows, i, generator=torch.Generator().manual_seed(rows))
        want = F.linear(x, qt.dequantize(), bias)
        got = qlinear(x, pw, bias)
        diff = float((got - want).abs().max())
        assert diff <= 1e-5 * float(want.abs().max()), f"{fmt}, {rows} rows: max diff {diff}"


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
@pytest.mark.parametrize("compiled", [False, True])
def test_local_experts_hold_checkpoint_formats_as_stored(fmt: str, compiled: bool) -> None:
    """``LocalExperts`` keeps fp8 / mxfp4 experts in their bytes (plus biases) and computes what a float backend
    holding the dequantized weights computes, for a few pairs and for a grouped batch."""
    d, inter = (256, 256) if compiled else (64, 32)
    spec = ExpertSpec(hidden=d, intermediate=inter, num_experts=4, activation="gptoss" if fmt == "mxfp4" else "silu",
                      bias=fmt == "mxfp4")
    native = LocalExperts(spec, "cpu", torch.float32)
    flat = LocalExperts(spec, "cpu", torch.float32)
    held = 0
    for e in range(4):
        if fmt == "fp8":
            gu, dn = _fp8(2 * inter, d, (16, 16), e), _fp8(d, inter, (16, 16), 10 + e)
            gub = dnb = None
        else:
            gu, dn = _mxfp4(2 * inter, d, e), _mxfp4(d, inter, 10 + e)
            gub, dnb = torch.randn(2 * inter) * 0.1, torch.randn(d) * 0.1
        native.add(0, e, ExpertWeights(gu, dn, gub, dnb))
        flat.add(0, e, ExpertWeights(gu.dequantize(), dn.dequantize(), gub, dnb))
        held += gu.nbytes() + dn.nbytes() + (0 if gub is None or dnb is None else 4 * (gub.numel() + dnb.numel()))
    assert native.nbytes() == held
    g = torch.Generator().manual_seed(1)
    for tokens in (1, 16):
        x = torch.randn(tokens, d, generator=g)
        ids = torch.randint(0, 4, (tokens, 2), generator=g)
        w = torch.rand(tokens, 2, generator=g)
        want, got = flat(0, x, ids, w), native(0, x, ids, w)
        diff = float((got - want).abs().max())
        assert diff <= 1e-5 * float(want.abs().max()), f"{fmt}, {tokens} tokens: max diff {diff}"


def test_quantizing_a_checkpoint_format_starts_from_its_exact_values() -> None:
    w = ExpertWeights(_fp8(64, 64, (16, 16)), _fp8(64, 32, (16, 16)))
    q = quantize_expert(w, "q8")
    assert isinstance(q.gate_up, QuantizedTensor) and q.gate_up.fmt == "q8"
    assert isinstance(w.gate_up, QuantizedTensor)
    ref = w.gate_up.dequantize()
    assert float((q.gate_up.dequantize() - ref).abs().max()) <= float(ref.abs().max()) / 127
