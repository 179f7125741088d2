"""The host store's side of a `PagedCache`: its history streamed in layer by layer and its new K/V
streamed out (`cattn.hf.streaming` does the copying; docs/store.md says how a turn uses them).

`StoreTraffic` is a part of `PagedCache`, apart only to keep each file about one thing: it uses the
cache's pages (``seqs``, ``window``, ``_k``/``_v``) and its `StoreStreaming` (``_streaming``).
"""
from __future__ import annotations

from concurrent.futures import Future

import torch

from cattn.store.contract import EntryKey, KVEntry, KVStore
from cattn.store.device.tier import Resident
from cattn.store.layout import KVLayout
from cattn.store.lease import KVLease, Segment


class StoreTraffic:
    """`PagedCache`'s methods for the host store (see the module docstring)."""

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
        layout or dtype differs from the cache's, `PoolExhaustedError` if the pages cannot hold it;
        nothing changes then.
        """
        lease = KVLease.from_entry(source) if isinstance(source, KVEntry) else source
        tail = KVLease.from_entry(window) if isinstance(window, KVEntry) else window
        if (tail is None) != (self.window is None):
            raise ValueError("window: the sliding layers' last tokens come with a cache whose sliding layers have "
                             "pages of their own (window_pages=True), and only then")
        if (lease is None) != (not self.stored_layers):
            raise ValueError("source: the history of the layers that keep every token "
                             f"({len(self.stored_layers)} of them here), and None only if there are none")
        if lease is not None:
            self._check_layout("source", lease, len(self.stored_layers))
            num_tokens = lease.num_tokens if num_tokens is None else num_tokens
            if num_tokens != lease.num_tokens:
                raise ValueError(f"num_tokens: {num_tokens}, but source holds {lease.num_tokens} tokens")
        elif not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens: the history's length (a positive int) is needed without a source, "
                             f"got {num_tokens!r}")
        if tail is not None:
            self._check_layout("window", tail, len(self.window.layers))
            n, m = num_tokens, tail.num_tokens
            if not min(n, self.window.window - 1) <= m <= n:
                raise ValueError(f"window: {m} tokens, but the next token's window of {self.window.window} needs "
                                 f"the last {min(n, self.window.window - 1)} of the {n} (and at most {n})")
        self._check_single("load_layerwise")
        if self._streaming.load_in_flight:
            raise RuntimeError("a history load is already in flight: run a forward step or finish() first")
        if tail is not None:
            if self.num_tokens(0):
                raise ValueError("load_layerwise: a cache with window pages takes a history only while empty")
            self._reserve({0: num_tokens})
            slots = torch.tensor(self.seqs.append_slots(0, num_tokens), dtype=torch.long, device=self.kv.device)
            window_slots = self.window.start_at(0, num_tokens - tail.num_tokens, num_tokens)
            self._bind_layers()           # the window pool may have grown
            self._streaming.rebind(self._k, self._v, saves_read_others=True)
            self._columns = self.num_tokens(0)
            parts = [(tail, list(self.window.layers), window_slots)]
            if lease is not None:
                parts.insert(0, (lease, self.stored_layers, slots))
            self._streaming.load(parts, preload_below=preload)
            return
        lay = lease.layout
        n, r = lease.num_tokens, self.resident_layers
        if self._resident_tokens:
            if n != self._resident_tokens:
                raise ValueError(f"source: {n} tokens, but the resident layers hold {self._resident_tokens}")
            slots = self._slots_of(0, n)
            self._resident_tokens = 0
            # Only the layers that are not resident stream in: a lease over their slices (no copy).
            lease = KVLease(lease.token_ids, [Segment(s.start, s.k[r:], s.v[r:]) for s in lease.segments],
                            KVLayout(lay.num_layers - r, lay.num_kv_heads, lay.head_dim, lay.dtype),
                            on_release=lease.release, on_transfer=lease.record_transfer)
        else:
            self._reserve({0: n})
            slots = torch.tensor(self.seqs.append_slots(0, n), dtype=torch.long, device=self.kv.device)
            self._columns = self.num_tokens(0)
            r = 0
        self._streaming.load([(lease, list(range(r, self.layout.num_layers)), slots)], preload_below=r + preload)

    def take_resident(self, token_ids: torch.Tensor, num_layers: int) -> Resident:
        """After the turn (`finish`): the first ``num_layers`` layers' pages (at most those with tensors
        of their own) as a `Resident` of the sequence's tokens ``token_ids [n] int64`` (``n`` =
        `num_tokens`), for `DeviceTier.put`. The cache must not be used afterwards."""
        self._check_single("take_resident")
        if token_ids.numel() != self.num_tokens(0):
            raise ValueError(f"token_ids: {token_ids.numel()} ids for {self.num_tokens(0)} cached tokens")
        keep = min(num_layers, self._separate)
        res = Resident(token_ids.cpu(), list(self.seqs.seqs[0].pages), self._k[:keep], self._v[:keep])
        self._k, self._v = [], []   # handed over: any later use fails loudly
        return res

    def save_next_step(self, store: KVStore, key: EntryKey, token_ids: torch.Tensor, start: int) -> None:
        """Save the next forward step's new K/V to ``store`` layer by layer, as each layer writes it.

        Args:
            store: with ``begin_save`` (`TieredStore`) the copies land in its pinned pool; any other
                `KVStore` gets them through ``save`` after the last layer.
            key: the session; ``start``: its tokens already stored (the step's tokens follow them).
            token_ids: ``[m] int64``, the step's new tokens (a single sequence).

        If the store cannot take them when the step starts (`StoreFullError`), or the step's tokens
        are not ``m``, nothing is saved and `step_saved` stays False.
        """
        self._check_single("save_next_step")
        self._check_stores("save_next_step")
        self._streaming.save_next_step(store, key, token_ids, start, self.stored_layers)

    @property
    def step_saved(self) -> bool:
        """The last `save_next_step` request was taken up: the step's new K/V go to the store."""
        return self._streaming.step_saved

    def save_tokens(self, store: KVStore, key: EntryKey, token_ids: torch.Tensor, start: int, first: int) -> None:
        """Save the K/V of the sequence's tokens ``[first, first + m)`` (the `stored_layers` at once: decode
        tokens at the end of a turn) as ``key``'s tokens after its first ``start``; ``token_ids [m] int64``.
        Raises `StoreFullError` if the store has no room."""
        self._check_single("save_tokens")
        self._check_stores("save_tokens")
        self._streaming.finish_load()
        self._streaming.save_tokens(store, key, token_ids, start, self._slots_of(first, first + token_ids.numel()),
                                    self.stored_layers)

    def save_window(self, store: KVStore, key: EntryKey, token_ids: torch.Tensor) -> int:
        """With window pages: save the sliding layers' K/V of the tokens the next token's window reaches
        (and the slack), ``[first_held, n)``, as ``key``'s whole entry (``token_ids [n] int64`` are the
        sequence's; pages before them are given back first). Returns ``first_held``.
        Raises `StoreFullError` if the store has no room."""
        self._check_single("save_window")
        if self.window is None:
            raise ValueError("save_window: this cache has no window pages (window_pages=False keeps every token "
                             "of every layer: save_tokens saves them all)")
        if token_ids.numel() != self.num_tokens(0):
            raise ValueError(f"token_ids: {token_ids.numel()} ids for {self.num_tokens(0)} cached tokens")
        self._streaming.finish_load()
        self.window.give_back(0)     # what the next token's window cannot reach is not saved either
        first = self.first_held(0)
        self._streaming.save_tokens(store, key, token_ids[first:].cpu(), 0,
                                    self.window.slots(0, first, self.num_tokens(0)), list(self.window.layers))
        return first

    @property
    def stored_layers(self) -> list[int]:
        """The layers whose every token this cache holds, what `save_next_step`, `save_tokens` and
        `load_layerwise`'s ``source`` cover: all, or with window pages the global (non-sliding) ones."""
        every = range(self.layout.num_layers)
        return list(every) if self.window is None else [i for i in every if i not in self.window.layers]

    def finish(self) -> list[Future]:
        """Done with the store for now: complete the history load (releasing its lease), order the current
        stream after every save's copies (so the pages may be freed or reused), and hand over the saves'
        futures (each: None, or the commit's exception). The turn itself never waits for its saves."""
        return self._streaming.finish()

    def load_seconds(self) -> tuple[float, float]:
        """``(hidden, exposed)`` seconds of the last completed history load (after `finish`)."""
        return self._streaming.load_seconds()

    def layer_seconds(self) -> tuple[int, float] | None:
        """``(new tokens, seconds per layer)`` measured in the last prefill step (a step of more than one
        new token per sequence): the median time from one layer's history wait to the next's, i.e. one
        layer's compute without load stalls. None if not measured (a one-layer model, no prefill yet)."""
        return self._streaming.layer_seconds()

    # ---- internals -----------------------------------------------------------------------------
    def _check_layout(self, what: str, lease: KVLease, num_layers: int) -> None:
        lay = lease.layout
        expect = (num_layers, self.layout.num_kv_heads, self.layout.head_dim, self.kv.dtype)
        if (lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.dtype) != expect:
            raise ValueError(f"{what}: history of layout {lay} does not fit this cache's (num_layers, num_kv_heads, "
                             f"head_dim, dtype) = {expect}")

    def _check_stores(self, what: str) -> None:
        if not self.stored_layers:
            raise ValueError(f"{what}: every layer of this model slides, so with window pages no layer holds every "
                             "token for the store's entry to name: create it with PagedCache(..., window_pages=False)")
