"""Layer-wise pre-loading and asynchronous saving between host KV and paged device caches.

`LayerLoader` copies a session's history into each layer's paged cache on a
copy stream, one event per layer, so that layer ``l``'s attention waits for
layer ``l``'s copy only; `preload_layers` says how many layers to copy before
the job starts so that no layer waits at all. `LayerSaver` copies each layer's
*new* KV to host memory on a save stream right after the layer wrote it, and
commits it to the store when the copies are done, off the critical path.

On CUDA the copies are asynchronous; on CPU the same calls copy at once. The
model integration needs two calls per layer: ``loader.wait(l)`` before layer
``l`` attends, ``saver.layer_written(l)`` after it wrote its new KV.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext

import torch

from cattn.store.contract import EntryKey, KVEntry, KVStore
from cattn.store.layout import KVLayout
from cattn.store.lease import KVLease

_committer: ThreadPoolExecutor | None = None   # one thread: commits of a session stay in turn order


def preload_layers(num_layers: int, load_s: float, compute_s: float) -> int:
    """How many layers to load before the job starts so that no layer waits for its KV (the buffer rule).

    Copies run back to back on the copy stream while layers compute back to back: with ``k`` layers
    loaded ahead, layer ``j >= k`` is ready ``(j - k + 1) * load_s`` after the job starts and is needed
    at ``j * compute_s``. The answer is the smallest ``k`` for which every layer is ready in time;
    the paper's buffer size is ``k`` layers' worth of history KV. ``load_s``: copy time of one layer's
    history (its bytes / measured bandwidth); ``compute_s``: one layer's compute time for the new tokens.
    """
    if num_layers < 0 or load_s < 0 or compute_s < 0:
        raise ValueError(f"num_layers, load_s, compute_s must be >= 0, got {num_layers}, {load_s}, {compute_s}")
    for k in range(num_layers + 1):
        # (j - k + 1) * load - j * compute is linear in j: checking both ends checks every layer
        if all((j - k + 1) * load_s <= j * compute_s for j in {k, num_layers - 1} if j >= k):
            return k
    return num_layers


def copy_bandwidth(device: torch.device | str, nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """Measured host->device copy bandwidth in bytes/s (from pinned memory on CUDA; memcpy on CPU)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda).random_(0, 256)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=cuda)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return nbytes / sorted(times)[len(times) // 2]


def _check_caches(k_caches, v_caches, layout: KVLayout) -> torch.device:
    if len(k_caches) != layout.num_layers or len(v_caches) != layout.num_layers:
        raise ValueError(f"k_caches and v_caches must hold {layout.num_layers} layers, got "
                         f"{len(k_caches)} and {len(v_caches)}")
    device = k_caches[0].device
    for name, caches in (("k_caches", k_caches), ("v_caches", v_caches)):
        for c in caches:
            if c.ndim != 4 or tuple(c.shape[2:]) != (layout.num_kv_heads, layout.head_dim) or c.dtype != layout.dtype:
                raise ValueError(f"{name}: each must be [num_pages, page_size, {layout.num_kv_heads}, "
                                 f"{layout.head_dim}] {layout.dtype}, got {tuple(c.shape)} {c.dtype}")
            if not c.is_contiguous() or c.device != device:
                raise ValueError(f"{name}: each must be contiguous and on {device}")
    return device


def _slots(slot_mapping: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.shape != (n,) or slot_mapping.is_floating_point():
        raise ValueError(f"slot_mapping must be an [{n}] integer tensor, got {getattr(slot_mapping, 'shape', None)}")
    return slot_mapping.to(device=device, dtype=torch.int64)


class LayerLoader:
    """Copies leased history KV into per-layer paged caches, one layer at a time.

    Args:
        source: a `KVLease` (from `TieredStore.acquire`: pinned, copied in place) or a `KVEntry`.
        k_caches, v_caches: per layer ``[num_pages, page_size, num_kv_heads, head_dim]`` on the device.
        slot_mapping: ``[n]`` int, ``page * page_size + offset`` of each history token.
        stream: the copy stream on CUDA (default: a new one).

    The copy stream first waits for the work already queued on the current stream (the pages may
    have been released by a sequence whose kernels are still queued). Call `close` when the layers
    are done with: it releases the lease once the copies are complete and reports the seconds of
    copy hidden behind compute and exposed to it.
    """

    def __init__(self, source: KVLease | KVEntry, k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor],
                 slot_mapping: torch.Tensor, stream: torch.cuda.Stream | None = None):
        self.lease = KVLease.from_entry(source) if isinstance(source, KVEntry) else source
        self.num_layers = self.lease.layout.num_layers
        self._device = _check_caches(k_caches, v_caches, self.lease.layout)
        self._slots = _slots(slot_mapping, self.lease.num_tokens, self._device)
        self._k_caches, self._v_caches = k_caches, v_caches
        self._cuda = self._device.type == "cuda"
        self._stream = (stream or torch.cuda.Stream(self._device)) if self._cuda else None
        if self._cuda:
            self._slots.record_stream(self._stream)  # made on the current stream, read on the copy stream
            self._stream.wait_stream(torch.cuda.current_stream(self._device))
        self._issued = 0
        self._started = False           # the job has started (first `wait`)
        self._events: list = []         # CUDA: (copy start, copy done) per layer
        self._wanted: dict[int, torch.cuda.Event] = {}
        self.hidden_s = self.exposed_s = 0.0

    def preload(self, num_layers: int) -> None:
        """Start copying layers ``[0, num_layers)`` now, before the job (see `preload_layers`)."""
        t0 = time.perf_counter()
        self._issue_through(min(num_layers, self.num_layers) - 1)
        if not self._cuda:
            self.hidden_s += time.perf_counter() - t0

    def wait(self, layer: int) -> None:
        """Make the current stream wait for layer ``layer``'s copy, and only that one (CPU: copy it now)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        if self._cuda:
            if not self._started:  # the job has started: queue every remaining layer behind the preloaded ones
                self._started = True
                self._issue_through(layer if self.lease.streamed else self.num_layers - 1)
            elif self.lease.streamed:  # layers still arriving from disk: issue each as it is needed
                self._issue_through(layer)
            current = torch.cuda.current_stream(self._device)
            self._wanted[layer] = torch.cuda.Event(enable_timing=True)
            self._wanted[layer].record(current)
            current.wait_event(self._events[layer][1])
        else:
            t0 = time.perf_counter()
            self._issue_through(layer)
            self.exposed_s += time.perf_counter() - t0

    def close(self) -> None:
        """Finish every copy, release the lease and report the transfer's hidden and exposed seconds."""
        try:
            self._issue_through(self.num_layers - 1)
        except BaseException:   # a streamed lease lost its history: release it all the same
            self.lease.release()
            raise
        if self._cuda and self._events:
            self._events[-1][1].synchronize()
            for layer, wanted in self._wanted.items():
                wanted.synchronize()
                self.exposed_s += max(0.0, wanted.elapsed_time(self._events[layer][1]) / 1e3)
            copy_s = sum(start.elapsed_time(done) for start, done in self._events) / 1e3
            self.hidden_s = max(0.0, copy_s - self.exposed_s)
        self.lease.record_transfer(self.hidden_s, self.exposed_s, self.lease.nbytes)
        self.lease.release()

    def _issue_through(self, last: int) -> None:
        while self._issued <= last:
            layer = self._issued
            self.lease.wait_layer(layer)
            with torch.cuda.stream(self._stream) if self._cuda else nullcontext():
                if self._cuda:
                    start = torch.cuda.Event(enable_timing=True)
                    start.record(self._stream)
                for seg in self.lease.segments:   # pinned host -> device, asynchronous on the copy stream
                    seg.scatter_layer(layer, self._k_caches[layer], self._v_caches[layer],
                                      self._slots[seg.start:seg.start + seg.num_tokens])
                if self._cuda:
                    done = torch.cuda.Event(enable_timing=True)
                    done.record(self._stream)
                    self._events.append((start, done))
            self._issued += 1


class LayerSaver:
    """Copies each layer's new KV out of the paged caches to host memory right after the layer ran.

    Args:
        store: where the KV goes, through its `KVStore.begin_save`: a `TieredStore` receives it straight
            in its pinned pool, a store of plain tensors in host buffers it saves at `finish`.
        key: the session; ``start``: its tokens already stored (only the new ones are copied).
        token_ids: ``[m] int64``, the new tokens.
        k_caches, v_caches: per layer ``[num_pages, page_size, num_kv_heads, head_dim]``.
        slot_mapping: ``[m]`` int, the slots the new tokens' KV was written to.
        stream: the save stream on CUDA (default: a new one).

    Nothing waits for the copies but `finish`'s background commit, and `wait_copies`, which the
    owner of the caches calls before it reuses these pages.
    """

    def __init__(self, store: KVStore, key: EntryKey, token_ids: torch.Tensor, start: int,
                 k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor], slot_mapping: torch.Tensor,
                 stream: torch.cuda.Stream | None = None):
        if not isinstance(token_ids, torch.Tensor) or token_ids.ndim != 1 or token_ids.dtype != torch.int64:
            raise TypeError(f"token_ids must be a 1-D int64 tensor, got {getattr(token_ids, 'shape', token_ids)!r}")
        c = k_caches[0]
        layout = KVLayout(len(k_caches), c.shape[2], c.shape[3], c.dtype)
        self._device = _check_caches(k_caches, v_caches, layout)
        self._slots = _slots(slot_mapping, token_ids.numel(), self._device)
        self._cuda = self._device.type == "cuda"
        self._stream = (stream or torch.cuda.Stream(self._device)) if self._cuda else None
        if self._cuda:
            self._slots.record_stream(self._stream)
        self._k_caches, self._v_caches = k_caches, v_caches
        self._pending = store.begin_save(key, token_ids.cpu(), layout, start)
        self._segments = self._pending.segments
        self._written = [False] * layout.num_layers
        self._last: torch.cuda.Event | None = None

    def layer_written(self, layer: int) -> None:
        """Layer ``layer``'s new KV is in the caches (queued on the current stream): copy it out."""
        if not 0 <= layer < len(self._written) or self._written[layer]:
            raise ValueError(f"layer {layer} is out of range or was already saved")
        if self._cuda:
            self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._stream) if self._cuda else nullcontext():
            k, v = (c.view(-1, *c.shape[2:]).index_select(0, self._slots)
                    for c in (self._k_caches[layer], self._v_caches[layer]))
            for seg in self._segments:   # an 8-bit store's segments quantize on the device, before the copy
                part = slice(seg.start, seg.start + seg.num_tokens)
                seg.write_layer(layer, k[part], v[part], non_blocking=True)
            if self._cuda:
                self._last = torch.cuda.Event()
                self._last.record(self._stream)
        self._written[layer] = True

    def save_all(self) -> None:
        """Copy every layer at once (decode tokens, saved at the end of a turn or in batches)."""
        for layer in range(len(self._written)):
            if not self._written[layer]:
                self.layer_written(layer)

    def wait_copies(self) -> None:
        """Make the current stream wait for the copies (before the pages they read are reused)."""
        if self._cuda and self._last is not None:
            torch.cuda.current_stream(self._device).wait_event(self._last)

    def finish(self) -> Future:
        """Commit once every copy is done: in the background on CUDA, at once on CPU. The future's
        result is None, or the commit's exception (e.g. ValueError if the stored history is shorter
        than ``start`` by then)."""
        if not all(self._written):
            raise ValueError(f"layers {[i for i, w in enumerate(self._written) if not w]} were never saved")
        if not self._cuda:
            future = Future()
            try:
                self._commit()
                future.set_result(None)
            except Exception as exc:
                future.set_exception(exc)
            return future
        global _committer
        if _committer is None:
            _committer = ThreadPoolExecutor(1, thread_name_prefix="cattn-save")
        return _committer.submit(self._commit)

    def abort(self) -> None:
        """Drop the copies; nothing is saved."""
        if self._last is not None:
            self._last.synchronize()
        self._pending.abort()

    def _commit(self) -> None:
        if self._last is not None:
            self._last.synchronize()
        self._pending.commit()
