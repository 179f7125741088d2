"""The shared Redis tier against real servers: one `redis-server`, and a 3-master Redis Cluster (plus one
replica) built with `redis-cli --cluster create`, each started here on free loopback ports.

Two stores in two processes ("serving machines", each with its own DRAM and disk) share sessions; every
failure of the tier (server down, killed mid-read and mid-write, a timeout, maxmemory eviction, a master
failing over, a wrong password, corrupt and foreign values) is a counted miss within the timeout, and the
turn that meets it still equals the stock model's."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

from cattn.store import EntryKey, KVEntry
from tests.store.redis_machines import machine, peer, redis_env
from tests.store.redis_servers import RedisCluster, RedisServer, cli, require_redis

MODEL = "0123abcd0123abcd"


@pytest.fixture
def server(tmp_path):
    require_redis()
    s = RedisServer(tmp_path)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_redis()
    c = RedisCluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


def random_entry(n=37, layers=3, heads=3, dim=24, dtype=torch.float16, offset=0) -> KVEntry:
    shape = (layers, n, heads, dim)
    return KVEntry(torch.arange(offset, offset + n), torch.randn(shape).to(dtype), torch.randn(shape).to(dtype))


SAVE_IN_PEER = """
import torch
from cattn.store import EntryKey, KVEntry, build_store
torch.manual_seed(1234)
shape = (3, 37, 3, 24)
entry = KVEntry(torch.arange(37), torch.randn(shape).half(), torch.randn(shape).half())
store = build_store()                      # CATTN_* from the environment: DRAM, disk, redis
store.save(EntryKey("acme", "{model}", "{session}"), entry)
store.close()
torch.save(entry.__dict__, "{out}")
"""


@pytest.mark.parametrize("kind", ["server", "cluster"])
def test_saved_in_one_process_loaded_in_another_equal_kv(kind, request, tmp_path):
    if kind == "server":
        urls, is_cluster = (request.getfixturevalue("server").url,), False
    else:
        urls, is_cluster = request.getfixturevalue("cluster").urls, True
    session = f"moved-{kind}"
    peer(SAVE_IN_PEER.format(model=MODEL, session=session, out=tmp_path / "saved.pt"),
         redis_env(urls, is_cluster, CATTN_DISK_PATH=str(tmp_path / "peer-disk")))
    saved = torch.load(tmp_path / "saved.pt")
    key = EntryKey("acme", MODEL, session)
    here = machine(tmp_path / "here", urls, is_cluster)
    assert here.lookup(key).tolist() == saved["token_ids"].tolist()
    got = here.load(key)
    assert torch.equal(got.k, saved["k"]) and torch.equal(got.v, saved["v"])
    # This machine extends the session; a third machine sees both writers' chunks.
    turn2 = random_entry(11, offset=37)
    here.save(key, turn2, start=37)
    here.sync()
    third = machine(tmp_path / "third", urls, is_cluster)
    both = third.load(key)
    assert torch.equal(both.k, torch.cat([saved["k"], turn2.k], 1)) and torch.equal(both.v, torch.cat([saved["v"], turn2.v], 1))
    assert torch.equal(third.load(key, 20).k, saved["k"][:, :20])
    stats = third.stats()
    assert stats["redis"]["hits"] == 2 and stats["dram"]["partial_hits"] == 1
    other_tenant = EntryKey("other", MODEL, session)
    assert third.lookup(other_tenant) is None and third.stats()["redis"]["misses_by_reason"]["absent"] == 1
    for s in (here, third):
        s.close(persist=False)


def test_values_written_with_ttl_expire(server, tmp_path):
    a = machine(tmp_path / "a", [server.url], ttl_s=30)
    a.save(EntryKey("t", MODEL, "ttl"), random_entry())
    a.sync()
    keys = cli(server.port, "keys", "cattn:*").split()
    assert len(keys) == 3 and all(0 < int(cli(server.port, "pttl", k)) <= 30_000 for k in keys)
    cli(server.port, "pexpire", next(k for k in keys if k.count(":") == 3), "5000")
    a.save(EntryKey("t", MODEL, "ttl"), random_entry(3, offset=37), start=37)   # the next turn's manifest
    a.sync()
    keys = cli(server.port, "keys", "cattn:*").split()
    assert len(keys) == 5 and all(5_000 < int(cli(server.port, "pttl", k)) <= 30_000 for k in keys)
    a.close(persist=False)


def _raw(server):
    import redis

    return redis.Redis(host="127.0.0.1", port=server.port)


@pytest.mark.parametrize("damage", ["payload_bit", "header_bit", "manifest_garbage", "other_format_version"])
def test_corrupt_values_in_redis_are_misses(server, tmp_path, damage):
    a, key = machine(tmp_path / "a", [server.url]), EntryKey("t", MODEL, "corrupt")
    a.save(key, random_entry())
    a.sync()
    r, tag = _raw(server), "cattn:{t/%s/corrupt}" % MODEL
    chunk = next(k.decode() for k in r.keys(tag + ":c:*") if k.count(b":") == 3)
    target = {"payload_bit": chunk + ":0", "header_bit": chunk, "manifest_garbage": tag + ":m",
              "other_format_version": tag + ":m"}[damage]
    value = bytearray(r.get(target))
    if damage == "manifest_garbage":
        value = bytearray(os.urandom(len(value)))
    elif damage == "other_format_version":
        value[8] += 1
    else:
        value[len(value) // 2] ^= 0x10
    r.set(target, bytes(value))
    b = machine(tmp_path / "b", [server.url])
    assert b.load(key) is None
    assert b.stats()["redis"]["misses_by_reason"]["corrupt"] == 1
    assert r.get(tag + ":m") is None   # the unusable session is gone from the shared tier too
    for s in (a, b):
        s.close(persist=False)


def test_foreign_values_in_redis_are_misses(server, tmp_path):
    a = machine(tmp_path / "a", [server.url])
    mine, other = EntryKey("t", MODEL, "mine"), EntryKey("t", MODEL, "other")
    a.save(mine, random_entry())
    a.save(other, random_entry(n=20))
    a.sync()
    r = _raw(server)
    tag = lambda s: "cattn:{t/%s/%s}" % (MODEL, s)  # noqa: E731
    r.set(tag("copied") + ":m", r.get(tag("mine") + ":m"))         # a manifest of another session
    mine_chunk = next(k.decode() for k in r.keys(tag("mine") + ":c:*") if k.count(b":") == 3)
    other_chunk = next(k.decode() for k in r.keys(tag("other") + ":c:*") if k.count(b":") == 3)
    r.set(mine_chunk, r.get(other_chunk))                            # a chunk header of another chunk
    b = machine(tmp_path / "b", [server.url])
    assert b.lookup(EntryKey("t", MODEL, "copied")) is None
    assert b.lookup(mine) is None
    assert torch.equal(b.load(other).k, a.load(other).k)
    assert b.stats()["redis"]["misses_by_reason"]["foreign"] == 2
    for s in (a, b):
        s.close(persist=False)


def test_a_refused_chunk_keeps_every_manifest_naming_it_out_of_redis(server, tmp_path):
    from cattn.store.errors import RemoteTierError

    a, key = machine(tmp_path / "a", [server.url]), EntryKey("t", MODEL, "refused")
    a.save(key, random_entry())                                     # turn 1: in Redis, complete
    a.sync()
    shared, write_chunk = a.state.disk.shared, a.state.disk.shared.write_chunk

    def refused(*args):
        shared.write_chunk = write_chunk
        raise RemoteTierError("redis server_error: refused")
    shared.write_chunk = refused
    a.save(key, random_entry(3, offset=37), start=37)               # turn 2: its chunk refused
    a.sync()
    a.save(key, random_entry(3, offset=40), start=40)               # turn 3: its chunk accepted
    a.sync()
    assert torch.equal(a.lookup(key), torch.arange(43))
    b = machine(tmp_path / "b", [server.url])
    assert torch.equal(b.lookup(key), torch.arange(37))             # the last complete manifest
    assert b.stats()["redis"]["misses_by_reason"]["absent"] == 0
    for s in (a, b):
        s.close(persist=False)


def test_an_absent_chunk_is_a_miss_that_leaves_the_shared_session(server, tmp_path):
    a, key = machine(tmp_path / "a", [server.url]), EntryKey("t", MODEL, "lagging")
    a.save(key, random_entry())
    a.sync()
    r, tag = _raw(server), "cattn:{t/%s/lagging}" % MODEL
    chunk = next(k for k in r.keys(tag + ":c:*") if k.count(b":") == 3)
    value = r.get(chunk)
    r.delete(chunk)                                                 # as a node in failover may lack it
    b = machine(tmp_path / "b", [server.url])
    assert b.load(key) is None
    assert b.stats()["redis"]["misses_by_reason"]["absent"] == 1
    assert r.exists(tag + ":m") == 1 and len(r.keys(tag + ":c:*")) == 1
    r.set(chunk, value)                                             # the node serving it has it
    c = machine(tmp_path / "c", [server.url])
    assert torch.equal(c.load(key).k, a.load(key).k)
    for s in (a, b, c):
        s.close(persist=False)


def test_metrics_endpoint_serves_prometheus_text_matching_stats(server, tmp_path):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from cattn.store.metrics import serve_metrics

    a = machine(tmp_path / "a", [server.url])
    key = EntryKey("t", MODEL, "metrics")
    a.save(key, random_entry())
    a.sync()
    b = machine(tmp_path / "b", [server.url])
    b.load(key)
    b.load(key, 10)
    b.lookup(EntryKey("t", MODEL, "absent"))
    http = serve_metrics(b, 0)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{http.server_port}/metrics", timeout=5).read().decode()
    finally:
        http.shutdown()
    stats = b.stats()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    for tier, fields in stats.items():
        for name, value in fields.items():
            if isinstance(value, bool) or isinstance(value, (int, float)):
                got = samples.get((f"cattn_{tier}_{name}_total", ()), samples.get((f"cattn_{tier}_{name}", ())))
                assert got == float(value), (tier, name, got, value)
    for reason, n in stats["redis"]["misses_by_reason"].items():
        assert samples[("cattn_redis_misses_by_reason_total", (("reason", reason),))] == n
    lat = stats["redis"]["read_latency_seconds"]
    assert samples[("cattn_redis_read_latency_seconds_count", ())] == lat["count"] >= 3
    assert samples[("cattn_redis_read_latency_seconds_bucket", (("le", "+Inf"),))] == lat["count"]
    assert stats["redis"]["hits"] == 1 and stats["redis"]["misses_by_reason"]["absent"] == 1
    for s in (a, b):
        s.close(persist=False)


def test_tls_with_a_ca_is_a_hit_without_it_a_miss(tmp_path):
    """A server that speaks TLS only on its TLS port, with a CA made here for 127.0.0.1."""
    import shutil

    require_redis()
    if not shutil.which("openssl"):
        pytest.skip("openssl not found: install the Debian package (apt-get install -y openssl)")
    pki = tmp_path / "pki"
    pki.mkdir()
    (pki / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for cmd in (["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
                 "-subj", "/CN=cattn test CA"],
                ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
                 "-subj", "/CN=127.0.0.1"],
                ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", "server.crt", "-days", "1", "-extfile", "san.ext"]):
        subprocess.run(["openssl", *cmd], cwd=pki, check=True, capture_output=True, timeout=60)
    from tests.store.redis_servers import free_port

    tls_port = free_port()
    s = RedisServer(tmp_path, "--tls-port", str(tls_port), "--tls-cert-file", str(pki / "server.crt"),
                    "--tls-key-file", str(pki / "server.key"), "--tls-ca-cert-file", str(pki / "ca.crt"),
                    "--tls-auth-clients", "no")
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0"
        a = machine(tmp_path / "a", [url], tls=True, tls_ca_certs=str(pki / "ca.crt"))
        key, entry = EntryKey("t", MODEL, "tls"), random_entry()
        a.save(key, entry)
        a.sync()
        assert a.stats()["redis"]["write_errors"] == 0
        b = machine(tmp_path / "b", [url], tls=True, tls_ca_certs=str(pki / "ca.crt"))
        assert torch.equal(b.load(key).v, entry.v)
        untrusted = machine(tmp_path / "c", [url], tls=True)       # the system CAs do not know this one
        assert untrusted.lookup(key) is None
        assert untrusted.stats()["redis"]["misses_by_reason"]["server_error"] == 1
        for st in (a, b, untrusted):
            st.close(persist=False)
    finally:
        s.stop()
