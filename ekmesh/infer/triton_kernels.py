"""The Triton kernels behind ``decode_experts`` (see there for what they compute). Importing this module imports
Triton, so only ``decode_experts`` imports it, on first use on a CUDA device. Not type-checked (Triton's kernel
language); the typed entry point is ``decode_experts.moe``.

Weights (``w_kind``): 0 float (bf16 / fp16); 1 int8 codes with one fp32 scale per output row (q8); 2 FP8 e4m3
bits (uint8) with one fp32 scale per block of ``block_rows`` x ``group`` (DeepSeek's block FP8; a column tile never
straddles two groups: ``block`` divides ``group``).
"""

import triton
import triton.language as tl


@triton.jit
def _dequant(w, w_kind: tl.constexpr):
    if w_kind == 2:
        return w.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return w.to(tl.float32)


@triton.jit
def _scale(s_base, rows, col0, rmask, n_col_groups, w_kind: tl.constexpr, block_rows: tl.constexpr,
           group: tl.constexpr):
    # fp8: the scale of each row's block at column col0, [rows]
    return tl.load(s_base + (rows // block_rows) * n_col_groups + col0 // group, mask=rmask, other=0.0)


@triton.jit
def _slot(slot_ptr, table_ptr, p, lookup: tl.constexpr):
    # pair p's slot: slot_ptr holds slots, or (lookup) expert ids mapped through the layer's table
    if lookup:
        return tl.load(table_ptr + tl.load(slot_ptr + p))
    return tl.load(slot_ptr + p)


@triton.jit
def gate_up_act(x_ptr, w_ptr, b_ptr, s_ptr, slot_ptr, table_ptr, a_ptr, d, inter, stride_we, stride_wr, stride_se,
                n_col_groups, alpha, limit, k: tl.constexpr, act_kind: tl.constexpr, has_bias: tl.constexpr,
                w_kind: tl.constexpr, block_rows: tl.constexpr, group: tl.constexpr,
                block_i: tl.constexpr, block_d: tl.constexpr, lookup: tl.constexpr):
    # one program: pair p, rows [bi*block_i, +block_i) of its gate and of its up projection
    p = tl.program_id(0)
    bi = tl.program_id(1)
    slot = _slot(slot_ptr, table_ptr, p, lookup)
    base = w_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_we
    s_base = s_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_se
    rows = bi * block_i + tl.arange(0, block_i)
    rmask = rows < tl.where(slot >= 0, inter, 0)  # no rows of an expert not held
    x_row = x_ptr + (p // k).to(tl.int64) * d
    acc_g = tl.zeros([block_i], dtype=tl.float32)
    acc_u = tl.zeros([block_i], dtype=tl.float32)
    for d0 in range(0, d, block_d):
        cols = d0 + tl.arange(0, block_d)
        cmask = cols < d
        xv = tl.load(x_row + cols, mask=cmask, other=0.0).to(tl.float32)
        m2 = rmask[:, None] & cmask[None, :]
        g = _dequant(tl.load(base + rows[:, None] * stride_wr + cols[None, :], mask=m2, other=0), w_kind)
        u = _dequant(tl.load(base + (rows[:, None] + inter) * stride_wr + cols[None, :], mask=m2, other=0), w_kind)
        pg = tl.sum(g * xv[None, :], axis=1)
        pu = tl.sum(u * xv[None, :], axis=1)
        if w_kind == 2:
            pg = pg * _scale(s_base, rows, d0, rmask, n_col_groups, w_kind, block_rows, group)
            pu = pu * _scale(s_base, rows + inter, d0, rmask, n_col_groups, w_kind, block_rows, group)
        acc_g += pg
        acc_u += pu
    if w_kind == 1:
        acc_g = acc_g * tl.load(s_base + rows, mask=rmask, other=0.0)
        acc_u = acc_u * tl.load(s_base + inter + rows, mask=rmask, other=0.0)
    if has_bias:
        bias = b_ptr + tl.maximum(slot, 0).to(tl.int64) * (2 * inter)
        acc_g += tl.load(bias + rows, mask=rmask, other=0.0).to(tl.float32)
        acc_u += tl.load(bias + inter + rows, mask=rmask, other=0.0).to(tl.float32)
    out_ty = a_ptr.dtype.element_ty
    g = acc_g.to(out_ty).to(tl.float32)  # the projection's output in the activations' dtype, as a matmul's
    u = acc_u.to(out_ty).to(tl.float32)
    if act_kind == 0:  # SwiGLU
        act = g / (1.0 + tl.exp(-g)) * u
    else:  # gpt-oss: clamped, alpha-scaled sigmoid gate, (up + 1)
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        act = (u + 1.0) * (g / (1.0 + tl.exp(-g * alpha)))
    tl.store(a_ptr + p.to(tl.int64) * inter + rows, act.to(out_ty), mask=rows < inter)


@triton.jit
def down_sum(a_ptr, w_ptr, b_ptr, s_ptr, slot_ptr, table_ptr, wt_ptr, y_ptr, d, inter, stride_we, stride_wr,
             stride_se, n_col_groups, k: tl.constexpr, has_bias: tl.constexpr, w_kind: tl.constexpr,
             block_rows: tl.constexpr, group: tl.constexpr, block_d: tl.constexpr, block_i: tl.constexpr,
             lookup: tl.constexpr):
    # one program: token t, output rows [bd*block_d, +block_d), summed over the token's k experts
    bd = tl.program_id(0)
    t = tl.program_id(1)
    rows = bd * block_d + tl.arange(0, block_d)
    rmask = rows < d
    out_ty = y_ptr.dtype.element_ty
    acc = tl.zeros([block_d], dtype=tl.float32)
    for j in tl.static_range(k):
        p = t * k + j
        slot = _slot(slot_ptr, table_ptr, p, lookup)
        held = rows < tl.where(slot >= 0, d, 0)  # no rows of an expert not held
        base = w_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_we
        s_base = s_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_se
        a_row = a_ptr + p.to(tl.int64) * inter
        part = tl.zeros([block_d], dtype=tl.float32)
        for i0 in range(0, inter, block_i):
            cols = i0 + tl.arange(0, block_i)
            cmask = cols < inter
            av = tl.load(a_row + cols, mask=cmask, other=0.0).to(tl.float32)
            w = _dequant(tl.load(base + rows[:, None] * stride_wr + cols[None, :],
                                 mask=held[:, None] & cmask[None, :], other=0), w_kind)
            pw = tl.sum(w * av[None, :], axis=1)
            if w_kind == 2:
                pw = pw * _scale(s_base, rows, i0, held, n_col_groups, w_kind, block_rows, group)
            part += pw
        if w_kind == 1:
            part = part * tl.load(s_base + rows, mask=held, other=0.0)
        if has_bias:
            part += tl.load(b_ptr + tl.maximum(slot, 0).to(tl.int64) * d + rows, mask=held,
                            other=0.0).to(tl.float32)
        part = part.to(out_ty).to(tl.float32)  # the expert's output in the activations' dtype
        acc += part * tl.load(wt_ptr + p).to(tl.float32)
    tl.store(y_ptr + t.to(tl.int64) * d + rows, acc.to(out_ty), mask=rmask)


@triton.jit
def softmax_topk(logit_ptr, w_ptr, id_ptr, n_exp, stride_t, k: tl.constexpr, normalize: tl.constexpr,
                 block_e: tl.constexpr, block_k: tl.constexpr):
    # one program: token t's router logits -> its k largest (first index on ties) and their softmax weights
    t = tl.program_id(0)
    cols = tl.arange(0, block_e)
    cmask = cols < n_exp
    x = tl.load(logit_ptr + t.to(tl.int64) * stride_t + cols, mask=cmask, other=float("-inf")).to(tl.float32)
    m = tl.max(x, 0)
    denom = tl.sum(tl.where(cmask, tl.exp(x - m), 0.0), 0)
    slots = tl.arange(0, block_k)
    ws = tl.zeros([block_k], dtype=tl.float32)
    ids = tl.zeros([block_k], dtype=tl.int64)
    rest = x
    for j in tl.static_range(k):
        best = tl.argmax(rest, 0, tie_break_left=True)
        top = tl.max(rest, 0)
        ws = tl.where(slots == j, tl.exp(top - m) / denom, ws)
        ids = tl.where(slots == j, best.to(tl.int64), ids)
        rest = tl.where(cols == best, float("-inf"), rest)
    if normalize:
        ws = ws / tl.sum(tl.where(slots < k, ws, 0.0), 0)
    tl.store(w_ptr + t.to(tl.int64) * k + slots, ws.to(w_ptr.dtype.element_ty), mask=slots < k)
    tl.store(id_ptr + t.to(tl.int64) * k + slots, ids, mask=slots < k)
