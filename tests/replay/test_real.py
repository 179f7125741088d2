"""The pieces of the real replay that need no model: the trace handed to the simulator and the
machine's cost model."""
import pytest

from cattn.replay.costmodel import ModelShape
from cattn.replay.real import RealTurn, rates, same_trace_for_the_simulator, this_machine


def test_the_simulator_gets_the_same_order_and_token_counts():
    turns = [RealTurn("a", "first", 40, 0, 40, 0.1), RealTurn("b", "first", 30, 0, 30, 0.1),
             RealTurn("a", "dram", 100, 40, 100, 0.1), RealTurn("a", "miss", 150, 0, 151, 0.2)]
    jobs = same_trace_for_the_simulator(turns)
    assert [(j.session, j.turn, j.new_tokens, j.output_tokens) for j in jobs] == [
        ("a", 0, 40, 0), ("b", 0, 30, 0), ("a", 1, 60, 0), ("a", 2, 50, 1)]
    assert all(a.arrival < b.arrival for a, b in zip(jobs, jobs[1:]))


def test_rates_count_only_turns_with_history():
    assert rates(["first", "dram", "disk", "miss", "dram", "first"]) == dict(
        dram_hit_rate=0.5, disk_hit_rate=0.25, hit_rate=0.75)


def test_this_machine_flop_rate_is_what_the_prefills_achieved():
    shape = ModelShape("m", 2, 2, 1, 4, params=1e6, max_context=64)
    turns = [RealTurn("a", "first", 100, 0, 100, 0.5), RealTurn("a", "dram", 300, 100, 300, 0.5)]
    hw = this_machine(shape, turns)
    assert hw.peak_flops * hw.mfu == pytest.approx(2 * 1e6 * 300 / 1.0)
    assert hw.gpus == 1
