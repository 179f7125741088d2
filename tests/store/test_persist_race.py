"""Writing a session to disk while another session's files are removed to make room: the lock is released
then, and a truncate of the session being written must not give back the DRAM of a chunk still to write."""
import threading

import torch

from cattn.store import DiskTier, EntryKey, KVEntry, TieredStore


class RemoveHeldBack(DiskTier):
    """Holds a manifest's removal (a session dropped from disk) until the test lets it through."""

    def __init__(self, root, capacity):
        super().__init__(root, capacity)
        self.hold, self.entered, self.go = False, threading.Event(), threading.Event()

    def remove(self, key, incarnation, chunk_ids, manifest):
        if self.hold and manifest:
            self.entered.set()
            assert self.go.wait(20), "the test never let the removal through"
        return super().remove(key, incarnation, chunk_ids, manifest)


def entry(n: int, start: int = 0) -> KVEntry:
    return KVEntry(torch.arange(start, start + n), torch.randn(2, n, 1, 16), torch.randn(2, n, 1, 16))


def test_a_chunk_retired_while_room_is_made_on_disk_is_still_written_from_live_dram(tmp_path):
    a, b = EntryKey("acme", "0123abcd", "a"), EntryKey("acme", "0123abcd", "b")
    probe = TieredStore(1 << 20, DiskTier(tmp_path / "probe", 1 << 20))
    probe.save(a, entry(32))
    probe.flush()
    one_session = probe.stats()["disk"]["used_bytes"]
    probe.close(persist=False)

    disk = RemoveHeldBack(tmp_path / "disk", one_session + one_session // 2)   # room for one session, not two
    store = TieredStore(1 << 20, disk)
    store.save(a, entry(32))
    assert store.flush() == []                               # a is on disk
    first, second = entry(16), entry(16, 16)
    store.save(b, first)
    store.save(b, second, start=16)                          # b: two chunks, in DRAM only
    disk.hold = True
    failures = []

    def flush():
        try:
            failures.extend(store.flush())                   # b needs a's room: a's removal is held back
        except Exception as exc:   # noqa: BLE001 - what the test reports
            failures.append(exc)

    writer = threading.Thread(target=flush)
    writer.start()
    assert disk.entered.wait(20)
    store.truncate(b, 16)                                    # b's first chunk leaves its history meanwhile
    disk.go.set()
    writer.join(30)
    assert not writer.is_alive() and failures == []
    store.sync()
    kept = store.load(b)
    assert torch.equal(kept.token_ids, second.token_ids) and torch.equal(kept.k, second.k)
    files = sum(p.stat().st_size for p in (tmp_path / "disk").rglob("*") if p.is_file() and p.name != ".lock")
    assert files == store.stats()["disk"]["used_bytes"]
    store.close(persist=False)
