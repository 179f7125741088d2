"""Policies on hand-built queues whose right answer is known."""
import math

import pytest

from cattn.replay.queue import Job, JobQueue
from cattn.store.policy import POLICIES, make_policy
from cattn.store.policy.base import FIFO, LRU, Belady, Scheduler


def touched(policy, *keys):
    for t, k in enumerate(keys):
        policy.touch(k, float(t))
    return policy


# ---- LRU / FIFO


def test_lru_evicts_least_recently_touched_and_refreshes():
    p = touched(LRU(), "a", "b", "c")
    assert p.victim("dram", {"a", "b", "c"}) == "a"
    p.touch("a", 5.0)
    assert p.victim("dram", {"a", "b", "c"}) == "b"
    assert p.victim("disk", {"a", "c"}) == "c"
    p.forget("b")
    assert p.victim("dram", {"a", "b", "c"}) == "c"  # a key the policy does not know goes last


def test_fifo_ignores_refresh():
    p = touched(FIFO(), "a", "b", "c")
    p.touch("a", 5.0)
    assert p.victim("dram", ["a", "b", "c"]) == "a"


def test_lru_small_tier_fast_path_agrees_with_the_walk():
    p = touched(LRU(), *[f"k{i}" for i in range(40)])
    assert p.victim("dram", {"k30", "k7", "k12"}) == "k7"       # few candidates: scanned
    assert p.victim("disk", {f"k{i}" for i in range(5, 40)}) == "k5"  # many: order walked


@pytest.mark.parametrize("cls", [LRU, FIFO, Scheduler])
def test_empty_candidates_and_bad_tier(cls):
    p = touched(cls(), "a")
    assert p.victim("dram", []) is None
    with pytest.raises(ValueError, match="tier"):
        p.victim("gpu", ["a"])


# ---- scheduler


def test_scheduler_demotes_unqueued_first_then_furthest_back():
    p = touched(Scheduler(), "a", "b", "c", "d")
    p.update_queue(["c", "a", "c"])
    assert p.victim("dram", {"a", "b", "c", "d"}) == "b"   # no job; older than d
    assert p.victim("dram", {"a", "c", "d"}) == "d"
    assert p.victim("dram", {"a", "c"}) == "a"             # position 1 is further back than 0


def test_scheduler_ties_among_unqueued_go_by_recency():
    p = Scheduler()
    for k in ("x", "y", "z"):
        p.touch(k, 1.0)  # same time: touch order decides
    p.update_queue(["y"])
    assert p.victim("dram", {"x", "y", "z"}) == "x"
    p.touch("x", 2.0)
    assert p.victim("dram", {"x", "y", "z"}) == "z"


def test_scheduler_with_empty_queue_is_lru_and_prefetches_nothing():
    p = touched(Scheduler(), "a", "b", "c")
    p.update_queue([])
    assert p.victim("dram", {"a", "b", "c"}) == "a"
    assert p.victim("disk", {"b", "c"}) == "b"
    assert p.prefetch({"a", "b"}) == []


def test_scheduler_prefetches_inside_the_window_in_queue_order():
    p = touched(Scheduler(), "a", "b", "c", "d")
    p.update_queue(["d", "b", "d", "a", "c"], prefetch_window=4, eviction_window=5)
    assert p.prefetch({"a", "b", "c", "d"}) == ["d", "b", "a"]  # c is the 5th job; d once
    assert p.prefetch({"c"}) == []
    p.update_queue(["d", "b", "d", "a", "c"], prefetch_window=0, eviction_window=5)
    assert p.prefetch({"a", "b", "c", "d"}) == []


def test_scheduler_drops_from_disk_only_outside_the_eviction_window():
    p = touched(Scheduler(), "old", "a", "b", "c")
    p.update_queue(["a", "b", "old", "c"], prefetch_window=1, eviction_window=2)
    # 'old' and 'c' are outside the first two jobs; 'old' is the least recently used of them
    assert p.victim("disk", {"old", "a", "b", "c"}) == "old"
    assert p.victim("disk", {"a", "b", "c"}) == "c"
    # everything inside the window: the furthest back goes
    assert p.victim("disk", {"a", "b"}) == "b"


def test_scheduler_incoming_only_displaces_less_urgent():
    p = touched(Scheduler(), "a", "b", "c")
    p.update_queue(["a", "b", "c"])
    assert p.victim("dram", {"a", "c"}, incoming="b") == "c"
    assert p.victim("dram", {"a"}, incoming="b") is None
    assert p.victim("dram", {"a", "b"}, incoming="c") is None


def test_scheduler_session_queued_while_being_demoted_comes_back():
    p = touched(Scheduler(), "a", "b", "c")
    p.update_queue(["b", "c"], prefetch_window=2, eviction_window=3)
    assert p.victim("dram", {"a", "b", "c"}) == "a"  # chosen for demotion...
    p.update_queue(["a", "b", "c"], prefetch_window=2, eviction_window=3)  # ...and its turn arrives
    assert p.prefetch({"a"}) == ["a"]
    assert p.victim("dram", {"a", "b", "c"}) == "c"


def test_scheduler_ttl_expires_only_stale_sessions_outside_the_window():
    p = Scheduler(ttl=10.0)
    p.touch("stale", 0.0)
    p.touch("queued", 1.0)
    p.touch("fresh", 15.0)
    p.update_queue(["queued"], eviction_window=1)
    assert p.expired({"stale", "queued", "fresh"}, now=20.0) == ["stale"]
    assert Scheduler().expired({"stale"}, now=1e9) == []
    with pytest.raises(ValueError, match="ttl"):
        Scheduler(ttl=-1)


def test_scheduler_reads_a_job_queue_in_place():
    p = touched(Scheduler(), "a", "b", "c")
    q = JobQueue(dram_bytes=200, disk_bytes=800, listeners=[p])
    q.mean_session_bytes = 100.0
    for s in ("c", "a", "c"):
        q.push(Job(s, 0.0, 1, 1))
    assert (p.prefetch_window, p.eviction_window) == (2, 10)
    assert p.victim("dram", {"a", "b", "c"}) == "b"
    assert p.victim("dram", {"a", "c"}) == "a"
    q.pop()  # c's first job starts; its second is now at position 1, behind a
    assert p.victim("dram", {"a", "c"}) == "c"


# ---- Belady


def test_belady_evicts_furthest_next_use_and_never_used_first():
    p = Belady(["a", "b", "c", "a", "b", "a"])
    for k in ("a", "b", "c"):
        p.touch(k, 0.0)
    for k in ("a", "b", "c"):
        p.start(k, 0.0)
        p.touch(k, 0.0)  # the job loaded its history
    assert p.next_use("a") == 3 and p.next_use("b") == 4 and p.next_use("c") == math.inf
    assert p.victim("disk", {"a", "b", "c"}) == "c"
    assert p.victim("dram", {"a", "b"}) == "b"
    p.forget("c")
    assert p.victim("disk", {"a", "b"}) == "b"
    assert p.victim("dram", {"a"}, incoming="b") is None
    assert p.victim("dram", {"b"}, incoming="a") == "b"


def test_belady_heap_path_matches_scan():
    keys = [f"k{i}" for i in range(50)]
    p = Belady(keys + keys[::-1])
    for k in keys:
        p.touch(k, 0.0)
        p.start(k, 0.0)
        p.touch(k, 0.0)
    # next uses: k49 soonest ... k0 furthest
    assert p.victim("disk", set(keys)) == "k0"          # heap
    assert p.victim("dram", {"k10", "k20"}) == "k10"    # scan


def test_belady_prefetches_the_next_jobs_and_checks_order():
    p = Belady(["a", "b", "a", "c"])
    p.update_queue([], prefetch_window=2)
    assert p.prefetch({"a", "b", "c"}) == ["a", "b"]
    p.start("a", 0.0)
    assert p.prefetch({"a", "c"}) == ["a"]
    with pytest.raises(ValueError, match="job 1 of the trace is 'b'"):
        p.start("c", 0.0)


# ---- factory


def test_make_policy_by_name_and_errors():
    assert [make_policy(n, accesses=[]).name for n in POLICIES] == list(POLICIES)
    assert make_policy("scheduler", ttl=5.0).ttl == 5.0
    with pytest.raises(ValueError, match=r"unknown policy 'lfu'; choose one of scheduler, lru, fifo, belady"):
        make_policy("lfu")
    with pytest.raises(ValueError, match="accesses"):
        make_policy("belady")
    with pytest.raises(ValueError, match="ttl"):
        make_policy("lru", ttl=3.0)


@pytest.mark.parametrize("name", ["scheduler", "belady"])
def test_a_started_session_stays_until_its_history_is_loaded(name):
    # the store is told a job started before the job loads its history: a prefetch for a queued
    # job must not push that history down in between
    p = make_policy(name, accesses=["a", "b", "a"])
    for k in ("a", "b", "c"):
        p.touch(k, 0.0)
    p.update_queue(["a", "b"], prefetch_window=2, eviction_window=2)
    p.start("a", 1.0)
    p.update_queue(["b"], prefetch_window=2, eviction_window=2)
    assert p.victim("dram", {"a"}, incoming="b") is None
    assert p.victim("dram", {"a", "c"}) == "c"  # c: no job to come
    p.touch("a", 2.0)  # loaded: its job needs it no more than its next turn does
    assert p.victim("dram", {"a"}, incoming="b") == "a"
