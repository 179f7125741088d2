"""Partial prefetch (`TieredStore(partial_prefetch=True)`): a read oldest chunk first that a starting job
stops, the prefix in DRAM served exactly (`tokens_in_dram`), the rest still whole on disk; late reads
issued soonest first."""
import random

import pytest
import torch

from cattn.store.contract import KVEntry
from cattn.store.lower.disk import DiskTier
from cattn.store.tiered.migration import evict_dram_locked
from cattn.store.policy.base import Scheduler
from cattn.store.tiered.store import TieredStore
from tests.store.entries import TOKEN_BYTES, cat, key, make_entry, saved_in_turns
from tests.store.gated_tiers import GatedDisk, store_with_sessions_on_disk, wait_until


def prefix(e, n):
    return KVEntry(e.token_ids[:n], e.k[:, :n], e.v[:, :n])


def assert_exact(got, want):
    assert got is not None and torch.equal(got.token_ids, want.token_ids)
    assert torch.equal(got.k, want.k) and torch.equal(got.v, want.v)


def reading_mid_history(tmp_path, turns, read_before, sizes=None, max_chunk_tokens=None):
    """A restarted partial-prefetch store whose lane has read the first ``read_before`` chunks of the session
    (``turns`` saves of random sizes, or of ``sizes``) and is blocked in the next one's read."""
    sizes = sizes or [random.randint(3, 24) for _ in range(turns)]
    parts = saved_in_turns(tmp_path, sizes, max_chunk_tokens)
    disk = GatedDisk(tmp_path, 1 << 24)
    store = TieredStore(1 << 20, disk, policy=Scheduler(), high_watermark=1.0, partial_prefetch=True)
    assert store.update_queue([key()]) == [key()]
    for _ in range(read_before):
        disk.permits.release()
    wait_until(lambda: disk.entered == read_before + 1, "the lane to reach the next chunk")
    return store, disk, parts


def test_a_job_starting_mid_read_gets_exactly_the_prefix_read_and_the_read_stops(tmp_path):
    turns = random.randint(3, 6)
    read_before = random.randint(1, turns - 2)
    store, disk, parts = reading_mid_history(tmp_path, turns, read_before)
    whole = cat(*parts)
    have = sum(p.num_tokens for p in parts[:read_before])

    store.job_started(key())                          # the chunk in flight is the last one read
    assert store.tokens_in_dram(key()) == have        # served without the disk
    assert_exact(store.load(key(), have), prefix(whole, have))
    with store.acquire(key(), have) as lease:
        assert lease.num_tokens == have
        assert_exact(KVEntry.from_lease(lease), prefix(whole, have))
    disk.permits.release()
    store.sync()
    assert len(disk.read) == read_before + 1          # the rest of the history was not read
    s = store.stats()
    assert s["disk"]["prefetch_stopped"] == 1 and s["disk"]["prefetched"] == 1
    assert s["dram"]["misses"] == 0 and s["dram"]["partial_hits"] >= 1
    now = have + parts[read_before].num_tokens        # the chunk that was in flight came in whole
    assert store.tokens_in_dram(key()) == now
    assert torch.equal(store.lookup(key()), whole.token_ids)   # the history is still all there
    assert_exact(store.load(key(), now), prefix(whole, now))

    disk.gated = False   # a load of an explicit length still reads what it needs from disk, exactly
    assert_exact(store.load(key(), whole.num_tokens), whole)
    assert len(disk.read) == turns
    store.close()


def test_a_long_turn_split_into_chunks_can_be_stopped_within_it(tmp_path):
    cap = random.randint(4, 12)
    n = cap * random.randint(4, 8) + random.randint(0, cap - 1)   # one save: ceil(n / cap) chunks
    chunks = -(-n // cap)
    read_before = random.randint(1, chunks - 2)
    store, disk, parts = reading_mid_history(tmp_path, 1, read_before, sizes=[n], max_chunk_tokens=cap)
    store.job_started(key())
    assert store.tokens_in_dram(key()) == read_before * cap
    assert_exact(store.load(key(), read_before * cap), prefix(parts[0], read_before * cap))
    disk.permits.release()
    store.sync()
    assert len(disk.read) == read_before + 1 and store.stats()["disk"]["prefetch_stopped"] == 1
    disk.gated = False
    assert_exact(store.load(key(), n), parts[0])
    assert len(disk.read) == chunks
    store.close()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_chunk_tokens must be an int >= 1"):
            TieredStore(1 << 16, max_chunk_tokens=bad)


def test_the_job_saves_after_its_prefix_and_the_history_stays_whole_across_a_restart(tmp_path):
    turns = random.randint(3, 6)
    store, disk, parts = reading_mid_history(tmp_path, turns, random.randint(1, turns - 2))
    store.job_started(key())
    reused = store.tokens_in_dram(key())
    whole = cat(*parts)
    disk.permits.release()
    # the caller prefills the rest of the history and its new tokens, and saves them after the prefix
    rest = make_entry(whole.num_tokens - reused + random.randint(1, 9), first_id=77)
    store.save(key(), rest, start=reused)
    want = cat(prefix(whole, reused), rest)
    assert_exact(store.load(key()), want)
    store.close()
    disk_bytes = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock")
    store = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 24))
    assert_exact(store.load(key()), want)
    assert store.stats()["disk"]["used_bytes"] == disk_bytes   # the old tail's files went with the manifest
    store.close()


@pytest.mark.parametrize("persist", [True, False])
def test_restart_mid_read_loses_nothing(tmp_path, persist):
    turns = random.randint(3, 6)
    store, disk, parts = reading_mid_history(tmp_path, turns, random.randint(1, turns - 2))
    if random.random() < 0.5:
        store.job_started(key())
    disk.gated = False
    disk.permits.release()
    store.close(persist=persist)
    store = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 24))
    assert_exact(store.load(key()), cat(*parts))
    store.close()


def test_a_partial_copy_is_never_taken_for_the_whole_entry(tmp_path):
    """Truncation, demotion and flush of a session whose stopped prefetch left a prefix in DRAM."""
    turns = random.randint(4, 6)
    store, disk, parts = reading_mid_history(tmp_path, turns, random.randint(1, turns - 3))
    store.job_started(key())
    disk.permits.release()
    store.sync()
    whole = cat(*parts)
    keep_first, drop = random.randint(0, 4), random.randint(1, whole.num_tokens // 2)
    store.truncate(key(), drop, keep_first)
    idx = torch.cat([torch.arange(keep_first), torch.arange(keep_first + drop, whole.num_tokens)])
    want = KVEntry(whole.token_ids[idx], whole.k[:, idx], whole.v[:, idx])
    assert torch.equal(store.lookup(key()), want.token_ids)
    shown = store.tokens_in_dram(key())                          # a prefix of the truncated history
    assert_exact(store.load(key(), shown), prefix(want, shown))
    assert not store.flush()
    st = store.state
    with st.lock:   # what is left of the prefix (the cut may have taken it all) goes down to disk again
        while evict_dram_locked(st):
            pass
    assert store.stats()["dram"]["used_bytes"] == 0
    disk.gated = False
    assert_exact(store.load(key(), want.num_tokens), want)
    store.close()
    store = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 24))
    assert_exact(store.load(key()), want)
    store.close()


def test_late_reads_are_issued_soonest_start_first(tmp_path):
    rate = 16 * TOKEN_BYTES / 0.1                     # 0.1 s per 16 tokens, and the store is told so
    sizes = [random.choice([16, 32, 48]) for _ in range(4)]
    store, disk, entries = store_with_sessions_on_disk(tmp_path, sizes, rate, disk_read_bytes_per_s=rate,
                                                       partial_prefetch=True)
    keys = list(entries)
    starts = [random.uniform(0.0, 0.2) for _ in keys]  # most reads cannot be on time
    soonest = [k for _, k in sorted(zip(starts, keys), key=lambda p: p[0])]
    assert store.update_queue(keys, starts_in=starts) == soonest
    store.sync()
    assert disk.order == [k.session for k in soonest] and disk.most == 1
    for k, e in entries.items():
        assert_exact(store.load(k), e)
    store.close()
    # the same queue without the option skips what cannot be on time
    store, disk, _ = store_with_sessions_on_disk(tmp_path / "off", sizes, rate, disk_read_bytes_per_s=rate)
    assert len(store.update_queue(keys, starts_in=[0.0] * len(keys))) == 0
    store.close()


def test_bad_option_is_refused_naming_it(tmp_path):
    for bad in ("yes", 1, None):
        with pytest.raises(TypeError, match="partial_prefetch must be a bool"):
            TieredStore(1 << 16, DiskTier(tmp_path, 1 << 20), partial_prefetch=bad)
    TieredStore(1 << 16, DiskTier(tmp_path, 1 << 20)).close()   # the refused stores released the directory


def test_the_real_replay_turns_the_option_on(tiny_model, byte_tokenizer, monkeypatch):
    from cattn.hf import apply_cattn
    from cattn.replay import real
    from cattn.store.tiered import store as tiered

    made = []
    init = tiered.TieredStore.__init__

    def recording_init(self, *args, **kwargs):
        made.append(kwargs.get("partial_prefetch", False))
        init(self, *args, **kwargs)

    monkeypatch.setattr(tiered.TieredStore, "__init__", recording_init)
    model = apply_cattn(tiny_model("llama"), page_size=4)
    conversations = {"c0": [("Hello", "Hi"), ("More", "Sure")], "c1": [("Ping", "Pong"), ("Again", "Yes")]}
    runs = {}
    for partial in (False, True):
        turns, _ = real.replay_real(model, byte_tokenizer, conversations, ["c0", "c1", "c0", "c1"], "scheduler",
                                    1 << 20, 1 << 22, progress=False, partial_prefetch=partial)
        runs[partial] = [(t.tier, t.reused_tokens) for t in turns]
    assert made == [False, True]
    assert runs[True] == runs[False] and runs[True][2][0] == "dram"   # every prefetch finished before its job
