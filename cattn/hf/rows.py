"""Whole-batch operations of a `PagedCache` that generation asks for: rows reordered, repeated or
selected (beam search, contrastive search), and the page pool grown when a cache that may grow is full."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cattn.hf.cache import PagedCache


def rebuild_rows(cache: PagedCache, sources: list[int]) -> None:
    """Make row ``r`` a copy of row ``sources[r]`` (rows may repeat, vanish, or grow in number).

    Each row owns its pages, so the rows' K/V are gathered first and written back into freshly
    allocated pages: a copy of every cached token, ``O(layers * tokens)`` per call.
    """
    if sources == list(range(cache.batch_size)):
        return
    _check_one_pool(cache, "rows rearranged")
    if cache._streaming.saving:
        raise RuntimeError("PagedCache rows cannot be rearranged while a save may still read their pages: "
                           "call finish() first")
    cache._streaming.finish_load()
    lens = [cache.num_tokens(s) for s in sources]
    flat = cache.kv.flatten(2, 3)                                      # [L, 2, num_slots, Hkv, D]
    gathered = [flat.index_select(2, cache._slots_of(0, n, s)) for s, n in zip(sources, lens)]
    window = cache.window
    held = [] if window is None else [window.gather(s) for s in sources]
    for row in range(cache.batch_size):
        cache.seqs.release(row)
        if window is not None:
            window.seqs.release(row)
    ps = cache.page_size
    need = sum(-(-n // ps) for n in lens) - cache.pool.num_free
    if need > 0:
        grow_pool(cache, need)
    flat = cache.kv.flatten(2, 3)
    for row, (n, data) in enumerate(zip(lens, gathered)):
        slots = torch.tensor(cache.seqs.append_slots(row, n), dtype=torch.long, device=cache.kv.device)
        flat[:, :, slots] = data
    for row, (n, (first, data)) in enumerate(zip(lens, held)):
        window.place(row, first, n, data)
    cache._batch_size = len(sources)
    if window is not None:
        cache._bind_layers()            # placing rows may have grown the window pool
        cache._streaming.rebind(cache._k, cache._v)


def grow_pool(cache: PagedCache, min_pages: int) -> None:
    """Enlarge the pool by at least ``min_pages`` (at least doubling it, so growth is amortised).

    Raises RuntimeError while a store transfer is in flight (its copies hold views of the old pool)."""
    _check_one_pool(cache, "grown")
    extra = max(min_pages, cache.pool.num_pages)
    if not cache._streaming.idle:
        raise RuntimeError(f"PagedCache needs {min_pages} more pages but cannot grow while a store transfer "
                           "is in flight: call finish() first, or create it with a larger max_tokens")
    old = cache.kv
    kv = old.new_empty(old.shape[0], old.shape[1], old.shape[2] + extra, *old.shape[3:])
    kv[:, :, : old.shape[2]] = old
    cache.kv = kv
    cache.pool.grow(extra)
    cache._bind_layers()
    cache._streaming.rebind(cache._k, cache._v)


def _check_one_pool(cache: PagedCache, what: str) -> None:
    """Rows and growth work on the one pool tensor: a cache whose first layers have tensors of their own
    (resident layers of the device tier) is a single chat turn's, never beam-searched or grown."""
    if cache._separate:
        raise RuntimeError(f"a PagedCache with resident layers cannot have its rows {what}"
                           if what != "grown" else "a PagedCache with resident layers cannot grow its pool")
