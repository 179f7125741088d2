"""The store's prefetch lane: one read at a time, in the policy's order, under deadlines."""
import pytest

from cattn.store.tiered.store import TieredStore
from tests.store.entries import TOKEN_BYTES, assert_same, key, make_entry
from tests.store.gated_tiers import store_with_sessions_on_disk


def test_prefetches_read_one_at_a_time_in_queue_order(tmp_path):
    store, disk, entries = store_with_sessions_on_disk(tmp_path, [16] * 5)
    queue = [key("s3"), key("s0"), key("s4")]
    assert store.update_queue(queue) == queue
    store.sync()
    assert disk.order == ["s3", "s0", "s4"] and disk.most == 1
    before = store.stats()
    for k in queue:
        assert_same(store.load(k), entries[k])
    after = store.stats()
    assert after["dram"]["hits"] - before["dram"]["hits"] == 3 and after["disk"]["prefetched"] == 3
    assert after["disk"]["read_bytes_per_s"] > 0  # measured on those reads
    store.close()


def test_deadlines_keep_the_most_reads_on_time(tmp_path):
    # 0.1 s per 16 tokens, and the store is told so: big needs 0.3 s, a and b 0.1 s each
    rate = 16 * TOKEN_BYTES / 0.1
    store, disk, entries = store_with_sessions_on_disk(tmp_path, [48, 16, 16], rate, disk_read_bytes_per_s=rate)
    big, a, b = key("s0"), key("s1"), key("s2")
    # soonest first would read big (done at 0.3 s) and be too late for both a and b
    assert store.update_queue([big, a, b], starts_in=[0.32, 0.36, 0.44]) == [a, b]
    store.sync()  # planned again after a's read: big would still be late
    assert disk.order == ["s1", "s2"]
    assert store.update_queue([big], starts_in=[0.2]) == []  # cannot be done in time: not read
    store.job_started(big)  # its job started: no deadline is left for it
    assert store.prefetch() == [big]
    store.close()


def test_bad_deadlines_are_refused_before_anything_changes(tmp_path):
    store, disk, _ = store_with_sessions_on_disk(tmp_path, [16, 16])
    with pytest.raises(ValueError, match="starts_in must give one time per queued job: 1 for 2"):
        store.update_queue([key("s0"), key("s1")], starts_in=[1.0])
    with pytest.raises(ValueError, match="starts_in must be finite"):
        store.update_queue([key("s0")], starts_in=[-1.0])
    store.sync()
    assert disk.order == [] and store.stats()["disk"]["prefetched"] == 0
    store.close()
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="disk_read_bytes_per_s must be a positive number"):
            TieredStore(1 << 16, None, disk_read_bytes_per_s=bad)


def in_dram(store, k):
    return any(c.offset is not None for c in store.state.entries[k].chunks.values())


def test_prefetch_demotes_only_what_the_policy_values_less(tmp_path):
    # DRAM holds two 16-token sessions; s0..s2 are on disk, then idle (no queued job) is saved
    store, disk, entries = store_with_sessions_on_disk(tmp_path, [16] * 3, dram_bytes=2 * 16 * TOKEN_BYTES)
    s0, s1, s2 = (key(f"s{i}") for i in range(3))
    idle = key("idle")
    entries[idle] = make_entry(16, first_id=9000)
    store.save(idle, entries[idle])
    store.sync()
    assert store.update_queue([s0, s1]) == [s0, s1]
    store.sync()  # s0 fits; s1 needs room, and idle has no queued job: it goes down
    assert [in_dram(store, k) for k in (s0, s1, idle)] == [True, True, False]
    store.update_queue([s0, s1, s2])
    store.sync()  # s2 would need s0 or s1 out, both sooner: refused
    assert [in_dram(store, k) for k in (s0, s1, s2)] == [True, True, False]
    store.update_queue([s2, s0, s1])
    store.sync()  # now s2 is first: s1, the furthest back, goes down for it
    assert [in_dram(store, k) for k in (s0, s1, s2)] == [True, False, True]
    assert disk.order == ["s0", "s1", "s2"]
    for k, e in entries.items():  # nothing lost on the way
        assert_same(store.load(k), e)
    store.close()
