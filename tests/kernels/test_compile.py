"""The machine-code gate: every shipped kernel configuration (rule and tuned files) compiles for Hopper
(sm_90) as a real launch specialises it and passes `bench.sass.gate` (no spills or local memory, no
trigonometry, tensor-core work equal to the tile's, K/V by 16-byte cp.async); and the gate rejects a
deliberately bad configuration of each kind.

The interpreter this suite runs under never compiles, so compiles run in child processes
(`bench.compile_report`, which also prints the per-configuration table and the static estimates).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cattn.launch import shipped_configs

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, TRITON_INTERPRET="0")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("compile") / "compile_sm90.json"
    run = subprocess.run([sys.executable, "-m", "bench.compile_report", "--out", str(path)], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=1800)
    assert path.exists(), f"compile report did not run:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return json.loads(path.read_text())


def test_report_covers_every_shipped_configuration(report):
    names = [cfg.name for cfg in shipped_configs()]
    assert len(names) == len(set(names)), "configuration names must be unique"
    assert [row["name"] for row in report["configs"]] == names
    assert {cfg.kernel.__name__ for cfg in shipped_configs()} >= {
        "paged_prefill_kernel", "paged_decode_kernel", "merge_splits_kernel", "write_kv_kernel", "dequant_kv_kernel"}
    assert report["hints"] is True


def test_every_shipped_configuration_passes_the_gate(report):
    failed = {row["name"]: row["violations"] for row in report["configs"] if row["violations"]}
    assert not failed
    for row in report["configs"]:
        assert 0 < row["registers"] <= 255 and row["spill_stores"] == row["spill_loads"] == 0, row["name"]


def test_attention_configurations_use_tensor_cores_once_per_tile(report):
    """Every 16-bit attention configuration has key loops, HGMMA in prefill, and an estimate."""
    for row in report["configs"]:
        if row["kernel"] not in ("paged_prefill_kernel", "paged_decode_kernel") or "fp32" in row["name"]:
            continue
        assert row["key_loops"], row["name"]
        for loop in row["key_loops"]:
            ops = loop["tensor"]
            if row["kernel"] == "paged_prefill_kernel":
                assert ops and all(op.startswith("HGMMA") for op in ops), (row["name"], ops)
            assert not loop["mufu"].keys() - {"MUFU.EX2", "MUFU.RCP"}, (row["name"], loop["mufu"])
        assert row["estimate"]["estimate"] is True


def test_gate_rejects_each_bad_configuration():
    run = subprocess.run([sys.executable, "-m", "tests.kernels.gate_cases"], cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    verdicts = json.loads(run.stdout.strip().splitlines()[-1])
    assert any("tensor cores execute" in v and "1.50x" in v for v in verdicts["duplicated_qk"]), verdicts
    assert any("cp.async" in v or "narrower than 4 bytes" in v for v in verdicts["no_hints"]), verdicts
    assert any("trigonometry" in v and "sinf" in v for v in verdicts["trig"]), verdicts
    assert any("spills" in v for v in verdicts["spills"]), verdicts
    assert any("16-byte LDG" in v for v in verdicts["dequant_no_hints"]), verdicts
