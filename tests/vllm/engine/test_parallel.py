"""cattn's connector in vLLM's multi-process engines, vLLM's prefix cache on: tensor parallel 3 with
the multi-process executor (3 CPU workers bound by hand to 2 cores, each rank storing its own KV
heads), and tensor parallel 1 with vLLM's default engine (the engine core in a process of its own).

A conversation with a system prompt of a few hundred tokens takes its turns between two longer ones
that fill vLLM's small KV cache, so vLLM's own prefix cache has evicted it by its next turn and the
history comes back through cattn. Then: a restart of the TP 3 engine on the same directory with one
rank's shard of one session corrupted and another's deleted, and a TP 1 engine on the TP 3 engine's
directory.
"""
import os

import pytest

if os.environ.get("CATTN_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (see docs/vllm.md)")
else:
    import vllm  # noqa: F401  (CI's vLLM block: a missing vLLM is a failure, not a skip)

from tests.vllm.engine.engines import (BLOCK, CONVERSATION, conversation, corrupt, replies, run_engine,  # noqa: E402
                                       shard_files, system_prompt)

FILLER = ["Is the museum open on Sunday?", "Can I bring a large bag?", "Are guided tours free?",
          "May I take photos?", "Where can I eat?"]
LAYERS, HEAD_DIM, KV_HEADS = 30, 64, 3
CACHE_TOKENS = 40 * BLOCK   # vLLM's KV cache: one long conversation's turn and a little more


def engine(model_dir, tp: int, store=None) -> dict:
    spec = dict(model=model_dir, prefix_caching=True, in_process=False, max_model_len=1024,
                kv_cache_bytes=CACHE_TOKENS * LAYERS * 2 * (KV_HEADS // tp) * HEAD_DIM * 4)
    if tp > 1:
        spec.update(tensor_parallel=tp, cpu_threads_bind="0|1|0"[:2 * tp - 1])
    if store is not None:
        spec["connector"] = dict(dram_bytes=64 << 20, disk_dir=str(store))
    return spec


def work(turns: int = 5) -> list[dict]:
    main = conversation(system=system_prompt(32, "city museum"))
    fillers = [dict(user_turns=FILLER, max_tokens=8, system=system_prompt(55, f"{name} museum"), session=name)
               for name in ("harbour", "castle")]
    convs = [dict(c, user_turns=c["user_turns"][:turns]) for c in [main, *fillers]]
    return [{"interleave": convs}]


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-parallel")
    store = tmp / "store"
    out = dict(plain3=run_engine(tmp, "plain-tp3", engine(model_dir, 3), work()),
               cattn3=run_engine(tmp, "cattn-tp3", engine(model_dir, 3, store), work(), settle_s=3))
    # rank 1's shard of one filler session corrupted, rank 2's shard of the other deleted
    assert shard_files(store, 1, "harbour") and shard_files(store, 2, "castle")
    for path in shard_files(store, 1, "harbour"):
        corrupt(path)
    for path in shard_files(store, 2, "castle"):
        path.unlink()
    out["restart3"] = run_engine(tmp, "restart-tp3", engine(model_dir, 3, store), work(2))
    out["plain1"] = run_engine(tmp, "plain-tp1", engine(model_dir, 1), work())
    out["cattn1"] = run_engine(tmp, "cattn-tp1", engine(model_dir, 1, store), work())
    return out


@pytest.mark.parametrize("tp", [3, 1])
def test_history_loaded_through_cattn_replies_identical(runs, tp):
    plain, cattn = runs[f"plain{tp}"], runs[f"cattn{tp}"]
    for base, turns in zip(plain, cattn):
        assert replies(turns) == replies(base)
    main = cattn[0]
    assert len(main) == len(CONVERSATION) and main[0]["prompt_tokens"] > 300
    for previous, t in zip(main, main[1:]):
        # vLLM's own count of tokens from KV transfer: at least 90% of the history before this turn
        assert t["external_tokens"] >= 0.9 * previous["prompt_tokens"], (previous, t)
    for turns in cattn:
        for t in turns:
            report = t["cattn"]
            assert not report["load_failed"] and t["external_tokens"] == report["loaded_tokens"]
            own = t["cached_tokens"] - report["loaded_tokens"]   # vLLM's own prefix cache hits
            # cattn loads exactly what vLLM's cache lacks of the matched prefix
            assert report["loaded_tokens"] == max(0, report["matched_tokens"] - own), t


def test_tp1_engine_misses_a_tp3_store(runs):
    main = runs["cattn1"][0]
    assert main[0]["cattn"]["loaded_tokens"] == 0 and main[0]["external_tokens"] == 0


def test_restart_continues_and_a_lost_shard_recomputes(runs):
    plain, after = runs["plain3"], runs["restart3"]
    for base, turns in zip(plain, after):
        assert replies(turns) == replies(base)[:2]
    main, corrupted, deleted = after
    # every rank has the main conversation on disk: the restarted engine loads its first turn
    assert main[0]["cattn"]["loaded_tokens"] == (main[0]["prompt_tokens"] - 1) // BLOCK * BLOCK
    for lost in (corrupted, deleted):
        # one rank cannot serve its shard: vLLM recomputes the blocks on every rank
        assert lost[0]["cattn"]["load_failed"] and lost[0]["cattn"]["loaded_tokens"] == 0
        # saved whole again at the end of that turn, on every rank: the next turn loads
        assert lost[1]["cattn"]["loaded_tokens"] > 0 and not lost[1]["cattn"]["load_failed"]
