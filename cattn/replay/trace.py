"""Trace files: one turn per line, JSON Lines.

    {"session": "c17", "arrival": 12.5, "new_tokens": 95, "output_tokens": 350}

``arrival`` is in seconds from the start of the trace; ``new_tokens`` are the
user's new message, ``output_tokens`` the model's answer. A session's turns
are numbered in arrival order (ties: file order). Both replay modes read the
same format; a bad line is reported with its file name and line number. `read_trace` also
reads Mooncake-style traces (`cattn.replay.mooncake`), told apart by their first record.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

from cattn.replay.mooncake import is_mooncake, read_mooncake
from cattn.replay.queue import Job
from cattn.replay.records import json_record, number_turns

FIELDS = ("session", "arrival", "new_tokens", "output_tokens")


def _parse(line: str, lineno: int, where: str) -> Job:
    rec, bad = json_record(line, lineno, where, FIELDS)
    session, arrival = rec["session"], rec["arrival"]
    if not isinstance(session, str) or not session:
        raise bad("session must be a non-empty string")
    if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not math.isfinite(arrival) or arrival < 0:
        raise bad("arrival must be a finite number of seconds >= 0")
    for f in ("new_tokens", "output_tokens"):
        if isinstance(rec[f], bool) or not isinstance(rec[f], int) or rec[f] < 0:
            raise bad(f"{f} must be an int >= 0")
    if rec["new_tokens"] + rec["output_tokens"] == 0:
        raise bad("a turn needs at least one new or output token")
    return Job(session, float(arrival), rec["new_tokens"], rec["output_tokens"])


TRACE_FORMATS = ("auto", "cattn", "mooncake")


def read_trace(path: str | Path, format: str = "auto") -> list[Job]:
    """Parse a JSON Lines trace; blank lines are skipped. Raises ValueError naming the file and the bad line.

    Args:
        path: the file.
        format: ``"cattn"`` (the format above), ``"mooncake"`` (`cattn.replay.mooncake`), or ``"auto"``:
            Mooncake if the first record has ``hash_ids`` and ``input_length``.
    """
    if format not in TRACE_FORMATS:
        raise ValueError(f"format must be one of {TRACE_FORMATS}, got {format!r}")
    path = Path(path)
    if format == "auto":
        with path.open(encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        try:
            format = "mooncake" if first and is_mooncake(json.loads(first)) else "cattn"
        except json.JSONDecodeError:
            format = "cattn"  # reported with its line below
    if format == "mooncake":
        return read_mooncake(path)
    jobs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                jobs.append(_parse(line, lineno, path.name))
    if not jobs:
        raise ValueError(f"{path.name}: the trace holds no turns")
    return number_turns(jobs)


def write_trace(jobs: Iterable[Job], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for j in jobs:
            f.write(json.dumps(dict(session=j.session, arrival=round(j.arrival, 6), new_tokens=j.new_tokens,
                                    output_tokens=j.output_tokens)) + "\n")
