"""The vLLM connector's worker side without vLLM: a history on disk only is read a layer at a time into
vLLM-shaped block caches, each layer as the forward would wait for it; a layer that fails its checksum
fails that request's blocks (vLLM recomputes them) and no other."""
import random

import torch

from cattn.store import DiskTier, EntryKey, KVEntry, TieredStore
from cattn.vllm.jobs import LoadJob
from cattn.vllm.worker import WorkerSide, token_slots
from tests.store.gated_tiers import corrupt_layer

L, H, D, BLOCK = 3, 2, 8, 4


def stored_on_disk(tmp_path, sessions: dict[str, int]) -> dict[str, KVEntry]:
    store = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 24))
    entries = {}
    for name, n in sessions.items():
        entries[name] = KVEntry(torch.randint(0, 1000, (n,)), torch.randn(L, n, H, D), torch.randn(L, n, H, D))
        store.save(EntryKey("t", "0123abcd", name), entries[name])
    store.close()
    return entries


def worker_over(tmp_path):
    store = TieredStore(1 << 20, DiskTier(tmp_path, 1 << 24))
    layers = {f"model.layers.{i}.self_attn": torch.zeros(16, H, BLOCK, 2 * D) for i in range(L)}
    return WorkerSide(store, BLOCK, layers), store


def job(name: str, entry: KVEntry, block_ids: list[int]) -> LoadJob:
    return LoadJob(name, EntryKey("t", "0123abcd", name), entry.token_ids.tolist(), 0, block_ids)


def test_histories_on_disk_load_layer_by_layer_and_one_corrupt_fails_alone(tmp_path):
    entries = stored_on_disk(tmp_path, {"good": 10, "bad": 7})
    bad_layer = random.randrange(L)
    corrupt_layer(tmp_path / "t" / "0123abcd" / "bad", 0, bad_layer)   # its one chunk file
    worker, store = worker_over(tmp_path)
    jobs = [job("good", entries["good"], [3, 5, 9]), job("bad", entries["bad"], [0, 1])]
    worker.start_loads(jobs)
    for name in worker.names:                                # the forward's order
        worker.wait_layer(name)
    errors = worker.take_load_errors()
    assert errors == {0, 1}                                  # the bad request's blocks only
    results = worker.take_report().loads
    assert results["bad"].load_failed and results["bad"].loaded_tokens == 0
    assert not results["good"].load_failed and results["good"].loaded_tokens == 10
    blocks, offsets = token_slots([3, 5, 9], 0, 10, BLOCK)
    for i, layer in enumerate(worker.layers):
        assert torch.equal(layer[blocks, :, offsets, :D], entries["good"].k[i])
        assert torch.equal(layer[blocks, :, offsets, D:], entries["good"].v[i])
    stats = store.stats()["disk"]
    assert stats["layerwise_reads"] == 2 and stats["corrupt"] == 1
    assert store.lookup(jobs[1].key) is None                 # dropped: never served again
    worker.close()


def test_a_store_that_cannot_serve_now_is_a_miss(tmp_path):
    """A DRAM pool full of sessions in use (or an unreachable lower tier) fails the request's blocks,
    which vLLM recomputes; the step goes on."""
    from cattn.store import StoreFullError

    entries = stored_on_disk(tmp_path, {"s": 9})
    worker, store = worker_over(tmp_path)

    def full(*args, **kwargs):
        raise StoreFullError("host pool full")

    store.acquire = full
    worker.start_loads([job("s", entries["s"], [2, 4, 6])])
    assert worker.take_load_errors() == {2, 4, 6}
    assert worker.take_report().loads["s"].load_failed
    worker.close()
