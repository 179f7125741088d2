"""Every shipped kernel configuration compiles for Hopper (sm_90) on this machine, GPU or not, and none
spills registers to local memory.

The interpreter this suite runs under never compiles, so the compile runs in a child process
(`bench.compile_report`, which also prints the per-configuration table) with it switched off.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cattn.launch import shipped_configs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("compile") / "compile_sm90.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-m", "bench.compile_report", "--out", str(path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert path.exists(), f"compile report did not run:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return json.loads(path.read_text())


def test_report_covers_every_shipped_configuration(report):
    names = [cfg.name for cfg in shipped_configs()]
    assert len(names) == len(set(names)), "configuration names must be unique"
    assert [row["name"] for row in report["configs"]] == names
    assert {cfg.kernel.__name__ for cfg in shipped_configs()} >= {
        "paged_prefill_kernel", "paged_decode_kernel", "merge_splits_kernel", "write_kv_kernel"}


def test_every_configuration_compiles_for_sm90(report):
    failed = {row["name"]: row["error"] for row in report["configs"] if row["error"]}
    assert not failed
    for row in report["configs"]:
        assert row["registers"] and 0 < row["registers"] <= 255, row
        assert row["shared_bytes"] >= 0


def test_no_configuration_spills(report):
    """Every shipped configuration is one the launchers pick on Hopper: none may spill."""
    spilling = {row["name"]: (row["registers"], row["spill_stores"], row["spill_loads"])
                for row in report["configs"] if row["spill_stores"] or row["spill_loads"]}
    assert not spilling, f"(registers, spill store bytes, spill load bytes): {spilling}"
