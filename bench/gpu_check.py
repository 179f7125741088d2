"""The one script for a GPU machine: tuning, kernel correctness in bf16/fp16/fp32, then the benchmarks.

    python -m bench.gpu_check [--budget-s 400] [--parts tune,correctness,...] [--out DIR]
    python -m bench.gpu_check --dry-run      # any machine, no GPU: every part on CPU, tiny (1-2 minutes)

Parts, in this order:

- tune: the tile configurations (`bench.tune`) when ``cattn/configs`` has no file for this GPU, written
  there and into the results folder.
- correctness: every kernel against the float64 reference on the GPU, on shapes the interpreter cannot
  reach (`bench.gpu_correctness`).
- benchmarks: `bench.kernels` on the shapes of the GPU notes, those of the performance goals first.
- ttft: time to first token after 4K/16K/32K tokens of history on a Llama-3-8B-shaped model, recomputed,
  resident, the buffer rule's first layers resident and the rest streamed, and all streamed from DRAM
  (`bench.ttft`, in its own process, so that its 16 GB model and pinned pool leave with it).
- ttft_disk: the same with the history on disk only, read whole or one layer at a time behind the
  prefill (`bench.ttft_disk`, in its own process).
- pytest: the kernel test files under pytest on the GPU (CATTN_TEST_DEVICE=cuda).

Then the tables. Time: each part has a limit (``--<part>-budget-s``; 0 leaves the part out) and all of
them one more (``--budget-s``); a part stops itself at its limit or is stopped there, and the run prints
each part as it starts, with the time elapsed and the most that is left. The defaults (400 s in all)
fit 8 minutes on an H100 as on an H200, tuning included: limits are times, so a slower card measures
less (fewer tuning candidates, fewer histories), never longer.

Before any part, the run checks that it can write its JSON (``--out``, else ``$OUT``, else the results
folder of `bench.common.results_dir`, never the source tree) and, when it will tune, the tuned file in
``cattn/configs``; it stops at once, saying which folder, otherwise. Each part runs even if an earlier one
failed; ``gpu_check.json`` holds each part's status ("ok", or "failed" with its error: it raised, ran out
of time, or a check of its own failed), what it measured and its seconds, rewritten after every part, so
a run cut short still leaves what it measured.

``--dry-run`` runs the same lines on CPU: the kernels under Triton's interpreter (set before triton is
imported), tiny shapes, cases and budgets, the tuning gate's sm_90 compiles of the rule's configurations,
the TTFT runs ``--quick``, one kernel test. It writes its JSON and tuned file into a new temporary folder
(or ``--out``), never the source tree; `make test` runs it (tests/bench/test_gpu_check.py). Only the
GPU's own calls stay untried: FlexAttention compiled for the GPU and timing by CUDA events (do_bench).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Before triton is imported: the GPU run times compiled kernels (a leftover TRITON_INTERPRET=1 would
    # time the interpreter); the dry run runs them under the interpreter. Imported (by a test, or in the
    # workers of a part), the setting of the importing process stands.
    os.environ["TRITON_INTERPRET"] = "1" if "--dry-run" in sys.argv[1:] else "0"

if __package__ in (None, ""):   # run by path (python bench/gpu_check.py): import `bench` as `python -m` does
    import pathlib
    # the checkout's root, and not bench/ itself: bench/kernels.py would shadow the `kernels` package
    here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != here]

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import cattn.launch  # noqa: E402,F401  (imports triton and the kernels now, under the setting above)
# Not bench.ttft or bench.ttft_disk: they run in processes of their own, so that a store or HF module
# that fails to import fails those two parts only.
from bench import gpu_correctness, kernels  # noqa: E402
from bench.common import REPO, device_name, format_table, results_dir, write_json  # noqa: E402
from cattn import configs  # noqa: E402
from cattn.ops import interpreting  # noqa: E402

PARTS = ("tune", "correctness", "benchmarks", "ttft", "ttft_disk", "pytest")
# Seconds each part may take at most, and all of them together. On the GPU the parts' limits sum to
# 380 s and the run stops starting parts at 400 s; with Python's start (about 15 s) and one step running
# past its part's limit (a benchmark method's first compile, about 30 s), the run ends within 8 minutes.
GPU_BUDGETS = {"total": 400, "tune": 60, "correctness": 80, "benchmarks": 70, "ttft": 70, "ttft_disk": 55,
               "pytest": 45}
# The dry run's parts take 5 to 25 s each on 2 busy cores; its limits only catch a hang.
DRY_BUDGETS = {"total": 300, "tune": 90, "correctness": 60, "benchmarks": 60, "ttft": 60, "ttft_disk": 60,
               "pytest": 60}
MIN_PART_S = 5          # a part is not started with less time left than this
CHILD_START_S = 25      # a TTFT process's imports before its own clock, and its last history's overrun
DRY_SHAPES = [kernels.Shape("extend q16 kv64", 1, 16, 64), kernels.Shape("decode B1 kv64", 1, 1, 64)]
KERNEL_TESTS = ["tests/kernels/test_write_kv.py", "tests/kernels/test_paged_attention.py",
                "tests/kernels/test_window_softcap.py", "tests/kernels/test_strided_indices.py"]
DRY_TESTS = ["tests/kernels/test_write_kv.py::test_no_tokens_is_a_no_op"]

# The performance goals, set on an H200: (shape, metric, floor, peers cattn must beat).
# The floor of the extend shape is FlexAttention's H200 figure; this run's flex row is printed beside it.
GOALS = [("extend q512 kv16K", "tflops", 420.0, ("unfused", "flex")),
         ("decode B32 kv16K", "gbps", 3600.0, ("flex",)),
         ("decode B8 kv64K", "gbps", 3600.0, ("flex",))]


@dataclass
class Setup:
    dry: bool
    device: torch.device
    out_dir: Path           # the JSON, the benchmarks' files and a copy of the tuned file
    config_dir: Path        # where the tuned file is looked for and written: cattn/configs on the GPU
    workers: int


# ---- the parts: each takes the seconds it may use and returns what it measured ("error" if it failed) --

def tune_part(s: Setup, limit: float) -> dict:
    """Tune this GPU's configurations first, unless it has a tuned file already."""
    from bench import tune

    path = s.config_dir / configs.device_file_name(device_name(s.device))
    if path.exists():
        return {"skipped": f"{path} exists"}
    tiny = {"prefill": DRY_SHAPES[:1], "decode": DRY_SHAPES[1:]} if s.dry else None
    payload = tune.run(limit, [s.config_dir, s.out_dir], s.workers, device=s.device, shapes=tiny,
                       limit=1 if s.dry else None)
    return {"file": str(path), "prefill": payload.get("prefill"), "decode": payload.get("decode"),
            "timings": payload["timings"]}


def correctness_part(s: Setup, limit: float) -> dict:
    cases = gpu_correctness.DRY_CASES if s.dry else gpu_correctness.CASES
    return gpu_correctness.correctness(s.device.type, s.workers, cases, limit)


def benchmarks_part(s: Setup, limit: float) -> dict:
    goals = {shape for shape, *_ in GOALS}
    shapes = DRY_SHAPES if s.dry else sorted(kernels.GPU_SHAPES, key=lambda shape: shape.name not in goals)
    timings = kernels.run(shapes, device=s.device, backend="triton", deadline=time.monotonic() + limit)
    name = f"kernels_{kernels.device_slug()}.json"
    write_json(name, timings, path=s.out_dir / name)
    return timings


def _text(out) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def module_part(s: Setup, module: str, json_name: str, limit: float, *args: str) -> dict:
    """``python -m module *args`` in its own process, killed after ``limit``; what it wrote to
    ``json_name`` (rewritten after each history) comes back."""
    out = s.out_dir / json_name
    out.unlink(missing_ok=True)
    env = dict(os.environ, OUT=str(s.out_dir))          # its results folder is ours
    try:
        run = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=limit)
        result = {"returncode": run.returncode, "tail": (run.stdout + run.stderr).strip().splitlines()[-20:]}
    except subprocess.TimeoutExpired as exc:
        result = {"returncode": None, "tail": _text(exc.stdout).strip().splitlines()[-20:],
                  "error": f"killed after {limit:.0f} s"}
    report = json.loads(out.read_text()) if out.exists() else {}
    if "error" not in result and "wall_s" not in report:       # it ended before its last write
        result["error"] = f"exited with {result['returncode']} before it finished {json_name}"
    return {**result, "rows": report.get("rows", []), "skipped": report.get("skipped", []),
            "host_to_device_bytes_per_s": report.get("host_to_device_bytes_per_s")}


def ttft_part(s: Setup, limit: float) -> dict:
    """`bench.ttft`: it starts no history that would end past its budget, and is killed at ``limit``."""
    own = str(int(limit - CHILD_START_S))
    if s.dry:
        return module_part(s, "bench.ttft", "ttft_quick.json", limit, "--quick", "--repeats", "1", "--budget-s", own)
    return module_part(s, "bench.ttft", "ttft.json", limit, "--budget-s", own)


def ttft_disk_part(s: Setup, limit: float) -> dict:
    """`bench.ttft_disk`: a history on disk only, read whole or layer by layer (the shortest first)."""
    own = str(int(limit - CHILD_START_S))
    if s.dry:
        return module_part(s, "bench.ttft_disk", "ttft_disk_quick.json", limit, "--quick", "--repeats", "1",
                           "--budget-s", own)
    return module_part(s, "bench.ttft_disk", "ttft_disk.json", limit, "--repeats", "2", "--budget-s", own)


def pytest_progress(out: str) -> dict:
    """The results ``pytest -q`` printed so far (its lines of ``.sxXFE``), for a run stopped at its limit."""
    marks = "".join(re.findall(r"^([.sxXFE]+)(?:\s+\[\s*\d+%\])?\s*$", out, re.M))
    return {"passed": marks.count("."), "failed": marks.count("F") + marks.count("E")}


def pytest_part(s: Setup, limit: float) -> dict:
    """The kernel test files on this device (on CPU, one test under the interpreter). Stopped at its
    limit, it is ok if the tests that ran passed: the GPU run gives it what the other parts left."""
    env = dict(os.environ, CATTN_TEST_DEVICE=s.device.type, TRITON_INTERPRET="1" if s.dry else "0",
               PYTHONUNBUFFERED="1")                  # its progress must reach us before a kill
    # -q once, whatever the project's addopts say: twice hides the summary line ("N passed in ...")
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider",
           *(DRY_TESTS if s.dry else KERNEL_TESTS)]
    try:
        run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as exc:
        done = pytest_progress(_text(exc.stdout))
        result = {"returncode": None, "tail": _text(exc.stdout).splitlines()[-10:], **done,
                  "summary": f"stopped at its limit ({limit:.0f} s): {done['passed']} passed, "
                             f"{done['failed']} failed, the rest not run"}
        if done["failed"] or not done["passed"]:
            result["error"] = result["summary"]
        return result
    tail = (run.stdout + run.stderr).strip().splitlines()
    result = {"returncode": run.returncode, "summary": tail[-1] if tail else "", "tail": tail[-30:]}
    if run.returncode != 0:
        result["error"] = result["summary"] or f"pytest exited with {run.returncode}"
    return result


PART_FUNCTIONS = {"tune": tune_part, "correctness": correctness_part, "benchmarks": benchmarks_part,
                  "ttft": ttft_part, "ttft_disk": ttft_disk_part, "pytest": pytest_part}


# ---- the run ------------------------------------------------------------------------------------------

def unwritable(folder: Path) -> str | None:
    """Why no file can be written into ``folder`` (created if missing), or None: found by writing one."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".gpu_check-"):
            pass
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def run_parts(s: Setup, plan: list[str], budgets: dict, report: dict) -> None:
    """Each part of ``plan`` in turn, within its limit and what is left of the total; the JSON is
    rewritten after each."""
    start = time.monotonic()
    for i, name in enumerate(plan):
        elapsed = time.monotonic() - start
        left = budgets["total"] - elapsed
        most = max(0.0, min(left, sum(budgets[p] for p in plan[i:])))
        print(f"== [{i + 1}/{len(plan)}] {name}: {elapsed:.0f} s elapsed, at most {most:.0f} s left", flush=True)
        limit = min(budgets[name], left)
        t0 = time.monotonic()
        if limit < MIN_PART_S:
            entry = {"status": "failed", "error": f"not started: {max(left, 0):.0f} s left of --budget-s"}
        else:
            try:
                result = PART_FUNCTIONS[name](s, limit)
                entry = {"status": "failed" if "error" in result else "ok", **result}
            except Exception:  # noqa: BLE001 - one failing part must not stop the others
                entry = {"status": "failed", "error": traceback.format_exc()[-2000:]}
        entry["wall_s"] = round(time.monotonic() - t0, 1)
        report["parts"][name] = entry
        print(f"   {name}: {entry['status']} in {entry['wall_s']:.0f} s"
              + (f": {entry['error'].strip().splitlines()[-1]}" if "error" in entry else ""), flush=True)
        write_json("gpu_check.json", report, path=s.out_dir / "gpu_check.json")
    report["wall_s"] = round(time.monotonic() - start, 1)
    write_json("gpu_check.json", report, path=s.out_dir / "gpu_check.json")


def goal_lines(rows: list[dict]) -> list[str]:
    lines = []
    for shape, metric, floor, must_beat in GOALS:
        value = {r["method"]: r.get(metric) for r in rows if r["shape"] == shape}
        ours = value.get("cattn")
        if ours is None:
            verdict = "n/a (cattn did not run)" if value else "n/a (shape not measured)"
        else:
            met = ours >= floor and all(value.get(p) is None or ours > value[p] for p in must_beat)
            verdict = "met" if met else "NOT met"
        peers = ", ".join(f"{m} {v:.0f}" for m, v in value.items() if m != "cattn" and v is not None)
        lines.append(f"goal {shape}: cattn {ours or 0:.0f} {metric}, floor {floor:.0f}, beat {', '.join(must_beat) or '-'} "
                     f"[{peers}]: {verdict}")
    return lines


def print_summary(report: dict, out_dir: Path) -> None:
    parts = report["parts"]
    print("\nparts: " + ", ".join(f"{name} {entry['status']}" for name, entry in parts.items()))
    checks = parts.get("correctness")
    if checks is not None:
        print(f"correctness: {checks.get('passed', 0)} ok, {checks.get('failed', 'n/a')} failed")
        for row in checks.get("rows", []):
            if not row["ok"]:
                print(f"  FAIL {row}")
    if "pytest" in parts:
        print(f"pytest on {report['device']}: {parts['pytest'].get('summary', parts['pytest'].get('error'))}")
    print(f"total {report.get('wall_s', 0):.0f} s; JSON in {out_dir}\n")
    timings = parts.get("benchmarks")
    if timings is not None and "rows" in timings:
        for line in goal_lines(timings["rows"]):
            print(line)
        print(format_table(timings["rows"], kernels.COLUMNS))
    elif timings is not None:
        print("benchmarks failed:\n" + timings.get("error", ""))
    for name, title in (
            ("ttft", "TTFT, 256 new tokens after a history (Llama-3-8B shape, bf16; target: (c) within 10% of "
                     "max((b), copy)):"),
            ("ttft_disk", "TTFT after a history on disk only (target: (f) layer-wise within 10% of the reach and "
                          "at most (e)):")):
        if name in parts:
            print("\n" + title)
            if parts[name].get("rows"):     # measured, so its module imports: its own table's columns
                print(format_table(parts[name]["rows"], importlib.import_module(f"bench.{name}").COLUMNS))
            else:
                print("\n".join(parts[name].get("tail", [])) or parts[name].get("error", ""))


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every part on CPU with tiny shapes and budgets, "
                        "the kernels under Triton's interpreter: that the GPU run's lines run")
    parser.add_argument("--out", help="folder for the JSON (default: $OUT or the results folder; "
                                      "for --dry-run a new temporary folder)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"seconds for all parts (default {GPU_BUDGETS['total']}; no part starts after)")
    for name in PARTS:
        parser.add_argument(f"--{name.replace('_', '-')}-budget-s", dest=f"{name}_budget_s", type=float,
                            default=None, help=f"limit of {name} (default {GPU_BUDGETS[name]}; 0 leaves it out)")
    parser.add_argument("--skip-pytest", action="store_true", help="leave out the kernel tests (--pytest-budget-s 0)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes for the tuning gate and the correctness checks (default: min(8, CPUs); "
                             "dry run 2)")
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}; the parts are {', '.join(PARTS)}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.dry_run and not interpreting():
        print("gpu_check --dry-run runs the kernels under Triton's interpreter: set TRITON_INTERPRET=1 before "
              "triton is imported (`python -m bench.gpu_check --dry-run` does).")
        return 2
    if not args.dry_run and (not torch.cuda.is_available() or interpreting()):
        print("gpu_check times compiled kernels on a CUDA GPU (and TRITON_INTERPRET unset); without one, "
              "`python -m bench.gpu_check --dry-run` runs every part on CPU.")
        return 2
    budgets = dict(DRY_BUDGETS if args.dry_run else GPU_BUDGETS)
    budgets["total"] = args.budget_s if args.budget_s is not None else budgets["total"]
    for name in PARTS:
        chosen = getattr(args, f"{name}_budget_s")
        budgets[name] = chosen if chosen is not None else budgets[name]
    if args.skip_pytest:
        budgets["pytest"] = 0
    plan = [p for p in PARTS if p in args.parts.split(",") and budgets[p] > 0]
    device = torch.device("cpu" if args.dry_run else "cuda")

    # Where everything goes, tried before the first part: a run that cannot keep its results must not start.
    try:
        if args.dry_run:
            out_dir = Path(args.out or tempfile.mkdtemp(prefix="cattn-gpu-check-dry-run-"))
        else:
            out_dir = Path(args.out) if args.out else results_dir()
    except OSError as exc:
        print(f"gpu_check: cannot create the results folder: {exc}; name a writable one with --out or $OUT.")
        return 2
    config_dir = out_dir / "configs" if args.dry_run else configs.HERE
    folders = [(out_dir, "the JSON (--out or $OUT)")]
    if "tune" in plan and not (config_dir / configs.device_file_name(device_name(device))).exists():
        folders.append((config_dir, "the tuned configuration (cattn/configs; --tune-budget-s 0 skips tuning)"))
    for folder, what in folders:
        if (why := unwritable(folder)) is not None:
            print(f"gpu_check: cannot write {what} into {folder}: {why}. Nothing was run.")
            return 2

    workers = args.workers or (2 if args.dry_run else min(8, os.cpu_count() or 1))
    s = Setup(args.dry_run, device, out_dir, config_dir, workers)
    report: dict = {"dry_run": args.dry_run, "device": device_name(device), "budgets": budgets,
                    "left_out": [p for p in PARTS if p not in plan], "parts": {}}
    print(f"gpu_check{' --dry-run' if args.dry_run else ''} on {report['device']}: {', '.join(plan)}; "
          f"at most {min(budgets['total'], sum(budgets[p] for p in plan)):.0f} s; JSON into {out_dir}", flush=True)
    run_parts(s, plan, budgets, report)
    print_summary(report, out_dir)
    return 0 if all(report["parts"][p]["status"] == "ok" for p in plan) else 1


if __name__ == "__main__":
    sys.exit(main())
