"""Serving machines over a shared Redis tier, for the tests: a store with its own DRAM pool and disk
directory in this process, and another Python process (another machine) that runs given code, configured
through the environment to reach the same servers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cattn.store import DiskTier, TieredStore
from cattn.store.lower.redis_tier import RedisTier
from cattn.store.lower.over_shared import DiskOverShared

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 0.5
# A failed call costs at most one timeout, and the tier then answers at once until retry_after_s: a store
# call that meets a failure returns within the timeout (plus scheduling slack on a busy machine) however
# many Redis commands it would have sent.
BOUND_S = TIMEOUT_S + 0.5


def tier(urls, cluster=False, **kw) -> RedisTier:
    return RedisTier(urls=tuple(urls), cluster=cluster, **{"timeout_s": TIMEOUT_S, "retry_after_s": 0.5, **kw})


def machine(root: Path, urls, cluster=False, dram=1 << 22, **kw) -> TieredStore:
    """One serving machine: its own DRAM pool and disk directory, over the shared tier."""
    root.mkdir(parents=True, exist_ok=True)
    return TieredStore(dram, DiskOverShared(DiskTier(root, 1 << 26), tier(urls, cluster, **kw)))


def peer(code: str, env: dict, timeout: float = 300) -> str:
    """Run ``code`` in another Python process (another serving machine); its stdout."""
    full = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def redis_env(urls, cluster=False, **extra) -> dict:
    return {"CATTN_STORE_DRAM_BYTES": "4MiB", "CATTN_REDIS_URLS": ",".join(urls),
            "CATTN_REDIS_CLUSTER": str(cluster).lower(), "CATTN_REDIS_TIMEOUT_S": str(TIMEOUT_S), **extra}
