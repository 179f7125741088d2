"""Truncated conversations in the connector without vLLM: the lookup finds the kept span further on
in the stored session, the worker loads it re-rotated into other blocks (CPU layout), a shift the
engine cannot serve exactly is a logged miss of the span (the plain prefix still loads), and a
shifted turn never rewrites the stored original."""
import logging
import time
from types import SimpleNamespace

import pytest
import torch

from cattn.rope import RopeSpec
from cattn.store import EntryKey, TieredStore
from cattn.vllm.block_layout import CpuVecLayout
from cattn.vllm.config import CattnVllmConfig
from cattn.vllm.directory import SessionDirectory
from cattn.vllm.jobs import LoadJob, SaveJob, StepReport
from cattn.vllm.scheduler import SchedulerSide
from cattn.vllm.shift import ShiftSupport, rotate_keys, shift_angles
from cattn.vllm.truncation import Shift, find_shift
from cattn.vllm.worker import WorkerSide

BLOCK, H, D, L = 4, 2, 8, 2
ROPE = RopeSpec(torch.tensor([1.0, 0.3, 0.05, 0.002]))
SUPPORT = ShiftSupport(ROPE, "", None, "cpu-vec")
KEY = EntryKey("default", "f" * 32, "conv")


def test_find_shift_takes_the_longest_span_after_the_common_prefix():
    stored = [1, 2, 3, 9, 9, 9, 4, 5, 6, 7]
    assert find_shift(stored, [1, 2, 3, 4, 5, 6, 7, 8]) == Shift(3, 3, 4)
    assert find_shift(stored, [1, 2, 3, 4, 5, 6, 7, 8], min_length=5) is None
    assert find_shift(stored, stored + [1]) is None                      # a plain prefix: nothing to shift
    assert find_shift([0, 7, 1, 7, 1, 2], [0, 7, 1, 2]).by == 2
    with pytest.raises(ValueError, match="min_length"):
        find_shift(stored, stored, min_length=0)


def side(truncation=True, support=SUPPORT) -> SchedulerSide:
    return SchedulerSide(CattnVllmConfig(truncation=truncation), SessionDirectory(KEY.model, BLOCK, None), 1, support)


def request(req_id, prompt, reply=()):
    return SimpleNamespace(request_id=req_id, prompt_token_ids=list(prompt), cache_salt=None,
                           kv_transfer_params={"cattn_session": "conv"}, all_token_ids=list(prompt) + list(reply))


SYSTEM, DROPPED, KEPT = list(range(100, 106)), list(range(200, 211)), list(range(300, 320))
ORIGINAL = SYSTEM + DROPPED + KEPT + [400, 401, 402]         # 40 tokens, 10 blocks
TRUNCATED = SYSTEM + KEPT + [400, 401, 402] + [500, 501]      # the client dropped DROPPED, asked more


def scheduled(s: SchedulerSide, req) -> LoadJob:
    s.allocated(req, s.match(req, 0)[0])
    new = SimpleNamespace(req_id=req.request_id, block_ids=[list(range(50, 50 + len(req.prompt_token_ids)))])
    loads, _, _ = s.build(SimpleNamespace(scheduled_new_reqs=[new], scheduled_cached_reqs=SimpleNamespace(req_ids=[])))
    return loads[0]


def test_lookup_offers_prefix_and_span_and_the_turn_saves_nothing_over_the_original():
    s = side()
    s.directory.put(KEY, ORIGINAL)
    job = scheduled(s, request("r", TRUNCATED))
    # usable: 6 + 23 = 29 -> at most prompt - 1 = 30, whole blocks: 28
    assert (job.num_tokens, job.shift_at, job.shift, job.start) == (28, 6, 11, 0)
    assert job.token_ids == TRUNCATED[:28]
    keep, params = s.finished(request("r", TRUNCATED, [600, 601]), list(range(9)), computed=33, savable=True)
    assert not keep and params["cattn"]["saved_tokens"] == 0 and params["cattn"]["shifted_by"] == 11
    assert s.directory.tokens(KEY) == ORIGINAL and not s.unsent   # the original is untouched
    # a second truncation (more dropped) is served from the original again, shifted further
    job = scheduled(s, request("r2", SYSTEM + KEPT[8:] + [400, 401, 402, 7, 7]))
    assert (job.shift_at, job.shift, job.num_tokens) == (6, 19, 20)


def test_option_off_or_a_refused_shift_serves_the_plain_prefix(caplog):
    for s in (side(truncation=False), side(support=ShiftSupport(ROPE, "", None, "cpu-amx"))):
        s.directory.put(KEY, ORIGINAL)
        with caplog.at_level(logging.WARNING, logger="cattn.vllm.scheduler"):
            assert s.match(request("r", TRUNCATED), 0) == (4, False)   # the 6 system tokens, whole blocks
    assert "unknown KV block layout 'cpu-amx'" in caplog.text
    s = side(support=ShiftSupport(ROPE, "", 16, "cpu-vec"))
    s.directory.put(KEY, ORIGINAL)
    with caplog.at_level(logging.WARNING, logger="cattn.vllm.scheduler"):
        assert s.match(request("r", TRUNCATED), 0) == (4, False)
    assert "sliding window of 16" in caplog.text


def cpu_layers(num_blocks=24) -> dict[str, torch.Tensor]:
    return {f"model.layers.{i}.self_attn": torch.zeros(num_blocks, H, BLOCK, 2 * D) for i in range(L)}


def fill(layers, blocks: list[int], n: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens 0..n-1 into ``blocks`` (CPU layout); keys ``[L, n, H, D]`` as cached at their positions."""
    k, v = torch.randn(L, n, H, D, generator=gen), torch.randn(L, n, H, D, generator=gen)
    for l, layer in enumerate(layers.values()):
        enc = CpuVecLayout().encode(k[l].reshape(-1, BLOCK, H, D), v[l].reshape(-1, BLOCK, H, D))
        layer[torch.tensor(blocks)] = enc
    return k, v


def save_original(worker: WorkerSide) -> None:
    """The worker's own save path: blocks 0..9 as the session's 40 tokens."""
    worker.start_saves([SaveJob("s", KEY, ORIGINAL, 0, list(range(10)))])
    deadline = time.monotonic() + 30
    while "s" not in worker.take_saved():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert worker.take_report().saved == {"s": {0}}


@pytest.mark.parametrize("start", [0, 4, 8])   # vLLM already holds none, part or all of the prefix
def test_worker_loads_the_span_re_rotated_into_other_blocks(start):
    gen = torch.Generator().manual_seed(0)
    layers = cpu_layers()
    worker = WorkerSide(TieredStore(1 << 22, None), BLOCK, layers, shifting=SUPPORT)
    k, v = fill(layers, list(range(10)), 40, gen)
    save_original(worker)
    dst_blocks = list(range(12, 20))
    job = LoadJob("r", KEY, TRUNCATED[:28], start, dst_blocks, 6, 11)
    worker.start_loads([job])
    assert worker.take_load_errors() == set()
    dst = torch.arange(start, 28)
    src = torch.where(dst < 6, dst, dst + 11)
    cos, sin = shift_angles(ROPE, src, dst)
    for l, layer in enumerate(layers.values()):
        got_k, got_v = (x.reshape(-1, H, D) for x in CpuVecLayout().decode(layer[torch.tensor(dst_blocks)]))
        got_k, got_v = got_k[start:28], got_v[start:28]
        assert torch.equal(got_v, v[l][src])
        want = k[l][src].clone()
        want[dst >= 6] = rotate_keys(want[dst >= 6], cos[dst >= 6], sin[dst >= 6], ROPE)
        assert torch.equal(got_k, want)
        assert torch.equal(got_k[dst < 6], k[l][src][dst < 6])   # the kept prefix: not rotated
    assert worker.take_report().loads["r"].loaded_tokens == 28 - start


def test_worker_refuses_an_unknown_layout_and_fails_the_blocks(caplog):
    layers = cpu_layers()
    worker = WorkerSide(TieredStore(1 << 22, None), BLOCK, layers, shifting=ShiftSupport(ROPE, "", None, "cpu-amx"))
    with caplog.at_level(logging.WARNING, logger="cattn.vllm.worker"):
        worker.start_loads([LoadJob("r", KEY, TRUNCATED[:28], 0, list(range(12, 20)), 6, 11)])
    assert worker.take_load_errors() == set(range(12, 19))
    assert worker.take_report().loads["r"].load_failed
    assert "unknown KV block layout" in caplog.text and not layers["model.layers.0.self_attn"][12:].any()


def test_a_stored_token_mismatch_fails_the_shifted_load():
    gen = torch.Generator().manual_seed(1)
    layers = cpu_layers()
    worker = WorkerSide(TieredStore(1 << 22, None), BLOCK, layers, shifting=SUPPORT)
    fill(layers, list(range(10)), 40, gen)
    save_original(worker)
    wrong = TRUNCATED[:28]
    wrong[20] += 1
    worker.start_loads([LoadJob("r", KEY, wrong, 0, list(range(12, 20)), 6, 11)])
    assert worker.take_load_errors() == set(range(12, 19))
    step = StepReport().merge(worker.take_report())
    assert step.loads["r"].load_failed
