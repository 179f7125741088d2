"""How the shared tier reaches Redis: its options and its client (one server, or a Redis Cluster)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisOptions:
    """How to reach Redis. ``urls``: one ``redis://`` / ``rediss://`` (TLS) URL for a server, or any
    number of cluster nodes with ``cluster=True``. ``ttl_s``: expiry of every key (None: none)."""

    urls: tuple[str, ...] = ("redis://127.0.0.1:6379/0",)
    cluster: bool = False
    username: str | None = None
    password: str | None = None
    tls: bool = False
    tls_ca_certs: str | None = None
    timeout_s: float = 1.0
    retry_after_s: float = 1.0
    ttl_s: float | None = None
    prefix: str = "cattn"
    piece_bytes: int = 32 << 20
    capacity_bytes: int = 1 << 50


def connect(o: RedisOptions):
    """A `redis.Redis` (or `redis.cluster.RedisCluster`) client: ``timeout_s`` on every socket, no retries."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    common = dict(username=o.username, password=o.password, socket_timeout=o.timeout_s,
                  socket_connect_timeout=o.timeout_s, retry=Retry(NoBackoff(), 0))
    tls = o.tls or o.urls[0].startswith("rediss://")
    if tls:
        common.update(ssl_ca_certs=o.tls_ca_certs)
    if o.cluster:
        from redis.cluster import ClusterNode, RedisCluster

        common.update(ssl=tls)
        nodes = []
        for url in o.urls:
            parsed = redis.connection.parse_url(url)
            nodes.append(ClusterNode(parsed.get("host", "127.0.0.1"), parsed.get("port", 6379)))
        return RedisCluster(startup_nodes=nodes, require_full_coverage=False, **common)
    url = o.urls[0].replace("redis://", "rediss://", 1) if tls else o.urls[0]   # the scheme picks TLS
    return redis.Redis.from_url(url, **common)
