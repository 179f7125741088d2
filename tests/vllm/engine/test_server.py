"""cattn behind vLLM's OpenAI server, end to end: ``vllm serve`` with the connector (vLLM's defaults:
multi-process engine, prefix caching on), eight conversations of four turns at once over HTTP through
the `openai` client, named by the client (``kv_transfer_params``) or found by content, two tenants
(``cache_salt``); the DRAM tier holds a fraction of their history, so the disk tier serves the rest.
Every reply equals the same server's without cattn. Then the server is restarted on the same disk
directory and conversations go on from what it stored.
"""
import os

import pytest

if os.environ.get("CATTN_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (see docs/vllm.md)")
else:
    import vllm  # noqa: F401  (CI's vLLM block: a missing vLLM is a failure, not a skip)

from cattn.vllm import CattnVllmConfig  # noqa: E402
from cattn.vllm.server import ServedChat, VllmServer, chat_concurrently  # noqa: E402
from tests.vllm.engine.engines import env, system_prompt  # noqa: E402

TOPICS = ["city", "harbour", "castle", "railway", "science", "toy", "wine", "art"]
QUESTIONS = ["When does the museum open?", "Can I bring my bag?", "Is there a cafe?", "Are tours free?",
             "Can children come for free?"]
TURNS = 4
DRAM_BYTES = 96 << 20   # about 2,100 tokens of SmolLM2's fp32 KV: half of the eight histories at turn 4
# vLLM's own KV cache: 34 blocks of 32 tokens, one conversation's turn and a little more, so its prefix
# cache evicts the others' histories between their turns (and running requests may be preempted)
ARGS = ("--max-model-len", "1024", "--kv-cache-memory-bytes", str(34 * 32 * 30 * 2 * 3 * 64 * 4))


def chats() -> list[ServedChat]:
    """Eight conversations: even ones named by the client, odd ones found by content; two tenants."""
    return [ServedChat(system_prompt(20 + 3 * i, f"{topic} museum"), session=f"conv-{i}" if i % 2 == 0 else None,
                       salt="tenant-b" if i % 4 == 1 else None) for i, topic in enumerate(TOPICS)]


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-serve")
    connector = CattnVllmConfig(dram_bytes=DRAM_BYTES, disk_dir=str(tmp / "store"))
    plain, cattn = chats(), chats()
    with VllmServer(model_dir, tmp / "plain.log", *ARGS, env=env()) as server:
        chat_concurrently(server, [(c, QUESTIONS[:TURNS + 1]) for c in plain])
    with VllmServer(model_dir, tmp / "cattn.log", *ARGS, connector=connector, env=env()) as server:
        chat_concurrently(server, [(c, QUESTIONS[:TURNS]) for c in cattn])
        external = server.metric("vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
    # a restarted server on the same directory: each conversation's fifth turn
    with VllmServer(model_dir, tmp / "restart.log", *ARGS, connector=connector, env=env()) as server:
        chat_concurrently(server, [(c, QUESTIONS[TURNS:TURNS + 1]) for c in cattn])
    return dict(plain=plain, cattn=cattn, external=external)


def test_concurrent_conversations_reply_as_without_cattn(served):
    for base, conv in zip(served["plain"], served["cattn"]):
        assert [t["reply"] for t in conv.turns] == [t["reply"] for t in base.turns], conv.messages[0]
        assert all(t["reply"] for t in conv.turns)


def test_every_later_turn_loads_its_history(served):
    for conv in served["cattn"]:
        for previous, t in zip(conv.turns[:TURNS], conv.turns[1:TURNS]):
            report = t["cattn"]
            assert report is not None and not report["load_failed"], t
            # vLLM's prefix cache and cattn together: the whole history but its last partial block
            assert t["cached_tokens"] >= previous["prompt_tokens"] // 32 * 32, t
    loaded = sum(t["cattn"]["loaded_tokens"] for conv in served["cattn"] for t in conv.turns[:TURNS])
    assert loaded > 0 and served["external"] == loaded   # vLLM's own count of the connector's tokens
    # the DRAM tier holds a fraction of the histories: some came back from disk
    assert any(t["cattn"]["from_disk"] for conv in served["cattn"] for t in conv.turns[1:TURNS])


def test_restarted_server_continues_every_conversation(served):
    for base, conv in zip(served["plain"], served["cattn"]):
        last, previous = conv.turns[TURNS], conv.turns[TURNS - 1]
        assert last["reply"] == base.turns[TURNS]["reply"]
        # a fresh engine, its DRAM tier empty: everything reused came through cattn, from disk
        assert last["cattn"]["loaded_tokens"] >= previous["prompt_tokens"] // 32 * 32 > 0, last
