"""What the scheduler side and the worker side of one engine share (`EngineState`): the store, the
content index, the saves in flight and per-request results.

vLLM builds the connector twice, once per role. With ``distributed_executor_backend="uni"`` both live
in the engine-core process, and they meet here, keyed by the engine id; the KV itself never leaves
that process except to the store's own tiers.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cattn.store.contract import EntryKey
from cattn.store.lower.disk import DiskTier
from cattn.store.tiered.store import TieredStore
from cattn.store.policy.base import Scheduler
from cattn.vllm.config import CattnVllmConfig
from cattn.vllm.keys import CONTENT_PREFIX, block_chain

log = logging.getLogger(__name__)


@dataclass
class RequestResult:
    """What the worker did for one request, reported back in its ``kv_transfer_params``."""

    loaded_tokens: int = 0
    load_failed: bool = False
    from_disk: bool = False
    load_s: float = 0.0


@dataclass
class EngineState:
    """One engine's store and bookkeeping; every field is guarded by ``lock``."""

    config: CattnVllmConfig
    model: str                        # the model fingerprint
    block_size: int
    store: TieredStore
    lock: threading.Lock = field(default_factory=threading.Lock)
    # (tenant, chain digest) -> content session: any request whose block chain reaches a stored
    # session's digest finds it. Verified against the stored tokens before use.
    index: dict[tuple[str, int], str] = field(default_factory=dict)
    saving: dict[EntryKey, int] = field(default_factory=dict)   # saves in flight per session
    results: dict[str, RequestResult] = field(default_factory=dict)
    users: int = 0
    worker: object = None             # the WorkerSide, once the worker role registered its caches
    scheduler: object = None          # the SchedulerSide

    def index_locked(self, key: EntryKey, token_ids: list[int]) -> None:
        if key.session.startswith(CONTENT_PREFIX):
            for digest in block_chain(token_ids, self.block_size):
                self.index[(key.tenant, digest)] = key.session

    def rebuild_index(self) -> None:
        """Index the content sessions the disk tier brought back (this model's only), so that a
        restarted engine finds conversations by content too."""
        if self.config.disk_dir is None:
            return
        for session_dir in Path(self.config.disk_dir).glob(f"*/{self.model}/{CONTENT_PREFIX}*"):
            try:
                key = EntryKey(session_dir.parent.parent.name, self.model, session_dir.name)
            except ValueError:
                continue
            ids = self.store.lookup(key)
            if ids is not None:
                with self.lock:
                    self.index_locked(key, ids.tolist())


_engines: dict[str, EngineState] = {}
_engines_lock = threading.Lock()


def attach(engine_id: str, config: CattnVllmConfig, model: str, block_size: int) -> EngineState:
    """The shared state of ``engine_id``, made by whichever side comes first."""
    with _engines_lock:
        shared = _engines.get(engine_id)
        if shared is None:
            disk = None
            if config.disk_dir is not None:
                disk = DiskTier(config.disk_dir, config.disk_bytes)
            store = TieredStore(config.dram_bytes, disk, policy=Scheduler())
            shared = _engines[engine_id] = EngineState(config, model, block_size, store)
            shared.rebuild_index()
        elif shared.config != config or shared.model != model or shared.block_size != block_size:
            raise ValueError(f"engine {engine_id!r}: the two connector roles disagree on config or model")
        shared.users += 1
        return shared


def engines() -> list[EngineState]:
    """The engines with a cattn connector in this process (tests and benchmarks read their stores)."""
    with _engines_lock:
        return list(_engines.values())


def detach(engine_id: str) -> None:
    """Drop one role's reference; the last one closes the store (flushing it to disk)."""
    with _engines_lock:
        shared = _engines.get(engine_id)
        if shared is None:
            return
        shared.users -= 1
        if shared.users > 0:
            return
        del _engines[engine_id]
    shared.store.close(persist=shared.config.disk_dir is not None)
