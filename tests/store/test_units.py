"""Store building blocks: the host pool allocator, the layout, the file format."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cattn.store.contract import EntryKey, KVEntry
from cattn.store.errors import FormatError
from cattn.store.layout import DTYPES, KVLayout
from cattn.store.lease import KVLease, Segment
from cattn.store.lower import fileformat as ff
from cattn.store.tiered.pool import HostPool

KEY = EntryKey("acme", "0123abcd", "chat-1")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3000), st.integers(0, 10**6)), max_size=60))
def test_pool_extents_never_overlap_and_coalesce(ops):
    pool = HostPool(16 << 10)
    live: dict[int, int] = {}
    for alloc, nbytes, pick in ops:
        if alloc or not live:
            offset = pool.allocate(nbytes)
            if offset is None:
                assert pool.largest_free() < nbytes
                continue
            assert offset % 256 == 0 and offset + nbytes <= pool.capacity
            size = -(-nbytes // 256) * 256
            assert all(offset + size <= o or o + s <= offset for o, s in live.items())
            live[offset] = size
        else:
            offset = sorted(live)[pick % len(live)]
            pool.free(offset, live.pop(offset))
        assert pool.used == sum(live.values())
        assert pool.used + sum(pool.free_extent_sizes()) == pool.capacity
    for offset, size in list(live.items()):
        pool.free(offset, size)
    assert pool.free_extent_sizes() == [pool.capacity]   # everything merged back into one extent


def test_pool_rejects_double_free():
    pool = HostPool(4096)
    offset = pool.allocate(512)
    pool.free(offset, 512)
    with pytest.raises(ValueError, match="double free"):
        pool.free(offset, 512)
    with pytest.raises(ValueError, match="capacity"):
        HostPool(100)


def test_layout_views_and_json():
    layout = KVLayout(3, 2, 8, torch.bfloat16)
    assert layout.token_nbytes == 2 * 3 * 2 * 8 * 2
    buf = torch.empty(layout.extent_nbytes(5), dtype=torch.uint8)
    k, v = layout.views(buf, 5)
    k.copy_(torch.randn(3, 5, 2, 8))
    v.copy_(torch.randn(3, 5, 2, 8))
    assert k.data_ptr() == buf.data_ptr() and v.data_ptr() == buf.data_ptr() + layout.payload_nbytes(5) // 2
    assert k[1].is_contiguous()
    assert KVLayout.from_json(layout.to_json()) == layout
    with pytest.raises(TypeError, match="dtype"):
        KVLayout(1, 1, 1, torch.int8)
    with pytest.raises(ValueError, match="head_dim"):
        KVLayout(1, 1, 0, torch.float16)
    with pytest.raises(TypeError, match="entry.v dtype"):
        KVLayout.of(KVEntry(torch.arange(2), torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4).half()))


@pytest.mark.parametrize("dtype", list(DTYPES.values()))
def test_chunk_file_round_trip(tmp_path, dtype):
    layout = KVLayout(2, 2, 16, dtype)
    ids = torch.randint(0, 2**40, (37,))
    payload = torch.randint(0, 256, (layout.payload_nbytes(37),), dtype=torch.uint8)
    path = tmp_path / "c.kv"
    size = ff.write_chunk(path, KEY, layout, "00112233aabbccdd", ids, payload)
    assert size == path.stat().st_size == ff.chunk_file_nbytes(KEY, layout, "00112233aabbccdd", 37)
    into = torch.zeros(layout.extent_nbytes(37), dtype=torch.uint8)
    got = ff.read_chunk(path, KEY, layout, "00112233aabbccdd", 37, into)
    assert torch.equal(got, ids) and torch.equal(into[:payload.numel()], payload)
    with pytest.raises(FormatError, match="chunk"):
        ff.read_chunk(path, KEY, layout, "00112233aabbccdd", 36)
    with pytest.raises(FormatError, match="session"):
        ff.read_chunk(path, EntryKey("acme", "0123abcd", "chat-2"), layout, "00112233aabbccdd", 37)


def test_manifest_round_trip_and_checks(tmp_path):
    layout = KVLayout(2, 2, 16, torch.float16)
    data = ff.pack_manifest(KEY, layout, "0123456789abcdef", 7, 3, [("00112233aabbccdd", 10, 9000)],
                            [("00112233aabbccdd", 0, 2), ("00112233aabbccdd", 5, 10)])
    path = tmp_path / "m"
    ff.write_atomic(path, data)
    meta = ff.read_manifest(path, KEY)
    assert meta["layout"] == layout and meta["num_tokens"] == 7 and meta["version"] == 3
    assert meta["views"] == [("00112233aabbccdd", 0, 2), ("00112233aabbccdd", 5, 10)]
    bad = ff.pack_manifest(KEY, layout, "0123456789abcdef", 7, 3, [("00112233aabbccdd", 10, 9000)],
                           [("00112233aabbccdd", 5, 11)])   # a range past the chunk
    ff.write_atomic(path, bad)
    with pytest.raises(FormatError, match="inconsistent"):
        ff.read_manifest(path, KEY)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_lease_without_its_first_layers_waits_for_the_layers_it_views():
    """A session's resident layers are held on the device, so only the layers after them stream in: the
    view's layer l is the lease's r + l, waited for as such when the lease is streamed from disk."""
    class Recorded(KVLease):
        streamed = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.waited = []

        def wait_layer(self, layer):
            self.waited.append(layer)

    k, v = torch.randn(2, 5, 3, 2, 8).unbind(0)
    released, moved = [], []
    lease = Recorded(torch.arange(3), [Segment(0, k, v)], KVLayout(5, 2, 8, torch.float32),
                     on_release=lambda: released.append(True), on_transfer=lambda *a: moved.append(a), source="disk")
    view = lease.without_first_layers(2)
    assert view.streamed and view.source == "disk" and view.layout == KVLayout(3, 2, 8, torch.float32)
    assert torch.equal(view.segments[0].k, k[2:]) and view.segments[0].k.data_ptr() == k[2].data_ptr()
    for layer in range(3):
        view.wait_layer(layer)
    assert lease.waited == [2, 3, 4]
    view.record_transfer(0.5, 0.25, 64)
    view.release()
    assert moved == [(0.5, 0.25, 64)] and released == [True]
