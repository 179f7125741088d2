"""A store from a TOML file or ``CATTN_*`` environment variables.

```toml
[store]                       # the DRAM tier and the store's options
dram_bytes = "4GiB"           # sizes: an int of bytes or "512MiB", "4GB", ...
policy = "scheduler"          # scheduler | lru | fifo   (policy_ttl_s: scheduler only)
kv_format = "int8"            # lossless (default) | int8 | fp8: how DRAM, disk and Redis keep KV
[disk]                        # optional: the local disk tier
path = "/var/cache/cattn"
capacity_bytes = "1TiB"
[redis]                       # optional: the shared tier (beside the disk, or alone under DRAM)
urls = ["redis://10.0.0.5:6379/0"]   # cluster = true: any nodes of the cluster
timeout_s = 0.5
[metrics]                     # optional: the Prometheus endpoint
port = 9464
```

The environment spells the same keys ``CATTN_<SECTION>_<KEY>`` (``CATTN_STORE_DRAM_BYTES``,
``CATTN_REDIS_URLS`` as a comma-separated list, ``CATTN_REDIS_CLUSTER=true``); it overrides
the file. An unknown section or key, or a bad value, is a ValueError naming it.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cattn.store.kvformat.names import FORMATS, LOSSLESS
from cattn.store.lower.redis_client import RedisOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (a dependency there only)
    import tomli as tomllib

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
POLICY_NAMES = ("scheduler", "lru", "fifo")   # belady needs the future: not a serving policy


@dataclass(frozen=True)
class DramConfig:
    dram_bytes: int = 1 << 30
    high_watermark: float = 0.9
    low_watermark: float = 0.7
    io_threads: int = 2
    full_timeout_s: float = 5.0
    policy: str = "lru"
    policy_ttl_s: float | None = None
    disk_read_bytes_per_s: float | None = None
    pin: bool | None = None
    partial_prefetch: bool = False
    max_chunk_tokens: int | None = None
    kv_format: str = LOSSLESS


@dataclass(frozen=True)
class DiskConfig:
    path: str = ""
    capacity_bytes: int = 1 << 40


@dataclass(frozen=True)
class RedisConfig(RedisOptions):
    """The ``[redis]`` section: `RedisOptions`, except that no server is named unless ``urls`` are."""

    urls: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetricsConfig:
    port: int = 0
    addr: str = "127.0.0.1"


@dataclass(frozen=True)
class StoreConfig:
    """The whole store: ``store`` (DRAM and options) always; ``disk``, ``redis``, ``metrics`` if given."""

    store: DramConfig = field(default_factory=DramConfig)
    disk: DiskConfig | None = None
    redis: RedisConfig | None = None
    metrics: MetricsConfig | None = None

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, environ: dict | None = None) -> StoreConfig:
        """The file at ``path`` (TOML; None: none), then the ``CATTN_*`` variables of ``environ``
        (default ``os.environ``) over it."""
        raw: dict = {}
        if path is not None:
            try:
                raw = tomllib.loads(Path(path).read_text())
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"store config {path}: not valid TOML: {exc}") from None
        for name, value in (os.environ if environ is None else environ).items():
            for section in SECTIONS:
                prefix = f"CATTN_{section.upper()}_"
                if name.startswith(prefix):
                    raw.setdefault(section, {})[name[len(prefix):].lower()] = _EnvValue(value, name)
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> StoreConfig:
        if not isinstance(raw, dict):
            raise ValueError(f"store config must be a table, got {type(raw).__name__}")
        parts = {}
        for section, values in raw.items():
            if section not in SECTIONS:
                raise ValueError(f"store config: unknown section [{section}]; known: {', '.join(SECTIONS)}")
            if not isinstance(values, dict):
                raise ValueError(f"store config: [{section}] must be a table")
            parts[section] = _section(SECTIONS[section], section, values)
        config = cls(**parts)
        _check(config)
        return config


SECTIONS = {"store": DramConfig, "disk": DiskConfig, "redis": RedisConfig, "metrics": MetricsConfig}


class _EnvValue(str):
    """A value from the environment: a string that still says which variable it came from."""

    def __new__(cls, value: str, name: str):
        s = super().__new__(cls, value)
        s.name = name
        return s


def _size(text: str, where: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{where}: not a size: {text!r} (e.g. 4GiB, 512MB, 1048576)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _coerce(value, kind: str, optional: bool, where: str):
    env = isinstance(value, _EnvValue)
    if env and optional and value.strip().lower() in ("", "none"):
        return None
    if kind == "size":
        if isinstance(value, str):
            return _size(value, where)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind == "int":
        if env and re.fullmatch(r"\s*-?[0-9]+\s*", value):
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind == "float":
        if env:
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind == "bool":
        if env and value.strip().lower() in ("1", "true", "yes", "0", "false", "no"):
            return value.strip().lower() in ("1", "true", "yes")
        if isinstance(value, bool):
            return value
    elif kind == "str":
        if isinstance(value, str):
            return str(value)
    elif kind == "strs":
        if env:
            return tuple(u.strip() for u in value.split(",") if u.strip())
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(u, str) for u in value):
            return tuple(value)
    raise ValueError(f"{where}: expected {kind}, got {value!r}")


def _kind(name: str, annotation: str) -> str:
    if name.endswith("_bytes") and "int" in annotation:
        return "size"
    for kind in ("bool", "int", "float", "str"):
        if annotation.startswith(kind):
            return kind
    return "strs"   # tuple[str, ...]


def _section(cls, section: str, values: dict):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        where = getattr(value, "name", None) or f"[{section}] {name}"
        if name not in fields:
            raise ValueError(f"store config: unknown key {where}; [{section}] knows {', '.join(fields)}")
        annotation = str(fields[name].type)
        kwargs[name] = _coerce(value, _kind(name, annotation), "None" in annotation, where)
    return cls(**kwargs)


def _check(c: StoreConfig) -> None:
    """Range checks, each naming its key."""
    s = c.store
    rules = [
        ("store.dram_bytes", s.dram_bytes > 0, "must be > 0"),
        ("store.high_watermark", 0 < s.high_watermark <= 1, "must be in (0, 1]"),
        ("store.low_watermark", 0 < s.low_watermark <= s.high_watermark, "must be in (0, high_watermark]"),
        ("store.io_threads", s.io_threads >= 1, "must be >= 1"),
        ("store.full_timeout_s", s.full_timeout_s > 0, "must be > 0"),
        ("store.policy", s.policy in POLICY_NAMES, f"must be one of {', '.join(POLICY_NAMES)}"),
        ("store.policy_ttl_s", s.policy_ttl_s is None or (s.policy_ttl_s > 0 and s.policy == "scheduler"),
         "must be > 0, with policy = 'scheduler'"),
        ("store.disk_read_bytes_per_s", s.disk_read_bytes_per_s is None or 0 < s.disk_read_bytes_per_s < float("inf"),
         "must be a positive number"),
        ("store.max_chunk_tokens", s.max_chunk_tokens is None or s.max_chunk_tokens >= 1, "must be >= 1"),
        ("store.kv_format", s.kv_format in FORMATS, f"must be one of {', '.join(FORMATS)}"),
    ]
    if c.disk is not None:
        rules += [("disk.path", bool(c.disk.path), "must name a directory"),
                  ("disk.capacity_bytes", c.disk.capacity_bytes > 0, "must be > 0")]
    if (r := c.redis) is not None:
        rules += [
            ("redis.urls", bool(r.urls) and all(re.fullmatch(r"rediss?://\S+", u) for u in r.urls),
             "must be one or more redis:// or rediss:// URLs"),
            ("redis.urls", r.cluster or len(r.urls) <= 1, "must be one URL unless cluster = true"),
            ("redis.timeout_s", r.timeout_s > 0, "must be > 0"),
            ("redis.retry_after_s", r.retry_after_s >= 0, "must be >= 0"),
            ("redis.ttl_s", r.ttl_s is None or r.ttl_s > 0, "must be > 0"),
            ("redis.prefix", bool(re.fullmatch(r"[A-Za-z0-9._-]{1,64}", r.prefix)), "must be 1-64 of [A-Za-z0-9._-]"),
            ("redis.piece_bytes", 0 < r.piece_bytes <= 512 << 20, "must be in (0, 512MiB] (Redis's value limit)"),
            ("redis.capacity_bytes", r.capacity_bytes > 0, "must be > 0"),
            ("redis.tls_ca_certs", r.tls_ca_certs is None or r.tls or all(u.startswith("rediss://") for u in r.urls),
             "needs tls = true or rediss:// URLs"),
        ]
    if (m := c.metrics) is not None:
        rules += [("metrics.port", 0 <= m.port <= 65535, "must be in 0..65535"),
                  ("metrics.addr", bool(m.addr), "must be an address to listen on")]
    for key, ok, what in rules:
        if not ok:
            section, name = key.split(".")
            value = getattr(getattr(c, section), name)
            raise ValueError(f"store config: [{section}] {name} {what}, got {value!r}")


def build_store(config: StoreConfig | str | os.PathLike | None = None, **overrides):
    """A `TieredStore` as ``config`` says: a `StoreConfig`, a TOML file's path, or None for the ``CATTN_*``
    environment alone; ``overrides`` are `TieredStore` options over the ``[store]`` section's. With a
    ``[metrics]`` section the endpoint is started; ``store.metrics_server`` is it (else None), and the
    store's `close` stops it. The tiers and the store are imported here, when one is built: reading a
    config needs neither torch nor a Redis client."""
    from cattn.store.lower.disk import DiskTier
    from cattn.store.lower.over_shared import DiskOverShared
    from cattn.store.lower.redis_tier import RedisTier
    from cattn.store.metrics import serve_metrics
    from cattn.store.policy import make_policy
    from cattn.store.tiered.store import TieredStore

    if not isinstance(config, StoreConfig):
        config = StoreConfig.load(config)
    s, lower = config.store, None
    if config.disk is not None:
        lower = DiskTier(config.disk.path, config.disk.capacity_bytes)
    if (r := config.redis) is not None:
        shared = RedisTier(r)
        lower = shared if lower is None else DiskOverShared(lower, shared)
    kwargs = dict(policy=make_policy(s.policy, ttl=s.policy_ttl_s), high_watermark=s.high_watermark,
                  low_watermark=s.low_watermark, io_threads=s.io_threads, full_timeout_s=s.full_timeout_s,
                  pin=s.pin, disk_read_bytes_per_s=s.disk_read_bytes_per_s,
                  partial_prefetch=s.partial_prefetch, max_chunk_tokens=s.max_chunk_tokens,
                  kv_format=s.kv_format) | overrides
    store = TieredStore(s.dram_bytes, lower, **kwargs)
    if config.metrics is not None:
        store.metrics_server = serve_metrics(store, config.metrics.port, config.metrics.addr)
    return store
