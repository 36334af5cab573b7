"""Quantized experts (``infer/qtensor.py``, quantized ``LocalExperts``): the stored formats, the kernels against the
reference path (dequantize + F.linear), backends of quantized experts against float backends holding the
dequantized weights, and the errors that bad stored tensors raise.

Tolerances: the CPU kernels run in bf16 activations (see qtensor's docstring), so a kernel agrees with the fp32
reference within 1.5e-2 of the output's largest magnitude (measured: at most 4.2e-3 here, 7.2e-3 on CUDA), and a
whole expert layer within 3e-2 (measured: at most 1.1e-2). The dequant path IS the reference: equal bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ekmesh.core.errors import CheckpointError, ConfigError, ExpertNotLoadedError, MissingTensorError, TensorShapeError
from ekmesh.infer import experts as experts_mod
from ekmesh.infer.expert import (
    ExpertSpec,
    ExpertWeights,
    expert_forward,
    expert_from_tensors,
    expert_tensors,
    quantize_expert,
)
from ekmesh.infer.experts import LocalExperts
from ekmesh.infer.qkernels import pack, qlinear, stack_packed
from ekmesh.infer.qtensor import (
    Q4_GROUP_SIZES,
    QFORMATS,
    QuantizedTensor,
    default_group_size,
    expert_prefix,
    quantize,
    tensor_names,
)

KERNEL_TOL = 1.5e-2  # of max |reference output|
LAYER_TOL = 3e-2
QWEN3 = [(1536, 2048), (2048, 768)]  # Qwen3-30B-A3B expert gate_up [2I, D] and down [D, I]
TINY = [(32, 64), (48, 96), (16, 256)]


def _w(o: int, i: int, seed: int = 0, std: float = 0.02) -> torch.Tensor:
    return torch.randn(o, i, generator=torch.Generator().manual_seed(seed)) * std


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want.float()).abs().max().item() / want.float().abs().max().item()


# ------------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("shape", TINY + QWEN3)
def test_q8_round_trip_within_half_a_step(shape: tuple[int, int]) -> None:
    w = _w(*shape)
    w[3] = 0.0  # a zero row: scale 1, codes 0, exactly 0 back
    qt = quantize(w, "q8")
    assert qt.qweight.dtype == torch.int8 and tuple(qt.qweight.shape) == shape
    assert qt.scale.dtype == torch.float32 and tuple(qt.scale.shape) == (shape[0],)
    assert qt.zero is None and qt.group_size == shape[1]
    assert qt.nbytes() == shape[0] * shape[1] + 4 * shape[0]
    deq = qt.dequantize()
    err = (w - deq).abs()
    bound = qt.scale[:, None] / 2 + 1e-6 * w.abs()  # + fp32 rounding of code * scale
    ratio = (err / (qt.scale[:, None] / 2)).max().item()
    print(f"q8 {shape}: max |w - deq| = {err.max().item():.3g}, max |w - deq| / (step/2) = {ratio:.6f}")
    assert bool((err <= bound).all()), (err - bound).max().item()
    assert qt.scale[3].item() == 1.0 and bool((deq[3] == 0).all())
    assert int(qt.qweight.abs().max()) == 127  # the row maximum takes the full range


@pytest.mark.parametrize("shape", TINY + QWEN3)
@pytest.mark.parametrize("group", [None, 32])
def test_q4_round_trip_within_half_a_step(shape: tuple[int, int], group: int | None) -> None:
    o, i = shape
    w = _w(o, i, seed=1)
    w[1] = 0.375  # constant groups: exact (0.375 is an fp16 value)
    qt = quantize(w, "q4", group)
    g = qt.group_size
    assert g == (group or default_group_size("q4", i))
    assert qt.qweight.dtype == torch.uint8 and tuple(qt.qweight.shape) == (o, i // 2)
    assert qt.scale.dtype == torch.float16 and tuple(qt.scale.shape) == (o, i // g)
    assert qt.zero is not None and qt.zero.dtype == torch.float16 and tuple(qt.zero.shape) == (o, i // g)
    deq = qt.dequantize()
    err = (w - deq).abs()
    step = qt.scale.float().repeat_interleave(g, dim=1)  # [O, I]
    bound = step / 2 + 1e-6 * (w.abs() + qt.zero.float().abs().repeat_interleave(g, dim=1))  # + fp32 rounding
    ratio = (err / (step / 2)).max().item()
    print(f"q4 {shape} G={g}: max |w - deq| = {err.max().item():.3g}, max |w - deq| / (step/2) = {ratio:.6f}")
    assert bool((err <= bound).all()), (err - bound).max().item()
    assert bool((deq[1] == 0.375).all())


def test_default_group_sizes() -> None:
    """q4: the first of 128, 64, 32 that divides every given input size; q8: the input size (one scale a row)."""
    assert [default_group_size("q4", i) for i in (2048, 768, 2880, 64, 96)] == [128, 128, 64, 64, 32]
    assert default_group_size("q4", 2048, 96) == 32
    assert default_group_size("q8", 768) == 768


def test_q4_offset_group_bound_grows_by_half_an_fp16_ulp_of_zero() -> None:
    """A group far from zero compared with its spread: the fp16 zero cannot hit the best offset, so the error may
    pass half a step by at most half an fp16 ulp of the zero (the documented bound)."""
    w = 1000.0 + torch.linspace(0, 0.05, 32)[None, :].repeat(16, 1)  # [16, 32], spread 0.05 at 1000
    qt = quantize(w, "q4", 32)
    assert qt.zero is not None
    err = (w - qt.dequantize()).abs().max().item()
    half_step = qt.scale.float().max().item() / 2
    half_ulp = 0.5 * 2.0 ** (torch.floor(torch.log2(qt.zero.float().abs().max())).item() - 10)
    print(f"offset group: max err {err:.3g}, step/2 {half_step:.3g}, ulp16(zero)/2 {half_ulp:.3g}")
    assert half_step < err <= half_step + half_ulp + 1e-4


def test_nibble_order_low_nibble_is_the_even_column() -> None:
    """A ramp 0..15 in each group of 32 gives scale 1, zero 8 and codes equal to the values: byte j of a row holds
    column 2j in its low nibble and 2j+1 in its high nibble."""
    row = (torch.arange(64) % 16).float()  # [64]
    qt = quantize(row[None, :].repeat(16, 1), "q4", 32)
    assert bool((qt.scale == 1).all()) and qt.zero is not None and bool((qt.zero == 8).all())
    codes = (torch.arange(64) % 16).to(torch.uint8)
    expected = codes[0::2] | (codes[1::2] << 4)  # [32]
    assert torch.equal(qt.qweight[0], expected), qt.qweight[0]
    assert torch.equal(qt.dequantize()[0], row)
    # and by hand: low nibble 3 (column 0), high nibble 12 (column 1), scale 0.5, zero 1 -> (c - 8) * 0.5 + 1
    q = torch.full((16, 16), 3 | (12 << 4), dtype=torch.uint8)
    hand = QuantizedTensor("q4", (16, 32), 32, q, torch.full((16, 1), 0.5).half(), torch.ones(16, 1).half())
    assert hand.dequantize()[0, :4].tolist() == [-1.5, 3.0, -1.5, 3.0]


@pytest.mark.parametrize("fmt", QFORMATS)
def test_quantize_is_deterministic_and_dtype_independent_of_input(fmt: str) -> None:
    w = _w(64, 256, seed=2)
    a, b = quantize(w, fmt).to_tensors("x"), quantize(w.clone(), fmt).to_tensors("x")
    assert a.keys() == b.keys() == set(tensor_names(fmt, "x"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a bf16 weight is quantized from its (exact) fp32 values: the same bytes as from the fp32 copy
    wb = w.bfloat16()
    c, d = quantize(wb, fmt).to_tensors("x"), quantize(wb.float(), fmt).to_tensors("x")
    assert all(torch.equal(c[k], d[k]) for k in c)
    # a non-contiguous view quantizes like its contiguous copy
    wt = _w(256, 64, seed=3).t()
    e, f = quantize(wt, fmt).to_tensors("x"), quantize(wt.contiguous(), fmt).to_tensors("x")
    assert all(torch.equal(e[k], f[k]) for k in e)


def test_quantize_refuses_what_it_cannot_represent() -> None:
    with pytest.raises(ConfigError, match="q4 group size 16"):
        quantize(_w(16, 64), "q4", 16)
    with pytest.raises(ConfigError, match="dividing I = 48"):
        quantize(_w(16, 48), "q4", 32)
    with pytest.raises(ConfigError, match="divisible by 32"):
        quantize(_w(16, 48), "q4")
    with pytest.raises(ConfigError, match="unknown quantization format 'q3'"):
        quantize(_w(16, 64), "q3")
    with pytest.raises(ConfigError, match="group_size must be I = 64"):
        quantize(_w(16, 64), "q8", 32)
    bad = _w(16, 64)
    bad[2, 5] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        quantize(bad, "q8", name="experts.0.0.down")
    with pytest.raises(ConfigError, match="fp16"):
        quantize(_w(16, 64) * 1e7, "q4")


# ------------------------------------------------------------------------------------------------ kernels


@pytest.mark.parametrize("fmt", QFORMATS)
@pytest.mark.parametrize("shape", TINY + [(40, 64)] + QWEN3)
def test_cpu_kernels_match_the_reference_path(fmt: str, shape: tuple[int, int]) -> None:
    o, i = shape
    qt = quantize(_w(o, i, seed=4), fmt)
    pw = pack(qt, "cpu", torch.bfloat16)
    expected = {"q8": "cpu_int8", "q4": "cpu_int4" if o % 16 == 0 else "dequant"}[fmt]
    assert pw.kernel == expected
    ref_w = qt.dequantize()
    bias = torch.randn(o, generator=torch.Generator().manual_seed(5)) * 0.01
    for n in (1, 17):
        x = torch.randn(n, i, generator=torch.Generator().manual_seed(n))
        for b in (None, bias):
            ref = F.linear(x, ref_w, b)
            got = qlinear(x, pw, b)
            assert got.dtype == torch.float32 and got.shape == (n, o)
            rel = _rel(got, ref)
            print(f"{fmt} {pw.kernel} {shape} N={n} bias={b is not None}: max |kernel - ref| / max |ref| = {rel:.2e}")
            assert rel <= KERNEL_TOL, rel
        assert qlinear(x.bfloat16(), pw).dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", QFORMATS)
def test_dequant_kernel_is_the_reference_bit_for_bit(fmt: str) -> None:
    qt = quantize(_w(48, 128, seed=6), fmt)
    pw = pack(qt, "cpu", torch.float32)  # fp32 activations: no fast CPU kernel, the reference path
    assert pw.kernel == "dequant"
    x = torch.randn(5, 128)
    assert torch.equal(qlinear(x, pw), F.linear(x, qt.dequantize()))


@pytest.mark.parametrize("fmt", QFORMATS)
def test_stacked_select_and_gather_are_the_single_weights(fmt: str) -> None:
    qts = [quantize(_w(32, 64, seed=s), fmt) for s in range(3)]
    pws = [pack(q, "cpu", torch.bfloat16) for q in qts]
    st = stack_packed(pws)
    assert st.stacked and st.nbytes() == sum(p.nbytes() for p in pws)
    x = torch.randn(2, 64)
    for s, p in enumerate(pws):
        want = qlinear(x, p)
        assert torch.equal(qlinear(x, st.select(s)), want)
        assert torch.equal(qlinear(x, st.gather(torch.tensor([2, s])).select(1)), want)
    with pytest.raises(ConfigError, match="cannot stack"):
        stack_packed([pws[0], pack(quantize(_w(32, 64), fmt), "cpu", torch.float32)])


# ------------------------------------------------------------------------------------------------ backends

SPECS = [ExpertSpec(64, 32, 8), ExpertSpec(64, 64, 8, activation="gptoss", bias=True)]


def _float_expert(spec: ExpertSpec, g: torch.Generator) -> ExpertWeights:
    d, i = spec.hidden, spec.intermediate
    return ExpertWeights(torch.randn(2 * i, d, generator=g) * 0.1, torch.randn(d, i, generator=g) * 0.1,
                         torch.randn(2 * i, generator=g) * 0.1 if spec.bias else None,
                         torch.randn(d, generator=g) * 0.1 if spec.bias else None)


def _dequantized(w: ExpertWeights) -> ExpertWeights:
    assert isinstance(w.gate_up, QuantizedTensor) and isinstance(w.down, QuantizedTensor)
    return ExpertWeights(w.gate_up.dequantize(), w.down.dequantize(), w.gate_up_bias, w.down_bias)


def _pair(spec: ExpertSpec, fmt: str, layers: tuple[int, ...] = (0, 2)) -> tuple[LocalExperts, LocalExperts]:
    """A backend of quantized experts and a float one holding their dequantized weights."""
    g = torch.Generator().manual_seed(7)
    qb, fb = LocalExperts(spec), LocalExperts(spec)
    for layer in layers:
        for e in range(spec.num_experts):
            q = quantize_expert(_float_expert(spec, g), fmt)
            qb.add(layer, e, q)
            fb.add(layer, e, _dequantized(q))
    return qb, fb


@pytest.mark.parametrize("spec", SPECS, ids=["silu", "gptoss"])
@pytest.mark.parametrize("fmt", QFORMATS)
def test_quantized_backend_equals_float_backend_of_dequantized_weights(spec: ExpertSpec, fmt: str) -> None:
    qb, fb = _pair(spec, fmt)
    g = torch.Generator().manual_seed(8)
    for t, k in ((1, 2), (1, 8), (3, 2), (17, 2), (40, 4)):  # decode (pair by pair) and prefill (grouped)
        x = torch.randn(t, spec.hidden, generator=g)
        ids = torch.stack([torch.randperm(spec.num_experts, generator=g)[:k] for _ in range(t)])
        w = torch.rand(t, k, generator=g)
        got, want = qb(2, x, ids, w), fb(2, x, ids, w)
        rel = _rel(got, want)
        print(f"{spec.activation} {fmt} T={t} k={k} pair_by_pair={qb.pair_by_pair(t * k, x)}: {rel:.2e}")
        assert got.dtype == x.dtype and got.shape == (t, spec.hidden)
        assert rel <= LAYER_TOL, rel
        if qb.pair_by_pair(t * k, x):
            assert torch.equal(qb.few(2, x, ids.tolist(), w), got)
        # expert_forward on quantized weights is the reference the backend's kernels agree with
    x = torch.randn(1, spec.hidden, generator=g)
    q = quantize_expert(_float_expert(spec, g), fmt)
    one = LocalExperts(spec)
    one.add(0, 3, q)
    assert torch.equal(one(0, x, torch.tensor([[3]]), torch.ones(1, 1)), expert_forward(spec, x, q))


@pytest.mark.parametrize("spec", SPECS, ids=["silu", "gptoss"])
@pytest.mark.parametrize("fmt", QFORMATS)
def test_quantized_paths_agree_with_each_other(spec: ExpertSpec, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pair by pair (``_few``), grouped (``qexperts.grouped_loop_q``) and the graph-mode gathers
    (``qexperts.gathered_q``) give the same decode results: each makes the same kernel calls on the same rows."""
    qb, _ = _pair(spec, fmt, layers=(1,))
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, spec.hidden, generator=g)
    ids = torch.tensor([[7, 1, 4, 0]])
    w = torch.rand(1, 4, generator=g)
    few = qb(1, x, ids, w)
    qb.graph_mode = True
    gathered = qb(1, x, ids, w)
    qb.graph_mode = False
    monkeypatch.setattr(experts_mod, "SMALL_PAIRS", 0)
    grouped = qb(1, x, ids, w)
    assert torch.equal(few, grouped) and torch.equal(few, gathered)


def test_quantized_backend_holds_quantized_bytes_and_one_kind() -> None:
    spec = SPECS[0]
    qb8, fb = _pair(spec, "q8", layers=(0,))
    qb4, _ = _pair(spec, "q4", layers=(0,))
    n, o1, i1, o2, i2 = 8, 64, 64, 64, 32  # gate_up [64, 64], down [64, 32]
    assert fb.nbytes() == n * 4 * (o1 * i1 + o2 * i2)
    assert qb8.nbytes() == n * ((o1 * i1 + o2 * i2) + 6 * (o1 + o2))  # int8 + fp32 scale + bf16 unit scales
    # gate_up's default group is 64 (I = 64), down's 32: packed nibbles + bf16 (scale, zero) per group
    assert qb4.nbytes() == n * ((o1 * i1 + o2 * i2) // 2 + 4 * (o1 * i1 // 64 + o2 * i2 // 32))
    print("bytes: float", fb.nbytes(), "q8", qb8.nbytes(), "q4", qb4.nbytes())
    # counted the same before a layer's pack is built (added experts still pending) and after a call built it
    before = [b.nbytes() for b in (fb, qb8, qb4)]
    x = torch.randn(3, spec.hidden)
    for b in (fb, qb8, qb4):
        b(0, x, torch.tensor([[0, 1], [2, 3], [4, 5]]), torch.rand(3, 2))
    assert [b.nbytes() for b in (fb, qb8, qb4)] == before
    g = torch.Generator().manual_seed(10)
    with pytest.raises(ConfigError, match="holds q8 experts and cannot also hold float"):
        qb8.add(0, 1, _float_expert(spec, g))
    with pytest.raises(ConfigError, match="holds float experts and cannot also hold q4"):
        fb.add(0, 1, quantize_expert(_float_expert(spec, g), "q4"))
    with pytest.raises(ConfigError, match="cannot also hold q4"):
        qb8.add(3, 1, quantize_expert(_float_expert(spec, g), "q4"))
    with pytest.raises(ConfigError, match="holds q8 experts"):
        qb8.set_layer(5, [0], torch.zeros(1, 64, 64), torch.zeros(1, 64, 32))
    with pytest.raises(ConfigError, match="both float or both"):
        q = quantize_expert(_float_expert(spec, g), "q8")
        qb8.add(0, 1, ExpertWeights(q.gate_up, torch.zeros(64, 32)))


def test_quantized_backend_replaces_removes_and_names_missing_experts() -> None:
    spec = SPECS[1]
    qb, fb = _pair(spec, "q4", layers=(0,))
    x = torch.randn(5, spec.hidden)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [1, 2]])
    w = torch.rand(5, 2)
    qb(0, x, ids, w)  # builds the layer's pack
    new = quantize_expert(_float_expert(spec, torch.Generator().manual_seed(11)), "q4")
    qb.add(0, 2, new)  # unpacks the built layer, replaces one expert
    fb.add(0, 2, _dequantized(new))
    assert _rel(qb(0, x, ids, w), fb(0, x, ids, w)) <= LAYER_TOL
    qb.remove(0, 6)
    assert not qb.has(0, 6) and qb.held() == {0: [0, 1, 2, 3, 4, 5, 7]}
    with pytest.raises(ExpertNotLoadedError, match=r"\(layer=0, expert=6\)"):
        qb(0, x, ids, w)  # grouped
    with pytest.raises(ExpertNotLoadedError, match=r"\(layer=0, expert=6\)"):
        qb(0, x[:1], torch.tensor([[1, 6]]), w[:1])  # pair by pair


# ------------------------------------------------------------------------------------------------ stored form


@pytest.mark.parametrize("spec", SPECS, ids=["silu", "gptoss"])
@pytest.mark.parametrize("fmt", QFORMATS)
def test_expert_tensors_round_trip_through_a_safetensors_file(spec: ExpertSpec, fmt: str, tmp_path) -> None:
    group = 32 if fmt == "q4" else None
    q = quantize_expert(_float_expert(spec, torch.Generator().manual_seed(12)), fmt, group)
    prefix = expert_prefix(3, 5)
    assert prefix == "experts.3.5"
    tensors = expert_tensors(q, prefix)
    names = {f"{prefix}.{p}.{s}" for p in ("gate_up", "down") for s in ("qweight", "scale", "zero")
             if fmt == "q4" or s != "zero"}
    names |= {f"{prefix}.gate_up_bias", f"{prefix}.down_bias"} if spec.bias else set()
    assert set(tensors) == names
    save_file(tensors, str(tmp_path / "e.safetensors"))
    loaded = load_file(str(tmp_path / "e.safetensors"))
    for g in (group, None):
        back = expert_from_tensors(loaded, prefix, spec, fmt, g)
        for proj in ("gate_up", "down"):
            a, b = getattr(q, proj), getattr(back, proj)
            assert isinstance(a, QuantizedTensor) and isinstance(b, QuantizedTensor)
            assert (a.fmt, a.shape, a.group_size) == (b.fmt, b.shape, b.group_size)
            assert torch.equal(a.dequantize(), b.dequantize())
        if spec.bias:
            assert back.gate_up_bias is not None and back.gate_up_bias.dtype == torch.float32


def _stored(fmt: str = "q4") -> tuple[dict[str, torch.Tensor], ExpertSpec]:
    spec = SPECS[1]
    w = quantize_expert(_float_expert(spec, torch.Generator().manual_seed(13)), fmt, 32 if fmt == "q4" else None)
    return expert_tensors(w, "e"), spec


@pytest.mark.parametrize(("fmt", "name", "bad", "error", "match"), [
    ("q4", "e.down.scale", lambda t: t.float(), TensorShapeError, "'e.down.scale' has shape dtype torch.float32"),
    ("q4", "e.down.scale", lambda t: t[:, :1], TensorShapeError, r"'e.down.scale' has shape \(64, 1\)"),
    ("q4", "e.gate_up.zero", lambda t: t[:-1], TensorShapeError, r"'e.gate_up.zero' has shape \(127, 2\)"),
    ("q4", "e.gate_up.qweight", lambda t: t.view(torch.int8), TensorShapeError, "'e.gate_up.qweight'.*int8"),
    ("q8", "e.down.scale", lambda t: t.half(), TensorShapeError, "'e.down.scale'.*float16"),
    ("q8", "e.gate_up.qweight", lambda t: t[:, :-1], TensorShapeError, r"'e.gate_up.qweight' has shape \(128, 63\)"),
    ("q4", "e.down_bias", lambda t: t.bfloat16(), TensorShapeError, "'e.down_bias'.*bfloat16"),
    ("q4", "e.down.scale", lambda t: t.fill_(float("inf")), CheckpointError, "'e.down.scale' has non-finite"),
])
def test_bad_stored_tensors_are_named(fmt: str, name: str, bad, error: type[Exception], match: str) -> None:
    tensors, spec = _stored(fmt)
    tensors[name] = bad(tensors[name].clone())
    with pytest.raises(error, match=match):
        expert_from_tensors(tensors, "e", spec, fmt, 32 if fmt == "q4" else 0)


def test_missing_tensor_unknown_format_and_bad_group_size_are_named() -> None:
    tensors, spec = _stored("q4")
    for name in ("e.down.zero", "e.gate_up.qweight", "e.gate_up_bias"):
        partial = {k: v for k, v in tensors.items() if k != name}
        with pytest.raises(MissingTensorError) as info:
            expert_from_tensors(partial, "e", spec, "q4", 32)
        assert info.value.name == name
    with pytest.raises(MissingTensorError, match="'e.down.scale'"):  # group size read from the missing scale
        expert_from_tensors({k: v for k, v in tensors.items() if k != "e.down.scale"}, "e", spec, "q4", None)
    with pytest.raises(ConfigError, match="e.gate_up: unknown quantization format 'q5'"):
        expert_from_tensors(tensors, "e", spec, "q5", 32)
    with pytest.raises(ConfigError, match="e.gate_up: q4 group size 48"):
        expert_from_tensors(tensors, "e", spec, "q4", 48)
    with pytest.raises(ConfigError, match="e.gate_up: q4 group size 512"):
        expert_from_tensors(tensors, "e", spec, "q4", 512)
    bad = dict(tensors, **{"e.down.scale": tensors["e.down.scale"][:, :0]})
    with pytest.raises(TensorShapeError, match="'e.down.scale'"):
        expert_from_tensors(bad, "e", spec, "q4", None)
    assert set(Q4_GROUP_SIZES) == {32, 64, 128, 256}
    with pytest.raises(ConfigError, match="q8 has one scale per output row"):
        quantize_expert(_float_expert(spec, torch.Generator().manual_seed(0)), "q8", 32)
