"""The `value` policy on hand-built histories and queues whose right answer is known, and in TieredStore."""
import pytest
import torch

from cattn.store.contract import EntryKey, KVEntry
from cattn.store.lower.disk import DiskTier
from cattn.store.policy.value import ValueConfig, ValuePolicy


def turn(p, key, start, end):
    """One turn of ``key``: its job starts at ``start``, its history is saved at ``end``."""
    p.start(key, start)
    p.touch(key, end)


def population(p, singles=8, veterans=("v1", "v2"), returning=("r",)):
    """``singles`` sessions with one turn, then ``veterans`` with three and ``returning`` with two,
    one after another, each turn 30 s after the save before. Returns the time of the last save."""
    t = 0.0
    for i in range(singles):
        turn(p, f"single{i}", t, t + 1)
        t += 1
    for key, n in [(v, 3) for v in veterans] + [(r, 2) for r in returning]:
        for j in range(n):
            t += 30 if j else 1
            turn(p, key, t, t + 1)
            t += 1
    return t


def test_return_probability_learns_from_turn_counts_and_gaps():
    p = ValuePolicy()
    population(p)
    # 11 sessions reached one turn, 3 a second, 2 a third (Laplace-smoothed shares)
    p1, p2 = (3 + 1) / (11 + 2), (2 + 1) / (3 + 2)
    assert p.return_probability("single0", now=p.last_saved("single0")) == pytest.approx(p1)
    assert p.return_probability("r", now=p.last_saved("r")) == pytest.approx(p2)
    # the five gaps were all 30 s: idle 100 s, longer than every gap seen, survives with 1/6 (smoothed)
    s = 1 / 6
    assert p.return_probability("r", now=p.last_saved("r") + 100) == pytest.approx(p2 * s / (1 - p2 + p2 * s))
    assert p.return_probability("r", now=p.last_saved("r") + 10) == pytest.approx(p2 * 1.0)


def test_dram_demotes_the_session_least_likely_to_return_and_keeps_queued_ones():
    p = ValuePolicy()
    t = population(p)
    turn(p, "fresh", t + 4, t + 5)  # one turn, just saved: p_1 = 4/14; r, idle 5 s: p_2 = 3/5
    assert p.victim("dram", {"r", "fresh"}) == "fresh"
    assert p.victim("dram", {"r", "fresh", "single3"}) == "single3"  # as likely as fresh, idle for longer
    p.update_queue(["fresh"])
    assert p.victim("dram", {"r", "fresh"}) == "r"  # a queued job's history stays
    p.update_queue(["fresh", "r"])
    assert p.victim("dram", {"r", "fresh"}) == "r"  # all queued: the furthest back goes
    assert p.victim("dram", {"r"}, incoming="fresh") == "r" and p.victim("dram", {"fresh"}, incoming="r") is None


def test_a_first_turn_never_displaces_a_session_that_came_back_from_dram():
    on, off = ValuePolicy(), ValuePolicy(ValueConfig(first_turns_first=False))
    for p in (on, off):
        t = population(p)
        turn(p, "fresh", t + 99, t + 100)  # r idle 100 s, past every gap seen: 3/5 x 1/6 / (2/5 + 1/10) = 0.2
        assert p.return_probability("r", t + 100) == pytest.approx(0.2)
        assert p.return_probability("fresh", t + 100) == pytest.approx(4 / 14)  # likelier: one turn, just saved
    assert off.victim("dram", {"r", "fresh"}) == "r"
    assert on.victim("dram", {"r", "fresh"}) == "fresh"
    assert on.victim("dram", {"r", "fresh", "single3"}) == "single3"  # among first turns, the estimate orders
    assert on.victim("disk", {"r", "fresh"}) == off.victim("disk", {"r", "fresh"}) == "r"  # DRAM only
    on.update_queue(["fresh"])
    assert on.victim("dram", {"r", "fresh"}) == "r"  # a queued job's history still stays


def test_horizon_keeps_the_session_whose_turn_is_due():
    def population_with_gaps(p):
        t = 0.0
        for i, gap in enumerate([30.0] * 4 + [60.0] * 4):  # eight two-turn sessions: gaps of 30 s and 60 s
            turn(p, f"g{i}", t, t + 1)
            turn(p, f"g{i}", t + 1 + gap, t + 2 + gap)
            t += 100
        turn(p, "r", t + 35, t + 36)  # one turn each; at t + 76, r is idle 40 s and q 5 s
        turn(p, "q", t + 70, t + 71)
        return t + 76

    ever, soon = ValuePolicy(), ValuePolicy(ValueConfig(horizon_s=30.0))
    now = population_with_gaps(ever)
    assert population_with_gaps(soon) == now
    # at all: q (idle 5 s, every gap still ahead) is likelier than r (idle 40 s, half the gaps passed)
    assert ever.return_probability("q", now) > ever.return_probability("r", now)
    assert ever.victim("dram", {"r", "q"}) == "r"
    # within 30 s: 4 of the 9 (smoothed) gaps end in q's next 30 s, 4 of r's 5 left end in r's: r stays
    p1 = ever.return_probability("q", now)
    assert soon.return_probability("q", now) == pytest.approx(p1 * 4 / 9)
    assert soon.return_probability("r", now) == pytest.approx(p1 * 4 / 9 / (1 - p1 + p1 * 5 / 9))
    assert soon.victim("dram", {"r", "q"}) == "q"
    with pytest.raises(ValueError, match="horizon_s"):
        ValueConfig(horizon_s=0)
    with pytest.raises(ValueError, match="horizon_s"):
        ValueConfig(horizon_s=True)


def test_value_per_byte_keeps_the_longer_history_of_two_alike():
    cfg = ValueConfig(bytes_per_token=100, crossover_tokens=1000.0)
    p = ValuePolicy(cfg)
    population(p)
    turn(p, "short", 100.0, 101.0)
    turn(p, "long", 100.0, 101.0)
    p.sized("short", 100 * 100)
    p.sized("long", 100 * 3000)
    # same return odds; per byte the long one saves 1 + 3000/1000 against 1 + 100/1000
    assert p.score("long") / p.score("short") == pytest.approx(4.0 / 1.1)
    assert p.victim("dram", {"short", "long"}) == "short"
    assert ValuePolicy(ValueConfig(value_per_byte=False)).score("x") == ValuePolicy().score("x")


def test_disk_drops_the_least_valuable_outside_the_eviction_window():
    p = ValuePolicy()
    now = population(p)
    p.update_queue(["single0"], eviction_window=1)
    cands = {"r", "single0", "single1", "single5"}
    assert p.victim("disk", cands) == "single1"   # oldest of the least likely, single0 is queued
    lru = ValuePolicy(ValueConfig(disk_return=False))
    population(lru)
    lru.update_queue(["single0"], eviction_window=1)
    assert lru.victim("disk", cands) == "single1"  # recency: the same here
    assert p.victim("disk", {"r", "single7"}) == "single7" and lru.victim("disk", {"r", "single7"}) == "single7"
    p.update_queue([], eviction_window=0)
    turn(p, "new", now + 1, now + 2)
    assert p.victim("disk", {"r", "new"}) == "new"  # one turn so far: less likely than r's third
    assert lru.victim("disk", {"r", "single7"}) == "single7"


def test_tiered_store_demotes_by_the_value_policy(tmp_path):
    L, H, D = 2, 2, 16
    chosen = []

    class Spy(ValuePolicy):
        def victim(self, tier, candidates, incoming=None):
            v = super().victim(tier, candidates, incoming)
            chosen.append((tier, v))
            return v

    from cattn.store.tiered.store import TieredStore
    per_entry = 64 * 2 * L * H * D * 2
    policy = Spy()
    store = TieredStore(int(2.5 * per_entry), DiskTier(tmp_path, 20 * per_entry), policy=policy,
                        high_watermark=0.9, low_watermark=0.5)

    def save(session):
        k = EntryKey("t", "0123abcd", session)
        store.job_started(k)
        store.save(k, KVEntry(torch.arange(64), torch.randn(L, 64, H, D).half(), torch.randn(L, 64, H, D).half()))
        store.sync()
        return k

    import time
    t0 = time.time() - 10**5  # what the policy saw before: 8 one-turn sessions, 4 with three turns
    for i in range(8):
        turn(policy, f"old{i}", t0 + i, t0 + i + 1)
    for i in range(4):
        for j in range(3):
            turn(policy, f"vet{i}", t0 + 100 * i + 10 * j, t0 + 100 * i + 10 * j + 1)
    r = save("r")
    save("r")  # r came back: likelier to come back again than a one-turn session
    chosen.clear()
    for i in range(3):
        save(f"n{i}")
    assert policy.size(r) == 64 * 2 * L * H * D * 2  # told the size of what it holds
    demoted = [v for tier, v in chosen if tier == "dram"]
    assert demoted and r not in demoted
    assert store.lookup(r) is not None
    store.close()
