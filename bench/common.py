"""What every benchmark script shares: where results go, what they record about the machine, tables.

Every script runs both ways, ``python bench/kernels.py`` and ``python -m bench.kernels``. Results go
to the folder ``--out`` names, else `results_dir`: never into the source tree by default (the
committed ``bench/results/`` are refreshed only on purpose, ``--out bench/results/<name>.json``).
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

import cattn.apps.results

REPO = Path(__file__).resolve().parents[1]


def results_dir() -> Path:
    """``$OUT`` when set (a GPU job collects its files there), else `cattn.apps.results.results_dir`:
    ``$CATTN_RESULTS_DIR``, ``./cattn-results``, or the user cache folder inside the source tree."""
    return cattn.apps.results.results_dir(os.environ.get("OUT") or None)


def device_name(device: torch.device) -> str:
    """The GPU's name (``"NVIDIA H100 80GB HBM3"``), or ``"cpu"``: what a result or a tuned file is named after."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def environment() -> dict:
    """Provenance (cattn version, git commit, timestamp), device name and library versions, recorded
    with every result."""
    import triton

    env = {**cattn.apps.results.provenance(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, sm=f"{props.major}.{props.minor}", num_sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    else:
        env["device"] = "cpu"
    return env


def write_json(name: str, payload: dict, path: Path | None = None) -> Path:
    """Write ``payload`` plus the environment to ``path`` (default ``results_dir() / name``)."""
    path = Path(path) if path else results_dir() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2, default=str) + "\n")
    return path


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Rows as an aligned text table; ``columns`` are (key, header, format spec). Missing values print
    as 'n/a'."""
    def cell(row, key, spec):
        value = row.get(key)
        return "n/a" if value is None else format(value, spec)

    body = [[cell(r, key, spec) for key, _, spec in columns] for r in rows]
    headers = [h for _, h, _ in columns]
    widths = [max(len(h), *(len(line[i]) for line in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for line in body:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    return "\n".join(lines)
