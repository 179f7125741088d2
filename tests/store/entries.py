"""The KV entries of the store tests and the keys they are saved under: small random fp16 entries of
``L`` layers, ``H`` KV heads of dimension ``D``; their exact comparison and concatenation; and a session
saved turn by turn by a store that then shut down."""
import random

import torch

from cattn.store.contract import EntryKey, KVEntry
from cattn.store.lower.disk import DiskTier
from cattn.store.tiered.store import TieredStore

L, H, D = 2, 2, 16
TOKEN_BYTES = 2 * L * H * D * 2   # fp16


def key(session="s0", tenant="acme", model="0123abcd"):
    return EntryKey(tenant, model, session)


def make_entry(n, dtype=torch.float16, first_id=0):
    return KVEntry(torch.arange(first_id, first_id + n) * 31 % 50_000,
                   torch.randn(L, n, H, D).to(dtype), torch.randn(L, n, H, D).to(dtype))


def assert_same(got: KVEntry, want: KVEntry):
    assert got is not None
    assert torch.equal(got.token_ids, want.token_ids)
    assert torch.equal(got.k, want.k) and torch.equal(got.v, want.v)


def cat(*entries):
    return KVEntry(torch.cat([e.token_ids for e in entries]), torch.cat([e.k for e in entries], 1),
                   torch.cat([e.v for e in entries], 1))


def saved_in_turns(tmp_path, sizes, max_chunk_tokens=None):
    """A session saved turn by turn (``sizes`` tokens each, random KV; one chunk each unless
    ``max_chunk_tokens``) by a store that then shut down: its history is on disk only. Returns the turns'
    entries."""
    store = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 24), max_chunk_tokens=max_chunk_tokens)
    parts, have = [], 0
    for n in sizes:
        e = make_entry(n, first_id=random.randrange(10_000))
        store.save(key(), e, start=have)
        parts.append(e)
        have += e.num_tokens
    store.close()
    return parts
