"""How the shared tier reaches Redis: its options and its client (one server, or a Redis Cluster)."""
from __future__ import annotations

import functools
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
    """A `redis.Redis` (or `redis.cluster.RedisCluster`) client: ``timeout_s`` on every socket, no retries.

    A cluster client is built from whichever node answers: the slot map from the first node that answers
    ``CLUSTER SLOTS`` (redis-py tries each), and ``COMMAND`` from the first master that answers a PING
    (`_cluster_class`), so a dead master does not stop it. Each node that does not answer costs at most
    one ``timeout_s`` (once for the slot map, once for the PING)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    common = dict(username=o.username, password=o.password, socket_timeout=o.timeout_s,
                  socket_connect_timeout=o.timeout_s, retry=Retry(NoBackoff(), 0))
    tls = o.tls or o.urls[0].startswith("rediss://")
    if tls:
        common.update(ssl_ca_certs=o.tls_ca_certs)
    if o.cluster:
        from redis.cluster import ClusterNode

        common.update(ssl=tls)
        nodes = []
        for url in o.urls:
            parsed = redis.connection.parse_url(url)
            nodes.append(ClusterNode(parsed.get("host", "127.0.0.1"), parsed.get("port", 6379)))
        return _cluster_class()(startup_nodes=nodes, require_full_coverage=False, **common)
    url = o.urls[0].replace("redis://", "rediss://", 1) if tls else o.urls[0]   # the scheme picks TLS
    return redis.Redis.from_url(url, **common)


@functools.cache
def _cluster_class():
    """`redis.cluster.RedisCluster`, built even while the master of slot 0 is dead.

    redis-py's constructor asks its default node for ``COMMAND`` (the command table it routes by), and the
    default node is the first master of the slot map, the one serving slot 0; with no retry, a dead one
    made the constructor raise, and the tier then missed every session, also those on live masters. While
    this one is built, its default node is the first master (then replica) that answers a PING within the
    socket timeout. Once built, no command of the tier goes to the default node: each goes to its key's
    slot owner."""
    import redis
    from redis.cluster import RedisCluster

    class Cluster(RedisCluster):
        _building = True   # until __init__ returns

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._building = False

        def get_default_node(self):
            node = super().get_default_node()
            if not self._building or node is None or node is getattr(self, "_answered", None):
                return node
            candidates = [node, *self.get_primaries(), *self.get_replicas()]
            for candidate in dict.fromkeys(candidates):
                try:
                    candidate.redis_connection.ping()
                except (redis.RedisError, OSError):
                    continue
                self.nodes_manager.default_node = self._answered = candidate
                return candidate
            return node   # none answers: COMMAND fails, and so does the constructor

    return Cluster
