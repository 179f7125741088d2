"""The host-side KV hierarchy (AttentionStore): sessions' KV in pinned DRAM and on disk between turns,
streamed to the GPU layer by layer and saved back asynchronously. See docs/store.md."""
from cattn.store.base import EntryKey, KVEntry, KVStore, check_key, check_name
from cattn.store.device import DeviceTier, DeviceTierConfig, Resident
from cattn.store.disk import DiskTier
from cattn.store.fileformat import FormatError
from cattn.store.layout import KVLayout
from cattn.store.lease import KVLease, PendingSave, Segment
from cattn.store.memory import MemoryStore
from cattn.store.tiered import StoreFullError, TieredStore
from cattn.store.redis_tier import RedisTier, RemoteTierError
from cattn.store.shared import DiskOverShared
from cattn.store.config import StoreConfig
from cattn.store.transfer import LayerLoader, LayerSaver, copy_bandwidth, preload_layers

__all__ = ["EntryKey", "KVEntry", "KVStore", "check_key", "check_name", "DeviceTier", "DeviceTierConfig", "Resident", "DiskTier", "FormatError", "KVLayout", "KVLease",
           "PendingSave", "Segment", "MemoryStore", "StoreFullError", "TieredStore", "LayerLoader", "LayerSaver",
           "copy_bandwidth", "preload_layers", "RedisTier", "RemoteTierError", "DiskOverShared", "StoreConfig"]
