"""`StoreStreaming`: the copies between a `ModelPages` and the host store, layer by layer.

History streams into the pages through `LayerLoader`s, waited for in ``wait_layer(l)``
before layer ``l`` attends; a step's new K/V streams out through a `LayerSaver`, one layer
in each ``layer_written(l)``. `ModelPages` owns the pages and their slots, `StoreTraffic`
(`cattn.hf.cache_store`) turns a cache's requests into slots; this owns the loaders, the
savers and their futures, and the per-layer timing of the last prefill step. A history may
come in parts, each a lease over some of the layers with slots of its own (pages whose
sliding layers have a page space of their own load their window from a second entry), and
a save may cover some of the layers. See docs/store.md.

Loaders and savers copy into and out of the per-layer tensors of the moment; `idle` and
`load_in_flight` tell the pages when they may not replace them (grow).
"""
from __future__ import annotations

import logging
import statistics
import time
from concurrent.futures import Future
import torch

from cattn.hf.pages import ModelPages
from cattn.hf.step import ForwardStep
from cattn.store.contract import EntryKey, KVStore
from cattn.store.errors import HistoryLost, StoreFullError
from cattn.store.lease import KVLease
from cattn.store.transfer import LayerLoader, LayerSaver

log = logging.getLogger(__name__)


class StoreStreaming:
    """Streams history into a model's pages and new K/V out of them, one layer at a time.

    Args:
        pages: what the loaders and the savers copy to and from: each layer's
            ``[num_pages, page_size, num_kv_heads, head_dim]`` tensors (`ModelPages.layer`).

    ``step_saved`` says whether the last `save_next_step` request was taken up.
    """

    def __init__(self, pages: ModelPages):
        self._pages = pages
        self._num_layers = pages.layout.num_layers
        self._cuda = pages.device.type == "cuda"
        # history streaming into the pages: per part, its loader and {model layer: the lease's layer}
        self._loaders: list[tuple[LayerLoader, dict[int, int]]] = []
        self._loading = False                        # the loaders' layers are still waited for, one by one
        self._save_request: tuple | None = None      # (store, key, token_ids, start, layers) for the next step
        self._saver: LayerSaver | None = None        # saving the current step's new KV, layer by layer
        self._saver_layers: dict[int, int] = {}      # model layer -> the saver's layer
        self._savers: list[LayerSaver] = []          # savers whose copies may still read the pages
        self._futures: list[Future] = []             # their commits
        self._layer_marks: list = []                 # per layer (before wait, after wait): a step's timing
        self._timed: tuple[int, list] | None = None  # (new tokens, marks) of the last prefill step
        self._load_s = (0.0, 0.0)
        self.step_saved = False

    @property
    def idle(self) -> bool:
        """No load, save request or save copy is in flight: the pages' tensors may be replaced."""
        return not self._loaders and self._save_request is None and self._saver is None and not self._savers

    @property
    def saving(self) -> bool:
        """A save request or save copies may still read the pages (until `finish`)."""
        return self._save_request is not None or self._saver is not None or bool(self._savers)

    @property
    def load_in_flight(self) -> bool:
        """A `load` has not been completed by `finish_load` yet: the window pages may not grow."""
        return bool(self._loaders)

    # ---- a forward step ------------------------------------------------------------------------
    def before_step(self) -> None:
        """At layer 0, before the step's slots are reserved: complete a load whose every layer the
        previous step waited for (its copies are done, so closing it adds no host sync mid-forward)."""
        if self._loaders and not self._loading:
            self.finish_load()

    def begin_step(self, step: ForwardStep) -> None:
        """At layer 0, once the step's slots are reserved: start timing it if it is a prefill, and
        start the save that `save_next_step` asked for."""
        if step.max_q_len > 1:
            self._layer_marks = []
            self._timed = (step.slot_mapping.numel(), self._layer_marks)
        if self._save_request is not None:
            self._begin_save(step)

    def wait_layer(self, layer_idx: int, step: ForwardStep | None) -> None:
        """Before layer ``layer_idx`` of ``step`` attends: wait for that layer's history copy only."""
        marks = step is not None and step.max_q_len > 1
        if marks:
            self._layer_marks.append(self._mark())
        if self._loading:
            for loader, layers in self._loaders:
                if layer_idx in layers:
                    loader.wait(layers[layer_idx])
            self._loading = layer_idx < self._num_layers - 1
        if marks:
            self._layer_marks.append(self._mark())

    def layer_written(self, layer_idx: int) -> None:
        """After layer ``layer_idx`` wrote the step's K/V: copy it out; after the last layer, commit."""
        if self._saver is not None and layer_idx in self._saver_layers:
            self._saver.layer_written(self._saver_layers[layer_idx])
            if layer_idx == max(self._saver_layers):
                self._futures.append(self._saver.finish())
                self._saver = None

    # ---- requests ------------------------------------------------------------------------------
    def load(self, parts: list[tuple[KVLease, list[int], torch.Tensor]], preload_below: int) -> None:
        """Stream history in during the next forward step: per part, a lease over the model layers
        ``layers`` (in order), copied into ``slots`` (``[n] int64``, on the pool's device; n the lease's
        tokens). Layers below ``preload_below`` are copied now. Layers in no part are resident."""
        for lease, layers, slots in parts:
            loader = LayerLoader(lease, *self._caches(layers), slots)
            self._loaders.append((loader, {layer: i for i, layer in enumerate(layers)}))
            loader.preload(sum(layer < preload_below for layer in layers))
        self._loading = True

    def save_next_step(self, store: KVStore, key: EntryKey, token_ids: torch.Tensor, start: int,
                       layers: list[int] | None = None) -> None:
        """Save the next forward step's new K/V of ``layers`` (default all; see `PagedCache.save_next_step`)."""
        self._save_request = (store, key, token_ids, start, list(range(self._num_layers)) if layers is None else layers)
        self.step_saved = False

    def save_tokens(self, store: KVStore, key: EntryKey, token_ids: torch.Tensor, start: int,
                    slots: torch.Tensor, layers: list[int] | None = None) -> None:
        """Save the K/V in ``slots`` (``[m] int64``) of ``layers`` (default all) at once as ``key``'s tokens
        ``token_ids [m] int64`` after its first ``start``. Raises `StoreFullError` if the store has no room."""
        layers = range(self._num_layers) if layers is None else layers
        saver = LayerSaver(store, key, token_ids, start, *self._caches(layers), slots)
        saver.save_all()
        self._savers.append(saver)
        self._futures.append(saver.finish())

    def finish(self) -> list[Future]:
        """Complete the load, order the current stream after every save's copies, hand over the
        saves' futures (see `PagedCache.finish`)."""
        try:
            self.finish_load()
        except HistoryLost:   # the forward that needed the lost layers raised it already
            pass
        if self._saver is not None:        # a step stopped before its last layer: its copies are incomplete
            self._saver.abort()
            self._saver = None
        for saver in self._savers:
            saver.wait_copies()
        futures, self._savers, self._futures = self._futures, [], []
        return futures

    def finish_load(self) -> None:
        """Complete the history load (every layer copied, lease released, its times reported)."""
        if self._loaders:
            loaders, self._loaders, self._loading = self._loaders, [], False
            lost = None
            for loader, _ in loaders:
                try:
                    loader.close()
                except HistoryLost as exc:   # a history read from disk failed: the others still close
                    lost = exc
            self._load_s = (sum(loader.hidden_s for loader, _ in loaders), sum(loader.exposed_s for loader, _ in loaders))
            if lost is not None:
                raise lost

    # ---- measurements --------------------------------------------------------------------------
    def load_seconds(self) -> tuple[float, float]:
        """``(hidden, exposed)`` seconds of the last completed history load."""
        return self._load_s

    def layer_seconds(self) -> tuple[int, float] | None:
        """``(new tokens, seconds per layer)`` of the last prefill step (see `PagedCache.layer_seconds`)."""
        if self._timed is None:
            return None
        new, marks = self._timed
        if self._cuda:
            marks[-1].synchronize()
            gaps = [a.elapsed_time(b) / 1e3 for a, b in zip(marks[1::2], marks[2::2])]
        else:
            gaps = [b - a for a, b in zip(marks[1::2], marks[2::2])]
        return (new, statistics.median(gaps)) if gaps else None

    # ---- internals -----------------------------------------------------------------------------
    def _caches(self, layers) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The K and the V tensors of ``layers``, in order, as the pages hold them now."""
        pairs = [self._pages.layer(i) for i in layers]
        return [k for k, _ in pairs], [v for _, v in pairs]

    def _mark(self):
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _begin_save(self, step: ForwardStep) -> None:
        """Turn the pending `save_next_step` request into a saver over the step's slots."""
        store, key, token_ids, start, layers = self._save_request
        self._save_request = None
        if step.slot_mapping.numel() != token_ids.numel():
            log.warning("not saving per layer: the step has %d new tokens, %d were announced",
                        step.slot_mapping.numel(), token_ids.numel())
            return
        try:
            self._saver = LayerSaver(store, key, token_ids, start, *self._caches(layers), step.slot_mapping)
            self._saver_layers = {layer: i for i, layer in enumerate(layers)}
        except StoreFullError as exc:
            log.warning("not saving session %r per layer: %s", key.session, exc)
            return
        self._savers.append(self._saver)
        self.step_saved = True
