"""`CattnConnector`: vLLM's `KVConnectorBase_V1` over cattn's `TieredStore` (imports vLLM).

Select it with ``kv_transfer_config={"kv_connector": "CattnConnector", "kv_connector_module_path":
"cattn.vllm.connector", "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
"kv_connector_extra_config": {...}}`` (`cattn.vllm.kv_transfer_config` builds it). See docs/vllm.md.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                               KVConnectorRole)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from cattn.vllm import engine_state
from cattn.vllm.config import CattnVllmConfig
from cattn.vllm.keys import model_fingerprint
from cattn.vllm.scheduler import SchedulerSide
from cattn.vllm.jobs import LoadJob, SaveJob
from cattn.vllm.worker import WorkerSide

log = logging.getLogger(__name__)


@dataclass
class CattnConnectorMetadata(KVConnectorMetadata):
    """One step's work for the worker: histories to load before the forward, finished requests to save."""

    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)


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
    each finished request's new tokens in the background; sessions live in a `TieredStore`."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        parallel = vllm_config.parallel_config
        if parallel.world_size != 1 or parallel.distributed_executor_backend not in (None, "uni"):
            raise ValueError(
                "CattnConnector needs vLLM's scheduler and its one worker in one process (tensor and "
                "pipeline parallel size 1, distributed_executor_backend='uni'; on CPU also "
                f"VLLM_ENABLE_V1_MULTIPROCESSING=0), got world_size={parallel.world_size}, "
                f"distributed_executor_backend={parallel.distributed_executor_backend!r}")
        self.config = CattnVllmConfig.from_extra_config(self._kv_transfer_config.kv_connector_extra_config)
        self._engine_id = self._kv_transfer_config.engine_id
        self.shared = engine_state.attach(self._engine_id, self.config, model_fingerprint(vllm_config),
                                          vllm_config.cache_config.block_size)
        self._scheduler = SchedulerSide(self.shared) if role == KVConnectorRole.SCHEDULER else None
        if self._scheduler is not None:
            self.shared.scheduler = self._scheduler
        self._worker: WorkerSide | None = None
        self._closed = False

    # ---- worker side -------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, Any]):
        self._worker = self.shared.worker = WorkerSide(self.shared, kv_caches)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if self._worker is not None and isinstance(meta, CattnConnectorMetadata) and meta.loads:
            self._worker.start_loads(meta.loads)

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
        if isinstance(meta, CattnConnectorMetadata) and meta.saves:
            self._worker.start_saves(meta.saves)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        return self._worker.take_saved() or None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

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
        # Saves planned at finish but not yet sent in a step go to the worker, whichever role shuts
        # down first (one process: their blocks are still held).
        scheduler, worker = self.shared.scheduler, self.shared.worker
        if scheduler is not None and worker is not None and (unsent := scheduler.take_unsent_saves()):
            worker.start_saves(unsent)
        if self._worker is not None:
            self._worker.close()
        engine_state.detach(self._engine_id)

    # ---- scheduler side ----------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.match(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        self._scheduler.allocated(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        loads, saves = self._scheduler.build(scheduler_output)
        return CattnConnectorMetadata(loads, saves)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler.finished(request, block_ids)

    # ---- both --------------------------------------------------------------------------------------

    def stats(self) -> dict:
        """cattn's own counters: the store's per tier (`TieredStore.stats`)."""
        return self.shared.store.stats()
