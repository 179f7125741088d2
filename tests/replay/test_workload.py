"""Job queue, trace files, synthetic workload and the ShareGPT recovery."""
import json
import statistics

import pytest

from cattn.replay import sharegpt
from cattn.replay.queue import Job, JobQueue
from cattn.replay.records import number_turns
from cattn.replay.trace import read_trace, write_trace
from cattn.replay.workload import ArrivalConfig, SyntheticConfig, schedule, synthetic_conversations
from cattn.store.policy.base import Policy


class Recorder(Policy):
    def __init__(self):
        self.calls = []

    def touch(self, key, now):
        pass

    def victim(self, tier, candidates, incoming=None):
        return None

    def update_queue(self, upcoming, *, prefetch_window=None, eviction_window=None):
        self.calls.append(([upcoming[i] for i in range(len(upcoming))], prefetch_window, eviction_window))


# ---- queue


def test_queue_is_fcfs_and_reports_positions_and_windows():
    rec = Recorder()
    q = JobQueue(dram_bytes=1000, disk_bytes=9000, listeners=[rec])
    for s in ("a", "b", "a", "c"):
        q.push(Job(s, 0.0, 1, 1))
    assert [q[i] for i in range(len(q))] == ["a", "b", "a", "c"]
    assert (q.position("a"), q.position("b"), q.position("c"), q.position("zz")) == (0, 1, 3, None)
    assert rec.calls[-1] == (["a", "b", "a", "c"], 4, 4)  # no session size known yet: the whole queue
    q.mean_session_bytes = 300.0
    assert q.windows() == (3, 33)  # DRAM / mean, (DRAM + disk) / mean
    assert q.pop().session == "a"
    assert rec.calls[-1] == (["b", "a", "c"], 3, 33)
    assert (q.position("a"), q.position("b"), q.position("c")) == (1, 0, 2)
    q.pop(), q.pop(), q.pop()
    assert len(q) == 0 and q.peek() is None and q.position("c") is None
    with pytest.raises(IndexError):
        q.pop()


def test_queue_rejects_negative_capacity():
    with pytest.raises(ValueError, match="dram_bytes"):
        JobQueue(-1, 10)
    with pytest.raises(ValueError, match="disk_bytes"):
        JobQueue(1, -10)


# ---- trace files


def test_trace_roundtrip_and_turn_numbers(tmp_path):
    jobs = [Job("x", 5.0, 3, 4), Job("y", 1.0, 2, 2), Job("x", 1.0, 7, 1), Job("y", 1.0, 9, 9)]
    path = tmp_path / "t.jsonl"
    write_trace(jobs, path)
    back = read_trace(path)
    assert [(j.session, j.arrival, j.turn) for j in back] == [("y", 1.0, 0), ("x", 1.0, 0), ("y", 1.0, 1),
                                                              ("x", 5.0, 1)]
    assert back == number_turns(jobs)


@pytest.mark.parametrize("line, why", [
    ('{"session": "a", "arrival": 1.0, "new_tokens": 3}', "missing field"),
    ('{"session": "a", "arrival": 1.0, "new_tokens": -3, "output_tokens": 2}', "new_tokens must be an int >= 0"),
    ('{"session": "a", "arrival": -1, "new_tokens": 3, "output_tokens": 2}', "arrival must be"),
    ('{"session": "", "arrival": 1, "new_tokens": 3, "output_tokens": 2}', "session must be"),
    ('{"session": "a", "arrival": 1, "new_tokens": 2.5, "output_tokens": 2}', "new_tokens must be"),
    ('{"session": "a", "arrival": 1, "new_tokens": 0, "output_tokens": 0}', "a turn needs at least one"),
    ('["a", 1, 2, 3]', "expected a JSON object"),
    ('{"session": "a", "arrival": 1.0, "new_tok', "not JSON"),
])
def test_malformed_trace_line_is_named(tmp_path, line, why):
    path = tmp_path / "bad.jsonl"
    good = '{"session": "a", "arrival": 0.5, "new_tokens": 3, "output_tokens": 2}'
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
    with pytest.raises(ValueError, match=rf"bad.jsonl:4: {why}"):
        read_trace(path)


def test_empty_trace(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no turns"):
        read_trace(tmp_path / "e.jsonl")


# ---- synthetic workload


def test_synthetic_conversations_match_sharegpt_shape():
    convs = synthetic_conversations(SyntheticConfig(num_sessions=6000, seed=3))
    turns = [len(c) for c in convs]
    q = statistics.quantiles(turns, n=100)
    assert abs(statistics.mean(turns) - 3.5) < 0.15
    assert (statistics.median(turns), q[89]) == (3, 7)
    assert 11 <= q[98] <= 15
    user = [u for c in convs for u, _ in c]
    out = [o for c in convs for _, o in c]
    assert abs(statistics.mean(out) / 350 - 1) < 0.05
    assert abs(statistics.mean(user) / 95 - 1) < 0.2  # heavy tail (sigma 1.8): a noisy mean
    assert 14 <= statistics.median(user) <= 24
    assert convs == synthetic_conversations(SyntheticConfig(num_sessions=6000, seed=3))
    assert convs != synthetic_conversations(SyntheticConfig(num_sessions=6000, seed=4))


@pytest.mark.parametrize("process", ["poisson", "gamma"])
def test_schedule_rates_and_think_time(process):
    convs = [[(5, 5)] * 3 for _ in range(3000)]
    jobs = schedule(convs, ArrivalConfig(rate=2.0, process=process, burstiness=3.0, think_mean=30.0, seed=1))
    firsts = sorted(j.arrival for j in jobs if j.turn == 0)
    gaps = [b - a for a, b in zip(firsts, firsts[1:])]
    assert abs(statistics.mean(gaps) - 0.5) < 0.06
    cv = statistics.pstdev(gaps) / statistics.mean(gaps)
    assert abs(cv - (1.0 if process == "poisson" else 3.0)) < (0.1 if process == "poisson" else 0.6)
    by_session = {}
    for j in jobs:
        by_session.setdefault(j.session, []).append(j)
    thinks = [s[k + 1].arrival - s[k].arrival for s in by_session.values() for k in range(2)]
    assert abs(statistics.mean(thinks) - 30.0) < 1.5
    assert all(s[k].turn == k for s in by_session.values() for k in range(3))
    assert [j.arrival for j in jobs] == sorted(j.arrival for j in jobs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_sessions=0), "num_sessions"), (dict(user_mean=-5), "user_mean"), (dict(turns_mean=0.5), "turns_mean"),
    (dict(max_tokens=0), "max_tokens"),
])
def test_synthetic_config_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(rate=-1.0), "rate"), (dict(process="uniform"), "process"), (dict(think_mean=-2), "think_mean"),
])
def test_arrival_config_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ArrivalConfig(**kwargs)


# ---- ShareGPT recovery

CONVS = [
    {"id": "c0", "conversations": [{"from": "human", "value": "hi there"}, {"from": "gpt", "value": "hello you"}]},
    {"id": "c1", "conversations": [{"from": "gpt", "value": "orphan answer"}, {"from": "human", "value": "q1"},
                                   {"from": "human", "value": "q1 more"}, {"from": "gpt", "value": "a1"},
                                   {"from": "system", "value": "ignored"}, {"from": "human", "value": "q2"},
                                   {"from": "chatgpt", "value": "a2"}, {"from": "human", "value": "unanswered"}]},
    {"id": "c2", "conversations": [{"from": "human", "value": "only a question"}]},
    {"id": "c3", "conversations": [{"from": "human", "value": "x [ ] { } \" \\ y"}, {"from": "gpt", "value": "z"}]},
]


def truncated_file(tmp_path):
    text = json.dumps(CONVS + [{"id": "cut", "conversations": [{"from": "human", "value": "never finished"}]}],
                      indent=2)
    path = tmp_path / "sharegpt.json"
    path.write_text(text[: text.index("never fin")])  # cut inside the last object, as the shipped file is
    return path


def test_recover_keeps_every_complete_object(tmp_path):
    path = truncated_file(tmp_path)
    with pytest.raises(json.JSONDecodeError):
        json.loads(path.read_text())
    assert [c["id"] for c in sharegpt.recover(path.read_text())] == ["c0", "c1", "c2", "c3"]
    assert list(sharegpt.recover("[]")) == []
    with pytest.raises(ValueError, match="JSON array"):
        list(sharegpt.recover('{"a": 1}'))


def test_turns_pair_user_and_assistant(tmp_path):
    convs = dict(sharegpt.load_conversations(truncated_file(tmp_path)))
    assert convs["c0"] == [("hi there", "hello you")]
    assert convs["c1"] == [("q1\nq1 more", "a1"), ("q2", "a2")]
    assert "c2" not in convs  # nothing answered
    assert convs["c3"] == [('x [ ] { } " \\ y', "z")]


class WordTokenizer:
    calls = 0

    def __call__(self, texts, add_special_tokens=False):
        WordTokenizer.calls += 1
        return {"input_ids": [t.split() for t in texts]}


def test_token_counts_are_cached_outside_the_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("CATTN_CACHE_DIR", str(tmp_path / "cache"))
    path = truncated_file(tmp_path)
    WordTokenizer.calls = 0
    counts = sharegpt.token_counts(path, WordTokenizer())
    assert counts == [("c0", [(2, 2)]), ("c1", [(3, 1), (1, 1)]), ("c3", [(8, 1)])]
    assert len(list((tmp_path / "cache").glob("sharegpt-counts-*.json"))) == 1
    assert sharegpt.token_counts(path, WordTokenizer()) == counts
    assert WordTokenizer.calls == 1  # the second call read the cache
