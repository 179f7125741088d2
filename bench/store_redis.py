"""Throughput of the shared Redis tier against plain `redis` pipelined SET/GET of the same bytes, in the same run,
on one server and on a 3-master cluster, over loopback (`python bench/store.py --redis`).

Save: a store writing a session from its DRAM to Redis (`flush`: the same `persist` the write-through
after each commit runs): the chunk's pieces pipelined while they are checksummed, its header, then the
manifest. Load: a second store (another machine: the session is not in
its DRAM) `acquire`s it: manifest, then header and pieces pipelined, copied into the pool and checksummed.
The baseline pipelines SET (or GET) of the same bytes in pieces of the same size. Servers are started
here on free loopback ports (``--redis-url`` uses a running one instead, and skips the cluster).
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # the Redis servers the tests start, started the same way here

from tests.store.redis_servers import RedisCluster, RedisServer  # noqa: E402

from cattn.store.contract import EntryKey, KVEntry  # noqa: E402
from cattn.store.lower.fileformat import bytes_of  # noqa: E402
from cattn.store.lower.redis_tier import RedisTier  # noqa: E402
from cattn.store.tiered.store import TieredStore  # noqa: E402

MODEL = "0123abcd"


def _client(urls, cluster: bool):
    import redis
    from redis.cluster import ClusterNode, RedisCluster as Cluster

    if cluster:
        nodes = [ClusterNode(*u.split("//")[1].split("/")[0].rsplit(":", 1)) for u in urls]
        return Cluster(startup_nodes=nodes)
    return redis.Redis.from_url(urls[0])


def bench_topology(name: str, urls, cluster: bool, entry: KVEntry, repeats: int, piece_bytes: int) -> list[dict]:
    nbytes = entry.nbytes
    data = torch.cat([entry.k.reshape(-1).view(torch.uint8), entry.v.reshape(-1).view(torch.uint8)])
    view = bytes_of(data)
    pieces = [view[i:i + piece_bytes] for i in range(0, nbytes, piece_bytes)]
    r = _client(urls, cluster)

    def tier():
        return RedisTier(urls=tuple(urls), cluster=cluster, timeout_s=60.0, piece_bytes=piece_bytes)

    def base_set(i):
        tag = "{plain/%d}" % i   # one slot, as the store's keys of one session
        pipe = r.pipeline(transaction=False)
        for j, p in enumerate(pieces):
            pipe.set(f"{tag}:{j}", p)
        pipe.execute()

    def base_get(i):
        pipe = r.pipeline(transaction=False)
        for j in range(len(pieces)):
            pipe.get("{plain/%d}:%d" % (i, j))
        got = pipe.execute()
        assert sum(len(g) for g in got) == nbytes

    save_s, load_s, base_save_s, base_load_s = [], [], [], []
    for i in range(repeats + 1):        # round 0 warms up both sides
        key = EntryKey("bench", MODEL, f"s{i}")
        writer_tier = tier()
        writer_tier.write_through = False   # the write is timed alone: `flush`, the path a write-through takes
        writer = TieredStore(2 * nbytes + (1 << 20), writer_tier, high_watermark=1.0, low_watermark=1.0)
        writer.lookup(EntryKey("bench", MODEL, "warm"))   # connected before the clock starts, as a serving machine is
        writer.save(key, entry)
        steps = [("save", lambda: writer.flush()), ("base_save", lambda: base_set(i))]
        for label, fn in (steps if i % 2 else steps[::-1]):
            t0 = time.perf_counter()
            fn()
            (save_s if label == "save" else base_save_s).append(time.perf_counter() - t0)
        writer.close(persist=False)     # the Redis copy stays for the reader
        reader = TieredStore(nbytes + (1 << 20), tier(), high_watermark=1.0, low_watermark=1.0)
        reader.lookup(EntryKey("bench", MODEL, "warm"))

        def load():
            lease = reader.acquire(key)
            assert lease is not None and lease.num_tokens == entry.num_tokens
            lease.release()
        steps = [("load", load), ("base_load", lambda: base_get(i))]
        for label, fn in (steps if i % 2 else steps[::-1]):
            t0 = time.perf_counter()
            fn()
            (load_s if label == "load" else base_load_s).append(time.perf_counter() - t0)
        reader.close(persist=False)
        r.delete(*[f"{{plain/{i}}}:{j}" for j in range(len(pieces))])
        for x in (save_s, base_save_s, load_s, base_load_s):
            if i == 0:
                x.clear()
    r.close()
    return [dict(topology=name, op="save (flush)", bytes=nbytes, seconds=save_s,
                 baseline="pipelined SET", baseline_seconds=base_save_s),
            dict(topology=name, op="load (acquire)", bytes=nbytes, seconds=load_s,
                 baseline="pipelined GET", baseline_seconds=base_load_s)]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def run(mib: int, repeats: int, out: str | None, url: str | None, piece_mib: int) -> None:
    import cattn
    from bench.common import format_table, write_json

    layers, heads, dim = 32, 8, 128
    tokens = (mib << 20) // (2 * layers * heads * dim * 2)
    entry = KVEntry(torch.arange(tokens), torch.randn(layers, tokens, heads, dim).to(torch.bfloat16),
                    torch.randn(layers, tokens, heads, dim).to(torch.bfloat16))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if url:
            rows += bench_topology("server", [url], False, entry, repeats, piece_mib << 20)
        else:
            server = RedisServer(Path(tmp))
            try:
                rows += bench_topology("server", [server.url], False, entry, repeats, piece_mib << 20)
            finally:
                server.stop()
            cluster = RedisCluster(Path(tmp) / "cluster")
            try:
                rows += bench_topology("cluster (3 masters)", list(cluster.urls), True, entry, repeats,
                                       piece_mib << 20)
            finally:
                cluster.stop()
    for r in rows:
        t, b = statistics.median(r["seconds"]), statistics.median(r["baseline_seconds"])
        r.update(gbps=r["bytes"] / t / 1e9, baseline_gbps=r["bytes"] / b / 1e9, ratio=b / t)
    print(format_table(rows, [("topology", "topology", "s"), ("op", "op", "s"), ("gbps", "store GB/s", ".2f"),
                              ("baseline_gbps", "baseline GB/s", ".2f"), ("ratio", "ratio", ".0%"),
                              ("baseline", "baseline", "s")]))
    path = write_json("store_redis_cpu.json", dict(
        cattn=getattr(cattn, "__version__", "unknown"), commit=commit(), mib=mib, piece_mib=piece_mib,
        repeats=repeats, medians=True, redis_server=subprocess.run(["redis-server", "--version"], capture_output=True,
                                                                  text=True).stdout.strip(), results=rows),
        Path(out) if out else None)
    print(f"wrote {path}")
