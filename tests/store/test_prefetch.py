"""Choosing prefetch reads under deadlines: Moore-Hodgson against brute force."""
from itertools import combinations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cattn.store.prefetch.deadlines import Read, on_time


def feasible(reads, begin):
    t = begin
    for r in sorted(reads, key=lambda r: r.due):
        t += r.seconds
        if t > r.due:
            return False
    return True


def test_gives_up_one_long_read_for_two_short_ones():
    reads = [Read("big", 3.0, 3.0), Read("a", 1.0, 3.5), Read("b", 1.0, 4.0)]
    # greedy in deadline order reads big (done at 3) and then neither a (4 > 3.5) nor b (5 > 4)
    assert on_time(reads, 0.0) == (["a", "b"], ["big"])


def test_order_is_by_deadline_then_the_undated_in_policy_order():
    reads = [Read("x", 1.0, None), Read("late", 1.0, 9.0), Read("soon", 1.0, 2.0), Read("y", 5.0, None)]
    assert on_time(reads, 0.0) == (["soon", "late", "x", "y"], [])


def test_equal_sizes_skip_the_read_that_cannot_make_it_and_keep_the_urgent_ones():
    reads = [Read(k, 1.0, due) for k, due in (("a", 1.0), ("b", 1.5), ("c", 3.0), ("d", 3.0))]
    assert on_time(reads, 0.0) == (["a", "c", "d"], ["b"])


def test_begin_counts_and_a_read_already_too_late_is_given_up():
    assert on_time([Read("a", 1.0, 2.0)], 1.5) == ([], ["a"])
    assert on_time([], 0.0) == ([], [])
    with pytest.raises(ValueError, match="seconds"):
        on_time([Read("a", -1.0, 2.0)], 0.0)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 15)), max_size=7), st.integers(0, 3))
def test_as_many_on_time_as_brute_force(jobs, begin):
    reads = [Read(i, float(s), float(d)) for i, (s, d) in enumerate(jobs)]
    taken, given_up = on_time(reads, float(begin))
    assert sorted(taken + given_up) == list(range(len(reads)))
    chosen = [reads[k] for k in taken]
    assert feasible(chosen, begin)
    assert [r.key for r in sorted(chosen, key=lambda r: r.due)] == taken
    best = max(n for n in range(len(reads) + 1)
               if any(feasible(c, begin) for c in combinations(reads, n)))
    assert len(taken) == best
