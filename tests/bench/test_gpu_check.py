"""bench/gpu_check.py without a GPU: its dry run takes every part through the lines the GPU run takes
(the kernels under the interpreter), a part that breaks leaves the others running and recorded, and a
run that could not keep its results does not start."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench import gpu_check     # first: it imports triton under this suite's interpreter setting

REPO = Path(__file__).resolve().parents[2]


def snapshot() -> dict:
    """The files where a careless run would write: the tuned configurations, the benchmarks and their
    committed results, the kernel tests, and the repository root (a default results folder)."""
    found = {p.name: p.is_dir() or p.stat().st_mtime_ns for p in REPO.iterdir() if not p.name.startswith(".")}
    for folder in ("cattn/configs", "bench", "tests/kernels", "tests/bench"):
        found.update({str(p.relative_to(REPO)): p.stat().st_mtime_ns for p in (REPO / folder).rglob("*")
                      if p.is_file() and "__pycache__" not in p.parts})
    return found


def test_dry_run_runs_every_part_and_writes_only_where_asked(tmp_path):
    before = snapshot()
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}  # the command sets it
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(tmp_path)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["device"] == "cpu" and report["left_out"] == []
    assert {name: part["status"] for name, part in report["parts"].items()} == dict.fromkeys(gpu_check.PARTS, "ok")
    parts = report["parts"]
    assert set(parts["tune"]["timings"]) == {"prefill", "decode"} and parts["tune"]["prefill"]
    assert json.loads((tmp_path / "configs" / "cpu.json").read_text())["decode"]     # the tuned file, not in cattn/
    assert parts["correctness"]["passed"] == 2 * 3 * len(gpu_check.gpu_correctness.DRY_CASES)
    assert any(r["method"] == "cattn" and r["ms"] > 0 for r in parts["benchmarks"]["rows"])   # Triton, interpreted
    for name in ("ttft", "ttft_disk"):
        assert [r["history"] for r in parts[name]["rows"]] == [48, 160] and parts[name]["skipped"] == []
    assert "1 passed" in parts["pytest"]["summary"]
    assert {"kernels_cpu.json", "cpu.json", "ttft_quick.json", "ttft_disk_quick.json"} <= {
        p.name for p in tmp_path.iterdir()}
    assert "== [6/6] pytest:" in run.stdout and "s elapsed, at most" in run.stdout
    assert snapshot() == before


def test_a_broken_part_fails_alone_and_the_others_are_kept(tmp_path, monkeypatch, capsys):
    from bench import tune      # after gpu_check: importing it first would turn the interpreter off

    def broken(*args, **kwargs):
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(tune, "run", broken)
    monkeypatch.delenv("OUT", raising=False)
    code = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--parts", "tune,ttft"])
    assert code == 1
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert parts["tune"]["status"] == "failed" and "broken on purpose" in parts["tune"]["error"]
    assert parts["ttft"]["status"] == "ok"
    assert [r["history"] for r in parts["ttft"]["rows"]] == [48, 160]
    assert all(r["same_first_token"] and r["resident_ms"] > 0 for r in parts["ttft"]["rows"])
    out = capsys.readouterr().out
    assert "tune: failed" in out and "parts: tune failed, ttft ok" in out


def test_a_run_that_cannot_write_its_results_does_not_start(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "a-file" / "results")]) == 2
    assert "cannot write the JSON" in capsys.readouterr().out
    assert not (tmp_path / "a-file").is_dir()
    if not torch.cuda.is_available():
        assert gpu_check.main([]) == 2 and "--dry-run" in capsys.readouterr().out


def test_default_budgets_fit_eight_minutes():
    """The parts' limits within the total, and the total with Python's start and one step past its part's
    limit (about 45 s) within 8 minutes."""
    budgets = gpu_check.GPU_BUDGETS
    assert sum(v for k, v in budgets.items() if k != "total") <= budgets["total"] <= 8 * 60 - 60


def test_kernel_tests_stopped_at_their_limit_report_what_ran():
    out = "collected\n....F.s.                    [ 10%]\n..E\n"
    assert gpu_check.pytest_progress(out) == {"passed": 8, "failed": 2}
    assert gpu_check.pytest_progress("no tests ran in 0.01s\n") == {"passed": 0, "failed": 0}
