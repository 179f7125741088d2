"""cattn inside vLLM: a KV connector over cattn's store (docs/vllm.md).

vLLM is imported only by `cattn.vllm.connector` (the ``vllm`` extra), so this package and
`kv_transfer_config` work without it.
"""
from __future__ import annotations

from typing import Any

from cattn.vllm.config import CattnVllmConfig

CONNECTOR_NAME = "CattnConnector"
CONNECTOR_MODULE = "cattn.vllm.connector"


def kv_transfer_config(config: CattnVllmConfig | None = None, *, kv_load_failure_policy: str = "recompute",
                       **extra: Any) -> dict[str, Any]:
    """The ``kv_transfer_config`` that selects cattn's connector, for ``LLM(kv_transfer_config=...)`` or,
    as JSON, ``vllm serve --kv-transfer-config``.

    Args:
        config: the store behind the connector (default `CattnVllmConfig()`: 1 GiB of DRAM, no disk).
        kv_load_failure_policy: vLLM's answer to a load that fails: ``"recompute"`` (the blocks are
            computed again) or ``"fail"`` (the request fails).
        extra: other ``kv_connector_extra_config`` entries.
    """
    if kv_load_failure_policy not in ("recompute", "fail"):
        raise ValueError(f"kv_load_failure_policy must be 'recompute' or 'fail', got {kv_load_failure_policy!r}")
    return {"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": CONNECTOR_MODULE, "kv_role": "kv_both",
            "kv_load_failure_policy": kv_load_failure_policy,
            "kv_connector_extra_config": {**(config or CattnVllmConfig()).to_extra_config(), **extra}}


def __getattr__(name: str):
    if name in ("CattnConnector", "CattnConnectorMetadata", "CattnConnectorStats"):
        from cattn.vllm import connector
        return getattr(connector, name)
    raise AttributeError(f"module 'cattn.vllm' has no attribute {name!r}")


__all__ = ["CattnVllmConfig", "kv_transfer_config", "CattnConnector", "CONNECTOR_NAME", "CONNECTOR_MODULE"]
