"""A layer call's (token, expert) pairs on the wire: which hidden rows the REQUEST frame for some pairs carries,
that frame (with extra rows of pairs to verify after them), and the answers' rows added back into the result.

Pairs are flat indices into the call's [T*k] pairs (pair i = token i // k, choice i % k); ``None`` stands for every
pair in order (no gathers). Responsibilities: the row bookkeeping and the frame's bytes, with the ns of the rows'
device-to-host copy (the host's side of the round-trip split, ``peerstats.HostSplit``, counts it apart from the
encoding). Not responsible for: choosing holders, sending, deadlines, verification decisions (``remote``,
``verify``).

Invariants: a frame's rows are the distinct tokens of its pairs in ascending order (all T rows, in order, when
every token is used), each extra pair one more row after them with weight 1 (its answer is the expert's output
itself); ``add_rows`` adds each answer row to its token once, in fp32.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from ekmesh.infer.dataplane.frames import encode_request


def indices(pairs: np.ndarray | None, n: int) -> np.ndarray:
    """Pair indices, ``None`` standing for all ``n`` pairs in order."""
    return np.arange(n) if pairs is None else pairs


def frame_rows(pairs: np.ndarray, k: int, t: int) -> tuple[np.ndarray | None, np.ndarray]:
    """(rows [R] sent in frame order, or None when the pairs use every token (all T rows go, in order);
    [P] row in the frame of each pair)."""
    tok = pairs // k  # [P] token of each pair
    if t == 1 or len(pairs) == t * k:  # every token is used
        return None, tok
    used = np.zeros(t, dtype=bool)
    used[tok] = True
    if used.all():
        return None, tok
    rows = np.flatnonzero(used)  # [R] ascending
    return rows, (np.cumsum(used) - 1)[tok]


def add_rows(acc: torch.Tensor | None, rows: np.ndarray | None, part: torch.Tensor,
             like: torch.Tensor) -> torch.Tensor:
    """acc[rows] += part in fp32 (rows None: every row). The first full-rows partial becomes acc itself
    (0 + x == x), saving a zero fill. On the CPU the scatter-add runs in numpy (``rows`` are distinct, so
    ``a[rows] += p`` adds each row once, the same fp32 additions as ``index_add_``): torch's ``index_add_``
    took milliseconds in a node whose other threads and processes kept the second core busy."""
    if rows is None:
        if acc is None:
            return part
        return acc.add_(part)
    if acc is None:
        acc = torch.zeros(like.shape, dtype=torch.float32, device=like.device)  # [T, D]
    if acc.is_cpu:
        a = acc.numpy()
        a[rows] += part.numpy()
        return acc
    return acc.index_add_(0, torch.from_numpy(rows).to(acc.device), part)


def encode_pairs(rid: int, layer: int, hidden: torch.Tensor, pairs: np.ndarray | None, k: int, exp: np.ndarray,
                 w: np.ndarray, extra: np.ndarray | None, token_index: Callable[[int, int], np.ndarray]
                 ) -> tuple[np.ndarray | None, bytearray, int]:
    """(rows sent for ``pairs`` as ``frame_rows`` gives them, the REQUEST frame, ns of its rows' copy to the host)
    for ``pairs`` (None: every pair) and ``extra`` pairs to verify. ``token_index(t, k)``: [T*k] the token of each
    pair (the caller caches it per shape)."""
    t = hidden.shape[0]
    if extra is not None and len(extra):
        return _encode_with_extra(rid, layer, hidden, pairs, k, exp, w, extra, token_index)
    if pairs is None:  # every pair, in order: no gathers
        x, copy_ns = on_host(hidden)
        return None, encode_request(rid, layer, token_index(t, k), exp, w, x), copy_ns
    rows, inv = frame_rows(pairs, k, t)
    sub = hidden if rows is None else hidden.index_select(0, torch.from_numpy(rows).to(hidden.device))
    sub, copy_ns = on_host(sub)
    return rows, encode_request(rid, layer, inv, exp[pairs], w[pairs], sub), copy_ns  # sub: [R, D]


def _encode_with_extra(rid: int, layer: int, hidden: torch.Tensor, pairs: np.ndarray | None, k: int,
                       exp: np.ndarray, w: np.ndarray, extra: np.ndarray,
                       token_index: Callable[[int, int], np.ndarray]) -> tuple[np.ndarray | None, bytearray, int]:
    """``encode_pairs`` with extra pairs: the R rows of ``pairs``, then one row per ``extra`` pair."""
    t = hidden.shape[0]
    rows: np.ndarray | None
    if pairs is None:
        rows, inv, sub, pe, pw = None, token_index(t, k), hidden, exp, w
    elif not len(pairs):
        rows, inv, sub, pe, pw = pairs, np.zeros(0, np.int64), hidden[:0], exp[pairs], w[pairs]
    else:
        rows, inv = frame_rows(pairs, k, t)
        sub = hidden if rows is None else hidden.index_select(0, torch.from_numpy(rows).to(hidden.device))
        pe, pw = exp[pairs], w[pairs]
    r = t if rows is None else len(rows)
    xs = hidden.index_select(0, torch.from_numpy(extra // k).to(hidden.device))  # [V, D]
    x, copy_ns = on_host(torch.cat([sub, xs]))  # [R + V, D]
    data = encode_request(rid, layer, np.concatenate([inv, r + np.arange(len(extra))]),
                          np.concatenate([pe, exp[extra]]),
                          np.concatenate([pw, np.ones(len(extra), np.float32)]), x)
    return rows, data, copy_ns


def on_host(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(``x`` on the host, ns its device-to-host copy took: 0 when it is there already). The copy waits for the
    kernels that made ``x``, but ``as_numpy(expert_ids)`` has already waited for the router, which follows them."""
    if x.is_cpu:
        return x, 0
    t0 = time.perf_counter_ns()
    y = x.cpu()
    return y, time.perf_counter_ns() - t0
