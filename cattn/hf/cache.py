"""`PagedCache`: a transformers ``Cache`` whose K/V live in cattn pages, before RoPE.

Row ``b`` of the model's input is sequence ``b`` of the cache. All layers share one
pool tensor ``[num_layers, 2, num_pages, page_size, num_kv_heads, head_dim]`` and one
page table, so a forward step is described once (slots of the new tokens, block
table, ``kv_lens``, ``cu_seqlens_q``) when layer 0 runs, checked once, moved to the
device once, and reused by every layer: no host sync per layer.

Padding is a property of the input, not of the cache: tokens that the 2D attention
mask marks as padding are never written, so ``kv_lens`` count real tokens only and
each sequence's positions are ``0..kv_len-1`` whatever the padding, as in HF.

The host store plugs in through two hooks that every cattn attention module calls:
``wait_layer(l)`` before layer ``l`` attends (history streamed in by `load_layerwise`
waits there, for that layer only) and ``layer_written(l)`` after it wrote its new K/V
(`save_next_step` copies them out there, layer by layer); `cattn.hf.streaming` does
the streaming. See docs/store.md.

With a device tier (`cattn.store.device.tier`), the first layers can be a session's resident pages
from its last turn: those layers are attended in place (no copy) and only the others stream in;
at the end of the turn `take_resident` hands the first layers' pages back to the tier.

Sliding-window layers keep only what their window can still reach, in a page space of their own
(`cattn.hf.window`); with a host store their K/V go to an entry of their own (`save_window`,
``load_layerwise(..., window=)``), the global layers' to the session's (`stored_layers`).
The host store's side of the cache is `cattn.hf.cache_store.StoreTraffic`.
"""
from __future__ import annotations

import dataclasses
import itertools

import torch
from transformers.cache_utils import Cache

from cattn.hf.resident import check_resident, separate_layers
from cattn.hf import rows
from cattn.hf.cache_store import StoreTraffic
from cattn.hf.step import ForwardStep, PagedLayout
from cattn.hf.streaming import StoreStreaming
from cattn.hf.window import WindowPages
from cattn.ops import check_batch
from cattn.paged import PagedSequences, PagePool, PoolExhaustedError, SequencePages
from cattn.store.device.tier import Resident

class PagedCache(StoreTraffic, Cache):
    """KV cache of a batch of sequences in pages, for a model patched by `cattn.hf.apply_cattn`.

    Pass it to the model as its cache (``model.generate(ids, past_key_values=cache)``;
    transformers >= 5.24 names the argument ``cache``, see `cattn.hf.compat.CACHE_KWARG`).
    A later ``generate`` call whose ``input_ids`` start with the tokens already cached
    prefills only the rest.

    Args:
        model: the patched model.
        batch_size: number of sequences (rows of every input).
        max_tokens: capacity per sequence on average; the pool holds
            ``batch_size * ceil(max_tokens / page_size)`` pages. Default: the model's
            ``max_position_embeddings``.
        device, dtype: of the pool; default those of the model's attention weights.
        resident: a session's first layers from its last turn (`DeviceTier.take`): they become this
            cache's first layers, holding its first ``resident.num_tokens`` tokens (batch_size 1);
            `load_layerwise` then streams only the other layers of those tokens.
        keep_layers: how many first layers get their own tensors (with ``headroom`` extra pages),
            so that `take_resident` can hand them to the device tier after the turn.
        grow: when the pool is full, enlarge it (at least doubling) instead of raising
            `PoolExhaustedError`; the cache `generate` creates for a patched model grows.
        window_pages: sliding-window layers give back the pages their window has passed
            (`cattn.hf.window`; their own pool grows as a step needs). False keeps every token of
            every layer, as `load` and a model whose every layer slides need for a store; resident
            or kept layers imply it.
        window_slack: with window pages, tokens kept before each window's reach.
        window_tokens: with window pages, tokens per row their pool starts with (default the window,
            the slack and a page). It grows when a step needs more, except while a store transfer is
            in flight (`PoolExhaustedError` then): a caller that streams sizes it for its first step.

    With a host store, `load_layerwise` streams a history in layer by layer during the next
    forward step and `save_next_step` saves that step's new K/V layer by layer (``step_saved``
    says whether the store took them); `finish` ends both. See docs/store.md.
    """

    def __init__(self, model, *, batch_size: int = 1, max_tokens: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 resident: Resident | None = None, keep_layers: int = 0, headroom: float = 0.5, grow: bool = False,
                 window_pages: bool = True, window_slack: int = 0, window_tokens: int | None = None):
        layout = PagedLayout.of(model)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if max_tokens is None:
            max_tokens = model.config.get_text_config().max_position_embeddings
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        super().__init__(layers=[])
        self.layout = layout
        self.max_tokens = max_tokens
        self.page_size = layout.page_size
        if not isinstance(keep_layers, int) or not 0 <= keep_layers <= layout.num_layers:
            raise ValueError(f"keep_layers must be an int in [0, {layout.num_layers}], got {keep_layers!r}")
        if resident is not None and batch_size != 1:
            raise ValueError("resident layers need a PagedCache of batch_size 1")
        dtype, device = dtype or model.dtype, torch.device(device or model.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        num_pages = batch_size * -(-max_tokens // layout.page_size)
        if resident is not None:
            num_pages = max(num_pages, max(resident.pages, default=-1) + 1)
            check_resident(resident, layout, dtype, device)
        self.pool = PagePool(num_pages, layout.page_size)
        self.seqs = PagedSequences(self.pool)
        # Layers [0, separate) have tensors of their own (resident ones, or ones that may become resident);
        # the rest share one pool tensor. Slots past a sequence's kv_len are never read: no initialisation.
        separate = max(keep_layers, 0 if resident is None else resident.num_layers)
        windowed = window_pages and separate == 0 and any(w is not None for w in layout.sliding_windows)
        if not isinstance(window_slack, int) or window_slack < 0:
            raise ValueError(f"window_slack must be an int >= 0, got {window_slack!r}")
        self.window = WindowPages(layout, batch_size, max_tokens, dtype, device, window_slack, window_tokens) \
            if windowed else None
        self._separate = separate
        main_layers = layout.num_layers - separate - (len(self.window.layers) if windowed else 0)
        self.kv = torch.empty(main_layers, 2, num_pages, layout.page_size, layout.num_kv_heads,
                              layout.head_dim, dtype=dtype, device=device)
        self.resident_layers = 0 if resident is None else resident.num_layers
        self._own_k, self._own_v, self.grown_bytes = separate_layers(layout, resident, separate, num_pages, headroom,
                                                                     dtype, device)
        self._bind_layers()
        self._batch_size = batch_size
        self.grow = grow
        self._columns = 0        # input positions seen, padding included: what HF calls the cache length
        self._step: ForwardStep | None = None
        for row in range(batch_size):
            self.seqs.append_slots(row, 0)
        self._resident_tokens = 0    # tokens held by the resident layers that the other layers still lack
        if resident is not None and resident.num_tokens:
            self.pool.claim(resident.pages)
            self.seqs.seqs[0] = SequencePages(list(resident.pages), resident.num_tokens)
            self._columns = resident.num_tokens
            if self.resident_layers < layout.num_layers:
                self._resident_tokens = resident.num_tokens
        self._streaming = StoreStreaming(self._k, self._v)
        self._window_step: ForwardStep | None = None

    # ---- what the cattn attention modules call -------------------------------------------------
    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_cache, v_cache)`` of one layer, each ``[num_pages, page_size, num_kv_heads, head_dim]``."""
        return self._k[layer_idx], self._v[layer_idx]

    def step(self, layer_idx: int, attention_mask: torch.Tensor | None, batch_size: int, q_len: int) -> ForwardStep:
        """The current forward step, with the slots and block table of ``layer_idx``'s page space;
        layer 0 starts a new one (reserves the new tokens' slots)."""
        if layer_idx == 0:
            self._streaming.before_step()
            self._step = self._begin_step(attention_mask, batch_size, q_len)
            self._streaming.begin_step(self._step)
        elif self._step is None or (self._step.batch_size, self._step.q_len) != (batch_size, q_len):
            raise RuntimeError(f"layer {layer_idx} ran before layer 0 of this forward step")
        if self.window is not None and layer_idx in self.window.layers:
            return self._window_step
        return self._step

    def wait_layer(self, layer_idx: int) -> None:
        """Called before layer ``layer_idx`` attends: waits for that layer's history copy only, if
        `load_layerwise` is streaming one (on CUDA the current stream waits; on CPU it copies now)."""
        self._streaming.wait_layer(layer_idx, self._step)

    def layer_written(self, layer_idx: int) -> None:
        """Called once layer ``layer_idx`` has written this step's K/V: copies that layer's new K/V
        to the store if `save_next_step` asked for it; after the last layer the save commits (in the
        background on CUDA)."""
        self._streaming.layer_written(layer_idx)

    # ---- history in and out --------------------------------------------------------------------
    def num_tokens(self, row: int = 0) -> int:
        """Tokens cached for sequence ``row``."""
        return self.seqs.seqs[row].num_tokens

    def load(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append history to the (single) sequence: ``k``, ``v`` ``[num_layers, n, num_kv_heads, head_dim]``
        pre-RoPE, for the tokens that follow the ones cached (token ``i`` lands at ``num_tokens() + i``)."""
        expect = (self.layout.num_layers, k.shape[1], self.layout.num_kv_heads, self.layout.head_dim)
        if k.ndim != 4 or tuple(k.shape) != expect or v.shape != k.shape:
            raise ValueError(f"k and v must be [num_layers, n, num_kv_heads, head_dim] = {expect}, "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        self._check_single("load")
        self._check_every_token("load")
        if self._resident_tokens:
            raise ValueError("load: this cache's resident layers wait for their history through load_layerwise")
        self._reserve({0: k.shape[1]})
        slots = torch.tensor(self.seqs.append_slots(0, k.shape[1]), dtype=torch.long, device=self.kv.device)
        self._columns = self.num_tokens(0)
        for layer, (kc, vc) in enumerate(zip(self._k, self._v)):
            kc.view(-1, *kc.shape[2:])[slots] = k[layer].to(self.kv.device, self.kv.dtype)
            vc.view(-1, *vc.shape[2:])[slots] = v[layer].to(self.kv.device, self.kv.dtype)

    def read(self, start: int, end: int, row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of tokens ``[start, end)`` of sequence ``row``: each ``[num_layers, n, num_kv_heads, head_dim]``.
        With window pages, ``start`` must not be before `first_held` (ValueError)."""
        self._streaming.finish_load()
        slots = self._slots_of(start, end, row)
        window_slots = None if self.window is None else self.window.slots(row, start, end)
        k, v = [], []
        for layer, (kc, vc) in enumerate(zip(self._k, self._v)):
            at = window_slots if self.window is not None and layer in self.window.layers else slots
            k.append(kc.view(-1, *kc.shape[2:]).index_select(0, at))
            v.append(vc.view(-1, *vc.shape[2:]).index_select(0, at))
        return torch.stack(k), torch.stack(v)

    def first_held(self, row: int = 0) -> int:
        """The first token of sequence ``row`` whose K/V every layer still holds: 0, unless sliding
        layers gave back the pages their window passed (``window_pages``)."""
        return 0 if self.window is None else self.window.first_held(row)

    def truncate(self, num_drop: int, keep_first: int = 0) -> int:
        """Drop the oldest tokens of the (single) sequence after its first ``keep_first``; the kept
        tokens are renumbered from 0 and their K/V stay where they are (see `PagedSequences.truncate`:
        the drop is rounded up to whole pages). Returns the number of tokens dropped."""
        self._check_single("truncate")
        self._streaming.finish_load()
        if self.window is not None:   # before any change: the window must not reach given-back tokens
            n, kf = self.num_tokens(0), min(keep_first, self.num_tokens(0))
            dropped = min(-(-num_drop // self.page_size) * self.page_size, n - kf)
            self.window.check_keeps(0, n, kf, dropped)
            self.window.seqs.truncate(0, num_drop, keep_first, caches=[self.window.kv.permute(2, 3, 0, 1, 4, 5)])
            self.window.truncated(0, kf, dropped)
        sep = self._separate
        caches = [self.kv.permute(2, 3, 0, 1, 4, 5), *self._k[:sep], *self._v[:sep]]
        dropped = self.seqs.truncate(0, num_drop, keep_first, caches=caches)
        self._columns -= dropped
        return dropped

    def held_nbytes(self, row: int = 0) -> int:
        """Bytes of K and V that sequence ``row`` holds over all layers (sliding layers with window pages
        hold only their window's tokens)."""
        n, per_layer = self.num_tokens(row), self.nbytes_per_token // self.layout.num_layers
        sliding = 0 if self.window is None else len(self.window.layers) * (n - self.first_held(row))
        return per_layer * (len(self.stored_layers) * n + sliding)

    @property
    def nbytes_per_token(self) -> int:
        """Bytes of K and V of one token over all layers."""
        lay = self.layout
        return 2 * lay.num_layers * lay.num_kv_heads * lay.head_dim * self.kv.element_size()

    # ---- transformers Cache interface ----------------------------------------------------------
    def __len__(self) -> int:
        return self.layout.num_layers

    def __repr__(self) -> str:
        lens = [self.num_tokens(r) for r in range(self._batch_size)]
        return (f"PagedCache(tokens={lens}, pages_free={self.pool.num_free}/{self.pool.num_pages}, "
                f"page_size={self.page_size})")

    def update(self, *args, **kwargs):
        raise TypeError("PagedCache is written by cattn attention modules only; this model's attention is not "
                        "patched: call cattn.hf.apply_cattn(model) first")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._columns

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._columns + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_tokens

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return True

    @property
    def is_croppable(self) -> bool:
        return True

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.layout.num_layers

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.layout.num_layers

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.layout.num_layers

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens of every sequence (a positive value is the
        length to keep, HF's older convention). Used by assisted decoding to discard rejected drafts."""
        keep = self._columns + tokens_to_remove if tokens_to_remove <= 0 else min(tokens_to_remove, self._columns)
        remove = self._columns - max(keep, 0)
        self._streaming.finish_load()
        for row in range(self._batch_size):
            n = max(self.num_tokens(row) - remove, 0)
            if self.window is not None and n - self.window.window + 1 < self.window.first_held(row):
                raise ValueError(f"crop: the sliding layers gave back tokens [0, {self.window.first_held(row)}) "
                                 f"of row {row}, which a window ending at token {n} would reach; a PagedCache(..., "
                                 "window_pages=False) can be cropped that far")
        for row in range(self._batch_size):
            n = max(self.num_tokens(row) - remove, 0)
            self.seqs.crop(row, n)
            if self.window is not None:
                self.window.seqs.crop(row, n)
        self._columns -= remove

    def reset(self) -> None:
        self.finish()
        for row in range(self._batch_size):
            self.seqs.release(row)
            self.seqs.append_slots(row, 0)
            if self.window is not None:
                self.window.reset(row)
        self._columns, self._step = 0, None

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Row ``r`` becomes a copy of row ``beam_idx[r]`` (beam search keeps its best beams)."""
        rows.rebuild_rows(self, [int(i) for i in beam_idx.tolist()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row repeated ``repeats`` times in place (``[a, b] -> [a, a, b, b]``)."""
        rows.rebuild_rows(self, [r for r in range(self._batch_size) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows ``indices``, in that order."""
        rows.rebuild_rows(self, [int(i) for i in indices.tolist()])

    # ---- internals -----------------------------------------------------------------------------
    def _slots_of(self, start: int, end: int, row: int = 0) -> torch.Tensor:
        """``[end - start] int64``: the slots of tokens ``[start, end)`` of sequence ``row``."""
        if not 0 <= start <= end <= self.num_tokens(row):
            raise ValueError(f"token range [{start}, {end}) is outside the {self.num_tokens(row)} cached tokens")
        pages, ps = self.seqs.seqs[row].pages, self.page_size
        return torch.tensor([pages[i // ps] * ps + i % ps for i in range(start, end)], dtype=torch.long,
                            device=self.kv.device)

    def _bind_layers(self) -> None:
        """Per-layer ``(k, v)`` caches: the first layers' own tensors, then the main pool's and, for
        sliding layers with window pages, the window pool's."""
        window = {} if self.window is None else self.window.caches()
        main = iter(range(self.kv.shape[0]))
        self._k, self._v = list(self._own_k), list(self._own_v)
        for layer in range(self._separate, self.layout.num_layers):
            if layer in window:
                kc, vc = window[layer]
            else:
                i = next(main)
                kc, vc = self.kv[i, 0], self.kv[i, 1]
            self._k.append(kc)
            self._v.append(vc)

    def _check_every_token(self, what: str) -> None:
        if self.window is not None:
            raise ValueError(f"{what} streams every token of every layer to or from a host store, but this cache's "
                             "sliding layers give back the pages their window passed: create it with "
                             "PagedCache(..., window_pages=False)")

    def _check_single(self, what: str) -> None:
        if self._batch_size != 1:
            raise ValueError(f"{what} needs a PagedCache of batch_size 1: transformers counts one cache length "
                             "for the whole batch, so sequences cannot change length one by one")

    def _reserve(self, new_tokens: dict[int, int]) -> None:
        """Raise `PoolExhaustedError` before any change if the pool cannot take ``new_tokens`` per row."""
        ps = self.page_size
        need = sum(max(-(-(self.num_tokens(r) + n) // ps) - len(self.seqs.seqs[r].pages), 0)
                   for r, n in new_tokens.items())
        if need > self.pool.num_free and self.grow:
            rows.grow_pool(self, need - self.pool.num_free)
        if need > self.pool.num_free:
            raise PoolExhaustedError(f"PagedCache is full: {need} more pages needed, {self.pool.num_free} free "
                                     f"(max_tokens={self.max_tokens}, batch_size={self._batch_size}); "
                                     "create it with a larger max_tokens")

    def _begin_step(self, attention_mask: torch.Tensor | None, batch_size: int, q_len: int) -> ForwardStep:
        if batch_size != self._batch_size:
            raise ValueError(f"the input has {batch_size} rows but the PagedCache holds {self._batch_size} sequences")
        new = None
        if attention_mask is not None:
            if attention_mask.ndim != 2 or attention_mask.shape[0] != batch_size or attention_mask.shape[1] < q_len:
                raise ValueError(f"attention_mask must be a 2D padding mask [{batch_size}, >= {q_len}], "
                                 f"got shape {tuple(attention_mask.shape)}")
            new = attention_mask[:, -q_len:].to("cpu", torch.bool)
            if bool(new.all()):
                new = None
        counts = [q_len] * batch_size if new is None else new.sum(1).tolist()
        self._reserve(dict(enumerate(counts)))
        slots = list(itertools.chain.from_iterable(self.seqs.append_slots(r, n) for r, n in enumerate(counts)))
        window_slots = self._window_begin_step(counts)
        self._columns += q_len
        rows = list(range(batch_size))
        block_table, kv_lens = self.seqs.block_table(rows), self.seqs.kv_lens(rows)
        cu_seqlens_q = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32)
        max_q_len = check_batch(block_table, kv_lens, cu_seqlens_q, self.pool.num_pages, self.page_size, len(slots))
        device = self.kv.device
        token_index = None if new is None else new.flatten().nonzero().squeeze(1).to(device)
        step = ForwardStep(batch_size, q_len, torch.tensor(slots, dtype=torch.int32).to(device),
                           block_table.to(device), kv_lens.to(device), cu_seqlens_q.to(device), max_q_len,
                           int(kv_lens.max()), token_index)
        if self.window is not None:
            window_table = self.window.seqs.block_table(rows)
            check_batch(window_table, kv_lens, cu_seqlens_q, self.window.pool.num_pages, self.page_size,
                        len(window_slots))
            self._window_step = dataclasses.replace(
                step, slot_mapping=torch.tensor(window_slots, dtype=torch.int32).to(device),
                block_table=window_table.to(device))
        return step

    def _window_begin_step(self, counts: list[int]) -> list[int]:
        """The sliding layers' side of a new step: give back what no window reaches any more, then the
        new tokens' slots (row-major). Empty without window pages."""
        if self.window is None:
            return []
        before = self.window.kv
        for row in range(len(counts)):
            self.window.give_back(row)
        if self._streaming.load_in_flight and self.window.needs_pages(dict(enumerate(counts))):
            raise PoolExhaustedError(f"the sliding layers' pages ({self.window.pool.num_free} free) cannot take this "
                                     "step's tokens and cannot grow while a history streams into them: create the "
                                     "PagedCache with a larger window_tokens")
        self.window.reserve(dict(enumerate(counts)))
        if self.window.kv is not before:     # the window pool grew: new tensors, which no save reads
            self._bind_layers()
            self._streaming.rebind(self._k, self._v, saves_read_others=True)
        return list(itertools.chain.from_iterable(self.window.seqs.append_slots(r, n) for r, n in enumerate(counts)))
