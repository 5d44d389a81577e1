"""Inference state of the language models: what a forward pass with a cache reads and writes.

One module for both families (gpt-fast keeps its KV cache in a few lines beside the model; here the
Transformer and the RNN share the slot bookkeeping). Built by the model (`model.make_cache`,
`model.make_slot_cache`), driven by clusterlm.generate.engine:

- KVCache: keys and values of every Transformer layer for B sequences that advance together.
- SlotKVCache: n_slots independent sequences, each at its own position (continuous batching); a
  forward pass takes `cache.rows(slots)`, and SlotKV is one layer's write + read of those rows.
- RNNState / RNNSlotState: the LSTM/GRU recurrent state, same two shapes of use.

Shapes: B batch, N slots, L layers, K kv heads, S cached positions, Hd head dim, D model dim.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for `batch_size` sequences of up to `max_len` tokens.

    `pos` counts the tokens already stored; a forward pass with this cache consumes its T tokens
    at positions pos .. pos+T-1 and advances pos by T.
    """

    def __init__(self, layer_keys: list[str], batch_size: int, max_len: int, kv_heads: int, head_dim: int, *,
                 device: torch.device | str | None, dtype: torch.dtype) -> None:
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"KV cache needs batch_size >= 1 and max_len >= 1, got {batch_size} and {max_len}")
        shape = (batch_size, kv_heads, max_len, head_dim)  # (B, K, S, Hd): the layout SDPA reads
        self.k = {key: torch.zeros(shape, device=device, dtype=dtype) for key in layer_keys}
        self.v = {key: torch.zeros(shape, device=device, dtype=dtype) for key in layer_keys}
        self.batch_size = batch_size
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        """Forget the stored tokens (entries past pos are never read, so nothing is cleared)."""
        self.pos = 0


class SlotRows:
    """A batch view of a SlotKVCache (or an RNNSlotState): row b -> slot `slots[b]`."""

    def __init__(self, cache: SlotPool, slots: torch.Tensor) -> None:
        self.cache = cache
        self.slots = slots  # (B,) long
        self.batch_size = int(slots.numel())


class SlotPool:
    """Slot bookkeeping shared by the continuous-batching caches (SlotKVCache, RNNSlotState): `pos`
    (n_slots,) tokens stored per slot, a stack of free slots, and `rows()`, the handle a forward
    pass takes. Subclasses clear a slot's own tensors in `_clear`."""

    def __init__(self, n_slots: int, max_len: int, device: torch.device | str | None) -> None:
        self.n_slots = n_slots
        self.max_len = max_len
        self.pos = torch.zeros(n_slots, dtype=torch.long, device=device)  # (N,)
        self._free = list(range(n_slots - 1, -1, -1))  # a stack: lowest slot handed out first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def _clear(self, slot: int) -> None:
        """Reset what the slot stores beyond its position (nothing for a KV cache: entries past
        pos are never read)."""

    def alloc(self) -> int:
        """A free slot with nothing stored; ValueError when all n_slots are in use."""
        if not self._free:
            raise ValueError(f"all {self.n_slots} cache slots are in use; free one first")
        slot = self._free.pop()
        self._clear(slot)
        self.pos[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not in use (slots 0..{self.n_slots - 1})")
        self._free.append(slot)

    def rows(self, slots: list[int]) -> SlotRows:
        """The handle a forward pass takes: row b of the batch is slot slots[b]."""
        if len(set(slots)) != len(slots) or not slots:
            raise ValueError(f"slots {slots} must be distinct and non-empty")
        return SlotRows(self, torch.tensor(slots, dtype=torch.long, device=self.pos.device))


class SlotKVCache(SlotPool):
    """KV cache for continuous batching: `n_slots` independent sequences, each at its own position.

    `pos` is a LongTensor (n_slots,) counting each slot's stored tokens. `alloc()` hands out a
    free slot (its pos reset to 0) and `free(slot)` returns it. A forward pass takes
    `cache.rows(slots)`: the T tokens of row b go to slot slots[b] at positions
    pos[slot] .. pos[slot]+T-1, and each row attends only to its own slot's stored keys.
    """

    def __init__(self, layer_keys: list[str], n_slots: int, max_len: int, kv_heads: int, head_dim: int, *,
                 device: torch.device | str | None, dtype: torch.dtype) -> None:
        if n_slots < 1 or max_len < 1:
            raise ValueError(f"slot KV cache needs n_slots >= 1 and max_len >= 1, got {n_slots} and {max_len}")
        shape = (n_slots, kv_heads, max_len, head_dim)  # (N, K, S, Hd)
        self.k = {key: torch.zeros(shape, device=device, dtype=dtype) for key in layer_keys}
        self.v = {key: torch.zeros(shape, device=device, dtype=dtype) for key in layer_keys}
        super().__init__(n_slots, max_len, device)


class SlotKV:
    """One layer's slot-cache write + read for a batch at per-row positions (see SlotKVCache).
    `length` and `mask` are the same for every layer of a forward pass: made once by `for_batch`."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                 full: bool, length: int, mask: torch.Tensor) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache  # (N, K, S, Hd)
        self.slots, self.positions = slots, positions  # (B,), (B, T)
        self.full = full  # slots == 0..N-1 in order: read the cache without a gather
        self.length, self.mask = length, mask  # L, (B, 1, T, L)

    @staticmethod
    def for_batch(positions: torch.Tensor) -> tuple[int, torch.Tensor]:
        """L, the longest row's length after the write, and the boolean mask (B, 1, T, L): query t of
        row b sees key j iff j <= positions[b, t] (its own past and itself; stale entries of shorter
        rows are hidden)."""
        L = int(positions[:, -1].max()) + 1
        keys = torch.arange(L, device=positions.device)
        return L, keys[None, None, None, :] <= positions[:, None, :, None]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v (B, K, T, Hd) -> keys and values (B, K, L, Hd) of each row's slot, and the mask."""
        L = self.length
        # advanced indices around a slice put their dims first: the target is (B, T, K, Hd)
        self.k_cache[self.slots[:, None], :, self.positions] = k.transpose(1, 2)
        self.v_cache[self.slots[:, None], :, self.positions] = v.transpose(1, 2)
        if self.full:
            k_all, v_all = self.k_cache[:, :, :L], self.v_cache[:, :, :L]  # (B, K, L, Hd) views
        else:
            k_all, v_all = self.k_cache[self.slots, :, :L], self.v_cache[self.slots, :, :L]  # (B, K, L, Hd)
        return k_all, v_all, self.mask


class RNNState:
    """Recurrent state of `batch_size` sequences: h (and c for LSTM), each (n_layers, B, D).

    `pos` counts the tokens consumed so far. An RNN has no context limit, so `max_len` is
    recorded only for callers that budget by it.
    """

    def __init__(self, lstm: bool, n_layers: int, batch_size: int, dim: int, max_len: int, *,
                 device: torch.device | str | None, dtype: torch.dtype) -> None:
        if batch_size < 1:
            raise ValueError(f"RNN state needs batch_size >= 1, got {batch_size}")
        self._shape = (n_layers, batch_size, dim)  # (L, B, D)
        self._lstm = lstm
        self.batch_size = batch_size
        self.max_len = max_len
        self.h = torch.zeros(self._shape, device=device, dtype=dtype)
        self.c = torch.zeros(self._shape, device=device, dtype=dtype) if lstm else None
        self.pos = 0

    def reset(self) -> None:
        self.h = torch.zeros_like(self.h)
        if self.c is not None:
            self.c = torch.zeros_like(self.c)
        self.pos = 0

    def reorder(self, rows: torch.Tensor) -> None:
        """Row b takes the state of row rows[b] (beam search follows its hypotheses, generate/beam.py)."""
        self.h = self.h.index_select(1, rows)  # (L, B, D)
        if self.c is not None:
            self.c = self.c.index_select(1, rows)


class RNNSlotState(SlotPool):
    """Recurrent state of `n_slots` independent sequences for continuous batching: h (and c for
    LSTM), each (n_layers, n_slots, D), and `pos` (n_slots,) tokens consumed per slot. Same slot API
    as SlotKVCache: alloc() (state zeroed), free(slot), rows(slots) for forward."""

    def __init__(self, lstm: bool, n_layers: int, n_slots: int, dim: int, max_len: int, *,
                 device: torch.device | str | None, dtype: torch.dtype) -> None:
        if n_slots < 1:
            raise ValueError(f"RNN slot state needs n_slots >= 1, got {n_slots}")
        shape = (n_layers, n_slots, dim)  # (L, N, D)
        super().__init__(n_slots, max_len, device)  # max_len: no context limit; kept for budgeting
        self.h = torch.zeros(shape, device=device, dtype=dtype)
        self.c = torch.zeros(shape, device=device, dtype=dtype) if lstm else None

    def _clear(self, slot: int) -> None:
        self.h[:, slot] = 0
        if self.c is not None:
            self.c[:, slot] = 0
