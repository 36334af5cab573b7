"""The state one forward pass works on: the KV cache of a sequence, the step (positions, cache, experts backend,
rotary tables, masks) and the attention masks.

Invariants: ``KVCache.length`` positions are valid in every layer; a step's masks are built once per step and
window, not once per layer. Shapes as in ``common.py``: B batch, T new tokens, S cached + new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ekmesh.infer.experts import ExpertsBackend


class KVCache:
    """Per-layer key/value buffers. ``length`` tokens are valid in every layer.

    Dynamic (default): buffers grow by doubling and attention sees exactly ``length`` positions.
    Static (``max_len`` set): buffers have ``max_len`` slots from the start, writes go to the step's positions
    (a device tensor, so a decode step can be captured in a CUDA graph) and attention sees every slot with a
    causal mask hiding the ones not yet written. A caller may write a static step itself into ``static_buffers``
    (what ``update`` returns), e.g. fused with computing the keys.
    A family may cache one tensor per layer instead of a key and a value (``update_single``; DeepSeek's MLA keeps
    its latent and rotary key there); ``truncate`` and both modes work the same for it.
    """

    def __init__(self, num_layers: int, max_len: int | None = None) -> None:
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0
        self.max_len = max_len
        self.positions: torch.Tensor | None = None  # [T] positions of the step being computed

    @property
    def static(self) -> bool:
        return self.max_len is not None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores k [B, Hkv, T, dk], v [B, Hkv, T, dv] for this step; returns keys/values [B, Hkv, S, d*]."""
        return self._store(self.k, layer, k), self._store(self.v, layer, v)

    def update_single(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Stores x [B, h, T, d], a layer's only cached tensor, for this step; returns [B, h, S, d]."""
        return self._store(self.k, layer, x)

    def static_buffers(self, layer: int, k: torch.Tensor, v: torch.Tensor, k_dtype: torch.dtype | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """A static cache's key and value buffers [B, Hkv, max_len, d*] of ``layer``, for a step whose keys are
        shaped as k [B, Hkv, T, dk] (of dtype ``k_dtype`` when given: keys not computed yet) and values as
        v [B, Hkv, T, dv]; allocated (zeros) when absent or held for another batch size, as ``update`` does. For a
        caller that writes the step's positions itself (the fused norm/RoPE of ``attention.Attention``)."""
        return (self._static_buffer(self.k, layer, k, k.dtype if k_dtype is None else k_dtype),
                self._static_buffer(self.v, layer, v, v.dtype))

    def _static_buffer(self, buffers: list[torch.Tensor | None], layer: int, x: torch.Tensor, dtype: torch.dtype
                       ) -> torch.Tensor:
        assert self.max_len is not None
        buf = buffers[layer]
        if buf is None or buf.shape[0] != x.shape[0]:
            buf = buffers[layer] = x.new_zeros(x.shape[0], x.shape[1], self.max_len, x.shape[3], dtype=dtype)
        return buf

    def _store(self, buffers: list[torch.Tensor | None], layer: int, x: torch.Tensor) -> torch.Tensor:
        if self.max_len is not None:
            slots = self._static_buffer(buffers, layer, x, x.dtype)
            assert self.positions is not None
            slots.index_copy_(2, self.positions, x)
            return slots
        buf = buffers[layer]
        start, end = self.length, self.length + x.shape[2]
        if buf is None or buf.shape[2] < end or buf.shape[0] != x.shape[0]:
            cap = max(end, 2 * (buf.shape[2] if buf is not None else 0), 16)
            grown = x.new_zeros(x.shape[0], x.shape[1], cap, x.shape[3])
            if buf is not None and buf.shape[0] == x.shape[0]:
                grown[:, :, :start] = buf[:, :, :start]
            buf = buffers[layer] = grown
        buf[:, :, start:end] = x
        return buf[:, :, :end]

    def bytes_per_token(self) -> int:
        """Bytes one position of one sequence takes in this cache, over every layer (what context costs)."""
        return sum(t.shape[1] * t.shape[3] * t.element_size() for t in (*self.k, *self.v) if t is not None)

    def truncate(self, length: int) -> None:
        """Forgets every position at or after ``length`` (e.g. rejected speculative tokens)."""
        self.length = min(self.length, length)


@dataclass
class Step:
    """What every layer needs for one forward pass over T new tokens."""

    positions: torch.Tensor  # [T] absolute positions of the new tokens
    cache: KVCache
    experts: ExpertsBackend | None
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> cos, sin [T, dim]
    masks: dict[tuple[int, int | None, int], torch.Tensor | None] = field(default_factory=dict)

    def mask(self, s: int, window: int | None, repeat: int = 1) -> torch.Tensor | None:
        """The attention mask [T, S] for keys returned by ``cache.update`` (None when every key is visible), its
        rows repeated ``repeat`` times ([repeat*T, S], for ``attend_grouped``). Built once per step, window and
        repeat, not once per layer."""
        key = (s, window, repeat)
        if key not in self.masks:
            if repeat == 1:
                self.masks[key] = attention_mask(self.positions, s, window, always=self.cache.static)
            else:
                base = self.mask(s, window)
                self.masks[key] = None if base is None else base.repeat(repeat, 1)  # [repeat*T, S]
        return self.masks[key]


def attention_mask(positions: torch.Tensor, s: int, window: int | None, always: bool = False
                   ) -> torch.Tensor | None:
    """Bool mask [T, S], True where a query may attend: causal, and within ``window`` keys when set.

    None (no mask needed) for one query over exactly its visible keys, unless ``always``.
    """
    t = positions.shape[0]
    if not always and t == 1 and (window is None or s <= window):
        return None
    kpos = torch.arange(s, device=positions.device)[None, :]  # [1, S]
    qpos = positions[:, None]  # [T, 1]
    allowed = kpos <= qpos
    if window is not None:
        allowed = allowed & (kpos > qpos - window)
    return allowed
