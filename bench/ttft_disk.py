"""Time to first token after a history that is on disk only: recomputed, read whole then streamed, or
read one layer at a time behind the prefill.

    python -m bench.ttft_disk [--histories 4096,16384,32768] [--new-tokens 256] [--repeats 3] [--dir DIR]
                              [--budget-s S]     # S: start no history that would end past S seconds
    python -m bench.ttft_disk --quick     # the same code path on CPU with a tiny Llama

A Llama-3-8B-shaped model with random weights (bench.ttft's) answers ``new`` tokens after ``H`` tokens
of history whose KV a `TieredStore` left in chunk files on the disk under ``--dir`` (a new process:
the store is opened over the directory and the files' pages are dropped from the page cache before
every run, so the disk is read). The clock runs from the request to the first token's id:

(a) recompute: stock transformers (sdpa) prefills the history and the new tokens;
(e) whole: `acquire(key, H)` reads the chunks into the pinned pool, checksummed, then the lease is
    copied to the pages layer by layer while the prefill runs (how a load from disk worked before
    layer-wise reads);
(f) layer-wise: `acquire(key, H, layerwise=True)`: the reads go one layer at a time, each layer
    checksummed, and layer ``l``'s copy to the GPU waits for layer ``l``'s read only.

Also reported: a plain read of the same files (page cache dropped) and whether (e) and (f) give the
same logits, and (b): the new tokens' prefill with the history already in the pages. Target of (f): at
most (e), and within 10% of the reach, max(plain read, (b)) plus one layer's read: what reading behind
the compute can give. On CPU the run checks
the code path and the logits; the overlap of disk, PCIe and compute is a GPU effect.
"""
from __future__ import annotations

if __package__ in (None, ""):   # run by path: import `bench` as `python -m` does
    import pathlib
    import sys
    # the checkout's root, and not bench/ itself: bench/kernels.py would shadow the `kernels` package
    here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != here]

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import format_table, results_dir, write_json
from bench.store import drop_cache
from bench.ttft import build_model, clocked, common_arguments, first_token, fits, setup

COLUMNS = [("history", "history", "d"), ("history_mib", "MiB", ".0f"), ("recompute_ms", "(a) recompute ms", ".1f"),
           ("whole_ms", "(e) whole read ms", ".1f"), ("layerwise_ms", "(f) layer-wise ms", ".1f"),
           ("plain_read_ms", "plain read ms", ".1f"), ("resident_ms", "(b) resident ms", ".1f"),
           ("reach_ms", "reach ms", ".1f"), ("same_token", "(e) = (f)", "s"), ("verdict", "target", "s")]


def plain_read_s(files: list[Path]) -> float:
    """Seconds to read ``files`` whole with their pages dropped first (what the disk gives anyone)."""
    for f in files:
        drop_cache(f)
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass
    return time.perf_counter() - t0


def one_history(model, root: Path, history: int, new: int, repeats: int, device: torch.device) -> dict:
    from cattn.hf import PagedCache, apply_cattn, revert_cattn
    from cattn.store import DiskTier, EntryKey, KVEntry, TieredStore
    from cattn.store.layout import KVLayout

    c = model.config
    vocab, layers, dtype = c.vocab_size, c.num_hidden_layers, model.dtype
    runs = range(repeats + 1)                     # run 0 warms up and is not counted
    layout = KVLayout(layers, c.num_key_value_heads, c.head_dim, dtype)
    dram = layout.extent_nbytes(history) + 4 * layout.extent_nbytes(new) + (1 << 20)
    key = EntryKey("bench", "0123456789abcdef", f"h{history}")
    where = root / f"h{history}"

    def fresh(n):
        return torch.randint(0, vocab, (1, n), device=device)

    recompute = [clocked(lambda ids: first_token(model, ids).argmax().item(), fresh(history + new), device)
                 for _ in runs]
    store = TieredStore(dram, DiskTier(where, 2 * layout.extent_nbytes(history) + (1 << 24)))
    k = torch.randn(layers, history, c.num_key_value_heads, c.head_dim, dtype=dtype, device=device)  # fast there
    store.save(key, KVEntry(torch.randint(0, vocab, (history,)), k.cpu(), torch.randn_like(k).cpu()))
    store.close()                                 # on disk only: what a restarted process finds
    del k
    files = sorted(where.rglob("*.kv"))
    nbytes = sum(f.stat().st_size for f in files)

    apply_cattn(model)
    try:
        def from_disk(layerwise: bool, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
            store = TieredStore(dram, DiskTier(where, 2 * nbytes + (1 << 24)), high_watermark=1.0, low_watermark=1.0)
            cache = PagedCache(model, max_tokens=history + new, device=device, dtype=dtype)
            for f in files:
                drop_cache(f)
            out = []

            def turn(ids):
                lease = store.acquire(key, history, layerwise=layerwise)
                assert lease is not None and lease.streamed == layerwise, "the history was not on disk"
                cache.load_layerwise(lease, preload=0)
                out.append(first_token(model, ids, cache))
                out[-1].argmax().item()
            try:
                seconds = clocked(turn, ids, device)
            finally:
                cache.finish()
                store.close(persist=False)
            return seconds, out[-1].float()

        def resident_s() -> list[float]:
            """The prefill of the new tokens alone, the history's KV already in the pages (bench.ttft's (b))."""
            store = TieredStore(dram, DiskTier(where, 2 * nbytes + (1 << 24)))
            entry = store.load(key)
            store.close(persist=False)
            cache = PagedCache(model, max_tokens=history + new, device=device, dtype=dtype)
            cache.load(entry.k.to(device), entry.v.to(device))
            out = []
            for _ in runs:
                out.append(clocked(lambda ids: first_token(model, ids, cache).argmax().item(), fresh(new), device))
                cache.crop(history)
            return out

        ids = fresh(new)
        _, via_whole = from_disk(False, ids)
        _, via_layers = from_disk(True, ids)
        whole = [from_disk(False, fresh(new))[0] for _ in runs]
        layerwise = [from_disk(True, fresh(new))[0] for _ in runs]
        plain = [plain_read_s(files) for _ in runs]
        resident = resident_s()
    finally:
        revert_cattn(model)
    row = dict(history=history, new_tokens=new, history_bytes=nbytes, history_mib=nbytes / 2**20,
               recompute_ms=1e3 * statistics.median(recompute[1:]), whole_ms=1e3 * statistics.median(whole[1:]),
               layerwise_ms=1e3 * statistics.median(layerwise[1:]), plain_read_ms=1e3 * statistics.median(plain[1:]),
               resident_ms=1e3 * statistics.median(resident[1:]),
               same_first_token=bool(via_whole.argmax() == via_layers.argmax()),
               same_token="yes" if via_whole.argmax() == via_layers.argmax() else "NO",
               whole_vs_layerwise_max_abs=float((via_whole - via_layers).abs().max()),
               runs_ms={"recompute": [1e3 * s for s in recompute], "whole": [1e3 * s for s in whole],
                        "layerwise": [1e3 * s for s in layerwise], "plain_read": [1e3 * s for s in plain],
                        "resident": [1e3 * s for s in resident]})
    # reading behind the compute can reach the longer of the two, plus the first layer's read
    row["reach_ms"] = max(row["plain_read_ms"], row["resident_ms"]) + row["plain_read_ms"] / layers
    if device.type == "cuda":
        row["target_met"] = row["layerwise_ms"] <= min(row["whole_ms"], 1.1 * row["reach_ms"])
        row["verdict"] = "pass" if row["target_met"] else "FAIL"
    else:
        row["target_met"], row["verdict"] = None, "n/a (CPU)"
    return row


def main(argv=None) -> int:
    parser = common_arguments(__doc__, repeats=3)
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temporary one)")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="skip longer histories past this")
    args = parser.parse_args(argv)
    if (chosen := setup(parser, args, "ttft_disk")) is None:
        return 2
    shape, dtype, device, histories, new, repeats, name = chosen
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(shape, dtype, device)
    report = dict(model=shape, dtype=str(dtype).removeprefix("torch."), new_tokens=new, repeats=repeats, rows=[],
                  skipped=[])
    last = None                                      # (history, seconds) of the last one measured
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="cattn-ttft-disk-") as tmp:
        for history in histories:
            if not fits(start, last, history, args.budget_s):
                report["skipped"].append(history)
                continue
            print(f"  history {history} ...", flush=True)
            t0 = time.perf_counter()
            report["rows"].append(one_history(model, Path(tmp), history, new, repeats, device))
            last = (history, time.perf_counter() - t0)
            write_json(name, report, path=results_dir() / name)
    report["wall_s"] = time.perf_counter() - start
    write_json(name, report, path=results_dir() / name)
    print(f"\nTTFT, {new} new tokens after a history on disk only, {report['dtype']}; median of {repeats} "
          f"(JSON: {results_dir() / name})")
    print(format_table(report["rows"], COLUMNS))
    if report["skipped"]:
        print(f"skipped for the budget: histories {report['skipped']}")
    if device.type != "cuda":
        print("CPU: copies are synchronous here and the files are small, so (e) and (f) show the code path and "
              "the logits, not the overlap of disk and compute (python -m bench.gpu_check).")
    return 0 if all(r["target_met"] is not False and r["same_first_token"] for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
