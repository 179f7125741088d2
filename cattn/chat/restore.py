"""`ChatSession`'s restore path: before a turn's forward, find the prompt's longest stored prefix, drop
what overflows ``max_context`` (in the store: metadata only), and start streaming the stored KV into a
fresh `PagedCache` layer by layer, taking the session's resident layers from the store's device tier
where it has one.

`RestorePath` is a part of `ChatSession`, apart only to keep each file about one thing: it uses the
session's ``store``, ``key``, ``model``, ``layout``, ``keep_first``, ``max_context`` and its state
(``_windows``, ``_rule``, ``_history``, ``_dropped``, ``_forget``).
"""
from __future__ import annotations

import logging

import torch

from cattn.chat.window_entries import SLACK
from cattn.hf import PagedCache
from cattn.store.contract import common_prefix
from cattn.store.device.tier import DeviceTier, Resident
from cattn.store.errors import StoreFullError
from cattn.store.lease import KVLease

log = logging.getLogger(__name__)


class RestorePath:
    """`ChatSession`'s methods that bring a stored history back for a turn (see the module docstring)."""

    def _restore(self, prompt: list[int], max_new: int, droppable: int) -> tuple[list[int], PagedCache, int, int]:
        """Drop up to ``droppable`` tokens after ``keep_first`` if the turn would overflow ``max_context``
        (in the store: metadata only), then start streaming the stored KV of the prompt's longest cached
        prefix into a fresh cache. Returns the prompt after dropping, the cache, the prompt tokens it
        holds, and the tokens dropped."""
        stored = self._stored_history()
        reused = 0 if stored is None else min(common_prefix(stored.tolist(), prompt), len(prompt) - 1)
        drop = self._overflow(len(prompt), max_new, droppable)
        if drop:
            kf = self.keep_first
            # The stored history loses [kf, kf + in_store); in_store < drop only if nothing stored after kf remains.
            in_store = min(drop, reused - kf) if reused > kf else 0
            if in_store:
                if self._windows is not None:
                    self._windows.truncate(stored.tolist(), in_store, kf)
                else:
                    self.store.truncate(self.key, in_store, kf)
                stored = torch.cat([stored[:kf], stored[kf + in_store:]])
            self._dropped += drop
            prompt, reused = prompt[:kf] + prompt[kf + drop:], reused - in_store
        self._history = None if stored is None else stored.tolist()   # what the store holds now
        max_tokens = len(prompt) + max_new
        if (device := self.store.device) is None:
            # The sliding layers' pages: the window's reach of the history and the prefill, in one step.
            window_tokens = len(prompt) - reused + self.layout.page_size + (
                0 if self._windows is None else self._windows.window + 2 * SLACK)
            cache = PagedCache(self.model, max_tokens=max_tokens, window_pages=self._windows is not None,
                               window_slack=SLACK, window_tokens=window_tokens)
            return prompt, cache, self._load(cache, prompt, reused) if reused else 0, drop
        res = device.take(self.key, torch.tensor(prompt[:reused], dtype=torch.long), self.layout.num_layers) \
            if reused else None
        lay = self.layout
        if res is not None and not res.fits(lay.page_size, lay.num_kv_heads, lay.head_dim, self.model.dtype,
                                            self.model.device):
            res = None   # pages of another layout (the model was patched again, or moved): stream them all
        cache = self._device_cache(device, res, max_tokens)
        if cache.resident_layers == 0:
            res = None
        if res is not None:
            got = self._load(cache, prompt, reused, res)
            if got:
                return prompt, cache, got, drop
            cache = self._device_cache(device, None, max_tokens)   # the store lost the history: recompute
        return prompt, cache, self._load(cache, prompt, reused) if reused else 0, drop

    def _device_cache(self, device: DeviceTier, res: Resident | None, max_tokens: int) -> PagedCache:
        """A cache whose first layers are ``res``'s pages, and that can keep its first layers after the
        turn. Resident pages are released first if the device lacks the memory this turn needs, and
        all of them if the allocation still fails: the tier never causes an out-of-memory error."""
        lay = self.layout
        token_nbytes = 2 * lay.num_layers * lay.num_kv_heads * lay.head_dim * self.model.dtype.itemsize
        layer_nbytes = token_nbytes // lay.num_layers * -(-max_tokens // lay.page_size) * lay.page_size
        keep = device.layers_for(layer_nbytes, self._rule.keep())
        device.make_room(token_nbytes * max_tokens)
        try:
            return PagedCache(self.model, max_tokens=max_tokens, resident=res, keep_layers=keep,
                              headroom=device.config.headroom, window_pages=False)
        except torch.cuda.OutOfMemoryError:
            if res is not None:
                res.trim_layers(0)   # its pages go too: this turn streams every layer
            device.clear()
            torch.cuda.empty_cache()
            return PagedCache(self.model, max_tokens=max_tokens, window_pages=False)

    def _token_nbytes(self) -> int:
        lay = self.layout
        return 2 * lay.num_layers * lay.num_kv_heads * lay.head_dim * self.model.dtype.itemsize

    def _load(self, cache: PagedCache, prompt: list[int], reused: int, res: Resident | None = None) -> int:
        """Start streaming the stored KV of ``prompt[:reused]`` into ``cache``, layer by layer; returns
        the tokens it will hold: ``reused``, or 0 if the store cannot serve them (a miss: recompute).
        With ``res`` (its layers already in ``cache``), only the other layers are streamed."""
        if res is not None and res.num_layers >= self.layout.num_layers:   # fully resident: nothing to copy
            self.store.device.record_not_copied(reused * self._token_nbytes())
            return reused
        lease = self._acquire(cache, prompt, reused, split=res is None) if cache.stored_layers else None
        if lease is None and cache.stored_layers:
            return 0
        if lease is not None:
            reused = lease.num_tokens   # fewer if the rest is faster prefilled than read from disk
        tail = None
        if cache.window is not None:
            tail = self._windows.acquire(self._history, reused)
            if tail is None:     # the sliding layers' window is not there: recompute the turn
                if lease is not None:
                    lease.release()
                return 0
        try:
            first = lease or tail
            preload = self._rule.preload(first.nbytes / first.layout.num_layers, cache.kv.device,
                                         len(prompt) - reused, cache.resident_layers)
            cache.load_layerwise(lease, preload=preload, window=tail, num_tokens=reused)
        except BaseException:
            for taken in (lease, tail):
                if taken is not None:
                    taken.release()
            raise
        if res is not None:
            self.store.device.record_not_copied(lease.nbytes * res.num_layers // self.layout.num_layers)
        return reused

    def _acquire(self, cache: PagedCache, prompt: list[int], reused: int, split: bool) -> KVLease | None:
        """The stored KV of ``prompt[:reused]`` (the cache's `stored_layers`), or None (a miss). A `TieredStore`
        lends pinned pool views (no staging copy), and what is on disk streams in layer by layer; with
        ``split``, only the first tokens, as many as the disk delivers while the rest is prefilled
        (`BufferRule.disk_tokens`: all of them from a store without a disk)."""
        try:
            if split and cache.window is None:    # a window's tail entry holds the history's end only
                reused = self._rule.disk_tokens(reused, self.store.tokens_in_dram(self.key),
                                                len(prompt) - reused, self.store.disk_read_bytes_per_s)
            if not reused:
                return None
            lease = self.store.acquire(self.key, reused, layerwise=True)
        except StoreFullError as exc:
            log.warning("session %r: the store cannot bring its KV up (%s); recomputing", self.key.session, exc)
            return None
        if lease is None:
            return None
        lay, own = lease.layout, self.layout
        if ((lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.dtype) !=
                (len(cache.stored_layers), own.num_kv_heads, own.head_dim, cache.kv.dtype)
                or lease.token_ids.tolist() != prompt[:reused]):
            lease.release()
            self._forget()  # changed or corrupt since the lookup: a miss, never wrong KV
            return None
        return lease

    def _stored_history(self) -> torch.Tensor | None:
        """``[n] int64``: the token ids of the history the store holds for this session, or None."""
        return self.store.lookup(self.key) if self._windows is None else self._windows.lookup()

    def _overflow(self, prompt_len: int, max_new: int, droppable: int) -> int:
        """Tokens to drop after ``keep_first`` so the turn fits ``max_context``: whole pages, unless the
        history holds fewer. Raises ValueError if dropping all ``droppable`` history is not enough."""
        need = prompt_len + max_new - self.max_context
        if need <= 0:
            return 0
        if need > droppable:
            raise ValueError(f"the prompt ({prompt_len} tokens) and max_new_tokens ({max_new}) exceed max_context "
                             f"({self.max_context}) even without the {droppable} tokens of history after the first "
                             f"{self.keep_first}")
        return min(-(-need // self.layout.page_size) * self.layout.page_size, droppable)
