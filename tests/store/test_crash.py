"""Crash safety: a writer process is SIGKILLed at random points, many times; every later open finds
each session at its last committed history or the one being written, never a torn one."""
import multiprocessing
import os
import random
import signal
import time

import torch

from cattn.store.contract import EntryKey, KVEntry
from cattn.store.lower.disk import DiskTier
from cattn.store.tiered.store import TieredStore

L, H, D = 2, 2, 64   # 2 KiB of fp32 K+V per token: chunks of 16 to 320 KiB
MODEL = "c0ffee00"


def token_kv(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's K/V is a function of its id alone, so any mix of two histories is detectable."""
    base = (ids[None, :, None, None] * 7 + torch.arange(L)[:, None, None, None] * 3
            + torch.arange(H * D).view(1, 1, H, D)) % 4093
    return base.float(), (base + 1).float()


def history_ops(seed: int, count: int):
    """Versions 1..count of one session: ``(token ids after, op)`` where op is ``("save", start, new ids)``
    (a turn appends only its new tokens; start 0 replaces an edited history) or ``("truncate", num_drop,
    keep_first)`` (context overflow)."""
    rng, ids, next_id = random.Random(seed), torch.empty(0, dtype=torch.int64), seed * 10**6
    for _ in range(count):
        r = rng.random()
        if r < 0.15 and ids.numel() >= 8:
            keep = rng.randint(0, 4)
            drop = rng.randint(1, ids.numel() - keep)
            ids, op = torch.cat([ids[:keep], ids[keep + drop:]]), ("truncate", drop, keep)
        else:
            start = 0 if r < 0.3 else ids.numel()
            new = torch.arange(next_id, next_id + rng.randint(8, 160))
            next_id += new.numel()
            ids, op = torch.cat([ids[:start], new]), ("save", start, new)
        yield ids, op


def writer(root: str, session: str, seed: int, ready, committed) -> None:
    """Apply versions 1, 2, ... of ``session``, flushing each; ``committed`` holds the last durable one."""
    store = TieredStore(2 << 20, DiskTier(root, 256 << 20), io_threads=1)  # long histories spill to disk
    ready.set()
    key = EntryKey("t", MODEL, session)
    for i, (_, op) in enumerate(history_ops(seed, 10_000), start=1):
        if op[0] == "save":
            k, v = token_kv(op[2])
            store.save(key, KVEntry(op[2], k, v), start=op[1])
        else:
            store.truncate(key, op[1], keep_first=op[2])
        store.flush()
        committed.value = i


def _check_session(store: TieredStore, session: str, seed: int, allowed: list[int]) -> int:
    """The version the store holds for ``session`` (0: none); it must be one of ``allowed``."""
    got = store.load(EntryKey("t", MODEL, session))
    if got is None:
        assert 0 in allowed, f"{session}: lost, expected one of versions {allowed}"
        return 0
    versions = [ids for ids, _ in history_ops(seed, max(allowed))]
    k, v = token_kv(got.token_ids)
    assert torch.equal(got.k, k) and torch.equal(got.v, v), f"{session}: torn or mixed KV"
    found = [i for i in allowed if i > 0 and torch.equal(versions[i - 1], got.token_ids)]
    assert found, f"{session}: {got.num_tokens} tokens match none of versions {allowed}"
    return found[-1]


def test_sigkill_while_writing(tmp_path):
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "cattn.store.tiered.store", __name__])
    rng = random.Random(1234)
    final: dict[str, tuple[int, int]] = {}   # session -> (seed, version found after its kill)
    kills_mid_history = 0
    deadline = time.monotonic() + 15
    for it in range(60):
        if time.monotonic() > deadline and it >= 12:
            break
        session, seed = f"s{it}", rng.randrange(1000)
        ready, committed = ctx.Event(), ctx.Value("i", 0, lock=False)
        proc = ctx.Process(target=writer, args=(str(tmp_path), session, seed, ready, committed))
        proc.start()
        assert ready.wait(60), "the writer did not start"
        time.sleep(rng.uniform(0, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL, "the writer ended before it was killed"
        c = committed.value
        store = TieredStore(64 << 20, DiskTier(tmp_path, 256 << 20))
        try:
            found = _check_session(store, session, seed, [c, c + 1])
            kills_mid_history += found > 0
            for other, (other_seed, version) in final.items():   # earlier sessions are untouched
                _check_session(store, other, other_seed, [version])
            assert not list(tmp_path.rglob("*.tmp")), "the scan at open removes what a killed write left"
        finally:
            store.close(persist=False)
        final[session] = (seed, found)
    assert kills_mid_history >= 6, "the kills should land after some history was committed"
