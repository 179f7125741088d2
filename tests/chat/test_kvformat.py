"""ChatSession over an 8-bit store: turns stream their history from DRAM and, after a restart, layer by layer
from disk, dequantized into the pages; the store holds half the bytes."""
from cattn.chat.session import ChatSession
from cattn.store import DiskTier, TieredStore
from tests.chat.stock import GREEDY, SYSTEM


def test_turns_reuse_an_8_bit_history_from_dram_and_from_disk(chat_model, tmp_path):
    model, tok = chat_model
    store = TieredStore(1 << 22, DiskTier(tmp_path, 1 << 24), kv_format="int8")
    session = ChatSession(model, tok, session_id="s", system=SYSTEM, store=store)
    for text in ("Hello there", "Tell me more"):
        session.send(text, **GREEDY)
    last = session.turns[-1]
    assert last.reused_tokens > 0 and last.prefilled_tokens < last.prompt_tokens
    with store.acquire(session.key) as lease:
        assert lease.layout.kv_format == "int8" and lease.layout.quantized
        # fp32 KV: 4 bytes an element become 1, plus fp32 scales (a quarter more for 16-wide heads, short chunks)
        assert lease.nbytes < lease.num_tokens * lease.layout.token_nbytes * 0.4
    state = session.save()
    session.close()
    store.close()
    store = TieredStore(1 << 22, DiskTier(tmp_path, 1 << 24), kv_format="int8")   # a new process
    again = ChatSession.open(model, tok, state, store=store)
    again.send("And then?", **GREEDY)
    turn = again.turns[-1]
    assert turn.reused_tokens > 0 and store.stats()["disk"]["hits"] >= 1
    again.close()
    store.close()
