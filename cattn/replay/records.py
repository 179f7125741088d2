"""What both trace formats share: a JSON Lines record read with errors that name the file and line,
and the turns of each session numbered in serving order."""
from __future__ import annotations

import json
from collections.abc import Iterable

from cattn.replay.queue import Job


def json_record(line: str, lineno: int, where: str, fields: tuple[str, ...]):
    """``(record, bad)`` of one JSONL trace line holding ``fields``; ``bad(why)`` makes the ValueError that
    names the file and line (raised here for a line that is not such an object)."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{where}:{lineno}: {why}: {line.strip()[:120]!r}")

    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise bad(f"not JSON ({exc.msg})") from None
    if not isinstance(rec, dict):
        raise bad("expected a JSON object")
    missing = [f for f in fields if f not in rec]
    if missing:
        raise bad(f"missing field(s) {', '.join(missing)}")
    return rec, bad



def number_turns(jobs: Iterable[Job]) -> list[Job]:
    """The jobs in serving order (arrival, then given order), each with its turn index in its session."""
    ordered = sorted(jobs, key=lambda j: j.arrival)  # stable: ties keep their order
    seen: dict[str, int] = {}
    out = []
    for j in ordered:
        turn = seen.get(j.session, 0)
        seen[j.session] = turn + 1
        out.append(Job(j.session, j.arrival, j.new_tokens, j.output_tokens, turn))
    return out
