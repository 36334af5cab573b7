"""Tests for ekmesh.infer.quant: block-FP8 and MXFP4 dequantization against transformers and hand references."""

from __future__ import annotations

import math

import pytest
import torch

from ekmesh.core.errors import ConfigError, TensorShapeError
from ekmesh.infer.quant import FP4_VALUES, dequant_fp8_block, dequant_mxfp4, fp8_block_size

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _quantize_fp8_block(w: torch.Tensor, bo: int, bi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference block quantizer (DeepSeek-V3 style): per-block amax / 448 scale, cast to float8_e4m3fn."""
    rows, cols = w.shape
    nbo, nbi = math.ceil(rows / bo), math.ceil(cols / bi)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(nbo, nbi, dtype=torch.float32)
    for r in range(nbo):
        for c in range(nbi):
            tile = w[r * bo : (r + 1) * bo, c * bi : (c + 1) * bi]
            s = tile.abs().amax().clamp(min=1e-12) / FP8_MAX
            scale_inv[r, c] = s
            q[r * bo : (r + 1) * bo, c * bi : (c + 1) * bi] = (tile / s).to(torch.float8_e4m3fn)
    return q, scale_inv


def _loop_dequant_fp8(q: torch.Tensor, scale_inv: torch.Tensor, bo: int, bi: int) -> torch.Tensor:
    """Independent reference: explicit loops over blocks."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for r in range(scale_inv.shape[0]):
        for c in range(scale_inv.shape[1]):
            rs, cs = slice(r * bo, (r + 1) * bo), slice(c * bi, (c + 1) * bi)
            out[rs, cs] = q[rs, cs].to(torch.float32) * scale_inv[r, c]
    return out


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.to(torch.float32) - b.to(torch.float32)).abs().max().item()


# --- FP8 -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (576, 130), (5, 7)])
def test_fp8_roundtrip_and_exact_vs_references(shape: tuple[int, int]) -> None:
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen) * 0.05
    q, scale_inv = _quantize_fp8_block(w, 128, 128)
    assert list(scale_inv.shape) == [math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)]

    got = dequant_fp8_block(q, scale_inv, (128, 128), name="w")
    assert got.dtype == torch.float32 and got.shape == w.shape

    # Within FP8 error: e4m3 keeps 3 mantissa bits, so rounding moves a value by at most 2**-4 of itself, and
    # every value is at most the tensor's amax.
    bound = w.abs().max().item() / 16
    diff = _max_diff(got, w)
    assert diff <= bound, f"max diff to original {diff} > {bound}"

    loop = _loop_dequant_fp8(q, scale_inv, 128, 128)
    assert torch.equal(got, loop), f"max diff to loop reference {_max_diff(got, loop)}"

    hf = _dequantize_fp8_weight(q, scale_inv, [128, 128], torch.float32)
    assert torch.equal(got, hf), f"max diff to transformers {_max_diff(got, hf)}"


def test_fp8_rectangular_block_and_leading_dims() -> None:
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    gen = torch.Generator().manual_seed(1)
    experts = []
    scales = []
    for _ in range(3):
        q, s = _quantize_fp8_block(torch.randn(70, 50, generator=gen), 32, 16)
        experts.append(q)
        scales.append(s)
    q3, s3 = torch.stack(experts), torch.stack(scales)  # [3, 70, 50], [3, 3, 4]
    got = dequant_fp8_block(q3, s3, (32, 16), name="experts")
    for e in range(3):
        assert torch.equal(got[e], _loop_dequant_fp8(experts[e], scales[e], 32, 16))
    assert torch.equal(got, _dequantize_fp8_weight(q3, s3, [32, 16], torch.float32))


def test_fp8_bf16_scales_accepted_exactly() -> None:
    q, s = _quantize_fp8_block(torch.randn(130, 129, generator=torch.Generator().manual_seed(2)), 128, 128)
    s16 = s.to(torch.bfloat16)
    got = dequant_fp8_block(q, s16, name="w")
    assert torch.equal(got, _loop_dequant_fp8(q, s16.to(torch.float32), 128, 128))


def test_fp8_wrong_scale_shape_names_tensor() -> None:
    q = torch.zeros(200, 300).to(torch.float8_e4m3fn)
    with pytest.raises(TensorShapeError) as info:
        dequant_fp8_block(q, torch.ones(2, 2), (128, 128), name="model.layers.3.mlp.down_proj.weight")
    err = info.value
    assert err.name == "model.layers.3.mlp.down_proj.weight_scale_inv"
    assert err.expected == [2, 3] and err.got == [2, 2]
    assert "model.layers.3.mlp.down_proj.weight_scale_inv" in str(err)


def test_fp8_wrong_dtypes() -> None:
    with pytest.raises(TensorShapeError, match="'w'.*float8_e4m3fn"):
        dequant_fp8_block(torch.zeros(4, 4), torch.ones(1, 1), name="w")
    q = torch.zeros(4, 4).to(torch.float8_e4m3fn)
    with pytest.raises(TensorShapeError, match="'w_scale_inv'"):
        dequant_fp8_block(q, torch.ones(1, 1, dtype=torch.int32), name="w")
    with pytest.raises(TensorShapeError, match=r"\[\.\.\., O, I\]"):
        dequant_fp8_block(torch.zeros(4).to(torch.float8_e4m3fn), torch.ones(1), name="w")


def test_fp8_block_size_from_config() -> None:
    ds = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    assert fp8_block_size(ds) == (128, 128)
    assert fp8_block_size({"quant_method": "fp8", "weight_block_size": [64, 32]}) == (64, 32)
    assert fp8_block_size({"quant_method": "fp8"}) == (128, 128)
    assert fp8_block_size(None) is None
    assert fp8_block_size({"quant_method": "mxfp4"}) is None
    for bad in ([128], [0, 128], [128.0, 128], "128", [True, 1]):
        with pytest.raises(ConfigError, match="weight_block_size"):
            fp8_block_size({"quant_method": "fp8", "weight_block_size": bad})
    with pytest.raises(ConfigError, match="per-tensor"):
        fp8_block_size({"quant_method": "fp8", "weight_block_size": None})
    with pytest.raises(ConfigError):
        fp8_block_size(["fp8"])  # type: ignore[arg-type]


# --- MXFP4 -----------------------------------------------------------------------------------------------------


def test_mxfp4_matches_transformers_exactly() -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(3)
    experts, out_rows, groups = 3, 10, 4  # gate_up_proj_blocks [E, 2I, D/32, 16] with 2I=10, D=128
    blocks = torch.randint(0, 256, (experts, out_rows, groups, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(
        0, 255, (experts, out_rows, groups), dtype=torch.uint8, generator=gen
    )  # 255 is NaN

    ours = dequant_mxfp4(blocks, scales, name="gate_up_proj", rows_per_chunk=7)  # chunks cross row boundaries
    assert ours.shape == (experts, out_rows, groups * 32) and ours.dtype == torch.float32

    hf = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, D, 2I]: the x @ W layout
    assert hf.shape == (experts, groups * 32, out_rows)
    assert torch.equal(ours.transpose(1, 2), hf), f"max diff {_max_diff(ours.transpose(1, 2), hf)}"

    hf16 = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    ours16 = dequant_mxfp4(blocks, scales, dtype=torch.bfloat16)
    assert ours16.dtype == torch.bfloat16
    assert torch.equal(ours16.transpose(1, 2), hf16)
    # bf16 and fp32 are both exact
    assert torch.equal(ours16.to(torch.float32), ours)


def test_mxfp4_known_nibbles() -> None:
    # byte 0x9B: low nibble 0xB -> -1.5, high nibble 0x9 -> -0.5; byte 0x71: low 1 -> 0.5, high 7 -> 6.0
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0] = 0x9B
    blocks[0, 1] = 0x71
    blocks[0, 15] = 0xF8  # low 8 -> -0.0, high 0xF -> -6.0
    got = dequant_mxfp4(blocks, torch.tensor([129], dtype=torch.uint8))  # scale 2**2; [G=1, 16] -> [32]
    assert got.shape == (32,)
    expected = torch.zeros(32)
    expected[:4] = torch.tensor([-1.5, -0.5, 0.5, 6.0]) * 4
    expected[30], expected[31] = -0.0, -24.0
    assert torch.equal(got, expected)
    assert math.copysign(1.0, got[30].item()) == -1.0  # -0.0 keeps its sign

    all_codes = torch.tensor([(2 * k) | ((2 * k + 1) << 4) for k in range(8)], dtype=torch.uint8)
    blocks = torch.cat([all_codes, all_codes]).reshape(1, 16)
    got = dequant_mxfp4(blocks, torch.tensor([126], dtype=torch.uint8))  # scale 2**-1
    assert got[:16].tolist() == [v / 2 for v in FP4_VALUES]


def test_mxfp4_wrong_inputs() -> None:
    blocks = torch.zeros(2, 3, 16, dtype=torch.uint8)
    scales = torch.zeros(2, 3, dtype=torch.uint8)
    with pytest.raises(TensorShapeError, match="'down_proj_blocks'.*uint8"):
        dequant_mxfp4(blocks.to(torch.int8), scales, name="down_proj")
    with pytest.raises(TensorShapeError, match="'down_proj_scales'.*uint8"):
        dequant_mxfp4(blocks, scales.to(torch.float32), name="down_proj")
    with pytest.raises(TensorShapeError, match=r"'down_proj_scales' has shape \[2, 4\], expected \[2, 3\]"):
        dequant_mxfp4(blocks, torch.zeros(2, 4, dtype=torch.uint8), name="down_proj")
    with pytest.raises(TensorShapeError, match="'down_proj_blocks'"):
        dequant_mxfp4(torch.zeros(2, 3, 8, dtype=torch.uint8), scales, name="down_proj")
    with pytest.raises(ConfigError):
        dequant_mxfp4(blocks, scales, dtype=torch.float16)
