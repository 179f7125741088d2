"""Honest replay metrics, long-context shapes and traces, the fair bound, partial prefetch."""
import json
import warnings

import pytest

import cattn.replay.sim as sim
from cattn.apps.cli import main
from cattn.replay.costmodel import CostModel, Hardware, ModelShape, model_shape, parse_model_shape
from cattn.replay.longctx import LongContextConfig, long_context_trace, prompt_lengths
from cattn.replay.mooncake import read_mooncake, write_mooncake
from cattn.replay.queue import Job
from cattn.replay.report import percentile, summarize
from cattn.replay.records import number_turns
from cattn.replay.trace import read_trace
from cattn.store.policy.base import Belady

TINY = ModelShape("tiny", 1, 1, 1, 1, 1e6, max_context=1000, dtype_bytes=1)  # 2 bytes of KV per token


def _cli(tmp_path, lines, *extra):
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in lines))
    argv = ["replay", "--trace", str(trace), "--sweep", "", "--out", str(tmp_path / "out"), "--plots",
            str(tmp_path / "png"), "--name", "t", "--no-progress", *extra]
    return main(argv), json.loads((tmp_path / "out" / "replay_t.json").read_text())


def test_three_line_trace_overflowing_and_single_turns_are_not_hits(tmp_path, capsys):
    lines = [dict(session="a", arrival=0.0, new_tokens=3000, output_tokens=100),
             dict(session="b", arrival=1.0, new_tokens=20000, output_tokens=100),
             dict(session="a", arrival=60.0, new_tokens=5000, output_tokens=100)]
    rc, data = _cli(tmp_path, lines, "--model", "llama2-13b", "--policies", "scheduler,belady,recompute")
    assert rc == 0
    out = capsys.readouterr().out
    assert "warning:" in out and "4,096-token context" in out
    for row in data["results"]:
        # a's second turn keeps no history (5,000 new tokens fill the 4K context); b has one turn
        assert (row["turns_with_history"], row["hit_rate"], row["dram_hit_rate"], row["reuse"]) == (1, 0, 0, 0)
        assert row["policy"] == "recompute" or row["overflow_rate"] == 1.0
        assert row["prefill_tokens"] == row["prompt_tokens"] and row["gpu_saved"] == pytest.approx(0, abs=1e-12)
    # the same trace at 128K context: a's history fits and is reused, nothing is cut
    rc, data = _cli(tmp_path, lines, "--model", "llama3.1-8b", "--policies", "belady,recompute")
    assert "warning:" not in capsys.readouterr().out
    belady = data["results"][0]
    assert belady["dram_hit_rate"] == 1.0 and belady["reused_tokens"] == belady["history_tokens"] == 3100
    assert belady["gpu_saved"] > 0


def test_context_cut_counts_what_the_context_drops_and_simulate_warns():
    shape = ModelShape("ctx16", 1, 1, 1, 1, 1e6, max_context=16, dtype_bytes=1)
    jobs = number_turns([Job("a", 0.0, 5, 5), Job("a", 1.0, 4, 2), Job("a", 2.0, 3, 1), Job("b", 3.0, 20, 1)])
    cut = sim.context_cut(jobs, 16)
    # a: 5, then 10+4 (fits), then 16+3 with 1 answer: 4 history tokens dropped; b: 20 -> 16 new tokens
    assert (cut.prompt_tokens, cut.cut_new_tokens, cut.cut_history_tokens, cut.turns_cut) == (5 + 14 + 19 + 20, 4,
                                                                                                4, 2)
    with pytest.warns(sim.TruncationWarning, match=r"13\.8% of the trace's prompt tokens"):
        sim.simulate(jobs, "lru", 10**6, 10**6, CostModel(shape))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sim.simulate(jobs, "lru", 10**6, 10**6, CostModel(TINY))  # fits: no warning


def test_a_turn_recomputed_from_disk_is_not_a_store_hit():
    # no DRAM; the disk reads 100 B/s, so a 200-byte history takes 2 s against 0.001 s of prefill
    cost = CostModel(TINY, Hardware(gpus=1, disk_read_bytes_per_s=100.0))
    jobs = number_turns([Job("a", 0.0, 50, 50), Job("a", 10.0, 5, 5)])
    res = sim.simulate(jobs, "lru", 0, 10**6, cost)
    assert res.records[1].tier == "recomputed" and res.records[1].reused_tokens == 0
    s = summarize(res, cost)
    assert (s["hit_rate"], s["disk_hit_rate"], s["reuse"], s["recomputed_rate"]) == (0, 0, 0, 1.0)
    assert res.counters["recomputed_hits"] == 1
    fast = CostModel(TINY, Hardware(gpus=1, disk_read_bytes_per_s=1e12))
    s = summarize(sim.simulate(jobs, "lru", 0, 10**6, fast), fast)
    assert (s["disk_hit_rate"], s["reuse"]) == (1.0, 1.0) and s["gpu_saved"] > 0


def test_token_weighted_reuse_and_gpu_saved_against_hand_counts():
    cost = CostModel(TINY, Hardware(gpus=1))
    jobs = number_turns([Job("a", 0.0, 30, 10), Job("b", 0.0, 300, 100), Job("a", 50.0, 5, 5),
                         Job("b", 50.0, 5, 5)])
    # DRAM holds a's 80 bytes but not b's 800: a is a DRAM hit, b's history is on disk (fast enough)
    res = sim.simulate(jobs, "lru", 100, 10**6, cost)
    a, b = res.records[2], res.records[3]
    assert (a.tier, a.reused_tokens, a.history_tokens) == ("dram", 40, 40)
    s = summarize(res, cost)
    assert s["history_tokens"] == 440 and s["reuse"] == pytest.approx(b.reused_tokens / 440 + 40 / 440)
    assert s["dram_reuse"] == pytest.approx(40 / 440)
    recompute = sum(cost.recompute_time(r.prompt_tokens, o) for r, o in zip(res.records, (10, 100, 5, 5)))
    busy = sum(r.stall + r.prefill + r.decode for r in res.records)
    assert s["gpu_saved"] == pytest.approx((recompute - busy) / recompute, rel=1e-9)


def test_fair_bound_never_prefetches_a_job_before_it_is_queued(monkeypatch):
    p = Belady(["a", "b", "a"], prefetch_queued_only=True)
    p.update_queue([], prefetch_window=10)
    assert p.prefetch({"a", "b"}) == []  # full Belady would bring a up now
    p.update_queue(["b"], prefetch_window=10)
    assert p.prefetch({"a", "b"}) == ["b"]
    full = Belady(["a", "b", "a"])
    full.update_queue([], prefetch_window=10)
    assert full.prefetch({"a", "b"}) == ["a", "b"]  # reads the future
    # in a whole replay: every key it asks for has a queued job at that moment
    asked = []
    orig = Belady.prefetch

    def spy(self, on_disk):
        keys = orig(self, on_disk)
        asked.extend(self._queue.position(k) is not None for k in keys)
        return keys

    monkeypatch.setattr(Belady, "prefetch", spy)
    jobs = long_context_trace(LongContextConfig(duration_s=120, session_rate=1.0, gap_median_s=20, gap_p90_s=60))
    cost = CostModel(model_shape("llama3.1-8b"), Hardware(gpus=4))
    sim.simulate(jobs, "belady-fair", 20 * 10**9, 10**13, cost)
    assert asked and all(asked)


def test_partial_prefetch_uses_the_prefix_that_arrived():
    # 10 layers: 20 bytes of KV per token; prefill 0.01 s per token; disk 1,000 B/s = 0.02 s per token
    shape = ModelShape("ten", 10, 1, 1, 1, 1e6, max_context=10**5, dtype_bytes=1)
    cost = CostModel(shape, Hardware(gpus=1, peak_flops=2e8, mfu=1.0, disk_read_bytes_per_s=1000.0))
    jobs = number_turns([Job("a", 0.0, 50, 40), Job("a", 30.0, 10, 1)])
    res = sim.simulate(jobs, "lru", 0, 10**6, cost, tiers=sim.TierModel(partial_prefetch=True))
    turn = res.records[1]
    # read p of the 90 history tokens while prefilling the other 90 - p + 10: 0.02 p = 0.01 (100 - p)
    assert turn.tier == "disk" and 32 <= turn.reused_tokens <= 34
    assert turn.stall + turn.prefill == pytest.approx(2 / 3 * 1.1, rel=0.03)  # + one layer of the read
    whole = sim.simulate(jobs, "lru", 0, 10**6, cost).records[1]
    assert whole.tier == "recomputed" and whole.stall + whole.prefill == pytest.approx(1.0, rel=0.01)


def test_partial_prefetch_of_a_read_in_flight():
    from cattn.replay.queue import JobQueue
    from cattn.store.policy import make_policy
    # one layer, 2 bytes per token; prefill 0.01 s per token; the disk reads 20 B/s = 0.1 s per token
    shape = ModelShape("one", 1, 1, 1, 1, 1e6, max_context=10**5, dtype_bytes=1)
    cost = CostModel(shape, Hardware(gpus=1, peak_flops=2e8, mfu=1.0, disk_read_bytes_per_s=20.0))
    pol = make_policy("scheduler")
    q = JobQueue(250, 10**6, [pol])
    t = sim.SimTiers(250, 10**6, pol, q, cost, sim.TierModel(partial_prefetch=True))
    t.save("a", 200, 0.0)
    t.save("b", 200, 0.5)  # a goes to disk
    assert "a" not in t.dram
    q.push(Job("a", 1.0, 10, 1))
    t.prefetch(1.0)  # read of a: 1.0 -> 11.0
    assert t.dram["a"] == pytest.approx(11.0) and t.arrived_tokens("a", 6.0, 100) == 50
    found, wait = t.find("a", 6.0)
    assert (found, wait) == ("disk", pytest.approx(5.0))
    # waiting 5 s, reading on (0.1 s per token) or prefilling all 110 (1.1 s) lose to using the 50
    # tokens there and prefilling the other 60 (0.6 s)
    tier, reused, stall, prefill, reads_on = sim.serve_turn(t, cost, "a", 6.0, found, wait, 10, 100, 100, True)
    assert (tier, reused, reads_on) == ("partial", 50, True) and stall + prefill == pytest.approx(0.6, rel=0.01)
    tier, reused, _, prefill, reads_on = sim.serve_turn(t, cost, "a", 6.0, found, wait, 10, 100, 100, False)
    assert (tier, reused, prefill, reads_on) == ("recomputed", 0, pytest.approx(1.1, rel=0.01), False)


def test_a_job_that_starts_as_its_prefetch_begins_reads_on_overlapped():
    # a job arriving to an empty queue starts when its prefetch does: nothing has arrived yet, and it
    # must still get the overlapped read a history on disk only gets (it used to recompute it all)
    shape = ModelShape("ten", 10, 1, 1, 1, 1e6, max_context=10**5, dtype_bytes=1)  # 20 B per token
    cost = CostModel(shape, Hardware(gpus=1, peak_flops=2e8, mfu=1.0, disk_read_bytes_per_s=1000.0))
    jobs = number_turns([Job("a", 0.0, 50, 40), Job("b", 5.0, 50, 40), Job("a", 30.0, 10, 1)])
    res = sim.simulate(jobs, "scheduler", 2000, 10**6, cost, tiers=sim.TierModel(partial_prefetch=True))
    turn = res.records[2]
    assert turn.start == 30.0 and res.counters["prefetches"] == 1  # a came up from disk as it started
    # as if on disk only: p of the 90 tokens read (0.02 s each) while the other 100 - p prefill (0.01 s)
    assert turn.tier == "disk" and 32 <= turn.reused_tokens <= 34
    assert turn.stall + turn.prefill == pytest.approx(2 / 3 * 1.1, rel=0.03)
    assert res.counters["recomputed_hits"] == 0
    # and the disk read only those tokens: the prefetch stopped where the job took over
    cost_fast_gpu = CostModel(shape, Hardware(gpus=1, peak_flops=2e12, mfu=1.0, disk_read_bytes_per_s=1000.0))
    fast = sim.simulate(jobs, "scheduler", 2000, 10**6, cost_fast_gpu, tiers=sim.TierModel(partial_prefetch=True))
    assert fast.records[2].tier == "recomputed"  # a GPU this fast prefills it before any read pays


def test_what_a_partial_prefetch_job_reads_on_from_disk_is_disk_reuse():
    shape = ModelShape("ten", 10, 1, 1, 1, 1e6, max_context=10**5, dtype_bytes=1)  # 20 B per token
    cost = CostModel(shape, Hardware(gpus=1, peak_flops=2e8, mfu=1.0, disk_read_bytes_per_s=1000.0))
    # a goes to disk (b takes DRAM); a's next turn queues behind c at 20.5, its prefetch begins then and
    # c ends at 21.0: 25 of a's 90 tokens are in DRAM, and a reads 25 more while prefilling the other 40
    jobs = number_turns([Job("a", 0.0, 50, 40), Job("b", 5.0, 50, 40), Job("c", 20.0, 100, 1), Job("a", 20.5, 10, 1)])
    res = sim.simulate(jobs, "scheduler", 2000, 10**6, cost, tiers=sim.TierModel(partial_prefetch=True))
    turn = res.records[3]
    assert (turn.tier, turn.reused_tokens, turn.dram_tokens) == ("partial", 50, 25)
    s = summarize(res, cost)
    assert (s["reuse"], s["dram_reuse"], s["disk_reuse"]) == pytest.approx((50 / 90, 25 / 90, 25 / 90))
    assert s["dram_hit_rate"] == 1.0  # turn-weighted, a partial prefetch's turn counts as DRAM


def test_dram_hits_are_told_apart_kept_or_prefetched_and_broken_down_by_idle_time():
    shape = ModelShape("ten", 10, 1, 1, 1, 1e6, max_context=10**5, dtype_bytes=1)  # 20 B per token
    cost = CostModel(shape, Hardware(gpus=1, peak_flops=2e8, mfu=1.0, disk_read_bytes_per_s=1000.0))
    # a goes to disk; its next turn queues at 20.5 behind c (3 s of prefill): its 1.8 s read is in time
    jobs = number_turns([Job("a", 0.0, 50, 40), Job("b", 5.0, 50, 40), Job("c", 20.0, 300, 1), Job("a", 20.5, 10, 1),
                         Job("a", 400.0, 10, 1)])
    res = sim.simulate(jobs, "scheduler", 2100, 10**6, cost, tiers=sim.TierModel(partial_prefetch=True))
    assert [r.tier for r in res.records] == ["first", "first", "first", "dram", "dram"]
    # the first found its read done (prefetched), the second its history where its save left it (kept)
    assert (res.counters["dram_prefetched"], res.counters["dram_kept"]) == (1, 1)
    s = summarize(res, cost)
    idle = s["by_idle_time"]
    assert [b["turns"] for b in idle.values()] == [1, 0, 1]  # idle 20 s, then about 376 s
    saved = [r.recompute_s - r.stall - r.prefill - r.decode for r in res.records]
    assert idle["<1 min"]["gpu_saved"] == pytest.approx(saved[3] / sum(r.recompute_s for r in res.records))
    assert idle[">=4 min"]["dram_reuse"] == idle[">=4 min"]["reuse"] == 1.0
    assert sum(b["gpu_saved"] for b in idle.values()) == pytest.approx(s["gpu_saved"])


def test_told_value_policy_knows_which_sessions_return_and_when():
    from cattn.replay.oracle import ToldValuePolicy
    jobs = number_turns([Job("a", 0.0, 5, 5), Job("b", 1.0, 5, 5), Job("a", 100.0, 5, 5), Job("c", 2.0, 5, 5),
                         Job("c", 50.0, 5, 5)])
    for told in ("which", "when"):  # both know b has no turn left
        p = ToldValuePolicy(jobs, told)
        for key, t in (("a", 0.0), ("b", 1.0), ("c", 2.0)):
            p.start(key, t)
            p.touch(key, t + 1)
        assert p.return_probability("b", 10.0) == 0.0  # b has no turn left
        assert p.victim("dram", {"a", "b", "c"}) == "b"
        assert not p.config.first_turns_first  # a first turn told it returns stays over one told it ends
        assert p.name == f"value told {told}"
    # told when: c (due at 50) is worth more than a (due at 100); told which, both are sure to return
    when = ToldValuePolicy(jobs, "when")
    which = ToldValuePolicy(jobs, "which")
    for p in (when, which):
        for key, t in (("a", 0.0), ("c", 2.0)):
            p.start(key, t)
            p.touch(key, t + 1)
    assert when.victim("dram", {"a", "c"}) == "a"
    assert which.return_probability("a", 10.0) > 0 and which.return_probability("c", 10.0) > 0
    # told the odds: 2 of the 3 sessions have a second turn; which ones, it is not told
    odds = ToldValuePolicy(jobs, "odds")
    assert odds.config.first_turns_first  # not told which: the online rule stays
    for key, t in (("a", 0.0), ("b", 1.0)):
        odds.start(key, t)
        odds.touch(key, t + 1)
    assert odds.return_probability("b", 10.0) == odds.return_probability("a", 10.0) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="told must be one of"):
        ToldValuePolicy(jobs, "who")
    with pytest.raises(ValueError, match="horizon_s"):
        ToldValuePolicy(jobs, "which", horizon_s=0)
    # a policy instance replays as is, named by itself; options for a named policy do not apply to it
    res = sim.simulate(jobs, ToldValuePolicy(jobs, "when"), 10**6, 10**6, CostModel(TINY))
    assert res.policy == "value told when" and [r.tier for r in res.records][2:] == ["first", "dram", "dram"]
    with pytest.raises(ValueError, match="policy_options"):
        sim.simulate(jobs, ToldValuePolicy(jobs, "when"), 10**6, 10**6, CostModel(TINY), ttl=5.0)


def test_model_shape_spec_and_bad_fields_are_named():
    m = parse_model_shape("layers=32,kv_heads=8,heads=32,head_dim=128,dtype=bf16,context=131072,params=8.03e9")
    assert (m.kv_bytes_per_token, m.max_context, m.num_heads) == (131_072, 131072, 32)
    assert parse_model_shape("layers=2,kv_heads=1,head_dim=4,context=64,flops_per_token=4e6,dtype=fp32").params == 2e6
    for spec, field in (("layers=0,kv_heads=8,head_dim=128,context=8192,params=1e9", "num_layers"),
                        ("layers=2,kv_heads=x,head_dim=128,context=8192,params=1e9", "kv_heads"),
                        ("layers=2,kv_heads=8,head_dim=128,params=1e9", "context"),
                        ("layers=2,kv_heads=8,head_dim=128,context=8,params=1e9,color=red", "color"),
                        ("layers=2,kv_heads=8,head_dim=128,context=8,params=-1", "params"),
                        ("layers=2,kv_heads=8,heads=12,head_dim=128,context=8,params=1", "num_heads")):
        with pytest.raises(ValueError, match=field):
            parse_model_shape(spec)
    with pytest.raises(ValueError, match="head_dim must be an int >= 1"):
        ModelShape("m", 1, 1, 1, 0, 1e6, 8)


def test_cli_model_shape_flag(tmp_path, capsys):
    lines = [dict(session="a", arrival=0.0, new_tokens=300, output_tokens=10),
             dict(session="a", arrival=9.0, new_tokens=300, output_tokens=10)]
    rc, data = _cli(tmp_path, lines, "--model-shape", "layers=2,kv_heads=1,head_dim=4,context=500,params=1e6",
                    "--policies", "lru")
    assert rc == 0 and data["model"]["max_context"] == 500 and "warning:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["replay", "--model-shape", "layers=2,kv_heads=1,head_dim=four,context=5,params=1"])
    assert "head_dim" in capsys.readouterr().err


def test_long_context_workload_has_the_stated_shape():
    jobs = long_context_trace()
    prompts = prompt_lengths(jobs)
    turns = {}
    for j in jobs:
        turns[j.session] = turns.get(j.session, 0) + 1
    last, gaps = {}, []
    for j in jobs:
        if j.session in last:
            gaps.append(j.arrival - last[j.session])
        last[j.session] = j.arrival
    assert 11_000 <= len(jobs) <= 13_000 and max(j.arrival for j in jobs) < 3600
    assert 11_000 <= sum(prompts) / len(prompts) <= 13_000 and 100_000 <= max(prompts) <= 126_000
    assert 0.72 <= sum(n == 1 for n in turns.values()) / len(turns) <= 0.78
    assert 100 <= percentile(gaps, 50) <= 140 and 420 <= percentile(gaps, 90) <= 540
    assert long_context_trace(LongContextConfig(duration_s=60)) == long_context_trace(LongContextConfig(duration_s=60))
    with pytest.raises(ValueError, match="single_turn"):
        LongContextConfig(single_turn=1.5)


def test_mooncake_reader_infers_conversations_from_block_prefixes(tmp_path):
    path = tmp_path / "m.jsonl"
    # blocks 0-1: a system prompt every request shares; 10.. and 20..: two conversations
    rows = [dict(timestamp=0, input_length=1100, output_length=50, hash_ids=[0, 1, 10]),
            dict(timestamp=500, input_length=1536, output_length=20, hash_ids=[0, 1, 20]),
            dict(timestamp=60_000, input_length=1800, output_length=30, hash_ids=[0, 1, 20, 21]),
            dict(timestamp=90_000, input_length=1200, output_length=30, hash_ids=[0, 1, 30])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    jobs = read_mooncake(path, shared_min=3)
    assert [(j.session, j.turn, j.arrival, j.new_tokens, j.output_tokens) for j in jobs] == [
        ("m0", 0, 0.0, 1100, 50), ("m1", 0, 0.5, 1536, 20), ("m1", 1, 60.0, 1800 - 1556, 30),
        ("m2", 0, 90.0, 1200, 30)]
    assert read_trace(path)[2].session == jobs[2].session  # auto-detected (default shared_min: 4)


def test_mooncake_round_trip_of_the_long_workload(tmp_path):
    jobs = long_context_trace(LongContextConfig(duration_s=300))
    path = write_mooncake(jobs, tmp_path / "m.jsonl", system_tokens=1536)
    back = read_trace(path, "mooncake")
    assert len(back) == len(jobs)
    names = {}
    same = sum(names.setdefault(a.session, b.session) == b.session and (a.turn, a.new_tokens) == (b.turn, b.new_tokens)
               for a, b in zip(jobs, back))
    assert same >= 0.98 * len(jobs)  # a first prompt within the system prompt's blocks cannot be told apart


@pytest.mark.parametrize("line, message", [
    ("{not json", "m.jsonl:2: not JSON"),
    ('{"timestamp": 1, "input_length": 10, "output_length": 1}', "m.jsonl:2: missing field(s) hash_ids"),
    ('{"timestamp": -1, "input_length": 10, "output_length": 1, "hash_ids": [1]}', "m.jsonl:2: timestamp"),
    ('{"timestamp": 1, "input_length": 10.5, "output_length": 1, "hash_ids": [1]}', "m.jsonl:2: input_length"),
    ('{"timestamp": 1, "input_length": 1000, "output_length": 1, "hash_ids": [1]}', "m.jsonl:2: hash_ids has 1"),
])
def test_mooncake_bad_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "m.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [7]}\n' + line + "\n")
    with pytest.raises(ValueError) as exc:
        read_trace(path)
    assert message in str(exc.value)
