"""``decode_attention``'s host side: which calls it takes (``supports``/``fits``) and how it sizes the launch (key
blocks, splits). The kernels themselves need CUDA: tests/infer/test_cuda_kernels.py."""

from __future__ import annotations

import pytest
import torch

from ekmesh.infer import decode_attention as da
from ekmesh.infer import fusion


def _qkv(b=1, h=32, hkv=4, t=1, dk=128, dv=128, s=4096, dtype=torch.bfloat16):
    q = torch.zeros(b, t, h, dk, dtype=dtype).transpose(1, 2)  # [B, H, T, dk], strided as head_norm_rope gives it
    k = torch.zeros(b, hkv, s, dk, dtype=dtype)
    v = torch.zeros(b, hkv, s, dv, dtype=dtype)
    return q, k, v


@pytest.mark.timeout(30)
def test_cpu_tensors_are_not_supported():
    q, k, v = _qkv()
    assert da.fits(q, k, v)  # the shapes are fine: only the device says no
    assert not da.supports(q, k, v)
    assert not da.supports(q, k, v, torch.zeros(32, dtype=torch.bfloat16))


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("case", "ok"), [
    ({}, True),
    ({"dtype": torch.float32}, True),
    ({"dtype": torch.float16}, True),
    ({"dtype": torch.float64}, False),
    ({"h": 32, "hkv": 32, "t": 5}, True),
    ({"h": 32, "hkv": 4, "t": 16}, True),  # rep 8 x 16 tokens = 128 rows per KV head
    ({"h": 32, "hkv": 4, "t": 17}, False),  # 136 rows: prefill-sized
    ({"h": 30, "hkv": 4}, False),  # heads not a multiple of the KV heads
    ({"dk": 256, "dv": 256}, True),
    ({"dk": 288}, False),
    ({"dv": 512}, False),
])
def test_fits_says_which_shapes_the_kernels_take(case, ok):
    assert da.fits(*_qkv(**case)) is ok


@pytest.mark.timeout(30)
def test_fits_rejects_mismatches_and_layouts():
    q, k, v = _qkv()
    assert not da.fits(q, k, v.to(torch.float16))  # mixed dtypes
    assert not da.fits(q, k, v[:, :, :100])  # keys and values of different lengths
    assert not da.fits(q, k[:, :2], v)  # keys and values of different KV heads
    assert not da.fits(q, k[:, :3], v[:, :3])  # 3 KV heads do not divide 32 query heads
    assert da.fits(q, k[:, :2], v[:, :2])  # 2 do (rep 16)
    assert not da.fits(q.transpose(2, 3), k, v)  # last dim not contiguous
    assert not da.fits(q, k.transpose(2, 3).contiguous().transpose(2, 3), v)
    assert da.fits(q, k[:, :, :, :128], v)  # a view with strided rows (the static cache) is fine
    assert da.fits(q, k, v, torch.zeros(32))
    assert not da.fits(q, k, v, torch.zeros(4))  # one sink per query head
    assert not da.fits(q[0], k, v)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("bh", "s"), [(4, 4096), (4, 40960), (8, 4096), (64, 4096), (4, 100), (1, 64), (512, 4096)])
def test_splits_fill_the_gpu_about_twice_and_never_exceed_the_key_blocks(bh, s):
    dev = torch.device("cpu")
    block = da._block_n(128, 128, 2)
    splits = da._splits(bh, s, block, dev)
    blocks = -(-s // block)
    assert 1 <= splits <= blocks
    if splits < blocks:  # not capped by the cache's length: about PROGRAMS_PER_SM programs per SM
        want = da.PROGRAMS_PER_SM * da.CPU_SMS
        assert abs(bh * splits - want) <= bh / 2 or (splits == 1 and bh >= want)


@pytest.mark.timeout(30)
def test_key_blocks_keep_a_key_and_a_value_tile_small():
    assert da._block_n(128, 128, 2) == 64  # bf16, Qwen3
    assert da._block_n(64, 64, 4) == 64
    assert da._block_n(128, 128, 4) == 32  # fp32 rows of 512 bytes: half the keys per block
    assert da._block_n(256, 256, 2) == 32
    assert [fusion.pow2(n, 16) for n in (1, 8, 16, 17, 40, 128)] == [16, 16, 16, 32, 64, 128]
    assert [fusion.pow2(n) for n in (1, 2, 5)] == [1, 2, 8]
