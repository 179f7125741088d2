"""The disk tier: chunk files and manifests in one directory per session.

Layout under ``root``::

    .lock                                      held (flock) by the one process using the directory
    <tenant>/<model>/<session>/<incarnation>.manifest
    <tenant>/<model>/<session>/<chunk id>.kv

Names are validated (`check_name`), so a path never leaves ``root``. The manifest
is the commit point: chunk files are durable before a manifest names them, and
a chunk file is removed only after no committed manifest names it, so a crash at
any point leaves the previous history or the new one. `scan` rebuilds the index
at start-up and removes what an interrupted write or removal left behind.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import torch

from cattn.store import fileformat as ff
from cattn.store.base import EntryKey
from cattn.store.layout import KVLayout
from cattn.store.tier import StoredEntry


class DiskTier:
    """A `LowerTier` on a local directory; ``capacity`` is in bytes (the store keeps within it)."""

    def __init__(self, root: str | os.PathLike, capacity: int):
        if capacity <= 0:
            raise ValueError(f"disk capacity must be positive, got {capacity}")
        self.root, self.capacity = Path(root), capacity
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:   # read-only, not a directory, no permission: say so before anything is stored
            raise ValueError(f"root: the disk tier cannot write in {str(root)!r} ({exc.strerror or exc}); "
                             "give it a writable directory") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise RuntimeError(f"store directory {self.root} is in use by another process") from None
            raise

    def session_dir(self, key: EntryKey) -> Path:
        return self.root / key.tenant / key.model / key.session

    def scan(self) -> tuple[list[StoredEntry], int]:
        entries, bad = [], 0
        for session_dir in self.root.glob("*/*/*"):
            try:
                key = EntryKey(*session_dir.relative_to(self.root).parts)
            except ValueError:
                continue  # not a directory this store made
            entry, found_bad = self._scan_session(key, session_dir)
            bad += found_bad
            if entry is not None:
                entries.append(entry)
        return entries, bad

    def _scan_session(self, key: EntryKey, d: Path) -> tuple[StoredEntry | None, int]:
        found, bad = [], 0
        for path in d.glob("*.manifest"):
            try:
                meta = ff.read_manifest(path, key)
                if path.stem != meta["incarnation"] or any(
                        (d / f"{c}.kv").stat().st_size != nb for c, (_, nb) in meta["chunks"].items()):
                    raise ff.FormatError("manifest names missing or truncated chunk files")
            except (ff.FormatError, OSError):
                bad += 1
                continue
            found.append(StoredEntry(key, meta["layout"], meta["incarnation"], meta["created_ns"],
                                     meta["version"], meta["chunks"], meta["views"], path.stat().st_size))
        # Two incarnations only if a crash interrupted a delete: the newer one is the session.
        best = max(found, key=lambda e: (e.created_ns, e.version), default=None)
        keep = set() if best is None else {f"{best.incarnation}.manifest", *(f"{c}.kv" for c in best.chunks)}
        for path in d.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)
        if best is None:
            try:
                d.rmdir()
            except OSError:
                pass
        return best, bad

    def chunk_nbytes(self, key: EntryKey, layout: KVLayout, chunk_id: str, num_tokens: int) -> int:
        return ff.chunk_file_nbytes(key, layout, chunk_id, num_tokens)

    def write_chunk(self, key: EntryKey, layout: KVLayout, chunk_id: str, token_ids: torch.Tensor,
                    payload: torch.Tensor) -> int:
        return ff.write_chunk(self._make_dir(key) / f"{chunk_id}.kv", key, layout, chunk_id, token_ids, payload)

    def read_chunk(self, key: EntryKey, layout: KVLayout, chunk_id: str, num_tokens: int,
                   into: torch.Tensor | None = None) -> torch.Tensor:
        return ff.read_chunk(self.session_dir(key) / f"{chunk_id}.kv", key, layout, chunk_id, num_tokens, into)

    def write_manifest(self, key: EntryKey, incarnation: str, data: bytes) -> int:
        d = self._make_dir(key)
        ff.fsync_dir(d)   # the chunk files written since the last manifest: durable before it names them
        ff.write_atomic(d / f"{incarnation}.manifest", data)
        return len(data)

    def remove(self, key: EntryKey, incarnation: str, chunk_ids: list[str], manifest: bool) -> None:
        d = self.session_dir(key)
        if not d.is_dir():
            return
        if manifest and (d / f"{incarnation}.manifest").exists():
            (d / f"{incarnation}.manifest").unlink()
            ff.fsync_dir(d)
        for c in chunk_ids:
            (d / f"{c}.kv").unlink(missing_ok=True)
        # The directory stays (another incarnation may be writing into it); `scan` removes empty ones.

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def _make_dir(self, key: EntryKey) -> Path:
        d = self.session_dir(key)
        if not d.is_dir():
            # Each new level must be durable in its parent, or a crash could lose committed files with it.
            levels = ((self.root, key.tenant), (self.root / key.tenant, key.model), (d.parent, key.session))
            for parent, child in levels:
                if not (parent / child).is_dir():
                    (parent / child).mkdir(exist_ok=True)
                    ff.fsync_dir(parent)
        return d

