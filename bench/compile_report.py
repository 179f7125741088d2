"""Compile every shipped kernel configuration for Hopper (sm_90) on any machine, GPU or not, and
report registers, shared memory and spills per configuration.

    python -m bench.compile_report [--out PATH] [--jobs N]

Shared memory comes from Triton's compile metadata; registers, spills and stack from the
``ptxas -v`` log of the compile itself (Triton's own ptxas and flags; every run compiles into a
fresh cache so that ptxas always runs). The interpreter (``TRITON_INTERPRET=1``) never
compiles, so this script switches it off before importing Triton.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"   # before triton is imported: the kernels must be JITFunctions
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

if __package__ in (None, ""):   # run by path (python bench/compile_report.py): import `bench` as `python -m` does
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from functools import lru_cache  # noqa: E402
from multiprocessing import get_context  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bench.common import format_table, results_dir, write_json  # noqa: E402

ARCH = 90
SMEM_LIMIT = 232448          # bytes of shared memory one block may use on sm_90 (227 KiB)
PTXAS_FIELDS = {
    "registers": r"Used (\d+) registers",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "stack_bytes": r"(\d+) bytes stack frame",
}


@lru_cache(maxsize=None)
def shipped_configs() -> list:
    from cattn.launch import shipped_configs as configs
    return configs()


def ptxas_path(arch: int = ARCH) -> str:
    """The ptxas Triton itself runs for ``arch`` (its bundled binaries differ by CUDA release)."""
    from triton.backends.nvidia import compiler as nvidia
    try:
        return nvidia.get_ptxas(arch).path
    except (AttributeError, TypeError):           # older Triton: one bundled ptxas
        return nvidia.get_ptxas().path


def ptxas_version() -> str:
    banner = subprocess.run([ptxas_path(), "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release [\d.]+, V[\d.]+", banner)
    return found.group(0) if found else banner.strip().splitlines()[-1]


def parse_ptxas_log(log: str) -> dict:
    stats = {}
    for key, pattern in PTXAS_FIELDS.items():
        found = re.findall(pattern, log)
        stats[key] = max(int(v) for v in found) if found else None
    return stats


def ptxas_stats(ptx: str) -> dict:
    """Registers, spills and stack of the (single) kernel in ``ptx``, from ``ptxas -v``."""
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).rstrip(",")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([ptxas_path(), "-v", f"--gpu-name={target}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    log = run.stdout + run.stderr
    if run.returncode:
        raise RuntimeError(f"ptxas failed ({run.returncode}): {log.strip()[-500:]}")
    return parse_ptxas_log(log)


def compile_config(index: int) -> dict:
    """Compile ``shipped_configs()[index]`` for sm_90; returns its row of the report (or its error)."""
    cfg = shipped_configs()[index]
    row = {"name": cfg.name, "kernel": cfg.kernel.__name__, "num_warps": cfg.num_warps,
           "num_stages": cfg.num_stages, "constexprs": dict(cfg.constexprs)}
    start = time.perf_counter()
    try:
        # Triton prints the log of its own ptxas run when asked: the flags it builds with change the
        # register allocation, so that log is the truth. Only a Triton too old to print it makes
        # this script rerun ptxas -v on the PTX (with default flags; recorded in ptxas_log).
        with contextlib.redirect_stdout(io.StringIO()) as log:
            compiled = triton.compile(ASTSource(fn=cfg.kernel, signature=cfg.signature, constexprs=cfg.constexprs),
                                      target=GPUTarget("cuda", ARCH, 32),
                                      options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        row["shared_bytes"] = int(compiled.metadata.shared)
        stats = parse_ptxas_log(log.getvalue())
        row["ptxas_log"] = "compile" if stats["registers"] is not None else "rerun"
        row.update(stats if stats["registers"] is not None else ptxas_stats(compiled.asm["ptx"]))
        row["error"] = None
        if row["shared_bytes"] > SMEM_LIMIT:
            row["error"] = f"needs {row['shared_bytes']} bytes of shared memory, sm_90 allows {SMEM_LIMIT}"
    except Exception as exc:  # one failing configuration must not hide the others' report
        row["error"] = f"{type(exc).__name__}: {str(exc).strip()[-800:]}"
    row["compile_s"] = round(time.perf_counter() - start, 2)
    return row


def compile_all(jobs: int) -> list[dict]:
    """Compile every configuration into a fresh cache, so that every one runs ptxas and logs it."""
    count = len(shipped_configs())
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        if jobs <= 1:
            return [compile_config(i) for i in range(count)]
        # forked workers inherit the imported kernels and the cache setting
        with ProcessPoolExecutor(jobs, mp_context=get_context("fork")) as pool:
            return list(pool.map(compile_config, range(count)))


COLUMNS = [("name", "configuration", "s"), ("num_warps", "warps", "d"), ("num_stages", "stages", "d"),
           ("registers", "regs", "d"), ("shared_bytes", "smem B", "d"), ("spill_stores", "spill st B", "d"),
           ("spill_loads", "spill ld B", "d"), ("stack_bytes", "stack B", "d"), ("compile_s", "compile s", ".1f")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON path (default: compile_sm90.json in the results folder of bench.common)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    rows = compile_all(args.jobs)
    wall = time.perf_counter() - start
    print(format_table(rows, COLUMNS))
    for row in rows:
        if row["error"]:
            print(f"FAILED {row['name']}: {row['error']}", file=sys.stderr)
    spilling = [r["name"] for r in rows if r.get("spill_stores") or r.get("spill_loads")]
    print(f"\n{len(rows)} configurations for sm_{ARCH} in {wall:.1f} s with {args.jobs} jobs; "
          f"{sum(bool(r['error']) for r in rows)} failed; spilling: {', '.join(spilling) or 'none'}")
    path = write_json("compile_sm90.json", {"target": f"cuda sm_{ARCH}", "ptxas": ptxas_version(),
                                            "wall_s": round(wall, 1), "jobs": args.jobs, "configs": rows},
                      path=args.out or results_dir() / "compile_sm90.json")
    print(f"wrote {path}")
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
