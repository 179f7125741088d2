"""The one script for a GPU machine: kernel correctness in bf16/fp16/fp32, then the benchmarks.

    python -m bench.gpu_check [--budget-s 450] [--skip-pytest]

0. Tunes the tile configurations (`bench.tune`) when ``cattn/configs`` has no file for this GPU,
   within ``--tune-budget-s``, writing it there and under the results folder.
1. Checks every kernel against the float64 reference on the GPU, on shapes the interpreter
   cannot reach (GQA 32/8 with head_dim 128, contexts up to 20K, decode over many splits),
   plus head_dim 64/80/96/256, GQA 1 and 7, page sizes 5 and 12, gptj, partial and longrope.
2. Runs the benchmarks of `bench.kernels` on the shapes of the GPU notes.
3. Time to first token after 4K/16K/32K tokens of history on a Llama-3-8B-shaped model, recomputed,
   resident, the buffer rule's first layers resident and the rest streamed, and all streamed from DRAM
   (`bench.ttft`, in its own process, about 120 s); then the same with the history on disk only, read
   whole or one layer at a time behind the prefill (`bench.ttft_disk`, at most 90 s).
4. With the time left, runs the kernel test files under pytest on the GPU (CATTN_TEST_DEVICE=cuda).
5. Prints the benchmark tables last.

Each part runs even if an earlier one failed; JSON goes to ``$OUT`` when set, else to the results
folder of `bench.common.results_dir` (never the source tree),
and is rewritten after every part, so a run cut short still leaves what it measured.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"    # a leftover interpreter setting would time the interpreter

if __package__ in (None, ""):   # run by path (python bench/gpu_check.py): import `bench` as `python -m` does
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: E402
from multiprocessing import get_context  # noqa: E402

import torch  # noqa: E402

import cattn  # noqa: E402
from bench import kernels, ttft, ttft_disk  # noqa: E402
from bench.common import REPO, format_table, results_dir, write_json  # noqa: E402
from cattn import RopeSpec, reference  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# max |out - ref| / (1 + |ref|) allowed, i.e. atol = rtol: those of tests/kernels/batches.py
# with room for contexts of up to 20K keys.
TOLERANCES = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


def rope_of(kind: str, head_dim: int) -> RopeSpec | None:
    def default(rotary_dim, style="neox", base=10000.0):
        return RopeSpec(1.0 / (base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)), 1.0, style)

    if kind == "none":
        return None
    if kind == "gptj-partial":
        return default(head_dim // 2, "gptj")
    if kind == "longrope":
        short = default(head_dim).inv_freq
        return RopeSpec(short, 1.19, "neox", short / torch.linspace(1.0, 4.0, head_dim // 2), 4096)
    return default(head_dim, base=500000.0)


# (name, head_dim, group, page_size, rope, causal, extend (q_lens, kv_lens), decode kv_lens)
CASES = [
    ("gqa32/8 d128 p16", 128, 4, 16, "neox", True, ([1, 300, 77, 1], [2000, 300, 4100, 1000]),
     [20000, 1, 4097, 511, 8192, 100]),
    ("d64 mha p16 no-rope non-causal", 64, 1, 16, "none", False, ([40, 1, 129], [1000, 7, 129]), [3000, 2]),
    ("d80 gqa7 p5 gptj-partial", 80, 7, 5, "gptj-partial", True, ([33, 1, 65], [600, 1, 65]), [5000, 33]),
    ("d96 gqa4 p12 longrope", 96, 4, 12, "longrope", True, ([100, 20], [4000, 5000]), [4096, 4097, 9000]),
    ("d256 gqa4 p16", 256, 4, 16, "neox", True, ([64, 1], [700, 2000]), [3000, 1]),
]


def paged_batch(q_lens, kv_lens, num_kv_heads, group, head_dim, page_size, dtype, device):
    """Shuffled pages, NaN in every unwritten slot, block-table padding pointing anywhere."""
    pages = [math.ceil(n / page_size) for n in kv_lens]
    num_pages = sum(pages) + 4
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    ids = torch.randperm(num_pages, device=device)
    table = torch.randint(0, num_pages, (len(kv_lens), max(pages) + 3), dtype=torch.int32, device=device)
    slots = []
    for b, (n, p) in enumerate(zip(kv_lens, pages)):
        table[b, :p] = ids[sum(pages[:b]): sum(pages[:b]) + p]
        t = torch.arange(n, device=device)
        slots.append(table[b, t // page_size].long() * page_size + t % page_size)
    slot_mapping = torch.cat(slots)
    k = torch.randn(len(slot_mapping), num_kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    cattn.write_kv(k, v, k_cache, v_cache, slot_mapping, backend="triton")
    k_ref, v_ref = torch.full_like(k_cache, float("nan")), torch.full_like(v_cache, float("nan"))
    reference.write_kv(k, v, k_ref, v_ref, slot_mapping)
    write_ok = torch.equal(k_cache.nan_to_num(7.0), k_ref.nan_to_num(7.0)) and torch.equal(
        v_cache.nan_to_num(7.0), v_ref.nan_to_num(7.0))
    q = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, dtype=dtype, device=device)
    cu = torch.tensor([0] + list(q_lens), device=device).cumsum(0).int()
    return (q, k_cache, v_cache, table, torch.tensor(kv_lens, dtype=torch.int32, device=device), cu), write_ok


def check_case(case, dtype, device) -> list[dict]:
    name, head_dim, group, page_size, rope_kind, causal, (q_lens, kv_lens), decode_lens = case
    rope = rope_of(rope_kind, head_dim)
    rows = []
    for kind, (ql, kl) in (("extend", (q_lens, kv_lens)), ("decode", ([1] * len(decode_lens), decode_lens))):
        row = {"case": name, "kind": kind, "dtype": str(dtype).removeprefix("torch.")}
        try:
            args, write_ok = paged_batch(ql, kl, 8 if head_dim == 128 else 2, group, head_dim, page_size, dtype,
                                         device)
            out = cattn.paged_attention(*args, rope, causal=causal, backend="triton")
            expected = reference.paged_attention(*(a.double() if a.is_floating_point() else a for a in args),
                                                 rope.to(device) if rope else None, causal=causal)
            err = ((out.double() - expected).abs() / (1 + expected.abs())).max().item()
            tol = TOLERANCES[dtype]
            row.update(max_scaled_error=err, tolerance=tol, write_kv_exact=write_ok,
                       ok=bool(write_ok and err <= tol and torch.isfinite(out).all()))
        except Exception as exc:  # noqa: BLE001 - a failing case is reported, the others still run
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:400])
        rows.append(row)
    return rows


def check_task(task: tuple[int, str, str]) -> list[dict]:
    """One (case, dtype) on ``device``; runs in a worker process, so compiles run in parallel and a
    crashed kernel (a sticky CUDA error) takes down only its worker."""
    case_index, dtype_name, device = task
    torch.manual_seed(case_index)
    return check_case(CASES[case_index], getattr(torch, dtype_name), torch.device(device))


def correctness(device: str, workers: int) -> dict:
    tasks = [(i, str(d).removeprefix("torch."), device) for d in DTYPES for i in range(len(CASES))]
    rows = []
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(check_task, task): task for task in tasks}
        for future in as_completed(futures):
            index, dtype_name, _ = futures[future]
            try:
                done = future.result()
            except Exception as exc:  # noqa: BLE001 - e.g. a worker killed by a CUDA fault
                done = [{"case": CASES[index][0], "kind": "both", "dtype": dtype_name, "ok": False,
                         "error": f"{type(exc).__name__}: {exc}"[:400]}]
            rows += done
            status = "ok" if all(r["ok"] for r in done) else "FAIL"
            print(f"  {status:4} {dtype_name:8} {CASES[index][0]}", flush=True)
    return {"passed": sum(r["ok"] for r in rows), "failed": sum(not r["ok"] for r in rows), "rows": rows}


def pytest_kernel_files(timeout_s: float) -> dict:
    env = dict(os.environ, CATTN_TEST_DEVICE="cuda", TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels/test_write_kv.py",
           "tests/kernels/test_paged_attention.py", "tests/kernels/test_window_softcap.py",
           "tests/kernels/test_strided_indices.py"]
    try:
        run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        tail = (run.stdout + run.stderr).strip().splitlines()
        return {"returncode": run.returncode, "summary": tail[-1] if tail else "", "tail": tail[-30:]}
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"returncode": None, "summary": f"timed out after {timeout_s:.0f} s", "tail": out.splitlines()[-10:]}


def tune_part(budget_s: float, out_dir, jobs: int) -> dict:
    """Tune this GPU's configurations first, unless it has a tuned file already (or tuning is off)."""
    from bench import tune
    from cattn import configs

    name = configs.device_file_name(torch.cuda.get_device_name())
    if budget_s <= 0 or (configs.HERE / name).exists():
        return {"skipped": f"cattn/configs/{name} {'exists' if budget_s > 0 else 'not asked for'}"}
    payload = tune.run(budget_s, [configs.HERE, out_dir], jobs)
    return {"file": name, "prefill": payload.get("prefill"), "decode": payload.get("decode")}


def module_part(module: str, json_name: str, timeout_s: float, *args: str) -> dict:
    """``python -m module *args`` in its own process, so that its 16 GB model and pinned pool leave with it,
    killed after ``timeout_s``; what it wrote to ``json_name`` (rewritten after each history) comes back."""
    out = results_dir() / json_name
    out.unlink(missing_ok=True)
    try:
        run = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                             timeout=timeout_s)
        result = {"returncode": run.returncode, "tail": (run.stdout + run.stderr).strip().splitlines()[-20:]}
    except subprocess.TimeoutExpired:
        result = {"returncode": None, "tail": [f"timed out after {timeout_s:.0f} s"]}
    report = json.loads(out.read_text()) if out.exists() else {}
    return {**result, "rows": report.get("rows", []), "skipped": report.get("skipped", []),
            "host_to_device_bytes_per_s": report.get("host_to_device_bytes_per_s")}


def ttft_part(budget_s: float) -> dict:
    """`bench.ttft`: it stops starting histories at ``budget_s`` and is killed 45 s later."""
    return module_part("bench.ttft", "ttft.json", budget_s + 45, "--budget-s", str(int(budget_s)))


def ttft_disk_part(budget_s: float) -> dict:
    """`bench.ttft_disk`: a history on disk only, read whole or layer by layer; killed after ``budget_s``
    (each history's row is kept as it is measured, the shortest first)."""
    return module_part("bench.ttft_disk", "ttft_disk.json", budget_s, "--repeats", "2")


# The performance goals, set on an H200: (shape, metric, floor, peers cattn must beat).
# The floor of the extend shape is FlexAttention's H200 figure; this run's flex row is printed beside it.
GOALS = [("extend q512 kv16K", "tflops", 420.0, ("unfused", "flex")),
         ("decode B32 kv16K", "gbps", 3600.0, ("flex",)),
         ("decode B8 kv64K", "gbps", 3600.0, ("flex",))]


def goal_lines(rows: list[dict]) -> list[str]:
    lines = []
    for shape, metric, floor, must_beat in GOALS:
        value = {r["method"]: r.get(metric) for r in rows if r["shape"] == shape}
        ours = value.get("cattn")
        if ours is None:
            verdict = "n/a (cattn did not run)"
        else:
            met = ours >= floor and all(value.get(p) is None or ours > value[p] for p in must_beat)
            verdict = "met" if met else "NOT met"
        peers = ", ".join(f"{m} {v:.0f}" for m, v in value.items() if m != "cattn" and v is not None)
        lines.append(f"goal {shape}: cattn {ours or 0:.0f} {metric}, floor {floor:.0f}, beat {', '.join(must_beat) or '-'} "
                     f"[{peers}]: {verdict}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=450, help="stop starting new parts after this")
    parser.add_argument("--skip-pytest", action="store_true", help="skip part 4, the kernel tests on the GPU")
    parser.add_argument("--tune-budget-s", type=float, default=120, help="time for bench.tune when this GPU has "
                                                                        "no tuned file (0: never tune)")
    parser.add_argument("--ttft-budget-s", type=float, default=120, help="time for bench.ttft (0: skip it)")
    parser.add_argument("--ttft-disk-budget-s", type=float, default=90,
                        help="time for bench.ttft_disk (0: skip it)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes for the correctness checks (their kernel compiles run in parallel)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU; on CPU run pytest and `python -m bench.kernels --quick`.")
        return 2
    report: dict = {"parts": {}}
    out_dir = results_dir()

    def part(name, fn):
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            report["parts"][name] = fn()
        except Exception:  # noqa: BLE001 - one failing part must not stop the others
            report["parts"][name] = {"error": traceback.format_exc()[-2000:]}
            print(report["parts"][name]["error"], flush=True)
        report["parts"][name]["wall_s"] = round(time.perf_counter() - t0, 1)
        write_json("gpu_check.json", report, path=out_dir / "gpu_check.json")

    part("tune", lambda: tune_part(args.tune_budget_s, out_dir, args.workers))
    part("correctness", lambda: correctness("cuda", args.workers))
    part("benchmarks", lambda: kernels.run(kernels.GPU_SHAPES))
    timings = report["parts"]["benchmarks"]
    if "rows" in timings:
        name = f"kernels_{kernels.device_slug()}.json"
        write_json(name, timings, path=out_dir / name)
    left = args.budget_s - (time.perf_counter() - start)
    if args.ttft_budget_s > 0 and left > 60:
        part("ttft", lambda: ttft_part(min(args.ttft_budget_s, left - 45)))
    left = args.budget_s - (time.perf_counter() - start)
    if args.ttft_disk_budget_s > 0 and left > 60:
        part("ttft_disk", lambda: ttft_disk_part(min(args.ttft_disk_budget_s, left - 20)))
    left = args.budget_s - (time.perf_counter() - start)
    if not args.skip_pytest and left > 60:
        part("pytest_kernels", lambda: pytest_kernel_files(left - 20))

    checks = report["parts"]["correctness"]
    print(f"\ncorrectness: {checks.get('passed', 0)} ok, {checks.get('failed', 'n/a')} failed")
    for row in checks.get("rows", []):
        if not row["ok"]:
            print(f"  FAIL {row}")
    if "pytest_kernels" in report["parts"]:
        print(f"pytest on GPU: {report['parts']['pytest_kernels'].get('summary', 'error')}")
    print(f"total {time.perf_counter() - start:.0f} s; JSON in {out_dir}\n")
    if "rows" in timings:
        for line in goal_lines(timings["rows"]):
            print(line)
        print(format_table(timings["rows"], kernels.COLUMNS))
    else:
        print("benchmarks failed:\n" + timings.get("error", ""))
    ttft_report = report["parts"].get("ttft")
    if ttft_report is not None:
        print("\nTTFT, 256 new tokens after a history (Llama-3-8B shape, bf16; target: (c) within 10% of "
              "max((b), copy)):")
        if ttft_report.get("rows"):
            print(format_table(ttft_report["rows"], ttft.COLUMNS))
        else:
            print("\n".join(ttft_report.get("tail", [])) or ttft_report.get("error", ""))
    disk_report = report["parts"].get("ttft_disk")
    if disk_report is not None:
        print("\nTTFT after a history on disk only (target: (f) layer-wise within 10% of the reach and at most (e)):")
        if disk_report.get("rows"):
            print(format_table(disk_report["rows"], ttft_disk.COLUMNS))
        else:
            print("\n".join(disk_report.get("tail", [])) or disk_report.get("error", ""))
    return 0 if checks.get("failed") == 0 and "rows" in timings else 1


if __name__ == "__main__":
    sys.exit(main())
