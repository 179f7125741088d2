"""`ModelPages`: the K/V pages that a patched model's layers share, for a batch of sequences.

Row ``b`` of the model's input is sequence ``b`` of one `PagedSequences`, whose page table every
layer shares, so a forward step's slots and block table are built once (`begin_step`) for all of
them. Per layer the K/V, pre-RoPE, live in one of three places:

- layers ``[0, num_separate)``: tensors of their own, ``[capacity, page_size, Hkv, D]`` each, that
  the device tier can keep after the turn (`take_resident`) and hand to the next turn's pages
  (``resident``; `cattn.hf.resident_layers`);
- sliding-window layers, with window pages: a page space of their own that holds only what their
  window can still reach (`cattn.hf.window.WindowPages`);
- every other layer: the main pool tensor ``kv`` ``[layers, 2, num_pages, page_size, Hkv, D]``.

Slots past a sequence's length are never read, so no tensor is initialised. Store transfers
(`cattn.hf.streaming`) copy into and out of views of these tensors: while one is in flight a
tensor must not be replaced, so the methods that may grow one are told what is in flight.
"""
from __future__ import annotations

import dataclasses
import itertools

import torch

from cattn.hf.resident_layers import check_resident, separate_layers
from cattn.hf.step import ForwardStep, PagedLayout
from cattn.hf.window import WindowPages
from cattn.ops import check_batch
from cattn.paged import PagedSequences, PagePool, PoolExhaustedError, SequencePages
from cattn.store.device.tier import Resident
from cattn.working_kv import StepLens


class ModelPages:
    """The pages of ``batch_size`` sequences over every layer of a patched model (see the module docstring).

    Args:
        layout: the patched model's `PagedLayout`.
        batch_size: sequences, one per row of the model's input.
        max_tokens: capacity per sequence on average: the main pool holds
            ``batch_size * ceil(max_tokens / page_size)`` pages.
        dtype, device: of every K/V tensor.
        resident, keep_layers, headroom, grow, window_pages, window_slack, window_tokens: as `cattn.hf.PagedCache`'s.

    Attributes:
        layout, max_tokens, grow: as given.
        batch_size: rows (changed by `rebuild_rows`).
        pool, seqs: the shared `PagePool` and `PagedSequences` (sequence ``b`` is row ``b``).
        kv: the main pool, ``[layers, 2, num_pages, page_size, Hkv, D]``: K (0) and V (1) of each layer that
            has neither a tensor of its own nor window pages, in layer order.
        window: the sliding layers' `WindowPages`, or None (every layer keeps every token).
        num_separate: layers ``[0, num_separate)`` have tensors of their own.
        resident_layers: how many of those came from ``resident``.
        grown_bytes: bytes copied device-to-device because ``resident``'s tensors were too small.
        edits: counts every change but a forward step's new tokens (appends, loads, truncation, crop, reset,
            rows rebuilt): a copy of the pages (`cattn.working_kv.WorkingKV`) is stale once it moved.
    """

    def __init__(self, layout: PagedLayout, *, batch_size: int, max_tokens: int, dtype: torch.dtype,
                 device: torch.device | str, resident: Resident | None = None, keep_layers: int = 0,
                 headroom: float = 0.5, grow: bool = False, window_pages: bool = True, window_slack: int = 0,
                 window_tokens: int | None = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if not isinstance(keep_layers, int) or not 0 <= keep_layers <= layout.num_layers:
            raise ValueError(f"keep_layers must be an int in [0, {layout.num_layers}], got {keep_layers!r}")
        if resident is not None and batch_size != 1:
            raise ValueError("resident layers need a PagedCache of batch_size 1")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.layout, self.max_tokens, self.grow, self.batch_size = layout, max_tokens, grow, batch_size
        num_pages = batch_size * -(-max_tokens // layout.page_size)
        if resident is not None:
            num_pages = max(num_pages, max(resident.pages, default=-1) + 1)
            check_resident(resident, layout, dtype, device)
        self.pool = PagePool(num_pages, layout.page_size)
        self.seqs = PagedSequences(self.pool)
        # Resident layers, and layers that may become resident, cannot share the pool tensor: the device
        # tier keeps them after the turn.
        self.num_separate = max(keep_layers, 0 if resident is None else resident.num_layers)
        windowed = window_pages and self.num_separate == 0 and any(w is not None for w in layout.sliding_windows)
        if not isinstance(window_slack, int) or window_slack < 0:
            raise ValueError(f"window_slack must be an int >= 0, got {window_slack!r}")
        self.window = WindowPages(layout, batch_size, max_tokens, dtype, device, window_slack, window_tokens) \
            if windowed else None
        main_layers = layout.num_layers - self.num_separate - (len(self.window.layers) if windowed else 0)
        self.kv = torch.empty(main_layers, 2, num_pages, layout.page_size, layout.num_kv_heads, layout.head_dim,
                              dtype=dtype, device=device)
        self.resident_layers = 0 if resident is None else resident.num_layers
        self._own_k, self._own_v, self.grown_bytes = separate_layers(layout, resident, self.num_separate, num_pages,
                                                                     headroom, dtype, device)
        self._bind_layers()
        for row in range(batch_size):
            self.seqs.append_slots(row, 0)
        self.edits = 0
        self._resident_tokens = 0    # tokens held by the resident layers that the other layers still lack
        if resident is not None and resident.num_tokens:
            self.pool.claim(resident.pages)
            self.seqs.seqs[0] = SequencePages(list(resident.pages), resident.num_tokens)
            if self.resident_layers < layout.num_layers:
                self._resident_tokens = resident.num_tokens

    # ---- what the pages hold -------------------------------------------------------------------
    @property
    def page_size(self) -> int:
        return self.layout.page_size

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    @property
    def device(self) -> torch.device:
        return self.kv.device

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_cache, v_cache)`` of one layer, each ``[num_pages, page_size, num_kv_heads, head_dim]``
        (its own tensor, a view of ``kv``, or of the window pages')."""
        return self._k[layer_idx], self._v[layer_idx]

    def num_tokens(self, row: int = 0) -> int:
        """Tokens of sequence ``row``."""
        return self.seqs.seqs[row].num_tokens

    @property
    def resident_tokens(self) -> int:
        """Tokens of row 0 that only the resident layers hold so far (0 once `fill_resident` handed them out)."""
        return self._resident_tokens

    def slots(self, start: int, end: int, row: int = 0) -> torch.Tensor:
        """``[end - start] int64``: the slots of tokens ``[start, end)`` of sequence ``row`` in every layer
        but the sliding ones with window pages (`WindowPages.slots` has theirs)."""
        if not 0 <= start <= end <= self.num_tokens(row):
            raise ValueError(f"token range [{start}, {end}) is outside the {self.num_tokens(row)} cached tokens")
        pages, ps = self.seqs.seqs[row].pages, self.page_size
        return torch.tensor([pages[i // ps] * ps + i % ps for i in range(start, end)], dtype=torch.long,
                            device=self.device)

    def first_held(self, row: int = 0) -> int:
        """The first token of sequence ``row`` whose K/V every layer still holds: 0, unless sliding
        layers gave back the pages their window passed."""
        return 0 if self.window is None else self.window.first_held(row)

    @property
    def stored_layers(self) -> list[int]:
        """The layers that hold every token: all, or with window pages the global (non-sliding) ones."""
        every = range(self.layout.num_layers)
        return list(every) if self.window is None else [i for i in every if i not in self.window.layers]

    @property
    def nbytes_per_token(self) -> int:
        """Bytes of K and V of one token over all layers."""
        lay = self.layout
        return 2 * lay.num_layers * lay.num_kv_heads * lay.head_dim * self.kv.element_size()

    def held_nbytes(self, row: int = 0) -> int:
        """Bytes of K and V that sequence ``row`` holds over all layers (sliding layers with window pages
        hold only their window's tokens)."""
        n, per_layer = self.num_tokens(row), self.nbytes_per_token // self.layout.num_layers
        sliding = 0 if self.window is None else len(self.window.layers) * (n - self.first_held(row))
        return per_layer * (len(self.stored_layers) * n + sliding)

    def check_single(self, what: str) -> None:
        """ValueError unless there is one sequence: ``what`` changes its length alone."""
        if self.batch_size != 1:
            raise ValueError(f"{what} needs a PagedCache of batch_size 1: transformers counts one cache length "
                             "for the whole batch, so sequences cannot change length one by one")

    # ---- tokens in -----------------------------------------------------------------------------
    def begin_step(self, q_len: int, new: torch.Tensor | None, *, transfer_in_flight: bool,
                   load_in_flight: bool) -> tuple[ForwardStep, ForwardStep | None]:
        """Reserve the slots of a forward step's new tokens and describe the step, once for every layer.

        Args:
            q_len: the input's ``T`` (columns, padding included).
            new: ``[batch_size, q_len] bool`` (host): which input tokens are real, not padding; None if all are.
            transfer_in_flight: a store transfer holds views of the pool, so it cannot grow.
            load_in_flight: a history streams into the window pages, so they cannot grow.

        Returns ``(step, window_step)``: the step with the slots and block table of the main pool and the
        separate layers, and with those of the window pages (None without them).
        """
        counts = [q_len] * self.batch_size if new is None else new.sum(1).tolist()
        self._reserve(dict(enumerate(counts)), transfer_in_flight)
        slots = list(itertools.chain.from_iterable(self.seqs.append_slots(r, n) for r, n in enumerate(counts)))
        window_slots: list[int] = []
        if self.window is not None:
            before = self.window.kv
            window_slots = self.window.begin_step(counts, may_grow=not load_in_flight)
            if self.window.kv is not before:     # the window pool grew: new tensors
                self._bind_layers()
        rows = list(range(self.batch_size))
        block_table, kv_lens = self.seqs.block_table(rows), self.seqs.kv_lens(rows)
        cu_seqlens_q = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32)
        max_q_len = check_batch(block_table, kv_lens, cu_seqlens_q, self.pool.num_pages, self.page_size, len(slots))
        device = self.device
        token_index = None if new is None else new.flatten().nonzero().squeeze(1).to(device)
        step = ForwardStep(self.batch_size, q_len, torch.tensor(slots, dtype=torch.int32).to(device),
                           block_table.to(device), kv_lens.to(device), cu_seqlens_q.to(device), max_q_len,
                           int(kv_lens.max()), token_index, StepLens.of(kv_lens.tolist(), counts))
        if self.window is None:
            return step, None
        window_table = self.window.seqs.block_table(rows)
        check_batch(window_table, kv_lens, cu_seqlens_q, self.window.pool.num_pages, self.page_size,
                    len(window_slots))
        return step, dataclasses.replace(step, slot_mapping=torch.tensor(window_slots, dtype=torch.int32).to(device),
                                         block_table=window_table.to(device))

    def append(self, row: int, num_tokens: int, *, transfer_in_flight: bool = False) -> torch.Tensor:
        """Append ``num_tokens`` to sequence ``row``; returns their slots ``[num_tokens] int64`` (in every layer
        but the window pages'), for the caller to fill. `PoolExhaustedError` before any change if they do not fit."""
        self.edits += 1
        self._reserve({row: num_tokens}, transfer_in_flight)
        return torch.tensor(self.seqs.append_slots(row, num_tokens), dtype=torch.long, device=self.device)

    def start_window(self, row: int, first: int, num_tokens: int) -> torch.Tensor:
        """With window pages: make ``row`` of the window pages ``num_tokens`` tokens of which only
        ``[first, num_tokens)`` are held; returns their slots ``[num_tokens - first] int64`` there, to fill."""
        self.edits += 1
        slots = self.window.start_at(row, first, num_tokens)
        self._bind_layers()           # the window pool may have grown
        return slots

    def fill_resident(self) -> torch.Tensor:
        """The slots ``[resident_tokens] int64`` of the tokens only the resident layers hold, for the caller
        to copy the other layers' K/V into; from then on every layer counts as holding them."""
        self.edits += 1
        slots = self.slots(0, self._resident_tokens)
        self._resident_tokens = 0
        return slots

    def load(self, k: torch.Tensor, v: torch.Tensor, *, transfer_in_flight: bool = False) -> None:
        """Append history to the (single) sequence: ``k``, ``v`` ``[num_layers, n, num_kv_heads, head_dim]``
        pre-RoPE, for the tokens that follow the ones held (token ``i`` lands at ``num_tokens() + i``)."""
        expect = (self.layout.num_layers, k.shape[1], self.layout.num_kv_heads, self.layout.head_dim)
        if k.ndim != 4 or tuple(k.shape) != expect or v.shape != k.shape:
            raise ValueError(f"k and v must be [num_layers, n, num_kv_heads, head_dim] = {expect}, "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        self.check_single("load")
        if self.window is not None:
            raise ValueError("load streams every token of every layer to or from a host store, but this cache's "
                             "sliding layers give back the pages their window passed: create it with "
                             "PagedCache(..., window_pages=False)")
        if self._resident_tokens:
            raise ValueError("load: this cache's resident layers wait for their history through load_layerwise")
        slots = self.append(0, k.shape[1], transfer_in_flight=transfer_in_flight)
        for layer, (kc, vc) in enumerate(zip(self._k, self._v)):
            kc.view(-1, *kc.shape[2:])[slots] = k[layer].to(self.device, self.dtype)
            vc.view(-1, *vc.shape[2:])[slots] = v[layer].to(self.device, self.dtype)

    # ---- tokens out ----------------------------------------------------------------------------
    def read(self, start: int, end: int, row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of tokens ``[start, end)`` of sequence ``row``: each ``[num_layers, n, num_kv_heads, head_dim]``.
        With window pages, ``start`` must not be before `first_held` (ValueError)."""
        slots = self.slots(start, end, row)
        window_slots = None if self.window is None else self.window.slots(row, start, end)
        k, v = [], []
        for layer, (kc, vc) in enumerate(zip(self._k, self._v)):
            at = window_slots if self.window is not None and layer in self.window.layers else slots
            k.append(kc.view(-1, *kc.shape[2:]).index_select(0, at))
            v.append(vc.view(-1, *vc.shape[2:]).index_select(0, at))
        return torch.stack(k), torch.stack(v)

    def truncate(self, num_drop: int, keep_first: int = 0) -> int:
        """Drop the oldest tokens of the (single) sequence after its first ``keep_first``; the kept tokens
        are renumbered from 0 and stay where they are (`PagedSequences.truncate`: the drop is rounded up to
        whole pages). Returns the number of tokens dropped."""
        self.edits += 1
        self.check_single("truncate")
        if self.window is not None:   # first: it refuses a drop that brings given-back tokens into a window
            self.window.truncate(0, num_drop, keep_first)
        sep = self.num_separate
        caches = [self.kv.permute(2, 3, 0, 1, 4, 5), *self._k[:sep], *self._v[:sep]]
        return self.seqs.truncate(0, num_drop, keep_first, caches=caches)

    def crop(self, num_remove: int) -> None:
        """Remove the last ``num_remove`` tokens of every sequence (all of a shorter one). ValueError before
        any change if a sliding layer's window would then reach tokens it gave back."""
        self.edits += 1
        if self.window is not None:
            for row in range(self.batch_size):
                self.window.check_crop(row, max(self.num_tokens(row) - num_remove, 0))
        for row in range(self.batch_size):
            n = max(self.num_tokens(row) - num_remove, 0)
            self.seqs.crop(row, n)
            if self.window is not None:
                self.window.seqs.crop(row, n)

    def reset(self) -> None:
        """Every sequence empty again, its pages back in the pools."""
        self.edits += 1
        for row in range(self.batch_size):
            self.seqs.release(row)
            self.seqs.append_slots(row, 0)
            if self.window is not None:
                self.window.reset(row)

    def take_resident(self, token_ids: torch.Tensor, num_layers: int) -> Resident:
        """The first ``num_layers`` layers' pages (at most those with tensors of their own) as a `Resident` of
        the sequence's tokens ``token_ids [n] int64`` (``n`` = `num_tokens`), for `DeviceTier.put`. The pages
        must not be used afterwards."""
        self.edits += 1
        self.check_single("take_resident")
        if token_ids.numel() != self.num_tokens(0):
            raise ValueError(f"token_ids: {token_ids.numel()} ids for {self.num_tokens(0)} cached tokens")
        keep = min(num_layers, self.num_separate)
        res = Resident(token_ids.cpu(), list(self.seqs.seqs[0].pages), self._k[:keep], self._v[:keep])
        self._k, self._v = [], []   # handed over: any later use fails loudly
        return res

    # ---- rows ----------------------------------------------------------------------------------
    def rebuild_rows(self, sources: list[int]) -> None:
        """Make row ``r`` a copy of row ``sources[r]`` (rows may repeat, vanish, or grow in number): beam and
        contrastive search. The caller ends store transfers first.

        Each row owns its pages, so the rows' K/V are gathered first and written back into freshly allocated
        pages (the pool grows if they need more): a copy of every held token, ``O(layers * tokens)`` per call.
        """
        self.edits += 1
        if sources == list(range(self.batch_size)):
            return
        if self.num_separate:
            raise RuntimeError("a PagedCache with resident layers cannot have its rows rearranged")
        lens = [self.num_tokens(s) for s in sources]
        flat = self.kv.flatten(2, 3)                                      # [L, 2, num_slots, Hkv, D]
        gathered = [flat.index_select(2, self.slots(0, n, s)) for s, n in zip(sources, lens)]
        held = [] if self.window is None else [self.window.gather(s) for s in sources]
        for row in range(self.batch_size):
            self.seqs.release(row)
            if self.window is not None:
                self.window.seqs.release(row)
        need = sum(-(-n // self.page_size) for n in lens) - self.pool.num_free
        if need > 0:
            self._grow(need, transfer_in_flight=False)
        flat = self.kv.flatten(2, 3)
        for row, (n, data) in enumerate(zip(lens, gathered)):
            flat[:, :, torch.tensor(self.seqs.append_slots(row, n), dtype=torch.long, device=self.device)] = data
        for row, (n, (first, data)) in enumerate(zip(lens, held)):
            self.window.place(row, first, n, data)
        self.batch_size = len(sources)
        if self.window is not None:
            self._bind_layers()            # placing rows may have grown the window pool

    # ---- internals -----------------------------------------------------------------------------
    def _bind_layers(self) -> None:
        """Per-layer ``(k, v)`` caches: the first layers' own tensors, then the main pool's and, for
        sliding layers with window pages, the window pool's."""
        window = {} if self.window is None else self.window.caches()
        main = iter(range(self.kv.shape[0]))
        self._k, self._v = list(self._own_k), list(self._own_v)
        for layer in range(self.num_separate, self.layout.num_layers):
            if layer in window:
                kc, vc = window[layer]
            else:
                i = next(main)
                kc, vc = self.kv[i, 0], self.kv[i, 1]
            self._k.append(kc)
            self._v.append(vc)

    def _reserve(self, new_tokens: dict[int, int], transfer_in_flight: bool) -> None:
        """Raise `PoolExhaustedError` before any change if the pool cannot take ``new_tokens`` per row
        (unless it may grow)."""
        ps = self.page_size
        need = sum(max(-(-(self.num_tokens(r) + n) // ps) - len(self.seqs.seqs[r].pages), 0)
                   for r, n in new_tokens.items())
        if need > self.pool.num_free and self.grow:
            self._grow(need - self.pool.num_free, transfer_in_flight)
        if need > self.pool.num_free:
            raise PoolExhaustedError(f"PagedCache is full: {need} more pages needed, {self.pool.num_free} free "
                                     f"(max_tokens={self.max_tokens}, batch_size={self.batch_size}); "
                                     "create it with a larger max_tokens")

    def _grow(self, min_pages: int, transfer_in_flight: bool) -> None:
        """Enlarge the pool by at least ``min_pages`` (at least doubling it, so growth is amortised). Raises
        RuntimeError while a store transfer is in flight (its copies hold views of the old tensor). Growth
        works on the one pool tensor: pages whose first layers have tensors of their own (resident layers of
        the device tier) are a single chat turn's, never grown."""
        if self.num_separate:
            raise RuntimeError("a PagedCache with resident layers cannot grow its pool")
        extra = max(min_pages, self.pool.num_pages)
        if transfer_in_flight:
            raise RuntimeError(f"PagedCache needs {min_pages} more pages but cannot grow while a store transfer "
                               "is in flight: call finish() first, or create it with a larger max_tokens")
        old = self.kv
        self.kv = old.new_empty(old.shape[0], old.shape[1], old.shape[2] + extra, *old.shape[3:])
        self.kv[:, :, : old.shape[2]] = old
        self.pool.grow(extra)
        self._bind_layers()
