"""The host-side KV hierarchy (AttentionStore): sessions' KV in pinned DRAM and on disk between turns,
streamed to the GPU layer by layer and saved back asynchronously. See docs/store.md.

The names below are imported on first use, so that tools which only need the policies
(`cattn replay`, its `--help` above all) do not import torch."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "cattn.store.contract": ["EntryKey", "KVEntry", "KVStore", "check_key", "check_name", "check_store",
                             "common_prefix"],
    "cattn.store.errors": ["FormatError", "HistoryLost", "RemoteTierError", "StoreFullError"],
    "cattn.store.device.tier": ["DeviceTier"],
    "cattn.store.device.resident": ["DeviceTierConfig", "Resident"],
    "cattn.store.lower.disk": ["DiskTier"],
    "cattn.store.layout": ["KVLayout"],
    "cattn.store.lease": ["KVLease", "LoadSource", "PendingSave", "Segment"],
    "cattn.store.kvformat.segment": ["QuantSegment"],
    "cattn.store.memory": ["MemoryStore"],
    "cattn.store.tiered.store": ["TieredStore"],
    "cattn.store.lower.redis_tier": ["RedisTier"],
    "cattn.store.lower.over_shared": ["DiskOverShared"],
    "cattn.store.config": ["StoreConfig", "build_store"],
    "cattn.store.transfer": ["LayerLoader", "LayerSaver", "copy_bandwidth", "preload_layers"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'cattn.store' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
