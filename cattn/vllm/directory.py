"""`SessionDirectory`: what every worker of one engine holds, as the scheduler side knows it.

vLLM runs the connector's scheduler role in the engine core and one worker role per rank, each in a
process of its own under the multi-process executor, and each rank keeps its own shard of every
session (its KV heads) in a store of its own. The scheduler side must answer "how much of this prompt
is stored?" before any worker is asked, so it keeps the answer itself: a session is listed here,
with its token ids, once every rank reported its save done (vLLM's merged worker output), and
unlisted when any rank fails a save or a load of it. It is never trusted for correctness: each worker
checks the token ids of its own shard before it loads a byte, and a rank that cannot serve its shard
fails the request's blocks, which vLLM then recomputes on every rank. So a stale listing costs a
recompute, never wrong KV.

With a disk tier the listing is also written, one small record per session, under
``<disk_dir>/sessions/<tenant>/<model>/``, so a restarted engine on the same directory lists what
its workers' disk tiers hold (they write a saved session through a moment after its save; one
whose write a killed engine never finished is a miss, like any stale listing).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import xxhash

from cattn.store.contract import EntryKey
from cattn.store.lower.fileformat import write_atomic
from cattn.vllm.keys import CONTENT_PREFIX, block_chain

log = logging.getLogger(__name__)

RECORD_VERSION = 1


def _digest(token_ids: list[int]) -> str:
    return xxhash.xxh3_64_hexdigest(json.dumps(token_ids).encode())


class SessionDirectory:
    """Sessions stored on every rank, their token ids, and an index that finds content sessions.

    Args:
        model: the engine's model fingerprint (it covers the TP size and vLLM's version).
        block_size: vLLM's block size; content sessions are indexed by chained block digests.
        records: where listings are written and read back at start-up, or None (DRAM-only store).
    """

    def __init__(self, model: str, block_size: int, records: Path | None):
        self.model, self.block_size, self.records = model, block_size, records
        self._tokens: dict[EntryKey, list[int]] = {}
        # (tenant, chain digest) -> content session: any prompt whose block chain reaches a stored
        # session's digest finds it. Verified against the listed tokens before use.
        self._index: dict[tuple[str, int], str] = {}
        if records is not None:
            self._read_records()

    def tokens(self, key: EntryKey) -> list[int] | None:
        return self._tokens.get(key)

    def find(self, tenant: str, prompt: list[int]) -> str | None:
        """The content session whose indexed blocks cover the longest prefix of ``prompt``."""
        for digest in reversed(block_chain(prompt, self.block_size)):
            session = self._index.get((tenant, digest))
            if session is not None:
                return session
        return None

    def index(self, key: EntryKey, token_ids: list[int]) -> None:
        """Make a content session findable by the blocks of ``token_ids`` (before its save is done:
        the next turn then finds it and waits for the save)."""
        if key.session.startswith(CONTENT_PREFIX):
            for digest in block_chain(token_ids, self.block_size):
                self._index[(key.tenant, digest)] = key.session

    def put(self, key: EntryKey, token_ids: list[int]) -> None:
        """Every rank holds ``key`` with ``token_ids`` now."""
        tokens = plain_ints(token_ids)
        self._tokens[key] = tokens
        self.index(key, tokens)
        if self.records is not None:
            record = dict(version=RECORD_VERSION, tokens=tokens, digest=_digest(tokens))
            path = self._record_path(key)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, json.dumps(record).encode())
            except OSError as exc:   # the listing still holds in memory; a restart will miss it
                log.warning("cattn: cannot write the listing of session %r (%s)", key.session, exc)

    def drop(self, key: EntryKey) -> None:
        """Some rank no longer holds ``key`` (or never will): unlisted; its next request recomputes
        and saves it whole again. Index entries pointing to it stay and find nothing listed."""
        self._tokens.pop(key, None)
        if self.records is not None:
            self._record_path(key).unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._tokens)

    def _record_path(self, key: EntryKey) -> Path:
        return self.records / key.tenant / key.model / f"{key.session}.json"

    def _read_records(self) -> None:
        """List the sessions recorded for this model (a record that does not check out is skipped)."""
        for path in sorted(self.records.glob(f"*/{self.model}/*.json")):
            try:
                key = EntryKey(path.parent.parent.name, self.model, path.stem)
                record = json.loads(path.read_bytes())
                tokens = record["tokens"]
                if (record.get("version") != RECORD_VERSION or not isinstance(tokens, list)
                        or not all(isinstance(t, int) for t in tokens) or record.get("digest") != _digest(tokens)):
                    raise ValueError("not a session record of this version, or its digest does not match")
            except (ValueError, KeyError, TypeError, OSError) as exc:
                log.warning("cattn: session record %s skipped (%s)", path.name, exc)
                continue
            self._tokens[key] = tokens
            self.index(key, tokens)


def plain_ints(token_ids: list[int]) -> list[int]:
    """Token ids as plain ints (vLLM may hand numpy or array integers)."""
    return [int(t) for t in token_ids]
