"""The connector's scheduler side without vLLM: it lists a session only once every rank reported its
shard saved, unlists it when any rank fails a save or a load, asks vLLM to wait while a session's
save is in flight, saves nothing of an aborted request, and finds its listings again after a restart
(a record that does not check out is skipped, never trusted)."""
from types import SimpleNamespace

import pytest

from cattn.vllm.config import CattnVllmConfig
from cattn.vllm.directory import SessionDirectory
from cattn.vllm.jobs import RequestResult, StepReport
from cattn.vllm.scheduler import SchedulerSide

BLOCK, WORLD = 4, 3


def side(records=None) -> SchedulerSide:
    return SchedulerSide(CattnVllmConfig(), SessionDirectory("f" * 32, BLOCK, records), WORLD)


def request(req_id: str, prompt: list[int], reply: list[int] = (), session: str | None = "conv"):
    params = {"cattn_session": session} if session else None
    return SimpleNamespace(request_id=req_id, prompt_token_ids=list(prompt), cache_salt=None,
                           kv_transfer_params=params, all_token_ids=list(prompt) + list(reply))


def finish(s: SchedulerSide, req, *, savable: bool = True):
    s.match(req, 0)
    n = len(req.all_token_ids)
    return s.finished(req, list(range(n // BLOCK + 1)), computed=n, savable=savable)


def step_with(s: SchedulerSide, report: StepReport, done: set[str]) -> None:
    s.build(SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=SimpleNamespace(req_ids=[])))
    s.reported(report, done)


def test_listed_only_when_every_rank_saved():
    s, req = side(), request("r1", range(10), [100, 101, 102])
    keep, params = finish(s, req)
    assert keep and params["cattn"]["saved_tokens"] == 12
    assert s.match(request("r2", range(14)), 0) == (None, False)   # save in flight: ask again
    step_with(s, StepReport(saved={"r1": {0, 2}}), set())
    assert s.has_pending_saves()
    step_with(s, StepReport(saved={"r1": {1}}), {"r1"})
    assert not s.has_pending_saves()
    assert s.match(request("r2", list(range(10)) + [100, 101, 102, 7]), 0) == (12, False)


@pytest.mark.parametrize("failed_rank", range(WORLD))
def test_one_rank_failing_its_save_unlists_the_session(failed_rank):
    s = side()
    finish(s, request("r1", range(10), [1, 2]))
    ranks = set(range(WORLD)) - {failed_rank}
    step_with(s, StepReport(saved={"r1": ranks}, save_failed={"r1": {failed_rank}}), {"r1"})
    assert s.match(request("r2", range(13)), 0) == (0, False)
    # its next turn saves the whole history again, from token 0
    _, params = s.finished(request("r2", range(13)), list(range(4)), computed=13, savable=True)
    assert params["cattn"]["saved_tokens"] == 12 and s.unsent[0].start == 0


def test_a_failed_load_on_any_rank_unlists_and_resaves_whole():
    s = side()
    finish(s, request("r1", range(10), [1, 2]))
    step_with(s, StepReport(saved={"r1": set(range(WORLD))}), {"r1"})
    r2 = request("r2", list(range(10)) + [1, 2, 5, 6])
    assert s.match(r2, 0) == (12, False)
    merged = StepReport(loads={"r2": RequestResult(12, False, False, 0.1)}).merge(
        StepReport(loads={"r2": RequestResult(0, True, True, 0.2)}))
    assert merged.loads["r2"] == RequestResult(0, True, True, 0.2)
    step_with(s, merged, set())
    keep, params = s.finished(r2, list(range(5)), computed=14, savable=True)
    assert params["cattn"]["load_failed"] and s.unsent[-1].start == 0 and keep
    assert s.directory.tokens(s.unsent[-1].key) is None


def test_aborted_request_saves_nothing():
    s = side()
    keep, params = finish(s, request("r1", range(10), [1, 2]), savable=False)
    assert not keep and params["cattn"]["saved_tokens"] == 0 and not s.has_pending_saves()


def test_content_sessions_are_found_by_their_blocks():
    s = side()
    req = request("r1", range(20), [50, 51, 52, 53], session=None)
    finish(s, req)
    step_with(s, StepReport(saved={"r1": set(range(WORLD))}), {"r1"})
    later = request("r2", list(range(20)) + [50, 51, 52, 53, 9, 9, 9], session=None)
    assert s.match(later, 0) == (24, False)
    assert s.match(request("r3", [7] + list(range(1, 30)), session=None), 0) == (0, False)   # another prompt
    # vLLM's own prefix cache already has 16 of them: the connector offers the rest only
    assert s.match(later, 16) == (8, False)


def test_listings_survive_a_restart_and_bad_records_are_skipped(tmp_path):
    s = side(tmp_path)
    finish(s, request("r1", range(10), [1, 2], session="kept"))
    finish(s, request("r2", range(10), [1, 2], session="damaged"))
    step_with(s, StepReport(saved={"r1": set(range(WORLD)), "r2": set(range(WORLD))}), {"r1", "r2"})
    records = sorted(tmp_path.rglob("*.json"))
    assert len(records) == 2
    damaged = next(p for p in records if p.stem == "damaged")
    damaged.write_text(damaged.read_text().replace("[0, 1", "[5, 1"))   # tokens no longer match the digest
    again = side(tmp_path)
    history = list(range(10)) + [1, 2, 7]
    assert again.match(request("r3", history, session="kept"), 0) == (12, False)
    assert again.match(request("r4", history, session="damaged"), 0) == (0, False)
    other_model = SchedulerSide(CattnVllmConfig(), SessionDirectory("e" * 32, BLOCK, tmp_path), WORLD)
    assert other_model.match(request("r5", history, session="kept"), 0) == (0, False)
