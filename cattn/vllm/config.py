"""`CattnVllmConfig`: what the connector reads from ``kv_connector_extra_config``."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from cattn.store.contract import check_name

PREFIX = "cattn."


@dataclass(frozen=True)
class CattnVllmConfig:
    """The store behind the connector; every field is ``kv_connector_extra_config["cattn.<field>"]``.

    Attributes:
        dram_bytes: the pinned host pool (the DRAM tier).
        disk_dir: the disk tier's directory, or None for DRAM only (a restart then starts empty).
        disk_bytes: the disk tier's capacity.
        persist: write each saved session through to the disk tier right after it is saved, so an
            engine that is killed (vLLM's shutdown may not reach the worker) leaves its sessions on disk.
        default_tenant: the tenant of requests without a ``cache_salt``.
        session_param: the ``kv_transfer_params`` key that carries a client's session id.
        truncation: serve truncated conversations (the oldest messages dropped, a prefix such as the
            system prompt kept) from the stored history, the kept span's keys re-rotated to their new
            positions (docs/vllm.md, "Truncation"). Off: only prefixes are served.
    """

    dram_bytes: int = 1 << 30
    disk_dir: str | None = None
    disk_bytes: int = 8 << 30
    persist: bool = True
    default_tenant: str = "default"
    session_param: str = "cattn_session"
    truncation: bool = False

    def __post_init__(self):
        for name in ("dram_bytes", "disk_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{PREFIX}{name} must be a positive int (bytes), got {value!r}")
        if self.disk_dir is not None and (not isinstance(self.disk_dir, str) or not self.disk_dir):
            raise ValueError(f"{PREFIX}disk_dir must be a directory path or None, got {self.disk_dir!r}")
        for name in ("persist", "truncation"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{PREFIX}{name} must be a bool, got {getattr(self, name)!r}")
        check_name(self.default_tenant, f"{PREFIX}default_tenant")
        if not isinstance(self.session_param, str) or not self.session_param:
            raise ValueError(f"{PREFIX}session_param must be a non-empty string, got {self.session_param!r}")

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> CattnVllmConfig:
        """Parse ``kv_connector_extra_config``; unknown ``cattn.*`` keys are a ValueError (a typo must
        not silently fall back to a default), keys of other connectors are ignored."""
        extra = extra or {}
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in extra.items():
            if not key.startswith(PREFIX):
                continue
            name = key[len(PREFIX):]
            if name not in known:
                raise ValueError(f"unknown kv_connector_extra_config key {key!r}; known: "
                                 f"{sorted(PREFIX + k for k in known)}")
            values[name] = value
        return cls(**values)

    def to_extra_config(self) -> dict[str, Any]:
        return {PREFIX + f.name: getattr(self, f.name) for f in fields(self)}
