"""The store's 8-bit KV format against the lossless one, in history tokens per second and tokens held.

Both formats run the same operations on the same entry, interleaved (one round of each per repeat, the
order alternating), so that a shared machine's load falls on both:

- DRAM: `save` (an int8 store quantizes on the way in: on CPU here, where no device can do it before
  the copy), the history loaded into paged caches the way `LayerLoader` does it (lossless: a gather;
  int8: dequantized a block at a time, then gathered), and `load()` (fresh tensors, dequantized);
- disk: demotion (`flush`), promotion (a new process's `acquire`: chunk files into the pool), and the
  layer-wise promotion straight into paged caches (`acquire(..., layerwise=True)` under a `LayerLoader`:
  each layer read, checksummed, then dequantized into the pages), page cache dropped before every read;
- capacity: the pool bytes and the chunk-file bytes per token of each format.

    python bench/store_formats.py [--mib 128] [--repeats 5] [--dir DIR] [--out PATH]
    python bench/store_formats.py --quick

Writes ``store_formats_cpu.json`` to the results folder (`bench.common.results_dir`, or ``--out``).
"""
from __future__ import annotations

if __package__ in (None, ""):   # run by path: import `bench` as `python -m` does (see bench/store.py)
    import pathlib
    import sys
    here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != here]

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import write_json
from bench.store import HEAD_DIM, KEY, KV_HEADS, LAYERS, drop_cache, machine, positive_int
from cattn.store.contract import KVEntry
from cattn.store.lower.disk import DiskTier
from cattn.store.tiered.store import TieredStore
from cattn.store.transfer import LayerLoader

FORMATS = ("lossless", "int8")
PAGE = 16


class Pages:
    """Per-layer paged caches for the history and the slots it goes to (in order, as a fresh sequence's)."""

    def __init__(self, tokens: int):
        pages = -(-tokens // PAGE) + 1   # the disk's session holds one token more
        self.k = [torch.zeros(pages, PAGE, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16) for _ in range(LAYERS)]
        self.v = [torch.zeros_like(c) for c in self.k]

    def load(self, lease) -> None:
        loader = LayerLoader(lease, self.k, self.v, torch.arange(lease.num_tokens))
        for layer in range(LAYERS):
            loader.wait(layer)
        loader.close()


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(entry: KVEntry, root: Path, repeats: int) -> dict:
    nbytes, tokens = entry.nbytes, entry.num_tokens
    pages = Pages(tokens)
    dram = {f: TieredStore(3 * nbytes, high_watermark=1.0, low_watermark=1.0, kv_format=f) for f in FORMATS}
    dirs = {f: root / f for f in FORMATS}

    def on_disk(f: str) -> TieredStore:
        return TieredStore(2 * nbytes, DiskTier(dirs[f], 3 * nbytes), high_watermark=1.0, low_watermark=1.0,
                           kv_format=f)

    first = KVEntry(torch.arange(1), entry.k[:, :1].clone(), entry.v[:, :1].clone())
    for f in FORMATS:   # each session and its directory exist before the first round
        store = on_disk(f)
        store.save(KEY, first)
        store.close()
    times = {f: {} for f in FORMATS}

    def record(f, op, seconds):
        times[f].setdefault(op, []).append(seconds)

    def dram_round(f):
        store = dram[f]
        record(f, "dram save", _timed(lambda: store.save(KEY, entry)))
        record(f, "dram load into pages", _timed(lambda: pages.load(store.acquire(KEY))))
        record(f, "dram load() (fresh tensors)", _timed(lambda: store.load(KEY)))

    def cold(f) -> TieredStore:
        store = on_disk(f)   # a new process: its index from the disk, the page cache dropped
        for p in dirs[f].rglob("*.kv"):
            drop_cache(p)
        os.sync()
        return store

    def disk_round(f):
        store = on_disk(f)
        store.save(KEY, entry, start=1)
        os.sync()
        record(f, "disk demote (flush)", _timed(store.flush))
        store.close(persist=False)
        store = cold(f)
        record(f, "disk promote (acquire)", _timed(lambda: store.acquire(KEY).release()))
        store.close(persist=False)
        store = cold(f)
        record(f, "disk promote, layer-wise into pages", _timed(lambda: pages.load(store.acquire(KEY, layerwise=True))))
        assert store.stats()["disk"]["layerwise_reads"] == 1
        store.sync()
        store.close(persist=False)
        store = on_disk(f)
        store.truncate(KEY, tokens, keep_first=1)   # the turn leaves; its file goes at close
        store.close()

    for i in range(repeats + 1):
        for f in (FORMATS if i % 2 else FORMATS[::-1]):
            dram_round(f)
            disk_round(f)
        if i == 0:   # a warm-up round for both
            times = {f: {} for f in FORMATS}
    capacity = {}
    for f in FORMATS:
        lay = dram[f].acquire(KEY)
        capacity[f] = dict(dram_bytes_per_token=lay.layout.extent_nbytes(tokens) / tokens)
        lay.release()
        dram[f].close(persist=False)
        store = on_disk(f)
        store.save(KEY, entry, start=1)
        store.flush()
        store.close(persist=False)
        capacity[f]["disk_bytes_per_token"] = sum(p.stat().st_size for p in dirs[f].rglob("*.kv")) / (tokens + 1)
    rows = []
    for op in times["lossless"]:
        row = dict(op=op, tokens=tokens, seconds={f: times[f][op] for f in FORMATS})
        for stat, fn in (("median", statistics.median), ("best", min)):
            rate = {f: tokens / fn(times[f][op]) for f in FORMATS}
            row[stat] = dict(tokens_per_s=rate, ratio=rate["int8"] / rate["lossless"])
        rows.append(row)
    for tier in ("dram", "disk"):
        per = {f: capacity[f][f"{tier}_bytes_per_token"] for f in FORMATS}
        rows.append(dict(op=f"{tier} tokens held per GiB", tokens=tokens,
                         held={f: 2**30 / per[f] for f in FORMATS}, ratio=per["lossless"] / per["int8"]))
    return dict(rows=rows, capacity=capacity)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mib", type=positive_int, default=128, help="bytes of lossless K+V per entry, in MiB")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed rounds per format")
    p.add_argument("--quick", action="store_true", help="4 MiB entries, 2 repeats: done in seconds")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (the store's background save "
                   "runs on one; on a shared machine more only wait for each other)")
    p.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temporary one)")
    p.add_argument("--out", default=None, help="JSON path (default: store_formats_cpu.json in the results folder)")
    args = p.parse_args(argv)
    if args.quick:
        args.mib, args.repeats = min(args.mib, 4), min(args.repeats, 2)
    torch.set_num_threads(args.threads)
    tokens = (args.mib << 20) // (2 * LAYERS * KV_HEADS * HEAD_DIM * 2)
    g = torch.Generator().manual_seed(0)
    entry = KVEntry(torch.arange(tokens), torch.randn(LAYERS, tokens, KV_HEADS, HEAD_DIM, generator=g).bfloat16(),
                    torch.randn(LAYERS, tokens, KV_HEADS, HEAD_DIM, generator=g).bfloat16())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        result = run(entry, Path(tmp), args.repeats)
        facts = machine(Path(tmp))
    print(f"{'operation':38} {'lossless tok/s':>15} {'int8 tok/s':>11} {'ratio':>6} {'best ratio':>11}")
    for r in result["rows"]:
        if "held" in r:
            print(f"{r['op']:38} {r['held']['lossless']:>15.0f} {r['held']['int8']:>11.0f} {r['ratio']:>6.2f}x")
            continue
        m = r["median"]
        print(f"{r['op']:38} {m['tokens_per_s']['lossless']:>15.0f} {m['tokens_per_s']['int8']:>11.0f} "
              f"{m['ratio']:>6.2f}x {r['best']['ratio']:>10.2f}x")
    shape = dict(layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype="bfloat16", tokens=tokens,
                 threads=torch.get_num_threads())
    print(f"wrote {write_json('store_formats_cpu.json', dict(machine=facts, shape=shape, **result), path=args.out)}")


if __name__ == "__main__":
    main()
