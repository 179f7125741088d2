"""One dead master of a Redis Cluster costs only its own sessions.

A real 3-master cluster with no replicas and ``cluster-require-full-coverage no``: sessions saved across
all three masters, then one master killed (each in turn, one per fresh cluster; also one paused, so its
calls time out instead of being refused). A store built before the kill and one built after it (and a
bare client built after it) keep loading the sessions of the live masters, exact KV; the dead master's
sessions are counted misses, never wrong KV nor an exception; every call, and ``close()``, returns
within a bound derived from ``timeout_s``. The master killed first serves slot 0: it is the node
redis-py's cluster client asks for its command table while it is built.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from cattn.store import EntryKey, KVEntry, RedisTier, TieredStore
from cattn.store.lower.redis_client import RedisOptions, connect
from tests.store.redis_servers import RedisCluster, cli, require_redis

MODEL = "0123abcd0123abcd"
TIMEOUT_S = 0.5
RETRY_AFTER_S = 0.5
# The most a store call may take while a master is dead: building the client (the slot map, then a PING
# to pick the node it asks for COMMAND: one timeout each for a node that does not answer), a slot map
# refresh redis-py asked for (the failed node is tried last), the call to the dead node (one timeout);
# plus scheduling slack on a busy machine.
BOUND_S = 3 * TIMEOUT_S + 1.0
PER_MASTER = 3


def key(sid: str) -> EntryKey:
    return EntryKey("acme", MODEL, sid)


def manifest_name(sid: str) -> str:
    return "cattn:{acme/%s/%s}:m" % (MODEL, sid)


def entry(n: int, seed: int) -> KVEntry:
    g = torch.Generator().manual_seed(seed)
    shape = (2, n, 2, 16)
    return KVEntry(torch.arange(seed, seed + n), torch.randn(shape, generator=g).half(),
                   torch.randn(shape, generator=g).half())


def store(urls) -> TieredStore:
    """A serving machine with only DRAM over the shared tier: everything it loads comes from Redis."""
    return TieredStore(1 << 22, RedisTier(urls=tuple(urls), cluster=True, timeout_s=TIMEOUT_S,
                                          retry_after_s=RETRY_AFTER_S))


def timed(fn, *args):
    t0 = time.monotonic()
    out = fn(*args)
    took = time.monotonic() - t0
    assert took < BOUND_S, f"{fn.__name__}{args} took {took:.2f} s"
    return out, took


def sessions_on_every_master(cluster: RedisCluster) -> dict[str, int]:
    """``PER_MASTER`` session ids per master: sid -> the index of the master that serves it."""
    by_port = {n.port: i for i, n in enumerate(cluster.nodes)}
    owner, count = {}, [0] * len(cluster.nodes)
    for i in range(200):
        sid = f"s{i}"
        m = by_port[cluster.master_of(manifest_name(sid)).port]
        if count[m] < PER_MASTER:
            owner[sid], count[m] = m, count[m] + 1
        if min(count) == PER_MASTER:
            return owner
    raise AssertionError(f"no {PER_MASTER} sessions on every master among 200: {count}")


def check_reads(s: TieredStore, owner: dict[str, int], saved: dict[str, KVEntry], dead: int) -> float:
    """Every session through ``s``, interleaved across masters: live ones exact, dead ones misses.
    Returns the slowest call in seconds."""
    slowest = 0.0
    for sid, m in owner.items():
        ids, t1 = timed(s.lookup, key(sid))
        got, t2 = timed(s.load, key(sid))
        slowest = max(slowest, t1, t2)
        if m == dead:
            assert ids is None and got is None, sid
        else:
            want = saved[sid]
            assert ids is not None and ids.tolist() == want.token_ids.tolist(), sid
            assert got is not None and torch.equal(got.k, want.k) and torch.equal(got.v, want.v), sid
    return slowest


@pytest.mark.parametrize("dead,how", [(0, "kill"), (1, "kill"), (2, "kill"), (0, "pause")])
def test_a_dead_master_costs_only_its_own_sessions(dead, how, tmp_path):
    require_redis()
    cluster = RedisCluster(tmp_path / "cluster", replica=False, full_coverage=False)
    victim = cluster.nodes[dead]
    try:
        slots = cli(cluster.nodes[1].port, "cluster", "slots").split()
        assert slots[0] == "0" and int(slots[3]) == cluster.nodes[0].port   # nodes[0] serves slot 0
        urls = cluster.urls
        owner = sessions_on_every_master(cluster)
        saved = {sid: entry(5 + i, 1000 * i) for i, sid in enumerate(owner)}
        writer = store(urls)
        for sid, e in saved.items():
            writer.save(key(sid), e)
        writer.close(persist=False)
        before = store(urls)
        assert before.lookup(key("absent")) is None            # its client is built before the master dies

        if how == "kill":
            victim.stop()
        else:
            os.kill(victim.proc.pid, signal.SIGSTOP)

        t0 = time.monotonic()
        client = connect(RedisOptions(urls=urls, cluster=True, timeout_s=TIMEOUT_S))   # must not raise
        assert time.monotonic() - t0 < BOUND_S
        live = next(sid for sid, m in owner.items() if m != dead)
        assert client.get(manifest_name(live)) is not None
        client.close()

        after = store(urls)                                     # built while the master is dead
        slowest = {}
        for name, s in (("before", before), ("after", after)):
            slowest[name] = check_reads(s, owner, saved, dead)
            stats = s.stats()["redis"]
            misses = stats["misses_by_reason"]
            assert stats["up"] == 1                              # only the dead node was marked down
            assert misses["server_error"] + misses["timeout"] >= 1
            assert stats["hits"] >= 2 * PER_MASTER                 # the live masters' sessions, from Redis

        # After retry_after_s the dead node is tried again, once, and still costs only its sessions.
        time.sleep(RETRY_AFTER_S + 0.1)
        check_reads(after, {sid: m for sid, m in owner.items() if m == dead}, saved, dead)

        # Saves while the master is dead: the live master's session is written through, the dead one's
        # fails and stays local; close() returns within the bound.
        new_live = next(sid for sid, m in owner.items() if m != dead)
        new_dead = next(sid for sid, m in owner.items() if m == dead)
        extra = {sid: entry(4, 7 + i) for i, sid in enumerate((new_live, new_dead))}
        for sid, e in extra.items():
            after.save(key(sid), e, start=saved[sid].num_tokens if sid == new_live else 0)
        after.sync()
        for s in (before, after):
            timed(s.close)
        third = store(urls)
        got = third.load(key(new_live))
        want = saved[new_live]
        assert got is not None and torch.equal(got.k[:, want.num_tokens:], extra[new_live].k)
        assert third.load(key(new_dead)) is None
        timed(third.close)
        print(f"dead={dead} {how}: slowest call before/after {slowest['before']:.3f}/{slowest['after']:.3f} s")
    finally:
        if how == "pause" and victim.proc is not None and victim.proc.poll() is None:
            os.kill(victim.proc.pid, signal.SIGCONT)
        cluster.stop()
