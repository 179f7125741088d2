"""Store configuration: TOML files and CATTN_* variables; every key refuses a bad value, naming the key."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from cattn.store import EntryKey, KVEntry
from cattn.store.config import SECTIONS, StoreConfig, build_store
from cattn.store.lower.disk import DiskTier
from cattn.store.lower.redis_tier import RedisTier
from cattn.store.lower.over_shared import DiskOverShared

# key -> a bad value in TOML syntax; every key of every section is here (checked below)
BAD_TOML = {
    "store": {"dram_bytes": '"lots"', "high_watermark": "1.5", "low_watermark": "0", "io_threads": "0",
              "full_timeout_s": "-1", "policy": '"belady"', "policy_ttl_s": "-3", "disk_read_bytes_per_s": "0",
              "pin": '"maybe"', "partial_prefetch": "1", "max_chunk_tokens": "0", "kv_format": '"int4"'},
    "disk": {"path": '""', "capacity_bytes": "0"},
    "redis": {"urls": '["http://127.0.0.1:6379"]', "cluster": '"yes please"', "username": "7", "password": "[1]",
              "tls": "2", "tls_ca_certs": '"ca.pem"', "timeout_s": "0", "retry_after_s": "-1", "ttl_s": "0",
              "prefix": '"a b"', "piece_bytes": '"1TiB"', "capacity_bytes": "-5"},
    "metrics": {"port": "70000", "addr": '""'},
}
BAD_ENV = {  # the same keys through the environment, where every value is a string
    "store": {"dram_bytes": "0", "high_watermark": "high", "low_watermark": "0.95", "io_threads": "two",
              "full_timeout_s": "0", "policy": "random", "policy_ttl_s": "x", "disk_read_bytes_per_s": "-1",
              "pin": "sometimes", "partial_prefetch": "partly", "max_chunk_tokens": "many", "kv_format": "int7"},
    "disk": {"path": "", "capacity_bytes": "1 parsec"},
    "redis": {"urls": "", "cluster": "2", "username": None, "password": None, "tls": "tls", "tls_ca_certs": "ca.pem",
              "timeout_s": "fast", "retry_after_s": "soon", "ttl_s": "-1", "prefix": "{tag}", "piece_bytes": "0",
              "capacity_bytes": "big"},
    "metrics": {"port": "-1", "addr": ""},
}
GOOD = {"disk": {"path": '"d"'}, "redis": {"urls": '["redis://127.0.0.1:1/0"]'}}


def toml(sections: dict) -> str:
    return "".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items()) for s, kv in sections.items())


def test_every_key_has_a_bad_value_case():
    for section, cls in SECTIONS.items():
        assert set(BAD_TOML[section]) == set(BAD_ENV[section]) == {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("section,key", [(s, k) for s, kv in BAD_TOML.items() for k in kv])
def test_bad_value_in_the_file_names_its_key(tmp_path, section, key):
    body = {s: dict(v) for s, v in GOOD.items()}
    body.setdefault(section, {})[key] = BAD_TOML[section][key]
    if section == "redis" and key == "tls_ca_certs":
        body["redis"]["tls"] = "false"   # a CA file without TLS
    path = tmp_path / "store.toml"
    path.write_text(toml(body))
    with pytest.raises(ValueError, match=rf"\[{section}\] {key}\b"):
        StoreConfig.load(path, environ={})


@pytest.mark.parametrize("section,key", [(s, k) for s, kv in BAD_ENV.items() for k, v in kv.items() if v is not None])
def test_bad_value_in_the_environment_names_its_key(section, key):
    env = {"CATTN_DISK_PATH": "d", "CATTN_REDIS_URLS": "redis://127.0.0.1:1/0",
           f"CATTN_{section.upper()}_{key.upper()}": BAD_ENV[section][key]}
    with pytest.raises(ValueError, match=rf"CATTN_{section.upper()}_{key.upper()}|\[{section}\] {key}\b"):
        StoreConfig.load(None, environ=env)


def test_unknown_keys_and_sections_are_errors(tmp_path):
    path = tmp_path / "store.toml"
    path.write_text("[store]\ndram_byte = 5\n")
    with pytest.raises(ValueError, match=r"unknown key \[store\] dram_byte"):
        StoreConfig.load(path, environ={})
    path.write_text("[cache]\nx = 1\n")
    with pytest.raises(ValueError, match=r"unknown section \[cache\]"):
        StoreConfig.load(path, environ={})
    path.write_text("[store\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        StoreConfig.load(path, environ={})
    with pytest.raises(ValueError, match="unknown key CATTN_REDIS_URL"):
        StoreConfig.load(None, environ={"CATTN_REDIS_URL": "redis://x"})


def test_file_then_environment_builds_the_store(tmp_path):
    path = tmp_path / "store.toml"
    path.write_text(toml({"store": {"dram_bytes": '"3MiB"', "policy": '"scheduler"', "policy_ttl_s": "60"},
                          "disk": {"path": f'"{tmp_path / "disk"}"', "capacity_bytes": '"16MiB"'},
                          "redis": {"urls": '["redis://127.0.0.1:1/0"]', "timeout_s": "0.2", "ttl_s": "3600"}}))
    c = StoreConfig.load(path, environ={"CATTN_STORE_IO_THREADS": "3", "CATTN_REDIS_CLUSTER": "false",
                                        "CATTN_STORE_PARTIAL_PREFETCH": "true", "CATTN_STORE_MAX_CHUNK_TOKENS": "64",
                                        "CATTN_CACHE_DIR": "not ours"})
    assert (c.store.dram_bytes, c.store.io_threads, c.disk.capacity_bytes) == (3 << 20, 3, 16 << 20)
    assert (c.redis.urls, c.redis.ttl_s, c.redis.timeout_s) == (("redis://127.0.0.1:1/0",), 3600.0, 0.2)
    # Nothing listens on port 1: the store serves from DRAM and disk, the shared tier counts its misses.
    store = build_store(c)
    lower = store.state.disk
    assert c.store.partial_prefetch and store.partial_prefetch and store.state.max_chunk_tokens == 64
    assert isinstance(lower, DiskOverShared) and isinstance(lower.disk, DiskTier) and isinstance(lower.shared, RedisTier)
    key = EntryKey("t", "0123abcd", "s")
    k = torch.randn(2, 5, 1, 8)
    store.save(key, KVEntry(torch.arange(5), k, -k))
    assert torch.equal(store.load(key).k, k)
    assert store.lookup(EntryKey("t", "0123abcd", "other")) is None
    assert store.stats()["redis"]["misses_by_reason"]["server_error"] >= 1
    assert store.metrics_server is None
    store.close(persist=False)


def test_kv_format_from_the_file_and_the_environment(tmp_path):
    """The 8-bit format is opt-in: lossless unless the file or CATTN_STORE_KV_FORMAT says otherwise."""
    assert StoreConfig.load(None, environ={}).store.kv_format == "lossless"
    path = tmp_path / "store.toml"
    path.write_text('[store]\ndram_bytes = "1MiB"\nkv_format = "fp8"\n')
    assert StoreConfig.load(path, environ={}).store.kv_format == "fp8"
    c = StoreConfig.load(path, environ={"CATTN_STORE_KV_FORMAT": "int8"})
    store = build_store(c)
    assert store.kv_format == "int8"
    key, k = EntryKey("t", "0123abcd", "s"), torch.randn(2, 64, 1, 16)
    store.save(key, KVEntry(torch.arange(64), k, -k))
    lease = store.acquire(key)
    assert lease.layout.kv_format == "int8" and lease.nbytes < k.nbytes
    lease.release()
    assert torch.allclose(store.load(key).k, k, atol=k.abs().max().item() / 127)
    store.close()


def test_environment_alone_builds_a_dram_only_store_with_its_metrics_endpoint():
    import urllib.request

    c = StoreConfig.load(None, environ={"CATTN_STORE_DRAM_BYTES": "1MiB", "CATTN_METRICS_PORT": "0"})
    assert c.disk is None and c.redis is None and c.store.dram_bytes == 1 << 20
    store = build_store(c)
    port = store.metrics_server.server_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "cattn_dram_capacity_bytes 1.048576e+06" in text
    store.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_demo_refuses_a_bad_store_config_before_loading_the_model(tmp_path):
    from cattn.apps.cli import main

    path = tmp_path / "store.toml"
    path.write_text("[store]\ndram_bytes = -1\n")
    with pytest.raises(SystemExit, match=r"--store-config: .*\[store\] dram_bytes"):
        main(["demo", "--store-config", str(path)])


def test_real_replay_takes_the_store_from_a_config_file(tiny_model, byte_tokenizer, tmp_path):
    from cattn.hf import apply_cattn
    from cattn.replay.real import replay_real

    model = apply_cattn(tiny_model("llama"), page_size=4)
    path = tmp_path / "store.toml"
    path.write_text(f'[store]\ndram_bytes = "2MiB"\n[disk]\npath = "{tmp_path / "disk"}"\ncapacity_bytes = "8MiB"\n')
    conversations = {"c0": [("Hello", "Hi"), ("More", "Sure")], "c1": [("Ping", "Pong"), ("Again", "Yes")]}
    turns, counters = replay_real(model, byte_tokenizer, conversations, ["c0", "c1", "c0", "c1"], "lru",
                                  1 << 40, 1 << 40, progress=False, store_config=str(path))
    assert counters["dram"]["capacity_bytes"] == 2 << 20 and counters["disk"]["capacity_bytes"] == 8 << 20
    assert [t.tier for t in turns] == ["first", "first", "dram", "dram"] and all(t.reused_tokens for t in turns[2:])
