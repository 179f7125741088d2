"""A session the store dropped as corrupt says so: a warning when its bytes are found bad, and a lookup
error that names the cause, whether the manifest or a chunk was damaged."""
import logging

import pytest
import torch

from cattn.chat.session import ChatSession
from cattn.store import DiskTier, EntryKey, KVEntry, TieredStore

GREEDY = dict(max_new_tokens=4, do_sample=False)


def saved_to_disk(chat_model, folder) -> dict:
    """One turn of session 's' (tenant 'acme') saved to a disk tier whose store then closed."""
    model, tok = chat_model
    store = TieredStore(1 << 20, DiskTier(folder, 4 << 20))
    session = ChatSession(model, tok, session_id="s", tenant="acme", store=store)
    session.send("Remember the number seven", **GREEDY)
    state = session.save()
    store.close()
    return state


def test_a_corrupt_manifest_is_dropped_with_a_warning_and_the_lookup_says_why(chat_model, tmp_path, caplog):
    model, tok = chat_model
    state = saved_to_disk(chat_model, tmp_path)
    manifest, = tmp_path.rglob("*.manifest")
    data = bytearray(manifest.read_bytes())
    data[:32] = bytes(32)                                  # 32 zeroed bytes: its header frame no longer checks
    manifest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="cattn"):
        store = TieredStore(1 << 20, DiskTier(tmp_path, 4 << 20))
    try:
        assert f"session 's': manifest {manifest.name} is unusable" in caplog.text
        assert "session 's' of tenant 'acme': no usable manifest; dropped" in caplog.text
        assert store.stats()["disk"]["corrupt"] == 1 and not manifest.exists()
        with pytest.raises(LookupError, match=rf"no stored KV for session 's' of tenant 'acme' with this model: "
                                              rf"the store dropped it as corrupt \(its manifest {manifest.name} "
                                              r"is unusable \(.+\)\)"):
            ChatSession.open(model, tok, state, store=store)
    finally:
        store.close()


def test_a_session_never_stored_is_only_missing(chat_model, tmp_path):
    model, tok = chat_model
    state = saved_to_disk(chat_model, tmp_path)
    store = TieredStore(1 << 20, DiskTier(tmp_path / "elsewhere", 4 << 20))
    try:
        with pytest.raises(LookupError, match=r"no stored KV for session 's' of tenant 'acme' with this model$"):
            ChatSession.open(model, tok, state, store=store)
    finally:
        store.close()


def test_a_corrupt_chunk_found_at_a_read_is_the_reason_too(tmp_path, caplog):
    key = EntryKey("acme", "0123abcd", "s")
    store = TieredStore(1 << 20, DiskTier(tmp_path, 4 << 20))
    store.save(key, KVEntry(torch.arange(8), torch.randn(2, 8, 1, 16), torch.randn(2, 8, 1, 16)))
    store.close()
    chunk, = tmp_path.rglob("*.kv")
    data = bytearray(chunk.read_bytes())
    data[-3] ^= 0x5A                                       # a flipped byte in the payload
    chunk.write_bytes(bytes(data))
    store = TieredStore(1 << 20, DiskTier(tmp_path, 4 << 20))
    try:
        assert store.dropped_reason(key) is None           # indexed: its bytes are checked when read
        with caplog.at_level(logging.WARNING, logger="cattn"):
            assert store.load(key) is None
        assert "session 's': stored KV unusable" in caplog.text
        assert store.dropped_reason(key).startswith("its stored KV is unusable (")
        store.save(key, KVEntry(torch.arange(4), torch.randn(2, 4, 1, 16), torch.randn(2, 4, 1, 16)))
        assert store.dropped_reason(key) is None           # stored again: no longer missing
    finally:
        store.close()
