"""Every failure of the shared tier, injected for real on real servers: a counted miss within the timeout,
a turn equal to the stock model's, a store that keeps serving from its local tiers and reconnects.

Turn 1 of a chat runs on machine A; the router sends turn 2 (the whole conversation) to machine B,
which has its own DRAM and disk and finds the history only through Redis."""
from __future__ import annotations

import os
import signal
import time

import pytest

from cattn.hf import fingerprint
from cattn.chat.session import ChatSession
from cattn.store import EntryKey
from tests.chat.stock import GREEDY, SYSTEM, matches_stock
from tests.store.redis_machines import BOUND_S, machine
from tests.store.redis_servers import RedisCluster, RedisServer, cli, free_port, require_redis

QUESTION = {"role": "user", "content": "Which number?"}


@pytest.fixture
def server(tmp_path):
    require_redis()
    s = RedisServer(tmp_path)
    yield s
    if s.proc is not None and s.proc.poll() is None:
        os.kill(s.proc.pid, signal.SIGCONT)   # a test may have paused it
    s.stop()


class Timed:
    """Wraps a store's lookup and acquire, recording how long each call took."""

    def __init__(self, store, before_acquire=None):
        self.store, self.seconds, self.before_acquire = store, [], before_acquire
        self._lookup, self._acquire = store.lookup, store.acquire
        store.lookup, store.acquire = self.lookup, self.acquire

    def lookup(self, key):
        t0 = time.monotonic()
        try:
            return self._lookup(key)
        finally:
            self.seconds.append(time.monotonic() - t0)

    def acquire(self, key, num_tokens=None, **kwargs):
        if self.before_acquire is not None:
            self.before_acquire()
        t0 = time.monotonic()
        try:
            return self._acquire(key, num_tokens, **kwargs)
        finally:
            self.seconds.append(time.monotonic() - t0)


def turn_one(chat_model, store, sid: str) -> ChatSession:
    model, tok = chat_model
    first = ChatSession(model, tok, session_id=sid, store=store, system=SYSTEM)
    first.send("Remember the number seven", **GREEDY)
    first.save()
    store.sync()                 # written through to the shared tier
    return first


def turn_two(chat_model, store, first: ChatSession, before_acquire=None):
    """Turn 2 on ``store``'s machine; (its TurnStats, the session, the longest store call in seconds)."""
    model, tok = chat_model
    timed = Timed(store, before_acquire)
    second = ChatSession(model, tok, session_id=first.key.session, store=store)
    second.send([*first.messages, QUESTION], **GREEDY)
    assert matches_stock(model, second)
    return second.turns[-1], second, max(timed.seconds)


def test_turn_two_on_another_machine_reuses_the_history(chat_model, server, tmp_path):
    a, b = machine(tmp_path / "a", [server.url]), machine(tmp_path / "b", [server.url])
    first = turn_one(chat_model, a, "moved")
    turn, _, _ = turn_two(chat_model, b, first)
    assert turn.reused_tokens > 0 and turn.prefilled_tokens == turn.prompt_tokens - turn.reused_tokens
    assert b.stats()["redis"]["hits"] >= 1


def test_server_down_at_start_is_a_miss_then_reconnects(chat_model, server, tmp_path):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    a, b = machine(tmp_path / "a", [url]), machine(tmp_path / "b", [url])
    first = turn_one(chat_model, a, "down")
    assert a.stats()["redis"]["write_errors"] >= 1                       # counted, the turn went on
    again, _, _ = turn_two(chat_model, a, first)                          # a still serves it from DRAM
    assert again.reused_tokens > 0
    turn, _, slowest = turn_two(chat_model, b, first)
    assert turn.reused_tokens == 0 and slowest < BOUND_S
    assert b.stats()["redis"]["misses_by_reason"]["server_error"] >= 1
    back = RedisServer(tmp_path / "back", port=port)                      # the server comes back
    try:
        time.sleep(0.6)                                                  # past retry_after_s
        first = turn_one(chat_model, a, "after")
        turn, _, _ = turn_two(chat_model, b, first)
        assert turn.reused_tokens > 0 and b.stats()["redis"]["up"] == 1
    finally:
        back.stop()


def test_server_killed_mid_read_is_a_miss(chat_model, server, tmp_path):
    a, b = machine(tmp_path / "a", [server.url]), machine(tmp_path / "b", [server.url])
    first = turn_one(chat_model, a, "killed-read")
    # B's lookup has read the history's token ids from Redis; the server dies before the KV is read.
    turn, _, slowest = turn_two(chat_model, b, first, before_acquire=server.stop)
    assert turn.reused_tokens == 0 and slowest < BOUND_S
    assert b.stats()["redis"]["misses_by_reason"]["server_error"] >= 1


def test_timeout_is_a_miss_within_the_timeout(chat_model, server, tmp_path):
    a, b = machine(tmp_path / "a", [server.url]), machine(tmp_path / "b", [server.url])
    first = turn_one(chat_model, a, "paused")
    os.kill(server.proc.pid, signal.SIGSTOP)          # the server hangs: connections open, no replies
    turn, _, slowest = turn_two(chat_model, b, first)
    assert turn.reused_tokens == 0 and slowest < BOUND_S
    assert b.stats()["redis"]["misses_by_reason"]["timeout"] >= 1


def test_a_read_timing_out_does_not_delete_the_shared_session(chat_model, server, tmp_path):
    a = machine(tmp_path / "a", [server.url])
    b = machine(tmp_path / "b", [server.url], retry_after_s=0)   # no grace period: B's drop could reach Redis
    b.state.disk.write_through = False                           # and B writes nothing back
    first = turn_one(chat_model, a, "kept")
    turn, _, slowest = turn_two(chat_model, b, first, before_acquire=lambda: os.kill(server.proc.pid, signal.SIGSTOP))
    os.kill(server.proc.pid, signal.SIGCONT)
    assert turn.reused_tokens == 0 and slowest < BOUND_S
    assert b.stats()["redis"]["misses_by_reason"]["timeout"] == 1
    assert cli(server.port, "exists", "cattn:{default/%s/kept}:m" % first.key.model) == "1"
    c = machine(tmp_path / "c", [server.url])
    turn, _, _ = turn_two(chat_model, c, first)
    assert turn.reused_tokens > 0


def test_write_timing_out_before_the_manifest_is_bounded_and_never_wrong(chat_model, server, tmp_path):
    a = machine(tmp_path / "a", [server.url])
    shared = a.state.disk.shared
    write_manifest = shared.write_manifest

    def paused_first(*args):   # the chunks are in Redis; the server hangs before the manifest
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            return write_manifest(*args)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
    shared.write_manifest = paused_first
    t0 = time.monotonic()
    first = turn_one(chat_model, a, "torn")
    assert time.monotonic() - t0 < 2 * BOUND_S + 5.0      # two commits, each at most one timeout; the turn
    shared.write_manifest = write_manifest
    assert a.stats()["redis"]["write_errors"] >= 1
    time.sleep(0.6)
    # A timed-out SET may still land once the server runs again (it was in the socket); either way the
    # manifest came after every chunk it names, so another machine gets this history or a miss.
    b = machine(tmp_path / "b", [server.url])
    turn_two(chat_model, b, first)
    b.sync()     # b writes its own longer history in the background: it must land before the deletes
    # A writer that died between its chunks and its manifest: the chunks alone are a miss.
    import redis

    r = redis.Redis(host="127.0.0.1", port=server.port)
    r.delete(*r.keys("cattn:*:m"))
    assert r.keys("cattn:*:c:*")
    c = machine(tmp_path / "c", [server.url])
    turn, _, slowest = turn_two(chat_model, c, first)
    assert turn.reused_tokens == 0 and slowest < BOUND_S
    assert c.stats()["redis"]["misses_by_reason"]["absent"] >= 1


def test_server_killed_mid_write_keeps_serving_locally(chat_model, server, tmp_path):
    a = machine(tmp_path / "a", [server.url])
    shared = a.state.disk.shared
    write_chunk = shared.write_chunk

    def killed_first(*args):
        server.stop()
        return write_chunk(*args)
    shared.write_chunk = killed_first
    first = turn_one(chat_model, a, "killed-write")
    assert a.stats()["redis"]["write_errors"] >= 1
    again, _, slowest = turn_two(chat_model, a, first)
    assert again.reused_tokens > 0 and slowest < BOUND_S


def test_maxmemory_eviction_is_a_miss(chat_model, server, tmp_path):
    import redis

    a, b = machine(tmp_path / "a", [server.url]), machine(tmp_path / "b", [server.url])
    first = turn_one(chat_model, a, "evicted")
    r = redis.Redis(host="127.0.0.1", port=server.port)
    ours = r.keys("cattn:*")
    manifest = [name for name in ours if name.endswith(b":m")]
    assert len(manifest) == 1
    # Redis evicts what its policy picks: under volatile-ttl, among the keys with a time to live, the one that
    # expires first. Only the manifest gets one, so it is what goes (an evicted later chunk would rightly leave
    # the earlier ones reusable, which is a partial hit, not this test's miss).
    for name in ours:
        r.persist(name)
    r.pexpire(manifest[0], 3_600_000)
    r.config_set("maxmemory-policy", "volatile-ttl")
    r.config_set("maxmemory", str(int(r.info("memory")["used_memory"]) + (2 << 20)))
    for i in range(400):                                   # fill until Redis evicts the manifest
        if not r.exists(manifest[0]):
            break
        try:
            r.set(f"filler:{i}", os.urandom(64 << 10))
        except redis.exceptions.OutOfMemoryError:          # nothing evictable is left
            break
    assert not r.exists(manifest[0]) and r.exists(*ours) == len(ours) - 1
    turn, _, slowest = turn_two(chat_model, b, first)
    assert turn.reused_tokens == 0 and slowest < BOUND_S
    assert b.stats()["redis"]["misses_by_reason"]["absent"] >= 1


def test_wrong_password_is_a_miss_right_user_is_a_hit(chat_model, tmp_path):
    require_redis()
    s = RedisServer(tmp_path, "--requirepass", "s3cret")
    try:
        cli(s.port, "--no-auth-warning", "-a", "s3cret", "acl", "setuser", "cattn", "on", ">pw2", "~cattn:*", "+@all")
        a = machine(tmp_path / "a", [s.url], password="s3cret")
        first = turn_one(chat_model, a, "auth")
        wrong = machine(tmp_path / "wrong", [s.url], password="nope")
        turn, _, slowest = turn_two(chat_model, wrong, first)
        assert turn.reused_tokens == 0 and slowest < BOUND_S
        assert wrong.stats()["redis"]["misses_by_reason"]["server_error"] >= 1
        user = machine(tmp_path / "user", [s.url], username="cattn", password="pw2")
        turn, _, _ = turn_two(chat_model, user, first)
        assert turn.reused_tokens > 0
    finally:
        s.stop()


def test_cluster_master_failing_over_is_a_miss_then_the_replica_serves(chat_model, tmp_path):
    require_redis()
    cluster = RedisCluster(tmp_path / "cluster")
    try:
        master = cluster.nodes[0]                            # the master with a replica
        fp = fingerprint(chat_model[0])
        sid = next(f"fo-{i}" for i in range(1000) if cluster.master_of("cattn:{default/%s/fo-%d}:m" % (fp, i)) is master)
        a = machine(tmp_path / "a", cluster.urls, cluster=True)
        b = machine(tmp_path / "b", cluster.urls, cluster=True)
        first = turn_one(chat_model, a, sid)
        assert cli(master.port, "wait", "1", "5000") == "1"   # the replica has it
        master.stop()
        turn, _, slowest = turn_two(chat_model, b, first)
        assert turn.reused_tokens == 0 and slowest < BOUND_S
        missed = b.stats()["redis"]["misses_by_reason"]
        assert missed["server_error"] + missed["timeout"] >= 1
        replica, survivor = cluster.nodes[3], cluster.nodes[1]
        cluster.wait(lambda: cli(replica.port, "role").startswith("master")
                     and "cluster_state:ok" in cli(survivor.port, "cluster", "info"))
        time.sleep(0.6)
        c = machine(tmp_path / "c", cluster.urls, cluster=True)
        turn, _, _ = turn_two(chat_model, c, first)           # the promoted replica serves the history
        assert turn.reused_tokens > 0
    finally:
        cluster.stop()


def test_keys_carry_tenant_model_session_in_one_hash_tag(chat_model, server, tmp_path):
    a = machine(tmp_path / "a", [server.url])
    first = turn_one(chat_model, a, "tagged")
    key: EntryKey = first.key
    tag = "{%s/%s/%s}" % (key.tenant, key.model, key.session)
    keys = cli(server.port, "keys", "cattn:*").split()
    assert keys and all(k.startswith(f"cattn:{tag}:") for k in keys)
