"""Part 1 of `bench.gpu_check`: every kernel against the float64 reference, in bf16, fp16 and fp32.

On the GPU the cases are shapes the interpreter cannot reach (GQA 32/8 with head_dim 128, contexts up
to 20K, decode over many splits), plus head_dim 64/80/96/256, GQA 1 and 7, page sizes 5 and 12, gptj,
partial and longrope. The dry run checks the same cases with contexts of a few dozen keys, under the
interpreter on CPU.
"""
from __future__ import annotations

import math
import multiprocessing
import time
from multiprocessing import get_context

import torch

import cattn
from cattn import RopeSpec, reference

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
# The dry run's: the first case with contexts the interpreter runs in seconds (still several pages, a
# query longer than one, a one-key sequence and a decode split); tests/kernels covers the other shapes there.
DRY_CASES = [("gqa32/8 d128 p16 (tiny)", 128, 4, 16, "neox", True, ([1, 20], [40, 20]), [70, 1])]


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


def check_task(task: tuple) -> tuple[tuple, list[dict]]:
    """One (case, dtype) on ``device``, in a worker process, so compiles run in parallel and a crashed
    kernel (a sticky CUDA error) takes down only its worker. Returns the task with its rows."""
    case, dtype_name, device, seed = task
    torch.manual_seed(seed)
    try:
        return task, check_case(case, getattr(torch, dtype_name), torch.device(device))
    except Exception as exc:  # noqa: BLE001 - e.g. a bad RoPE setting: reported as this task's row
        return task, [{"case": case[0], "kind": "both", "dtype": dtype_name, "ok": False,
                       "error": f"{type(exc).__name__}: {exc}"[:400]}]


def correctness(device: str, workers: int, cases: list, limit_s: float) -> dict:
    """Every case in every dtype, ``workers`` processes at a time; the tasks not done after ``limit_s``
    are reported as such and their workers killed (a hung kernel must not eat the other parts' time)."""
    tasks = [(case, str(d).removeprefix("torch."), device, i) for d in DTYPES for i, case in enumerate(cases)]
    rows, todo = [], {(t[0][0], t[1]) for t in tasks}
    deadline = time.monotonic() + limit_s
    pool = get_context("spawn").Pool(workers)
    try:
        results = pool.imap_unordered(check_task, tasks)
        for _ in tasks:
            (case, dtype_name, _, _), done = results.next(timeout=max(0.0, deadline - time.monotonic()))
            rows += done
            todo.discard((case[0], dtype_name))
            status = "ok" if all(r["ok"] for r in done) else "FAIL"
            print(f"  {status:4} {dtype_name:8} {case[0]}", flush=True)
    except multiprocessing.TimeoutError:
        rows += [{"case": name, "kind": "both", "dtype": dtype_name, "ok": False,
                  "error": f"not finished within {limit_s:.0f} s"} for name, dtype_name in sorted(todo)]
    finally:
        pool.terminate()
        pool.join()
    failed = sum(not r["ok"] for r in rows)
    result = {"passed": sum(r["ok"] for r in rows), "failed": failed, "rows": rows}
    if failed:
        result["error"] = f"{failed} of {len(rows)} checks failed"
    return result
