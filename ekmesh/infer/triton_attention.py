"""The Triton kernels behind ``decode_attention`` (see there for what they compute). Importing this module imports
Triton, so only ``decode_attention`` imports it, on first use on a CUDA device. Not type-checked (Triton's kernel
language); the typed entry point is ``decode_attention.attend``.

Rows: the R = rep*T query rows of KV head g are (r, i) -> query head g*rep + r, token i (row r*T + i), as in
``attention.attend_grouped``; padded to ``rows`` (a power of two >= 16, for ``tl.dot``), the padding masked.
Partials (kernel 1 -> kernel 2), fp32, contiguous: acc [B*Hkv, splits, R, dv], m and l [B*Hkv, splits, R]; a
split with no visible key writes acc 0, m -inf, l 0.
"""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, ieee: tl.constexpr):
    if ieee:  # fp32 inputs: true fp32 products, never tf32
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def split_attend(q_ptr, k_ptr, v_ptr, pos_ptr, acc_ptr, m_ptr, l_ptr,
                 sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                 hkv, t, rep, n_rows, dk, dv, window, scaling, splits,
                 has_window: tl.constexpr, ieee: tl.constexpr, rows: tl.constexpr, t_pad: tl.constexpr,
                 block_n: tl.constexpr, dk_pad: tl.constexpr, dv_pad: tl.constexpr):
    # one program: batch b, KV head g (program 0 = b*hkv + g), its split of the visible keys
    bg = tl.program_id(0)
    split = tl.program_id(1)
    b = bg // hkv
    g = bg % hkv
    # the visible key range [lo, hi) of every token of the step, from the positions on the device
    toks = tl.arange(0, t_pad)
    tpos = tl.load(pos_ptr + toks, mask=toks < t, other=0)
    hi = tl.max(tl.where(toks < t, tpos, -1), axis=0) + 1
    lo = 0
    if has_window:
        lo = tl.maximum(tl.min(tl.where(toks < t, tpos, hi), axis=0) - window + 1, 0)
    lo = (lo // block_n) * block_n  # whole key blocks
    chunk = tl.cdiv(tl.cdiv(hi - lo, splits), block_n) * block_n
    start = lo + split * chunk
    end = tl.minimum(start + chunk, hi)

    row = tl.arange(0, rows)
    rvalid = row < n_rows
    head = g * rep + row // t  # [rows]
    tok = row % t
    qpos = tl.load(pos_ptr + tok, mask=rvalid, other=0)  # [rows]
    dks = tl.arange(0, dk_pad)
    dvs = tl.arange(0, dv_pad)
    q_rows = q_ptr + b.to(tl.int64) * sq_b + head.to(tl.int64) * sq_h + tok.to(tl.int64) * sq_t  # [rows]
    q = tl.load(q_rows[:, None] + dks[None, :], mask=rvalid[:, None] & (dks[None, :] < dk), other=0.0)
    k_base = k_ptr + b.to(tl.int64) * sk_b + g.to(tl.int64) * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + g.to(tl.int64) * sv_h

    m = tl.full([rows], float("-inf"), tl.float32)
    lsum = tl.zeros([rows], dtype=tl.float32)
    acc = tl.zeros([rows, dv_pad], dtype=tl.float32)
    for n0 in range(start, end, block_n):
        keys = n0 + tl.arange(0, block_n)
        kin = keys < end
        kt = tl.load(k_base + keys[None, :].to(tl.int64) * sk_s + dks[:, None],
                     mask=kin[None, :] & (dks[:, None] < dk), other=0.0)  # [dk_pad, block_n]
        s = _dot(q, kt, ieee) * scaling  # [rows, block_n] fp32
        vis = kin[None, :] & (keys[None, :] <= qpos[:, None])
        if has_window:
            vis = vis & (keys[None, :] > qpos[:, None] - window)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: no nan
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        lsum = lsum * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_base + keys[:, None].to(tl.int64) * sv_s + dvs[None, :],
                     mask=kin[:, None] & (dvs[None, :] < dv), other=0.0)  # [block_n, dv_pad]
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, ieee)
        m = m_new

    part = bg.to(tl.int64) * splits + split  # [B*Hkv, splits] index
    tl.store(acc_ptr + (part * n_rows + row)[:, None] * dv + dvs[None, :], acc,
             mask=rvalid[:, None] & (dvs[None, :] < dv))
    tl.store(m_ptr + part * n_rows + row, m, mask=rvalid)
    tl.store(l_ptr + part * n_rows + row, lsum, mask=rvalid)


@triton.jit
def combine(acc_ptr, m_ptr, l_ptr, sink_ptr, out_ptr, hkv, t, rep, n_rows, dv, n_heads, splits,
            has_sinks: tl.constexpr, block_s: tl.constexpr, dv_pad: tl.constexpr):
    # one program: batch b, KV head g, query row r; merges the splits' partials of that row (and its head's sink)
    # into out [B, T, H*dv], block_s splits at a time (loads of a whole block in flight, not one split after another)
    bg = tl.program_id(0)
    row = tl.program_id(1)
    b = bg // hkv
    g = bg % hkv
    head = g * rep + row // t
    tok = row % t
    dvs = tl.arange(0, dv_pad)
    sps = tl.arange(0, block_s)
    out_ty = out_ptr.dtype.element_ty
    base = bg.to(tl.int64) * splits * n_rows + row  # + split * n_rows
    big = float("-inf")
    if has_sinks:  # a per-head logit in the denominator only, rounded to the scores' dtype as attend does
        sink = tl.load(sink_ptr + head).to(out_ty).to(tl.float32)
        big = sink
    for s0 in range(0, splits, block_s):
        ms = tl.load(m_ptr + base + (s0 + sps) * n_rows, mask=s0 + sps < splits, other=float("-inf"))
        big = tl.maximum(big, tl.max(ms, axis=0))
    big_safe = tl.where(big == float("-inf"), 0.0, big)
    den = 0.0
    if has_sinks:
        den = tl.exp(sink - big_safe)
    acc = tl.zeros([dv_pad], dtype=tl.float32)
    for s0 in range(0, splits, block_s):
        inside = s0 + sps < splits
        off = base + (s0 + sps) * n_rows  # [block_s]
        w = tl.exp(tl.load(m_ptr + off, mask=inside, other=float("-inf")) - big_safe)  # [block_s]
        den += tl.sum(w * tl.load(l_ptr + off, mask=inside, other=0.0), axis=0)
        a = tl.load(acc_ptr + off[:, None] * dv + dvs[None, :], mask=inside[:, None] & (dvs[None, :] < dv),
                    other=0.0)  # [block_s, dv_pad]
        acc += tl.sum(a * w[:, None], axis=0)
    out = acc / tl.where(den > 0, den, 1.0)
    o_row = out_ptr + (b.to(tl.int64) * t + tok) * (n_heads * dv) + head * dv
    tl.store(o_row + dvs, out.to(out_ty), mask=dvs < dv)
