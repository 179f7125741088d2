"""`CattnConnector`: vLLM's `KVConnectorBase_V1` over cattn's `TieredStore` (imports vLLM).

Select it with ``kv_transfer_config={"kv_connector": "CattnConnector", "kv_connector_module_path":
"cattn.vllm.connector", "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
"kv_connector_extra_config": {...}}`` (`cattn.vllm.kv_transfer_config` builds it). See docs/vllm.md.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm import __version__ as vllm_version
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                               KVConnectorRole, KVConnectorWorkerMetadata)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.request import RequestStatus

from cattn.vllm.config import CattnVllmConfig
from cattn.vllm.directory import SessionDirectory
from cattn.vllm.jobs import LoadJob, QueueUpdate, SaveJob, StepReport
from cattn.vllm.keys import model_fingerprint
from cattn.vllm.scheduler import SchedulerSide
from cattn.vllm.shift import ShiftSupport, rope_for, sliding_window_of
from cattn.vllm.worker import WorkerSide, rank_store

log = logging.getLogger(__name__)

# The scheduler sides in this process, by engine id: with vLLM's in-process executor both roles live
# here, and the worker, which shuts down first, still writes the saves its scheduler planned but never
# sent. (Under the multi-process executor no worker is in the scheduler's process, and vLLM keeps
# stepping while saves are pending: `has_pending_push_work`.)
_local_schedulers: dict[str, SchedulerSide] = {}


@dataclass
class CattnConnectorMetadata(KVConnectorMetadata):
    """One step's work for the workers: histories to load before the forward, finished requests to
    save, and what the scheduler showed of its queue."""

    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)
    queue: QueueUpdate = field(default_factory=QueueUpdate)


@dataclass
class CattnWorkerMetadata(KVConnectorWorkerMetadata):
    """One worker's `StepReport`, merged across ranks by vLLM before the scheduler side reads it."""

    report: StepReport = field(default_factory=StepReport)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        self.report.merge(other.report)
        return self


@dataclass
class CattnConnectorStats(KVConnectorStats):
    """Counters of one logging interval: loads, load failures, tokens loaded, load seconds, saves,
    save failures, tokens saved. Summed across workers and steps."""

    def reset(self):
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


class CattnConnector(KVConnectorBase_V1):
    """Loads each new request's longest stored prefix into vLLM's blocks layer by layer and saves
    each finished request's new tokens in the background. Each worker keeps its shard of every session
    (its KV heads) in a `TieredStore` of its own; the scheduler side lists what every rank holds
    (`SessionDirectory`) from the workers' reports."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size != 1 or parallel.data_parallel_size != 1:
            raise ValueError(
                "CattnConnector supports tensor parallelism only: pipeline_parallel_size and "
                f"data_parallel_size must be 1, got {parallel.pipeline_parallel_size} and "
                f"{parallel.data_parallel_size}")
        self.config = CattnVllmConfig.from_extra_config(self._kv_transfer_config.kv_connector_extra_config)
        self._engine_id = self._kv_transfer_config.engine_id
        self.world_size = parallel.world_size
        block_size = vllm_config.cache_config.block_size
        # The model key covers vLLM's version and the TP size: a shard is served only to the rank
        # layout and vLLM that wrote it.
        model = model_fingerprint(vllm_config, vllm_version=vllm_version, tensor_parallel=self.world_size)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._saves_started = None   # the metadata whose saves start_load_kv started
        self._store = None
        self._block_size = block_size
        self._shifting = shift_support(vllm_config) if self.config.truncation else None
        if role == KVConnectorRole.SCHEDULER:
            records = None if self.config.disk_dir is None else Path(self.config.disk_dir) / "sessions"
            self._scheduler = SchedulerSide(self.config, SessionDirectory(model, block_size, records), self.world_size,
                                            self._shifting)
            _local_schedulers[self._engine_id] = self._scheduler
        else:
            self.rank = parallel.rank
            self._store = rank_store(self.config, self.rank, self.world_size)
        self._closed = False

    # ---- worker side -------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, Any]):
        self._worker = WorkerSide(self._store, self._block_size, kv_caches, rank=self.rank,
                                  persist=self.config.persist and self.config.disk_dir is not None,
                                  shifting=self._shifting)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if self._worker is None or not isinstance(meta, CattnConnectorMetadata):
            return
        self._worker.apply_queue(meta.queue)
        if meta.loads:
            self._worker.start_loads(meta.loads)
        if meta.saves:   # finished requests' blocks: untouched by this step's forward, copied beside it
            self._worker.start_saves(meta.saves)
            self._saves_started = meta

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._worker is not None:
            self._worker.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        # Saves are whole-request, at finish: each token's KV is final then and crosses once.
        return

    def wait_for_save(self):
        meta = self._get_connector_metadata()
        if self._worker is None:
            return
        self._worker.finish_loads()   # the leases go back before the step ends
        if isinstance(meta, CattnConnectorMetadata) and meta.saves and self._saves_started is not meta:
            self._worker.start_saves(meta.saves)
        self._saves_started = None
        self._worker.finish_saves()   # reported done in this step: vLLM frees the blocks now

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        return self._worker.take_saved() or None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if self._worker is None:
            return None
        report = self._worker.take_report()
        return CattnWorkerMetadata(report) if report else None

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._worker is None:
            return None
        stats = CattnConnectorStats(data=self._worker.take_counters())
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return CattnConnectorStats(data=dict(data or {}))

    def shutdown(self):
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            # One process (vLLM stops its workers before its scheduler): the saves planned at finish
            # but never sent in a step still have their blocks; write them, and list what was saved
            # since the last step, which no step will report now.
            scheduler = _local_schedulers.pop(self._engine_id, None)
            if scheduler is not None:
                self._worker.start_saves(scheduler.send_unsent())
            self._worker.close()
            if scheduler is not None:
                scheduler.reported(self._worker.take_report(), self._worker.take_saved())
        elif self._store is not None:
            self._store.close()

    # ---- scheduler side ----------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.match(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        self._scheduler.allocated(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return CattnConnectorMetadata(*self._scheduler.build(scheduler_output))

    def update_connector_output(self, connector_output) -> None:
        meta = connector_output.kv_connector_worker_meta
        report = meta.report if isinstance(meta, CattnWorkerMetadata) else None
        self._scheduler.reported(report, connector_output.finished_sending)

    def has_pending_push_work(self) -> bool:
        # keeps vLLM's engine stepping until every planned save is written and reported
        return self._scheduler is not None and self._scheduler.has_pending_saves()

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # with asynchronous scheduling the last scheduled tokens may not be computed yet
        computed = request.num_computed_tokens - getattr(request, "num_in_flight_tokens", 0)
        savable = request.status not in (RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR)
        return self._scheduler.finished(request, block_ids, computed=computed, savable=savable)

    # ---- both --------------------------------------------------------------------------------------

    def stats(self) -> dict:
        """This worker's store counters per tier (`TieredStore.stats`); empty on the scheduler side."""
        return self._store.stats() if self._store is not None else {}


def shift_support(vllm_config) -> ShiftSupport:
    """What this engine can shift (truncated conversations): the model's rope as cattn reads it, its
    sliding window, and the attention backend's KV block layout by name: ``cpu-<isa>`` for vLLM's CPU
    backend (only ``vec``/``vec16`` are known; `cattn.vllm.block_layout`), anything else unknown."""
    mc = vllm_config.model_config
    rope, reason = rope_for(mc.hf_config)
    layout = "unknown backend"
    try:
        from vllm.platforms import current_platform
        if vllm_config.cache_config.cache_dtype != "auto":
            layout = f"quantized KV cache {vllm_config.cache_config.cache_dtype}"
        elif current_platform.is_cpu():
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa   # vLLM's own choice of ISA
            layout = "cpu-" + _get_attn_isa(mc.dtype, vllm_config.cache_config.block_size, mc.get_head_size())
    except Exception as exc:   # a vLLM without these: unknown, so never shifted
        log.warning("cattn: KV block layout not known (%s); truncated histories are recomputed", exc)
    log.info("cattn: truncation on; KV layout %s, rope %s", layout, "ok" if rope is not None else reason)
    return ShiftSupport(rope, reason, sliding_window_of(mc.hf_config), layout)
