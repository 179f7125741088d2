"""Cost model, simulated tiers, the simulated replay and the `cattn replay` command."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cattn.replay.sim as sim
from cattn.apps.cli import main
from cattn.replay.cli import size
from cattn.replay.costmodel import MODELS, CostModel, Hardware, ModelShape, model_shape
from cattn.replay.queue import Job, JobQueue
from cattn.replay.report import summarize
from cattn.replay.records import number_turns
from cattn.replay.workload import ArrivalConfig, SyntheticConfig, schedule, synthetic_conversations
from cattn.store.policy import POLICIES, make_policy

# one byte per K and per V: a token's KV is 2 bytes, so sizes are easy to read
TINY = ModelShape("tiny", num_layers=1, num_heads=1, num_kv_heads=1, head_dim=1, params=1e6, max_context=1000,
                  dtype_bytes=1)
SLOW_DISK = Hardware(gpus=1, disk_read_bytes_per_s=100.0)


# ---- cost model


def test_kv_bytes_per_token_from_the_shapes():
    assert {n: m.kv_bytes_per_token for n, m in MODELS.items()} == {
        "llama2-13b": 819_200, "llama2-70b": 327_680, "llama3-8b": 131_072, "llama3.1-8b": 131_072,
        "llama3.1-70b": 327_680, "qwen2.5-7b": 57_344, "qwen2.5-7b-128k": 57_344, "falcon-40b": 122_880}
    assert {n: m.max_context for n, m in MODELS.items() if n.startswith(("llama3.1", "qwen"))} == {
        "llama3.1-8b": 131072, "llama3.1-70b": 131072, "qwen2.5-7b": 32768, "qwen2.5-7b-128k": 131072}


def test_prefill_and_decode_times():
    cost = CostModel(model_shape("llama2-13b"))
    per_gpu = 4 * 312e12 * 0.5
    assert cost.prefill_time(1, 0) == pytest.approx((2 * 13e9 + 4 * 40 * 40 * 128 * 0.5) / per_gpu)
    assert cost.prefill_time(100, 2000) > cost.prefill_time(100, 0)  # attention over the history
    assert cost.prefill_time(2100, 0) > cost.prefill_time(100, 2000)  # recomputing costs more than extending
    assert cost.decode_time(10, 1000) == pytest.approx(
        10 * (26e9 / 32 + 1005 * 819_200) / (4 * 2.0e12))
    with pytest.raises(ValueError, match="unknown model 'gpt5'"):
        model_shape("gpt5")
    with pytest.raises(ValueError, match="disk_read_bytes_per_s"):
        Hardware(disk_read_bytes_per_s=-1)


# ---- tiers


def tiers_for(policy, dram, disk, queue_sessions=(), model=sim.EXCLUSIVE):
    pol = make_policy(policy, accesses=list(queue_sessions))
    q = JobQueue(dram, disk, [pol])
    for s in queue_sessions:
        q.push(Job(s, 0.0, 1, 1))
    return sim.SimTiers(dram, disk, pol, q, CostModel(TINY, SLOW_DISK), model), q


def test_tiers_demote_then_drop_and_never_overfill():
    t, _ = tiers_for("lru", dram=100, disk=150, queue_sessions=())
    for i, n in enumerate([60, 30, 50, 70, 40]):
        t.save(f"s{i}", n, float(i))
        assert t.dram_used <= 100 and t.disk_used <= 150
        assert t.dram_used == sum(t.nbytes[k] for k in t.dram) and t.disk_used == sum(t.nbytes[k] for k in t.disk)
    # s2 pushed s0 down; s3 needed both s1 and s2 out; s4 pushed s3 down and the disk dropped s0
    assert list(t.dram) == ["s4"] and set(t.disk) == {"s1", "s2", "s3"}
    assert t.counters == dict(t.counters, demotions=4, drops=1)


def test_session_larger_than_dram_lives_on_disk_and_larger_than_both_is_not_kept():
    t, _ = tiers_for("scheduler", dram=100, disk=1000)
    t.save("big", 300, 0.0)
    assert "big" in t.disk and "big" not in t.dram and t.dram_used == 0
    assert t.find("big", 1.0) == ("disk", pytest.approx(3.0))  # 300 bytes at 100 B/s
    t.save("huge", 5000, 2.0)
    assert t.find("huge", 3.0) == ("miss", 0.0) and "huge" not in t.nbytes
    assert t.policy.prefetch(t.disk.keys()) == []  # nothing queued
    t.prefetch(3.0)
    assert "big" in t.disk  # too big to prefetch even if it were queued


def test_turn_arriving_while_its_prefetch_is_in_flight_waits_for_the_rest():
    t, q = tiers_for("scheduler", dram=500, disk=1000, queue_sessions=["a"])
    t.save("a", 200, 0.0)
    t.demote("a")
    t.prefetch(10.0)  # 200 bytes at 100 B/s: ready at 12.0
    assert t.dram["a"] == pytest.approx(12.0) and t.counters["prefetches"] == 1
    assert t.find("a", 11.5) == ("disk", pytest.approx(0.5))
    assert t.find("a", 12.0) == ("dram", 0.0)


def test_prefetch_never_displaces_a_more_urgent_session():
    t, q = tiers_for("scheduler", dram=100, disk=1000, queue_sessions=["a", "b"])
    t.save("b", 60, 0.0)
    t.demote("b")
    t.save("a", 80, 1.0)  # a is in DRAM and its job is first
    t.prefetch(2.0)
    assert "a" in t.dram and "b" in t.disk  # b would need a out: refused
    q.pop()  # a's job starts; a has nothing queued any more
    t.prefetch(3.0)
    assert "b" in t.dram and "a" in t.disk


def test_inclusive_disk_keeps_what_came_back_and_writes_only_what_it_lacks():
    t, _ = tiers_for("lru", dram=100, disk=150, model=sim.TierModel(inclusive=True))
    t.save("a", 60, 0.0)
    t.save("b", 50, 1.0)  # a goes down: 60 bytes written
    assert set(t.dram) == {"b"} and t.disk == {"a": 60} and t.counters["disk_write_bytes"] == 60
    t.save("a", 70, 2.0)  # a's next turn: 70 bytes in DRAM, the disk keeps its first 60; b goes down
    assert set(t.dram) == {"a"} and t.disk == {"a": 60, "b": 50} and t.counters["disk_write_bytes"] == 110
    t.save("c", 40, 3.0)  # a goes down again: only the 10 bytes the disk lacks are written
    assert set(t.dram) == {"c"} and t.disk == {"a": 70, "b": 50} and t.counters["disk_write_bytes"] == 120
    t.save("d", 90, 4.0)  # c goes down: 40 more do not fit, the oldest (b) is dropped, never c itself
    assert "b" not in t.nbytes and t.disk == {"a": 70, "c": 40} and set(t.dram) == {"d"}


def test_inclusive_disk_drop_removes_the_dram_copy_too():
    t, _ = tiers_for("lru", dram=100, disk=100, model=sim.TierModel(inclusive=True))
    t.save("a", 60, 0.0)
    t.save("b", 70, 1.0)  # a down (60 on disk)
    t.save("a", 60, 2.0)  # a back in DRAM, b down: the disk needs room for 70 and drops a, DRAM copy and all
    assert "a" not in t.nbytes and t.disk == {"b": 70} and t.dram == {} and t.dram_used == 0


def test_watermarks_demote_down_to_the_low_one():
    t, _ = tiers_for("lru", dram=100, disk=1000, model=sim.TIERED_STORE)
    for i in range(3):
        t.save(f"s{i}", 30, float(i))  # 90 bytes: not past the high watermark
    assert t.dram_used == 90
    t.save("s3", 10, 3.0)  # 100 > 90: demote the oldest until at most 70
    assert set(t.dram) == {"s1", "s2", "s3"} and t.dram_used == 70


@pytest.mark.parametrize("model", [sim.EXCLUSIVE, sim.TIERED_STORE])
def test_prefetch_demotes_a_session_with_no_queued_job_to_stay_below_the_high_watermark(model):
    t, q = tiers_for("scheduler", dram=100, disk=1000, queue_sessions=["b", "c"], model=model)
    for k, n in (("b", 40), ("c", 20)):
        t.save(k, n, 0.0)
        t.demote(k)
    t.save("a", 60, 1.0)  # no queued job
    t.prefetch(2.0)
    t.advance(3.0)  # one read at a time: c's starts when b's ends, at 2.4
    assert "b" in t.dram and "c" in t.dram and "a" not in t.dram and t.dram_used <= t.high_bytes
    assert ("a" in t.disk) and t.counters["prefetches"] == 2
    free = sim.TierModel(prefetch_evicts=False)
    t, q = tiers_for("scheduler", dram=100, disk=1000, queue_sessions=["b"], model=free)
    t.save("b", 50, 0.0)
    t.demote("b")
    t.save("a", 60, 1.0)
    t.prefetch(2.0)  # only into free DRAM: b does not fit
    assert "a" in t.dram and "b" not in t.dram


def test_prefetch_deadlines_skip_a_read_too_late_and_stop_one_its_job_did_not_wait_for():
    t, q = tiers_for("scheduler", dram=1000, disk=1000, queue_sessions=["a", "b", "c", "d"])
    for k in "abcd":
        t.save(k, 100, 0.0)
        t.demote(k)
    t.expected_start = lambda key, now: {"a": 1.5, "b": 1.5, "c": 10.0, "d": 10.0}[key]
    t.prefetch(0.0)  # 100 B at 100 B/s each: one read at a time, a first (ready at 1)
    assert t.dram == {"a": 1.0}
    t.advance(1.0)  # b would be ready at 2 > 1.5: skipped; c next
    assert t.dram == {"a": 1.0, "c": 2.0} and "b" in t.disk
    t.started("b", 1.5, recomputed=True)
    assert t.counters["prefetch_skipped"] == 1
    t.started("c", 1.25, recomputed=True)  # c's job did not wait: the rest of its read is given back
    assert t.read_free == pytest.approx(1.25) and t.counters["prefetch_late"] == 1
    t.advance(2.0)  # so d's read starts at 1.25
    assert t.dram["d"] == pytest.approx(2.25) and t.read_free == pytest.approx(2.25)
    late = tiers_for("scheduler", dram=1000, disk=1000, queue_sessions=["a"], model=sim.TIERED_STORE)[0]
    late.save("a", 100, 0.0)
    late.demote("a")
    late.expected_start = lambda key, now: 0.5
    late.prefetch(0.0)  # the store issues it anyway, and finishes it
    late.started("a", 0.5, recomputed=True)
    assert late.dram == {"a": 1.0} and late.read_free == 1.0


def test_one_read_at_a_time_gives_up_a_long_read_for_two_short_ones():
    t, q = tiers_for("scheduler", dram=1000, disk=1000, queue_sessions=["big", "a", "b"])
    for k, n in (("big", 300), ("a", 100), ("b", 100)):
        t.save(k, n, 0.0)
        t.demote(k)
    t.expected_start = lambda key, now: {"big": 3.0, "a": 3.5, "b": 4.0}[key]
    t.prefetch(0.0)
    t.advance(5.0)
    # soonest first would read big (done at 3) and then be too late for both a and b
    assert t.dram == {"a": 1.0, "b": 2.0} and "big" in t.skipped and t.counters["prefetches"] == 2


@pytest.mark.parametrize("one_at_a_time, kept", [(True, True), (False, False)])
def test_one_read_at_a_time_claims_dram_only_when_its_read_starts(one_at_a_time, kept):
    model = sim.TierModel(one_read_at_a_time=one_at_a_time)
    t, q = tiers_for("scheduler", dram=200, disk=1000, queue_sessions=["x", "y"], model=model)
    for k in "xy":
        t.save(k, 100, 0.0)
        t.demote(k)
    t.save("idle", 100, 0.5)  # no queued job: the first to go when a prefetch needs room
    t.prefetch(1.0)  # x's read: 1.0 to 2.0, into the free half of DRAM
    # y's read would need idle's room; one at a time, it is decided when x's read ends
    assert ("idle" in t.dram) == kept and ("y" in t.dram) != kept
    t.advance(2.0)
    assert set(t.dram) == {"x", "y"} and t.dram["y"] == pytest.approx(3.0)


def test_a_turn_arriving_during_a_long_job_is_prefetched_at_its_arrival():
    # 2 bytes of KV per token, prefill 0.01 s per token, disk 100 B/s; DRAM holds one 100-token history
    cost = CostModel(TINY, Hardware(gpus=1, peak_flops=2e8, mfu=1.0, disk_read_bytes_per_s=100.0))
    jobs = number_turns([Job("a", 0.0, 50, 50), Job("x", 0.1, 50, 50), Job("x", 1.0, 800, 1), Job("a", 2.0, 1, 1)])
    res = sim.simulate(jobs, "scheduler", 250, 10**6, cost)
    a1 = res.records[-1]
    assert a1.start > 8.0  # after x's 800-token prefill
    # a went to disk at 1.0; its read was issued at its arrival (2.0) and done at 4.0, long before it ran
    assert (a1.session, a1.tier, a1.stall) == ("a", "dram", 0.0) and res.counters["prefetches"] == 1


# ---- replay


def small_trace(sessions=300, rate=4.0, think=20.0, seed=0):
    convs = synthetic_conversations(SyntheticConfig(num_sessions=sessions, seed=seed))
    return schedule(convs, ArrivalConfig(rate=rate, think_mean=think, seed=seed))


def test_recompute_prefills_every_history_and_a_big_store_prefills_only_new_tokens():
    jobs = small_trace(60, rate=0.5)
    cost = CostModel(model_shape("llama3-8b"))
    rec = summarize(sim.simulate(jobs, "recompute", 0, 0, cost), cost)
    assert rec["hit_rate"] == 0 and rec["prefill_tokens"] == rec["prompt_tokens"]
    for policy in POLICIES:
        res = sim.simulate(jobs, policy, 10**13, 10**14, cost)
        s = summarize(res, cost)
        assert s["hit_rate"] == 1.0 and s["dram_hit_rate"] == 1.0, policy
        assert s["prefill_tokens"] == sum(min(j.new_tokens, 8192) for j in jobs)
        assert s["ttft_mean_s"] < rec["ttft_mean_s"] and s["gpu_hours"] < rec["gpu_hours"]


def test_context_overflow_keeps_the_newest_tokens():
    shape = ModelShape("ctx16", 1, 1, 1, 1, 1e6, max_context=16, dtype_bytes=1)
    jobs = number_turns([Job("a", 0.0, 5, 5), Job("a", 1.0, 4, 2), Job("a", 2.0, 3, 1)])
    res = sim.simulate(jobs, "lru", 10**6, 10**6, CostModel(shape, SLOW_DISK))
    # turn 1: history 10, 4 + 2 new -> 16 fits; turn 2: 16 + 3 + 1 overflows, keep 12 of the history
    assert [(r.tier, r.prompt_tokens, r.prefill_tokens) for r in res.records] == [
        ("first", 5, 5), ("dram", 14, 4), ("dram", 15, 3)]


def test_simulate_rejects_bad_arguments():
    cost = CostModel(TINY)
    with pytest.raises(ValueError, match="dram_bytes must be a non-negative int"):
        sim.simulate(small_trace(2), "lru", -5, 10, cost)
    with pytest.raises(ValueError, match="unknown policy 'mru'"):
        sim.simulate(small_trace(2), "mru", 5, 10, cost)


class CheckedTiers(sim.SimTiers):
    """Asserts the capacity and bookkeeping invariants after every change."""

    def _check(self):
        assert self.dram_used <= self.dram_bytes and self.disk_used <= self.disk_bytes
        assert self.model.inclusive or self.dram.keys().isdisjoint(self.disk.keys())
        assert set(self.nbytes) == set(self.dram) | set(self.disk)
        assert self.dram_used == sum(self.nbytes[k] for k in self.dram) and self.disk_used == sum(self.disk.values())
        assert all(self.disk[k] <= self.nbytes[k] for k in self.disk)

    def save(self, *a):
        super().save(*a)
        self._check()

    def prefetch(self, *a):
        super().prefetch(*a)
        self._check()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), dram_slots=st.integers(0, 4), disk_slots=st.integers(0, 12),
       think=st.sampled_from([0.5, 5.0, 50.0]))
def test_belady_bounds_every_policy_when_sessions_have_equal_size(seed, dram_slots, disk_slots, think):
    # context capped at 8 tokens and every turn longer than that: every entry is 16 bytes
    shape = ModelShape("eq", 1, 1, 1, 1, 1e6, max_context=8, dtype_bytes=1)
    convs = [[(4, 8)] * (1 + (i * 7 + seed) % 5) for i in range(25)]
    jobs = schedule(convs, ArrivalConfig(rate=2.0, think_mean=think, seed=seed))
    cost = CostModel(shape, SLOW_DISK)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sim, "SimTiers", CheckedTiers)
        hits = {p: summarize(sim.simulate(jobs, p, 16 * dram_slots, 16 * disk_slots, cost), cost)["hit_rate"]
                for p in POLICIES}
        for p in POLICIES:  # the store's behaviour keeps the invariants too
            sim.simulate(jobs, p, 16 * dram_slots, 16 * disk_slots, cost, tiers=sim.TIERED_STORE)
    assert all(hits["belady"] >= h - 1e-12 for h in hits.values()), hits


def test_scheduler_beats_lru_in_dram_on_a_backlogged_trace():
    # 1,000 sessions with capacities scaled by 1000 / 17000, arriving fast enough that a queue forms
    # (the look-ahead needs one; docs/replay.md shows the scheduler gains nothing without it)
    jobs = small_trace(1000, rate=10.0, think=30.0)
    cost = CostModel(model_shape("llama2-13b"))
    scale = 1000 / 17000
    dram, disk = int(128e9 * scale), int(10e12 * scale)
    s = {p: summarize(sim.simulate(jobs, p, dram, disk, cost), cost) for p in ("scheduler", "lru", "belady")}
    assert s["scheduler"]["dram_hit_rate"] >= s["lru"]["dram_hit_rate"] + 0.2
    assert s["scheduler"]["dram_hit_rate"] >= s["belady"]["dram_hit_rate"] - 0.1
    assert s["scheduler"]["ttft_mean_s"] < s["lru"]["ttft_mean_s"]


# ---- the command


def test_size_parser():
    assert size("128GB") == 128 * 10**9 and size("1.5GiB") == 3 * 2**29 and size("42") == 42
    assert size("10 TB") == 10**13


@pytest.mark.parametrize("argv, message", [
    (["--dram=-4GB"], "argument --dram: a size must be >= 0"),
    (["--disk", "lots"], "argument --disk: not a size"),
    (["--policies", "scheduler,lfu"], "argument --policies: unknown policy 'lfu'"),
    (["--rate", "-1"], "argument --rate: must be > 0"),
])
def test_cli_bad_arguments_name_the_argument(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["replay", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_replays_a_trace_file_and_writes_json_and_plots(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps(dict(session=f"s{i % 7}", arrival=i * 0.5, new_tokens=50 + i,
                                             output_tokens=100)) + "\n" for i in range(60)))
    argv = ["replay", "--trace", str(trace), "--model", "llama3-8b", "--dram", "200MB", "--disk", "2GB",
            "--sweep", "0.5,1", "--out", str(tmp_path / "out"), "--plots", str(tmp_path / "png"),
            "--name", "t", "--no-progress", "--policies", "scheduler,lru,recompute"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "scheduler" in out and "recompute" in out and "ttft mean" in out
    data = json.loads((tmp_path / "out" / "replay_t.json").read_text())
    assert [r["policy"] for r in data["results"]] == ["scheduler", "lru", "recompute"]
    assert len(data["sweep"]) == 4 and data["trace"] == {"turns": 60, "sessions": 7}
    assert data["kv_bytes_per_token"] == 131_072 and "python" in data["environment"]
    for png in ("replay_t_hit_rate.png", "replay_t_ttft.png"):
        assert (tmp_path / "png" / png).read_bytes()[:4] == b"\x89PNG"


def test_cli_reports_the_bad_trace_line(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"session": "a", "arrival": 0, "new_tokens": 1, "output_tokens": 1}\n{"session": "a"}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:2: missing field\(s\) arrival, new_tokens, output_tokens"):
        main(["replay", "--trace", str(trace), "--no-progress", "--out", str(tmp_path), "--plots", str(tmp_path)])


@pytest.mark.parametrize("catch_up", [True, False])
def test_the_next_read_starts_when_the_disk_frees_up_between_events(catch_up, monkeypatch):
    if not catch_up:  # decide reads only when a job arrives, starts or is saved
        monkeypatch.setattr(sim.SimTiers, "advance", lambda self, now: None)
    # 2 bytes of KV per token; prefill and decode 0.01 s per token each; the disk reads 200 B/s
    cost = CostModel(TINY, Hardware(gpus=1, peak_flops=2e8, mfu=1.0, hbm_bytes_per_s=3.125e6,
                                    disk_read_bytes_per_s=200.0))
    jobs = number_turns([Job("a", 0.0, 50, 50), Job("b", 0.0, 50, 50)]                 # 200 B each, 0-2 s
                        + [Job(f"z{i}", 0.0, 100, 100) for i in range(3)]              # a, b pushed down by 8 s
                        + [Job("w", 7.0, 1, 400),                                      # 8.0 s to 12.1 s
                           Job("a", 9.0, 1, 50), Job("b", 9.0, 1, 1)])                 # queued behind w
    res = sim.simulate(jobs, "scheduler", 1000, 10**6, cost)
    a1, b1 = res.records[-2:]
    assert (a1.session, a1.tier, b1.session) == ("a", "dram", "b") and 12.5 < b1.start < 12.7
    # a's read runs 9-10 s; b's starts when the disk is free at 10 s, when no job arrives or starts, and
    # is done at 11 s. Decided at the next event (12.1 s) it would still be in flight when b starts
    assert b1.tier == ("dram" if catch_up else "disk")


def test_a_real_replay_records_the_device_its_model_ran_on(tmp_path):
    from cattn.replay.report import write_json

    sim = json.loads(write_json(tmp_path / "s.json", {"config": {"mode": "sim", "device": "cpu"}}).read_text())
    real = json.loads(write_json(tmp_path / "r.json", {"config": {"mode": "real", "device": "cuda:0"}}).read_text())
    assert sim["environment"]["device"].startswith("simulated")
    assert real["environment"]["device"].startswith("cuda:0 (real replay")
