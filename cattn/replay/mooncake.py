"""Mooncake-style traces: one request per line, conversations inferred from shared block prefixes.

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48, ...]}

``timestamp`` is in milliseconds; ``input_length`` is the whole prompt (system prompt, history
and new message), ``output_length`` the answer; ``hash_ids`` name the prompt's blocks of 512
tokens (the last may be partial), two requests sharing a prefix of blocks sharing a prefix of ids.
The trace names no conversations: a request continues an earlier one when its blocks start with
all of that request's full blocks, and those go deeper than the prefix shared by many requests
(the system prompt). Of several such, the deepest wins; a request is continued at most once (a
second continuation starts a conversation of its own). The turn's new tokens are its prompt
minus the earlier turn's prompt and answer (at least one).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from cattn.replay.queue import Job
from cattn.replay.records import json_record, number_turns

BLOCK_TOKENS = 512
FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


def is_mooncake(record: dict) -> bool:
    return isinstance(record, dict) and "hash_ids" in record and "input_length" in record


def _parse(line: str, lineno: int, where: str) -> tuple[float, int, int, list]:
    rec, bad = json_record(line, lineno, where, FIELDS)
    ts = rec["timestamp"]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
        raise bad("timestamp must be a finite number of milliseconds >= 0")
    for f in ("input_length", "output_length"):
        if isinstance(rec[f], bool) or not isinstance(rec[f], int) or rec[f] < 0:
            raise bad(f"{f} must be an int >= 0")
    ids = rec["hash_ids"]
    if not isinstance(ids, list) or any(isinstance(h, (bool, float)) or not isinstance(h, (int, str)) for h in ids):
        raise bad("hash_ids must be a list of block ids (ints or strings)")
    if len(ids) != -(-rec["input_length"] // BLOCK_TOKENS):
        raise bad(f"hash_ids has {len(ids)} blocks for input_length {rec['input_length']} "
                  f"(expected ceil(input_length / {BLOCK_TOKENS}))")
    if rec["input_length"] + rec["output_length"] == 0:
        raise bad("a request needs at least one input or output token")
    return float(ts), rec["input_length"], rec["output_length"], ids


def conversations(requests: Sequence[tuple[float, int, int, list]], *, shared_min: int | None = None) -> list[Job]:
    """Jobs from ``(timestamp ms, input_length, output_length, hash_ids)`` requests, conversations inferred.

    Args:
        requests: in any order; served by timestamp (ties: given order).
        shared_min: a block prefix passed by at least this many requests is shared (a system
            prompt) and never identifies a conversation; default max(4, 1% of the requests).
    """
    order = sorted(range(len(requests)), key=lambda i: requests[i][0])
    if shared_min is None:
        shared_min = max(4, math.ceil(0.01 * len(requests)))
    # a trie of block ids: node -> [count of requests through it, children, mark]; the mark is the
    # (session, prompt + answer tokens) of a request whose full blocks end there and that no later
    # request has continued yet
    root: list = [0, {}, None]
    for i in order:
        node = root
        for h in requests[i][3]:
            node = node[1].setdefault(h, [0, {}, None])
            node[0] += 1
    t0 = requests[order[0]][0] if order else 0.0
    jobs, sessions = [], 0
    for i in order:
        ts, n_in, n_out, ids = requests[i]
        node, found, past_shared = root, None, False
        for h in ids:
            node = node[1][h]
            past_shared = past_shared or node[0] < shared_min
            if past_shared and node[2] is not None:
                found = node
        if found is not None:
            session, total = found[2]
            found[2] = None  # continued once; a second continuation is a conversation of its own
            new = max(1, n_in - total)
        else:
            session, new = f"m{sessions}", max(1, n_in)
            sessions += 1
        node = root
        for h in ids[:n_in // BLOCK_TOKENS]:
            node = node[1][h]
        if node is not root:
            node[2] = (session, n_in + n_out)
        jobs.append(Job(session, (ts - t0) / 1000.0, new, n_out))
    return number_turns(jobs)


def read_mooncake(path: str | Path, *, shared_min: int | None = None) -> list[Job]:
    """Parse a Mooncake-style JSON Lines trace into jobs (conversations inferred, see the module).
    Raises ValueError naming the file and line of a bad record."""
    path = Path(path)
    requests = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                requests.append(_parse(line, lineno, path.name))
    if not requests:
        raise ValueError(f"{path.name}: the trace holds no requests")
    return conversations(requests, shared_min=shared_min)


def write_mooncake(jobs: Sequence[Job], path: str | Path, *, system_tokens: int = 0) -> Path:
    """Write ``jobs`` (serving order) as a Mooncake-style trace: the first ``system_tokens`` of every
    first turn are a prompt all sessions share; a session's later prompts repeat its earlier blocks."""
    next_id, shared_ids = 0, []
    for _ in range(system_tokens // BLOCK_TOKENS):
        shared_ids.append(next_id)
        next_id += 1
    # session -> (block ids of its last prompt, that prompt's tokens, + its answer's)
    state: dict[str, tuple[list[int], int, int]] = {}
    with Path(path).open("w", encoding="utf-8") as f:
        for j in jobs:
            ids, prompt, total = state.get(j.session, (shared_ids, 0, 0))
            n_in = total + j.new_tokens
            keep = ids[:prompt // BLOCK_TOKENS] if total else shared_ids  # the full blocks stay the same
            blocks = list(keep[:n_in // BLOCK_TOKENS])
            while len(blocks) < -(-n_in // BLOCK_TOKENS):
                blocks.append(next_id)
                next_id += 1
            f.write(json.dumps(dict(timestamp=round(j.arrival * 1000, 3), input_length=n_in,
                                    output_length=j.output_tokens, hash_ids=blocks)) + "\n")
            state[j.session] = (blocks, n_in, n_in + j.output_tokens)
    return Path(path)
