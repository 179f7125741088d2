"""Throughput of the store's tiers against the plain copy of the same bytes, measured in the same run.

DRAM tier: `save` (entry -> pinned pool) and `load` (pool -> fresh tensors), and the zero-copy lease
that the layer-wise loader reads (pool -> a preallocated buffer), each against ``copy_`` of the same
bytes into a preallocated buffer; `load` also against ``clone`` (fresh tensors pay for their first
touch of every page, whoever fills them). Disk tier: demotion of a session's new turn (`flush`: chunk
file written and checksummed, fsynced, renamed, manifest committed, each rename made durable by a
directory fsync) against writing the same bytes to a new file and fsyncing it (no rename, no
directory fsync: not crash-safe); promotion (a new process's `acquire`: chunk read into the pool and
checksummed; and ``acquire(..., layerwise=True)``: read one layer at a time, each checksummed, with
the time until its first layer is in against a whole read's, which has it only at the end) against
reading that file into a buffer. Before every read both files' pages are dropped from the
page cache (fsync, then posix_fadvise DONTNEED), so both reads come from the disk.

    python bench/store.py [--mib 128] [--dir DIR] [--repeats 5]
    python bench/store.py --quick                                            # seconds, small entries
    python bench/store.py --transfer [4096 16384 32768] [--layer-ms 1.0]     # CUDA; on CPU a smoke run
    python bench/store.py --redis [--mib 128] [--redis-url URL]              # the shared tier, loopback

Prints a table and writes ``store_cpu.json`` (``store_cuda.json`` / ``store_cpu_transfer.json`` with
--transfer) to the results folder (`bench.common.results_dir`, or ``--out``).
"""
from __future__ import annotations

if __package__ in (None, ""):   # run by path (python bench/store.py): import `bench` as `python -m` does
    import pathlib
    import sys
    # the checkout's root, and not bench/ itself: bench/kernels.py would shadow the `kernels` package
    here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != here]

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import xxhash

from bench.common import write_json
from cattn.store.contract import EntryKey, KVEntry
from cattn.store.lower.fileformat import bytes_of
from cattn.store.lower.disk import DiskTier
from cattn.store.tiered.store import TieredStore

KEY = EntryKey("bench", "0123abcd", "s0")
LAYERS, KV_HEADS, HEAD_DIM = 32, 8, 128     # Llama-3-8B: 128 KiB of bf16 K+V per token


def timed(fn, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn()``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_dram(entry: KVEntry, repeats: int) -> list[dict]:
    nbytes = entry.nbytes
    store = TieredStore(3 * nbytes, high_watermark=1.0, low_watermark=1.0)
    buf_k, buf_v = torch.empty_like(entry.k), torch.empty_like(entry.v)

    def memcpy():
        buf_k.copy_(entry.k)
        buf_v.copy_(entry.v)

    def lease_copy():
        with store.acquire(KEY) as lease:
            for seg in lease.segments:
                buf_k[:, seg.start:seg.start + seg.num_tokens].copy_(seg.k)
                buf_v[:, seg.start:seg.start + seg.num_tokens].copy_(seg.v)

    def clone():
        return entry.k.clone(), entry.v.clone()

    memcpy()  # first touch of the buffers
    store.save(KEY, entry)
    rows = []
    prealloc, fresh = "copy_ into a preallocated buffer", "clone into fresh tensors"
    for op, fn, base_fn, base_name in (("save", lambda: store.save(KEY, entry), memcpy, prealloc),
                                       ("load", lambda: store.load(KEY), memcpy, prealloc),
                                       ("load", lambda: store.load(KEY), clone, fresh),
                                       ("lease -> buffer", lease_copy, memcpy, prealloc)):
        t, base = [], []
        for _ in range(repeats):   # interleaved, so that both sides see the same machine
            t += timed(fn, 1)
            base += timed(base_fn, 1)
        rows.append(dict(tier="dram", op=op, bytes=nbytes, seconds=t, baseline=base_name, baseline_seconds=base))
    store.close(persist=False)
    return rows


def bench_disk(entry: KVEntry, root: Path, repeats: int) -> list[dict]:
    """The steady state of the disk tier: each round a session gains a new turn of ``entry``'s size,
    demoted by `flush` (timed) and read back by a new process's `acquire` (timed), then dropped from
    the history (untimed). The baseline writes the same bytes to a new file and reads them back."""
    nbytes = entry.nbytes
    data = torch.cat([entry.k.reshape(-1).view(torch.uint8), entry.v.reshape(-1).view(torch.uint8)])
    view, buf = bytes_of(data), torch.empty_like(data)
    into = bytes_of(buf)

    def plain_write(path):
        with open(path, "wb") as f:
            f.write(view)
            f.flush()
            os.fsync(f.fileno())

    def plain_read(path):
        with open(path, "rb", buffering=0) as f:
            done = 0
            while done < nbytes:
                done += f.readinto(into[done:])

    store_dir = root / "store"

    def open_store():
        return TieredStore(2 * nbytes, DiskTier(store_dir, 3 * nbytes), high_watermark=1.0, low_watermark=1.0)

    first = KVEntry(torch.arange(1), entry.k[:, :1].clone(), entry.v[:, :1].clone())
    store = open_store()
    store.save(KEY, first)            # the session and its directory exist before the first round
    store.close()

    def store_write():
        store = open_store()
        store.save(KEY, entry, start=1)
        os.sync()
        t0 = time.perf_counter()
        store.flush()
        write_s.append(time.perf_counter() - t0)
        store.close(persist=False)

    def store_read():
        store = open_store()          # a new process: its index comes from the disk
        for f in store_dir.rglob("*.kv"):
            drop_cache(f)
        os.sync()
        t0 = time.perf_counter()
        store.acquire(KEY).release()
        read_s.append(time.perf_counter() - t0)
        assert store.stats()["disk"]["bytes_out"] >= nbytes
        store.close(persist=False)

    def end_round():
        store = open_store()
        store.truncate(KEY, entry.num_tokens, keep_first=1)   # the turn leaves; its file goes at close
        store.close()

    def store_read_layerwise():
        store = open_store()
        for f in store_dir.rglob("*.kv"):
            drop_cache(f)
        os.sync()
        t0 = time.perf_counter()
        lease = store.acquire(KEY, layerwise=True)
        lease.wait_layer(0)
        first_s.append(time.perf_counter() - t0)
        lease.wait_layer(LAYERS - 1)
        layerwise_s.append(time.perf_counter() - t0)
        lease.release()
        assert lease.streamed and store.stats()["disk"]["layerwise_reads"] == 1
        store.sync()
        store.close(persist=False)

    def base_write(i):
        (root / f"plain{i - 1}.bin").unlink(missing_ok=True)
        os.sync()
        base_write_s.extend(timed(lambda: plain_write(root / f"plain{i}.bin"), 1))

    def base_read(i):
        drop_cache(root / f"plain{i}.bin")
        os.sync()
        base_read_s.extend(timed(lambda: plain_read(root / f"plain{i}.bin"), 1))

    # Every timed operation starts with nothing dirty (os.sync); the order alternates between rounds.
    write_s, base_write_s, read_s, base_read_s, first_s, layerwise_s = [], [], [], [], [], []
    for i in range(repeats + 1):
        writes = [store_write, lambda: base_write(i)]
        reads = [store_read, store_read_layerwise, lambda: base_read(i)]
        for step in (writes + reads if i % 2 else writes[::-1] + reads[::-1]):
            step()
        end_round()
        if i == 0:  # a warm-up round, on both sides
            for times in (write_s, base_write_s, read_s, base_read_s, first_s, layerwise_s):
                times.clear()
    assert xxhash.xxh3_64_intdigest(into) == xxhash.xxh3_64_intdigest(view)
    return [dict(tier="disk", op="demote (flush)", bytes=nbytes, seconds=write_s,
                 baseline="write + fsync of a new file", baseline_seconds=base_write_s),
            dict(tier="disk", op="promote (acquire)", bytes=nbytes, seconds=read_s,
                 baseline="read of that file, page cache dropped", baseline_seconds=base_read_s),
            dict(tier="disk", op="promote, layer-wise", bytes=nbytes, seconds=layerwise_s,
                 baseline="read of that file, page cache dropped", baseline_seconds=base_read_s),
            # a latency: when layer 0 can be copied to the GPU (a whole read: when all of it is in)
            dict(tier="disk", op="first layer, layer-wise", bytes=nbytes, seconds=first_s,
                 baseline="first layer of a whole acquire", baseline_seconds=read_s)]


KINDS = {"b": "resident", "c": "layer-wise", "c0": "layer-wise, no preload", "d": "copy all first"}


def bench_transfer(tokens: int, layer_ms: float, repeats: int) -> dict:
    """CUDA: ``tokens`` of history (Llama-3-8B KV shape) streamed from the pinned pool into scattered
    pages while each layer runs a stand-in for its compute (bf16 matmuls, about ``layer_ms`` each):
    (b) compute alone, the history already resident; (c) layer-wise, the buffer rule's first layers
    loaded before the job starts; (c0) layer-wise with nothing loaded before; (d) copy all, then
    compute. Also checks the loaded pages and a `LayerSaver` round trip bit for bit."""
    from cattn.store.transfer import LayerLoader, LayerSaver, copy_bandwidth, preload_layers
    dev, page = torch.device("cuda" if torch.cuda.is_available() else "cpu"), 16   # CPU: a smoke run

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    entry = KVEntry(torch.arange(tokens), torch.randn(LAYERS, tokens, KV_HEADS, HEAD_DIM).to(torch.bfloat16),
                    torch.randn(LAYERS, tokens, KV_HEADS, HEAD_DIM).to(torch.bfloat16))
    store = TieredStore(entry.nbytes + (256 << 20))
    store.save(KEY, entry)
    num_pages = -(-tokens // page) + 64
    k_caches = [torch.empty(num_pages, page, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=dev)
                for _ in range(LAYERS)]
    v_caches = [torch.empty_like(c) for c in k_caches]
    pages = torch.randperm(num_pages, device=dev)
    slots = (pages[:, None] * page + torch.arange(page, device=dev)).flatten()[:tokens]
    # The stand-in compute: a bf16 matmul of a layer's size on the GPU; on CPU a small fp32 one (a CPU
    # bf16 2048x4096x4096 matmul takes seconds, far past --layer-ms), repeated to last about layer_ms.
    m, n, dtype = (2048, 4096, torch.bfloat16) if dev.type == "cuda" else (64, 512, torch.float32)
    x, w = torch.randn(m, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    sync()
    t0 = time.perf_counter()
    for _ in range(20):
        x @ w
    sync()
    reps = max(1, round(layer_ms / ((time.perf_counter() - t0) / 20 * 1e3)))

    def layer():
        for _ in range(reps):
            x @ w

    def run(kind: str) -> float:
        loader = None if kind == "b" else LayerLoader(store.acquire(KEY, tokens), k_caches, v_caches, slots)
        if kind in ("c", "d"):
            loader.preload(LAYERS if kind == "d" else k)
            sync()                            # "c": loaded while the previous job ran
        t0 = time.perf_counter()
        for l in range(LAYERS):
            if loader is not None:
                loader.wait(l)
            layer()
        sync()
        elapsed = time.perf_counter() - t0
        if loader is not None:
            loader.close()
        return elapsed

    layer_s = timed(lambda: (layer(), sync()), 5)
    bandwidth = copy_bandwidth(dev)
    load_s = 2 * tokens * KV_HEADS * HEAD_DIM * 2 / bandwidth
    k = preload_layers(LAYERS, load_s, statistics.median(layer_s))
    run("c0")
    ok = all(torch.equal(c.view(-1, KV_HEADS, HEAD_DIM)[slots].cpu(), entry.k[l]) for l, c in enumerate(k_caches))
    ok &= all(torch.equal(c.view(-1, KV_HEADS, HEAD_DIM)[slots].cpu(), entry.v[l]) for l, c in enumerate(v_caches))
    n_new = min(256, tokens)
    new = torch.arange(tokens, tokens + n_new)
    new_slots = slots[:n_new]  # reuse pages: the saver copies what they hold now
    saver = LayerSaver(store, KEY, new, tokens, k_caches, v_caches, new_slots)
    saver.save_all()
    saver.finish().result()
    got = store.load(KEY)
    ok &= torch.equal(got.k[:, tokens:], entry.k[:, :n_new]) and torch.equal(got.v[:, tokens:], entry.v[:, :n_new])
    times = {}
    for kind in ("b", "c", "c0", "d"):
        print(f"  {tokens} tokens: {KINDS[kind]} x{repeats} ...", flush=True)
        times[kind] = statistics.median([run(kind) for _ in range(repeats)])
    s = store.stats()["transfer"]
    return dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", tokens=tokens, history_mib=entry.nbytes >> 20,
                copy_gbps=bandwidth / 1e9, layer_ms=statistics.median(layer_s) * 1e3, preload_layers=k,
                correct=bool(ok), ms={kind: t * 1e3 for kind, t in times.items()},
                load_s_hidden=s["load_s_hidden"], load_s_exposed=s["load_s_exposed"])


def machine(root: Path) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    fs = max((line.split() for line in open("/proc/mounts") if str(root.resolve()).startswith(line.split()[1])),
             key=lambda parts: len(parts[1]))
    return dict(cpu=cpu, cores=os.cpu_count(), ram_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                                             / 2**30, 1),
                filesystem=fs[2], python=platform.python_version(), torch=torch.__version__,
                xxhash=xxhash.VERSION, cuda=torch.cuda.is_available())


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mib", type=positive_int, default=128, help="bytes of K+V per entry, in MiB")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs per measurement")
    p.add_argument("--quick", action="store_true", help="8 MiB entries, 3 repeats: done in seconds")
    p.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temporary one)")
    p.add_argument("--out", default=None, help="JSON path (default: store_cpu.json, store_cuda.json or "
                   "store_cpu_transfer.json in the results folder)")
    p.add_argument("--transfer", type=positive_int, nargs="*", metavar="TOKENS",
                   help="time layer-wise loading of histories of these sizes instead (default sizes: 4096 16384 "
                   "32768 on CUDA; 256 on CPU, a smoke run of seconds)")
    p.add_argument("--layer-ms", type=float, default=1.0, help="with --transfer: stand-in compute per layer")
    p.add_argument("--redis", action="store_true", help="the shared Redis tier instead (bench/store_redis.py)")
    p.add_argument("--redis-url", help="with --redis: a running server instead of starting one (and a cluster)")
    p.add_argument("--piece-mib", type=int, default=32, help="with --redis: bytes per Redis value, in MiB")
    args = p.parse_args(argv)
    if args.quick:
        args.mib, args.repeats = min(args.mib, 8), min(args.repeats, 3)
    if args.redis:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from bench.store_redis import run

        run(args.mib, args.repeats, args.out, args.redis_url, args.piece_mib)
        return
    if args.transfer is not None:
        sizes = args.transfer or ([4096, 16384, 32768] if torch.cuda.is_available() else [256])
        runs = []
        for t in sizes:
            print(f"transfer: {t} tokens of history, {LAYERS} layers", flush=True)
            runs.append(bench_transfer(t, args.layer_ms, args.repeats))
        print(f"{'tokens':>7} {'MiB':>6} {'k':>3} {'ok':>3} {'resident':>9} {'layerwise':>10} {'no preload':>11} "
              f"{'copy first':>11}  (ms)")
        for r in runs:
            m = r["ms"]
            print(f"{r['tokens']:>7} {r['history_mib']:>6} {r['preload_layers']:>3} "
                  f"{'yes' if r['correct'] else 'NO':>3} {m['b']:>9.2f} {m['c']:>10.2f} {m['c0']:>11.2f} {m['d']:>11.2f}")
        name = f"store_{'cuda' if torch.cuda.is_available() else 'cpu_transfer'}.json"
        print(f"wrote {write_json(name, dict(runs=runs), path=args.out)}")
        return
    tokens = (args.mib << 20) // (2 * LAYERS * KV_HEADS * HEAD_DIM * 2)
    entry = KVEntry(torch.arange(tokens), torch.randn(LAYERS, tokens, KV_HEADS, HEAD_DIM).to(torch.bfloat16),
                    torch.randn(LAYERS, tokens, KV_HEADS, HEAD_DIM).to(torch.bfloat16))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        rows = bench_dram(entry, args.repeats) + bench_disk(entry, root, args.repeats)
        facts = machine(root)
    # Medians, and bests (the least disturbed runs on a shared machine); ratio = store / baseline throughput.
    print(f"{'tier':5} {'op':21} {'MiB':>4} {'store GB/s':>11} {'baseline GB/s':>14} {'ratio':>6} "
          f"{'best store':>11} {'best base':>10} {'ratio':>6}  baseline")
    for r in rows:
        for stat, f in (("median", statistics.median), ("best", min)):
            t, b = f(r["seconds"]), f(r["baseline_seconds"])
            r[stat] = dict(gbps=r["bytes"] / t / 1e9, baseline_gbps=r["bytes"] / b / 1e9, ratio=b / t)
        m, b = r["median"], r["best"]
        print(f"{r['tier']:5} {r['op']:21} {r['bytes'] >> 20:>4} {m['gbps']:>11.2f} {m['baseline_gbps']:>14.2f} "
              f"{m['ratio']:>6.0%} {b['gbps']:>11.2f} {b['baseline_gbps']:>10.2f} {b['ratio']:>6.0%}  {r['baseline']}")
    shape = dict(layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype="bfloat16", tokens=tokens)
    print(f"wrote {write_json('store_cpu.json', dict(machine=facts, shape=shape, results=rows), path=args.out)}")


if __name__ == "__main__":
    main()
