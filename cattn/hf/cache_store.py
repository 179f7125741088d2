"""`StoreTraffic`: a `PagedCache`'s requests to the host store, checked against its pages and turned
into slots: a history streamed in layer by layer, new K/V streamed out (docs/store.md says how a
turn uses them).

It is a collaborator of the cache over two others it shares with it: the `ModelPages` whose slots
it hands out, and the `StoreStreaming` that does the copying.
"""
from __future__ import annotations

import torch

from cattn.hf.pages import ModelPages
from cattn.hf.streaming import StoreStreaming
from cattn.store.contract import EntryKey, KVEntry, KVStore, as_lease
from cattn.store.lease import KVLease


class StoreTraffic:
    """A cache's history loads and K/V saves (see the module docstring).

    Args:
        pages: the cache's pages.
        streaming: the cache's streaming, which its attention hooks drive.
    """

    def __init__(self, pages: ModelPages, streaming: StoreStreaming):
        self._pages, self._streaming = pages, streaming

    def load_layerwise(self, source: KVLease | KVEntry | None, preload: int = 0,
                       window: KVLease | KVEntry | None = None, num_tokens: int | None = None) -> None:
        """Append history to the (single, empty unless resident) sequence, copied into the pages layer by
        layer during the next forward step: layer ``l``'s attention waits for layer ``l``'s copy only.

        Args:
            source: the history's K/V, ``[layers, n, num_kv_heads, head_dim]`` pre-RoPE per segment, of
                every layer, or with window pages of the `stored_layers` only (None if there are none): a
                `KVLease` (``TieredStore.acquire``: pinned pool views, copied in place, released once
                copied) or a `KVEntry`.
            preload: layers to copy now, before the forward starts (see `cattn.store.preload_layers`).
            window: with window pages (and only then), the sliding layers' K/V of the history's last
                ``m`` tokens, ``[sliding layers, m, num_kv_heads, head_dim]``: at least what the next
                token's window reaches (``min(n, window - 1)`` tokens), at most ``n``.
            num_tokens: the history's ``n``; needed only without ``source``.

        Token ``i`` lands at ``num_tokens() + i``; with resident layers, ``source`` must be the tokens
        they hold (ValueError otherwise), and only the other layers are copied. Raises ValueError if a
        layout or dtype differs from the pages', `PoolExhaustedError` if the pages cannot hold it;
        nothing changes then.
        """
        pages = self._pages
        lease, tail = as_lease(source, "source"), as_lease(window, "window")
        if (tail is None) != (pages.window is None):
            raise ValueError("window: the sliding layers' last tokens come with a cache whose sliding layers have "
                             "pages of their own (window_pages=True), and only then")
        if (lease is None) != (not pages.stored_layers):
            raise ValueError("source: the history of the layers that keep every token "
                             f"({len(pages.stored_layers)} of them here), and None only if there are none")
        if lease is not None:
            self._check_layout("source", lease, len(pages.stored_layers))
            num_tokens = lease.num_tokens if num_tokens is None else num_tokens
            if num_tokens != lease.num_tokens:
                raise ValueError(f"num_tokens: {num_tokens}, but source holds {lease.num_tokens} tokens")
        elif not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens: the history's length (a positive int) is needed without a source, "
                             f"got {num_tokens!r}")
        if tail is not None:
            self._check_layout("window", tail, len(pages.window.layers))
            n, m = num_tokens, tail.num_tokens
            if not min(n, pages.window.window - 1) <= m <= n:
                raise ValueError(f"window: {m} tokens, but the next token's window of {pages.window.window} needs "
                                 f"the last {min(n, pages.window.window - 1)} of the {n} (and at most {n})")
        pages.check_single("load_layerwise")
        if self._streaming.load_in_flight:
            raise RuntimeError("a history load is already in flight: run a forward step or finish() first")
        if tail is not None:
            if pages.num_tokens(0):
                raise ValueError("load_layerwise: a cache with window pages takes a history only while empty")
            slots = pages.append(0, num_tokens, transfer_in_flight=not self._streaming.idle)
            parts = [(tail, list(pages.window.layers), pages.start_window(0, num_tokens - tail.num_tokens,
                                                                          num_tokens))]
            if lease is not None:
                parts.insert(0, (lease, pages.stored_layers, slots))
            self._streaming.load(parts, preload_below=preload)
            return
        n, r = lease.num_tokens, pages.resident_layers
        if pages.resident_tokens:
            if n != pages.resident_tokens:
                raise ValueError(f"source: {n} tokens, but the resident layers hold {pages.resident_tokens}")
            slots = pages.fill_resident()
            # Only the layers that are not resident stream in: a lease over their slices (no copy).
            lease = lease.without_first_layers(r)
        else:
            slots = pages.append(0, n, transfer_in_flight=not self._streaming.idle)
            r = 0
        self._streaming.load([(lease, list(range(r, pages.layout.num_layers)), slots)], preload_below=r + preload)

    def save_next_step(self, store: KVStore, key: EntryKey, token_ids: torch.Tensor, start: int) -> None:
        """Save the next forward step's new K/V to ``store`` layer by layer, as each layer writes it.

        Args:
            store: with ``begin_save`` (`TieredStore`) the copies land in its pinned pool; any other
                `KVStore` gets them through ``save`` after the last layer.
            key: the session; ``start``: its tokens already stored (the step's tokens follow them).
            token_ids: ``[m] int64``, the step's new tokens (a single sequence).

        If the store cannot take them when the step starts (`StoreFullError`), or the step's tokens
        are not ``m``, nothing is saved and `StoreStreaming.step_saved` stays False.
        """
        self._pages.check_single("save_next_step")
        self._check_stores("save_next_step")
        self._streaming.save_next_step(store, key, token_ids, start, self._pages.stored_layers)

    def save_tokens(self, store: KVStore, key: EntryKey, token_ids: torch.Tensor, start: int, first: int) -> None:
        """Save the K/V of the sequence's tokens ``[first, first + m)`` (the `stored_layers` at once: decode
        tokens at the end of a turn) as ``key``'s tokens after its first ``start``; ``token_ids [m] int64``.
        Raises `StoreFullError` if the store has no room."""
        self._pages.check_single("save_tokens")
        self._check_stores("save_tokens")
        self._streaming.finish_load()
        self._streaming.save_tokens(store, key, token_ids, start, self._pages.slots(first, first + token_ids.numel()),
                                    self._pages.stored_layers)

    def save_window(self, store: KVStore, key: EntryKey, token_ids: torch.Tensor) -> int:
        """With window pages: save the sliding layers' K/V of the tokens the next token's window reaches
        (and the slack), ``[first_held, n)``, as ``key``'s whole entry (``token_ids [n] int64`` are the
        sequence's; pages before them are given back first). Returns ``first_held``.
        Raises `StoreFullError` if the store has no room."""
        pages = self._pages
        pages.check_single("save_window")
        if pages.window is None:
            raise ValueError("save_window: this cache has no window pages (window_pages=False keeps every token "
                             "of every layer: save_tokens saves them all)")
        if token_ids.numel() != pages.num_tokens(0):
            raise ValueError(f"token_ids: {token_ids.numel()} ids for {pages.num_tokens(0)} cached tokens")
        self._streaming.finish_load()
        pages.window.give_back(0)     # what the next token's window cannot reach is not saved either
        first = pages.first_held(0)
        self._streaming.save_tokens(store, key, token_ids[first:].cpu(), 0,
                                    pages.window.slots(0, first, pages.num_tokens(0)), list(pages.window.layers))
        return first

    # ---- internals -----------------------------------------------------------------------------
    def _check_layout(self, what: str, lease: KVLease, num_layers: int) -> None:
        lay, pages = lease.layout, self._pages
        expect = (num_layers, pages.layout.num_kv_heads, pages.layout.head_dim, pages.dtype)
        if (lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.dtype) != expect:
            raise ValueError(f"{what}: history of layout {lay} does not fit this cache's (num_layers, num_kv_heads, "
                             f"head_dim, dtype) = {expect}")

    def _check_stores(self, what: str) -> None:
        if not self._pages.stored_layers:
            raise ValueError(f"{what}: every layer of this model slides, so with window pages no layer holds every "
                             "token for the store's entry to name: create it with PagedCache(..., window_pages=False)")
