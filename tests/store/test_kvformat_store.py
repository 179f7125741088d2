"""The 8-bit format in the store's tiers: DRAM pool, disk chunk files (whole and layer-wise reads), Redis
values; the loader and saver between host and pages; an entry of another format is a clean miss; damage to
any part of an 8-bit chunk (codes or scales) is a miss, never wrong KV."""
from __future__ import annotations

import os

import pytest
import torch

from cattn.store.contract import EntryKey, KVEntry
from cattn.store.errors import HistoryLost
from cattn.store.kvformat.codec import KEY_GROUP, dequantize_keys, dequantize_values, quantize_keys, quantize_values
from cattn.store.kvformat.segment import QuantSegment
from cattn.store.layout import KVLayout
from cattn.store.lower import fileformat as ff
from cattn.store.lower.disk import DiskTier
from cattn.store.tiered.store import TieredStore
from cattn.store.transfer import LayerLoader, LayerSaver
from tests.store.redis_machines import machine
from tests.store.redis_servers import RedisServer, require_redis

L, H, D = 3, 2, 16
KEY = EntryKey("acme", "0123abcd", "s0")


def make_entry(n: int, seed: int = 0, dtype=torch.bfloat16, first_id: int = 0) -> KVEntry:
    g = torch.Generator().manual_seed(seed)
    return KVEntry(torch.arange(first_id, first_id + n), torch.randn(L, n, H, D, generator=g).to(dtype),
                   torch.randn(L, n, H, D, generator=g).to(dtype))


def stored(entry: KVEntry, kv_format: str = "int8") -> KVEntry:
    """What a chunk of ``entry`` (saved whole) reads back as: its codes, dequantized."""
    ks, vs = [], []
    for layer in range(entry.k.shape[0]):
        ks.append(dequantize_keys(*quantize_keys(entry.k[layer], kv_format), entry.k.dtype))
        vs.append(dequantize_values(*quantize_values(entry.v[layer], kv_format), entry.v.dtype))
    return KVEntry(entry.token_ids, torch.stack(ks), torch.stack(vs))


def assert_same(got: KVEntry, want: KVEntry) -> None:
    assert got is not None and torch.equal(got.token_ids, want.token_ids)
    assert torch.equal(got.k, want.k) and torch.equal(got.v, want.v)


@pytest.mark.parametrize("kv_format", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dram_holds_codes_and_serves_them_dequantized(kv_format, dtype):
    store = TieredStore(1 << 20, kv_format=kv_format)
    a, b = make_entry(KEY_GROUP + 21, 1, dtype), make_entry(9, 2, dtype, first_id=500)
    store.save(KEY, a)
    store.save(KEY, b, start=a.num_tokens)
    with store.acquire(KEY) as lease:
        assert lease.layout == KVLayout(L, H, D, dtype, kv_format) and lease.layout.quantized
        assert all(isinstance(s, QuantSegment) for s in lease.segments)
        assert lease.nbytes < (a.nbytes + b.nbytes) * (0.56 if dtype != torch.float32 else 0.32)
        with pytest.raises(TypeError, match="8-bit"):
            lease.segments[0].k
    sa, sb = stored(a, kv_format), stored(b, kv_format)
    want = KVEntry(torch.cat([a.token_ids, b.token_ids]), torch.cat([sa.k, sb.k], 1), torch.cat([sa.v, sb.v], 1))
    assert_same(store.load(KEY), want)
    # a truncation leaves views that start inside a key group: each token keeps its own scale
    store.truncate(KEY, num_drop=KEY_GROUP - 3, keep_first=2)
    keep = torch.cat([torch.arange(2), torch.arange(KEY_GROUP - 1, want.num_tokens)])
    assert_same(store.load(KEY), KVEntry(want.token_ids[keep], want.k[:, keep], want.v[:, keep]))
    store.close()


def test_the_8_bit_format_holds_twice_the_tokens():
    """Bytes per token of a Llama-3-8B-shaped entry (32 layers, 8 KV heads of 128, bf16), 4096-token chunks."""
    lossless, int8 = KVLayout(32, 8, 128, torch.bfloat16), KVLayout(32, 8, 128, torch.bfloat16, "int8")
    assert lossless.extent_nbytes(4096) / int8.extent_nbytes(4096) >= 1.9
    assert KVLayout(30, 3, 64, torch.bfloat16).extent_nbytes(1024) / \
        KVLayout(30, 3, 64, torch.bfloat16, "int8").extent_nbytes(1024) >= 1.9   # SmolLM2's shape


def test_loader_and_saver_move_8_bit_kv_between_pool_and_pages():
    page, pages = 4, 40
    store = TieredStore(1 << 20, kv_format="int8")
    caches = [torch.zeros(pages, page, H, D, dtype=torch.bfloat16) for _ in range(2 * L)]
    k_caches, v_caches = caches[:L], caches[L:]
    e = make_entry(KEY_GROUP + 5, 3)
    slots = torch.randperm(pages * page)[:e.num_tokens]
    for layer in range(L):
        k_caches[layer].view(-1, H, D)[slots] = e.k[layer]
        v_caches[layer].view(-1, H, D)[slots] = e.v[layer]
    saver = LayerSaver(store, KEY, e.token_ids, 0, k_caches, v_caches, slots)
    for layer in range(L):
        saver.layer_written(layer)
    saver.finish().result()
    assert_same(store.load(KEY), stored(e))
    into = [torch.zeros_like(c) for c in caches]
    loader = LayerLoader(store.acquire(KEY), into[:L], into[L:], slots)
    loader.preload(1)
    for layer in range(L):
        loader.wait(layer)
    loader.close()
    for layer in range(L):
        assert torch.equal(into[layer].view(-1, H, D)[slots], stored(e).k[layer])
        assert torch.equal(into[L + layer].view(-1, H, D)[slots], stored(e).v[layer])
    store.close()


@pytest.mark.parametrize("layerwise", [False, True])
def test_disk_round_trip_is_exact_to_what_dram_served(tmp_path, layerwise):
    store = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 24), kv_format="int8")
    a, b = make_entry(150, 4), make_entry(20, 5, first_id=150)
    store.save(KEY, a)
    store.save(KEY, b, start=150)
    served = store.load(KEY)
    store.close()
    payload = sum(p.stat().st_size - _frame_meta(p)["payload_offset"] for p in tmp_path.rglob("*.kv"))
    assert payload < (a.nbytes + b.nbytes) * 0.56
    store = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 24), kv_format="int8")
    with store.acquire(KEY, layerwise=layerwise) as lease:
        assert lease.source == "disk" and lease.streamed == layerwise
        for layer in range(L):
            lease.wait_layer(layer)
        got = KVEntry.from_lease(lease)
    assert_same(got, served)
    store.close()


@pytest.mark.parametrize("written,read", [("lossless", "int8"), ("int8", "lossless"), ("int8", "fp8")])
def test_an_entry_of_another_format_is_a_miss_left_in_place(tmp_path, written, read):
    store = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 24), kv_format=written)
    e = make_entry(30, 6)
    store.save(KEY, e)
    store.close()
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    other = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 24), kv_format=read)
    assert other.lookup(KEY) is None and other.load(KEY) is None
    assert other.stats()["disk"]["other_format"] == 1 and other.stats()["disk"]["corrupt"] == 0
    other.close()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == files
    again = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 24), kv_format=written)   # its own format reads it
    assert_same(again.load(KEY), e if written == "lossless" else stored(e, written))
    again.close()


def _frame_meta(path) -> dict:
    fd = os.open(path, os.O_RDONLY)
    try:
        return ff.read_frame(fd)[0]
    finally:
        os.close(fd)


def _chunk_file(tmp_path):
    (path,) = tmp_path.rglob("*.kv")
    return path, _frame_meta(path)


@pytest.mark.parametrize("part", ["k_codes", "v_codes", "k_scales", "v_scales"])
@pytest.mark.parametrize("layerwise", [False, True])
def test_a_damaged_code_or_scale_is_a_miss_never_wrong_kv(tmp_path, part, layerwise):
    store = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 24), kv_format="int8")
    e = make_entry(40, 7)
    store.save(KEY, e)
    store.close()
    path, meta = _chunk_file(tmp_path)
    lay = KVLayout.from_json(meta["layout"])
    block = lay.block(meta["num_tokens"])
    at = meta["payload_offset"] + block.nbytes * (L - 1) + getattr(block, part) + 1   # the last layer's part
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))
    store = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 24), kv_format="int8")
    if layerwise:
        lease = store.acquire(KEY, layerwise=True)
        for layer in range(L - 1):
            lease.wait_layer(layer)          # the layers before the damaged one are served
        with pytest.raises(HistoryLost):
            lease.wait_layer(L - 1)
        lease.release()
    else:
        assert store.load(KEY) is None
    store.sync()
    assert store.stats()["disk"]["corrupt"] == 1 and store.load(KEY) is None
    store.close()


def test_redis_values_hold_the_8_bit_format_and_a_damaged_scale_is_a_miss(tmp_path):
    require_redis()
    server = RedisServer(tmp_path / "redis")
    try:
        a = _machine(tmp_path / "a", server.url)
        e = make_entry(KEY_GROUP + 3, 8)
        a.save(KEY, e)
        a.sync()
        b = _machine(tmp_path / "b", server.url)
        assert_same(b.load(KEY), stored(e))                      # another machine, through Redis
        lossless = machine(tmp_path / "c", [server.url])
        assert lossless.load(KEY) is None                        # a reader of another format: a miss
        lossless.close(persist=False)
        import redis
        r = redis.Redis(host="127.0.0.1", port=server.port)
        tag = "cattn:{%s/%s/%s}" % (KEY.tenant, KEY.model, KEY.session)
        (piece,) = [k for k in r.keys(tag + ":c:*") if k.count(b":") == 4]
        block = KVLayout(L, H, D, torch.bfloat16, "int8").block(e.num_tokens)
        value = bytearray(r.get(piece))
        value[block.k_scales + 2] ^= 0x01                         # one bit of layer 0's key scales
        r.set(piece, bytes(value))
        c = _machine(tmp_path / "d", server.url)
        assert c.load(KEY) is None and c.stats()["redis"]["misses_by_reason"]["corrupt"] == 1
        for s in (a, b, c):
            s.close(persist=False)
    finally:
        server.stop()


def _machine(root, url):
    from cattn.store.lower.over_shared import DiskOverShared
    from tests.store.redis_machines import tier

    root.mkdir(parents=True, exist_ok=True)
    return TieredStore(1 << 22, DiskOverShared(DiskTier(root, 1 << 26), tier([url])), kv_format="int8")


def test_kv_format_is_checked_by_name():
    with pytest.raises(ValueError, match="kv_format"):
        TieredStore(1 << 20, kv_format="int4")
    with pytest.raises(TypeError, match="kv_format"):
        TieredStore(1 << 20, kv_format=8)
    with pytest.raises(TypeError, match="8-bit kv_format"):
        KVLayout(1, 1, 8, torch.float8_e4m3fn, "int8")
    for kept in (torch.float8_e4m3fn, torch.float64):   # already 8 bits wide; a float64 oracle's KV
        assert KVLayout(1, 1, 8, kept).stored_as("int8").kv_format == "lossless"
    store = TieredStore(1 << 20, kv_format="int8")
    e = make_entry(5, 1, torch.float64)
    store.save(KEY, e)
    assert_same(store.load(KEY), e)
    store.close()


@pytest.mark.parametrize("first", [0, 5])
def test_scatter_writes_runs_in_place_and_gathers_the_rest(first):
    """The CPU load path: a run of consecutive slots is dequantized in place, scattered ones through a block;
    tokens of a view that starts inside a key group (``first``) keep their scale rows."""
    store = TieredStore(1 << 22, kv_format="int8")
    e = make_entry(400, 9)
    store.save(KEY, e)
    store.truncate(KEY, num_drop=first, keep_first=0)
    lease = store.acquire(KEY)
    n = lease.num_tokens
    scattered = torch.randperm(200)[:n - 300] + 2000
    slots = torch.cat([scattered[:40], torch.arange(500, 800), scattered[40:]])
    k_cache, v_cache = torch.randn(2, 4096 // 16, 16, H, D).bfloat16()
    for layer in range(L):
        for seg in lease.segments:
            seg.scatter_layer(layer, k_cache, v_cache, slots[seg.start:seg.start + seg.num_tokens])
        want = stored(e)
        assert torch.equal(k_cache.view(-1, H, D)[slots], want.k[layer, first:])
        assert torch.equal(v_cache.view(-1, H, D)[slots], want.v[layer, first:])
    lease.release()
    store.close()


def test_a_layout_of_other_codes_is_refused():
    """An 8-bit header records the version of its codes: one written by other codes (version 1: symmetric
    keys, no offsets) is refused when read, which every tier turns into a miss, never into misread bytes."""
    lay = KVLayout(L, H, D, torch.bfloat16, "int8")
    assert KVLayout.from_json(lay.to_json()) == lay
    older = {k: v for k, v in lay.to_json().items() if k != "codes"}
    with pytest.raises(ValueError, match="version 1"):
        KVLayout.from_json(older)
    with pytest.raises(ValueError, match="version 3"):
        KVLayout.from_json(lay.to_json() | {"codes": 3})
    lossless = KVLayout(L, H, D, torch.bfloat16)
    assert "codes" not in lossless.to_json() and KVLayout.from_json(lossless.to_json()) == lossless
