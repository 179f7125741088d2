"""`PagedCache`: a transformers ``Cache`` whose K/V live in cattn pages, before RoPE.

Row ``b`` of the model's input is sequence ``b`` of the cache's `ModelPages`, whose page table all
layers share, so a forward step is described once (slots of the new tokens, block table,
``kv_lens``, ``cu_seqlens_q``) when layer 0 runs, checked once, moved to the device once, and
reused by every layer: no host sync per layer.

Padding is a property of the input, not of the cache: tokens that the 2D attention mask marks as
padding are never written, so ``kv_lens`` count real tokens only and each sequence's positions are
``0..kv_len-1`` whatever the padding, as in HF. Only the cache length that transformers asks for
(`get_seq_length`) counts the input's columns, padding included.

The host store plugs in through two hooks that every cattn attention module calls: ``wait_layer(l)``
before layer ``l`` attends (history streamed in by `load_layerwise` waits there, for that layer only)
and ``layer_written(l)`` after it wrote its new K/V (`save_next_step` copies them out there, layer by
layer). The cache is thin: the pages are a `ModelPages` (`cattn.hf.pages`), the store's requests a
`StoreTraffic` (`cattn.hf.cache_store`) and their copies a `StoreStreaming` (`cattn.hf.streaming`).
See docs/store.md.
"""
from __future__ import annotations

from concurrent.futures import Future

import torch
from transformers.cache_utils import Cache

from cattn.hf.cache_store import StoreTraffic
from cattn.hf.pages import ModelPages
from cattn.hf.step import ForwardStep, PagedLayout
from cattn.hf.streaming import StoreStreaming
from cattn.hf.window import WindowPages
from cattn.paged import PagePool
from cattn.store.contract import EntryKey, KVEntry, KVStore
from cattn.store.device.tier import Resident
from cattn.store.lease import KVLease
from cattn.working_kv import WorkingKV


class PagedCache(Cache):
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

    Attributes:
        pages: the `ModelPages` that hold the K/V.

    On CPU each layer may keep a working copy of its K (rotated) and V for the turn's decode
    (`working_kv`; `cattn.working_kv`): about the pages' bytes again while the cache lives.

    With a host store, `load_layerwise` streams a history in layer by layer during the next
    forward step and `save_next_step` saves that step's new K/V layer by layer (``step_saved``
    says whether the store took them); `finish` ends both. See docs/store.md.
    """

    def __init__(self, model, *, batch_size: int = 1, max_tokens: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 resident: Resident | None = None, keep_layers: int = 0, headroom: float = 0.5, grow: bool = False,
                 window_pages: bool = True, window_slack: int = 0, window_tokens: int | None = None):
        layout = PagedLayout.of(model)
        if max_tokens is None:
            max_tokens = model.config.get_text_config().max_position_embeddings
        super().__init__(layers=[])
        self.pages = ModelPages(layout, batch_size=batch_size, max_tokens=max_tokens, dtype=dtype or model.dtype,
                                device=device or model.device, resident=resident, keep_layers=keep_layers,
                                headroom=headroom, grow=grow, window_pages=window_pages, window_slack=window_slack,
                                window_tokens=window_tokens)
        self._streaming = StoreStreaming(self.pages)
        self._traffic = StoreTraffic(self.pages, self._streaming)
        # Input positions seen, padding included: what transformers calls the cache length.
        self._columns = resident.num_tokens if resident is not None else 0
        self._step: ForwardStep | None = None
        self._window_step: ForwardStep | None = None
        cpu = self.pages.device.type == "cpu"
        self._working = [WorkingKV() for _ in range(layout.num_layers)] if cpu else None

    # ---- what the cattn attention modules call -------------------------------------------------
    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_cache, v_cache)`` of one layer, each ``[num_pages, page_size, num_kv_heads, head_dim]``."""
        return self.pages.layer(layer_idx)

    def step(self, layer_idx: int, attention_mask: torch.Tensor | None, batch_size: int, q_len: int) -> ForwardStep:
        """The current forward step, with the slots and block table of ``layer_idx``'s page space;
        layer 0 starts a new one (reserves the new tokens' slots).

        Args:
            attention_mask: the model's 2D ``[batch_size, >= q_len]`` padding mask (1 = a real token), or None.
            batch_size, q_len: the input's ``[B, T]``.
        """
        if layer_idx == 0:
            self._streaming.before_step()
            self._step, self._window_step = self.pages.begin_step(
                q_len, self._real_tokens(attention_mask, batch_size, q_len),
                transfer_in_flight=not self._streaming.idle, load_in_flight=self._streaming.load_in_flight)
            self._columns += q_len
            self._streaming.begin_step(self._step)
        elif self._step is None or (self._step.batch_size, self._step.q_len) != (batch_size, q_len):
            raise RuntimeError(f"layer {layer_idx} ran before layer 0 of this forward step")
        if self.pages.window is not None and layer_idx in self.pages.window.layers:
            return self._window_step
        return self._step

    def working_kv(self, layer_idx: int) -> WorkingKV | None:
        """Layer ``layer_idx``'s working copy for CPU attention (trusted while ``pages.edits`` is unchanged),
        or None off the CPU."""
        return None if self._working is None else self._working[layer_idx]

    @property
    def working_nbytes(self) -> int:
        """Bytes held by the layers' working copies."""
        return sum(w.nbytes for w in self._working or ())

    def wait_layer(self, layer_idx: int) -> None:
        """Called before layer ``layer_idx`` attends: waits for that layer's history copy only, if
        `load_layerwise` is streaming one (on CUDA the current stream waits; on CPU it copies now)."""
        self._streaming.wait_layer(layer_idx, self._step)

    def layer_written(self, layer_idx: int) -> None:
        """Called once layer ``layer_idx`` has written this step's K/V: copies that layer's new K/V
        to the store if `save_next_step` asked for it; after the last layer the save commits (in the
        background on CUDA)."""
        self._streaming.layer_written(layer_idx)

    # ---- the pages -----------------------------------------------------------------------------
    @property
    def kv(self) -> torch.Tensor:
        """The main pool, ``[layers, 2, num_pages, page_size, num_kv_heads, head_dim]`` (`ModelPages.kv`)."""
        return self.pages.kv

    @property
    def pool(self) -> PagePool:
        """The page table's `PagePool` (`ModelPages.pool`)."""
        return self.pages.pool

    @property
    def window(self) -> WindowPages | None:
        """The sliding layers' pages, or None (`ModelPages.window`)."""
        return self.pages.window

    @property
    def resident_layers(self) -> int:
        """How many first layers came from ``resident``."""
        return self.pages.resident_layers

    @property
    def grown_bytes(self) -> int:
        """Bytes copied device-to-device because ``resident``'s tensors were too small."""
        return self.pages.grown_bytes

    @property
    def stored_layers(self) -> list[int]:
        """The layers whose every token this cache holds, what `save_next_step`, `save_tokens` and
        `load_layerwise`'s ``source`` cover: all, or with window pages the global (non-sliding) ones."""
        return self.pages.stored_layers

    def num_tokens(self, row: int = 0) -> int:
        """Tokens cached for sequence ``row``."""
        return self.pages.num_tokens(row)

    def first_held(self, row: int = 0) -> int:
        """The first token of sequence ``row`` whose K/V every layer still holds (`ModelPages.first_held`)."""
        return self.pages.first_held(row)

    def held_nbytes(self, row: int = 0) -> int:
        """Bytes of K and V that sequence ``row`` holds over all layers (`ModelPages.held_nbytes`)."""
        return self.pages.held_nbytes(row)

    def load(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append history to the (single) sequence: ``k``, ``v`` ``[num_layers, n, num_kv_heads, head_dim]``
        pre-RoPE, for the tokens that follow the ones cached (token ``i`` lands at ``num_tokens() + i``)."""
        self.pages.load(k, v, transfer_in_flight=not self._streaming.idle)
        self._columns = self.pages.num_tokens(0)

    def read(self, start: int, end: int, row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of tokens ``[start, end)`` of sequence ``row``: each ``[num_layers, n, num_kv_heads, head_dim]``.
        With window pages, ``start`` must not be before `first_held` (ValueError)."""
        self._streaming.finish_load()
        return self.pages.read(start, end, row)

    def truncate(self, num_drop: int, keep_first: int = 0) -> int:
        """Drop the oldest tokens of the (single) sequence after its first ``keep_first``; the kept
        tokens are renumbered from 0 and their K/V stay where they are (see `PagedSequences.truncate`:
        the drop is rounded up to whole pages). Returns the number of tokens dropped."""
        self.pages.check_single("truncate")
        self._streaming.finish_load()
        dropped = self.pages.truncate(num_drop, keep_first)
        self._columns -= dropped
        return dropped

    def take_resident(self, token_ids: torch.Tensor, num_layers: int) -> Resident:
        """After the turn (`finish`): the first ``num_layers`` layers' pages (at most those with tensors
        of their own) as a `Resident` of the sequence's tokens ``token_ids [n] int64`` (``n`` =
        `num_tokens`), for `DeviceTier.put`. The cache must not be used afterwards."""
        return self.pages.take_resident(token_ids, num_layers)

    # ---- the host store ------------------------------------------------------------------------
    def load_layerwise(self, source: KVLease | KVEntry | None, preload: int = 0,
                       window: KVLease | KVEntry | None = None, num_tokens: int | None = None) -> None:
        """Append history to the (single) sequence, copied in layer by layer during the next forward step
        (`StoreTraffic.load_layerwise` says what each argument holds)."""
        appends = not self.pages.resident_tokens    # else it fills in the resident tokens, counted already
        self._traffic.load_layerwise(source, preload, window, num_tokens)
        if appends:
            self._columns = self.pages.num_tokens(0)

    def save_next_step(self, store: KVStore, key: EntryKey, token_ids: torch.Tensor, start: int) -> None:
        """Save the next forward step's new K/V ``token_ids [m] int64`` as ``key``'s tokens after its first
        ``start``, layer by layer as each layer writes them (`StoreTraffic.save_next_step`)."""
        self._traffic.save_next_step(store, key, token_ids, start)

    @property
    def step_saved(self) -> bool:
        """The last `save_next_step` request was taken up: the step's new K/V go to the store."""
        return self._streaming.step_saved

    def save_tokens(self, store: KVStore, key: EntryKey, token_ids: torch.Tensor, start: int, first: int) -> None:
        """Save the K/V of the sequence's tokens ``[first, first + m)`` as ``key``'s tokens after its first
        ``start`` (`StoreTraffic.save_tokens`)."""
        self._traffic.save_tokens(store, key, token_ids, start, first)

    def save_window(self, store: KVStore, key: EntryKey, token_ids: torch.Tensor) -> int:
        """With window pages: save the sliding layers' K/V of the tokens the next token's window reaches as
        ``key``'s whole entry; returns the first of them (`StoreTraffic.save_window`)."""
        return self._traffic.save_window(store, key, token_ids)

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

    # ---- transformers Cache interface ----------------------------------------------------------
    def __len__(self) -> int:
        return self.pages.layout.num_layers

    def __repr__(self) -> str:
        lens = [self.num_tokens(r) for r in range(self.batch_size)]
        return (f"PagedCache(tokens={lens}, pages_free={self.pool.num_free}/{self.pool.num_pages}, "
                f"page_size={self.pages.page_size})")

    def update(self, *args, **kwargs):
        raise TypeError("PagedCache is written by cattn attention modules only; this model's attention is not "
                        "patched: call cattn.hf.apply_cattn(model) first")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._columns

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._columns + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.pages.max_tokens

    @property
    def batch_size(self) -> int:
        return self.pages.batch_size

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
        return [False] * self.pages.layout.num_layers

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.pages.layout.num_layers

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.pages.layout.num_layers

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens of every sequence (a positive value is the
        length to keep, HF's older convention). Used by assisted decoding to discard rejected drafts."""
        keep = self._columns + tokens_to_remove if tokens_to_remove <= 0 else min(tokens_to_remove, self._columns)
        remove = self._columns - max(keep, 0)
        self._streaming.finish_load()
        self.pages.crop(remove)
        self._columns -= remove

    def reset(self) -> None:
        self.finish()
        self.pages.reset()
        self._columns, self._step = 0, None

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Row ``r`` becomes a copy of row ``beam_idx[r]`` (beam search keeps its best beams)."""
        self._rebuild_rows([int(i) for i in beam_idx.tolist()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row repeated ``repeats`` times in place (``[a, b] -> [a, a, b, b]``)."""
        self._rebuild_rows([r for r in range(self.batch_size) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows ``indices``, in that order."""
        self._rebuild_rows([int(i) for i in indices.tolist()])

    # ---- internals -----------------------------------------------------------------------------
    def _rebuild_rows(self, sources: list[int]) -> None:
        """`ModelPages.rebuild_rows` once no store copy uses the pages: refused while a save may still read
        them, after completing a history load (what the pages refuse is refused before either)."""
        if sources != list(range(self.batch_size)) and not self.pages.num_separate:
            if self._streaming.saving:
                raise RuntimeError("PagedCache rows cannot be rearranged while a save may still read their pages: "
                                   "call finish() first")
            self._streaming.finish_load()
        self.pages.rebuild_rows(sources)

    def _real_tokens(self, attention_mask: torch.Tensor | None, batch_size: int, q_len: int) -> torch.Tensor | None:
        """``[batch_size, q_len] bool`` (host): which of the step's input tokens are real, not padding;
        None if all are."""
        if batch_size != self.batch_size:
            raise ValueError(f"the input has {batch_size} rows but the PagedCache holds {self.batch_size} sequences")
        if attention_mask is None:
            return None
        if attention_mask.ndim != 2 or attention_mask.shape[0] != batch_size or attention_mask.shape[1] < q_len:
            raise ValueError(f"attention_mask must be a 2D padding mask [{batch_size}, >= {q_len}], "
                             f"got shape {tuple(attention_mask.shape)}")
        new = attention_mask[:, -q_len:].to("cpu", torch.bool)
        return None if bool(new.all()) else new
