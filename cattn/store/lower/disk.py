"""The disk tier: chunk files and manifests in one directory per session.

Layout under ``root``::

    .lock                                      held (flock) by the one process using the directory
    <tenant>/<model>/<session>/<incarnation>.manifest
    <tenant>/<model>/<session>/<chunk id>.kv

Every public method takes an `EntryKey` only and re-checks its fields (`check_key`), and chunk ids and
incarnations must be 16 hex digits, so a path never leaves ``root``. The manifest
is the commit point: chunk files are durable before a manifest names them, and
a chunk file is removed only after no committed manifest names it, so a crash at
any point leaves the previous history or the new one. `scan` rebuilds the index
at start-up and removes what an interrupted write or removal left behind.

What `scan` cannot use and did not make (a subdirectory in a session directory, a regular file where
a directory belongs, a directory it may not read) is skipped, counted in ``skipped`` and logged, and
left in place: one damaged entry never keeps the store, or another tenant's sessions, from opening.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

import torch

from cattn.store.errors import FormatError
from cattn.store.lower import fileformat as ff
from cattn.store.contract import EntryKey, check_key, check_name
from cattn.store.layout import KVLayout
from cattn.store.lower.base import LowerTier, StoredEntry

log = logging.getLogger(__name__)


class DiskTier(LowerTier):
    """A `LowerTier` on a local directory; ``capacity`` is in bytes (the store keeps within it)."""

    reads_layers = True

    def __init__(self, root: str | os.PathLike, capacity: int):
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
            raise ValueError(f"disk capacity must be a positive int, got {capacity!r}")
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a path, got {type(root).__name__}")
        self.root, self.capacity = Path(root), capacity
        self.skipped = 0   # directory entries the last `scan` could not use and left in place
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
        check_key(key)
        return self.root / key.tenant / key.model / key.session

    def _file(self, key: EntryKey, name: str, suffix: str) -> Path:
        if not isinstance(name, str) or not ff.CHUNK_ID.fullmatch(name):
            raise ValueError(f"chunk ids and incarnations are 16 hex digits, got {name!r}")
        return self.session_dir(key) / f"{name}{suffix}"

    def scan(self) -> tuple[list[StoredEntry], int]:
        entries, bad, self.skipped, self.dropped = [], 0, 0, {}
        for tenant in self._subdirs(self.root):
            for model in self._subdirs(tenant):
                for session_dir in self._subdirs(model):
                    try:
                        key = EntryKey(*session_dir.relative_to(self.root).parts)
                    except ValueError:
                        continue  # not a directory this store made
                    entry, found_bad = self._scan_session(key, session_dir)
                    bad += found_bad
                    if entry is not None:
                        entries.append(entry)
        return entries, bad

    def _skip(self, path: Path, why: str) -> None:
        self.skipped += 1
        log.warning("store directory: skipped %s (%s)", path, why)

    def _subdirs(self, d: Path) -> list[Path]:
        """The directories in ``d`` whose names this store could have made; anything else of such a
        name is skipped (counted, logged). Names it could not have made are not its business."""
        try:
            with os.scandir(d) as it:
                found = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        except OSError as exc:
            self._skip(d, f"cannot list it: {exc.strerror or exc}")
            return []
        out = []
        for name, is_dir in sorted(found):
            try:
                check_name(name, "name")
            except ValueError:
                continue
            if is_dir:
                out.append(d / name)
            else:
                self._skip(d / name, "not a directory")
        return out

    def _scan_session(self, key: EntryKey, d: Path) -> tuple[StoredEntry | None, int]:
        try:
            with os.scandir(d) as it:
                listing = {e.name: e.is_file(follow_symlinks=False) for e in it}
        except OSError as exc:
            self._skip(d, f"cannot list it: {exc.strerror or exc}")
            return None, 0
        for name, is_file in listing.items():
            if not is_file:
                self._skip(d / name, "not a regular file")
        files = {name for name, is_file in listing.items() if is_file}
        found, bad = [], 0
        for name in sorted(files):
            if not name.endswith(".manifest"):
                continue
            path = d / name
            try:
                meta = ff.read_manifest(path, key)
                if path.stem != meta["incarnation"] or any(
                        f"{c}.kv" not in files or os.stat(d / f"{c}.kv").st_size != nb
                        for c, (_, nb) in meta["chunks"].items()):
                    raise FormatError("manifest names missing or truncated chunk files")
                nbytes = os.stat(path).st_size
            except (FormatError, OSError) as exc:
                bad += 1
                log.warning("session %r: manifest %s is unusable (%s); ignored", key.session, name, exc)
                why = f"its manifest {name} is unusable ({exc})"
                continue
            found.append(StoredEntry(key, meta["layout"], meta["incarnation"], meta["created_ns"],
                                     meta["version"], meta["chunks"], meta["views"], nbytes))
        # Two incarnations only if a crash interrupted a delete: the newer one is the session.
        best = max(found, key=lambda e: (e.created_ns, e.version), default=None)
        keep = set() if best is None else {f"{best.incarnation}.manifest", *(f"{c}.kv" for c in best.chunks)}
        for name in files - keep:
            try:
                (d / name).unlink(missing_ok=True)
            except OSError as exc:
                self._skip(d / name, f"cannot remove it: {exc.strerror or exc}")
        if best is None:
            if bad:
                log.warning("session %r of tenant %r: no usable manifest; dropped", key.session, key.tenant)
                self.dropped[key] = why
            try:  # fails, as it should, if something skipped above is still in it
                d.rmdir()
            except OSError:
                pass
        return best, bad

    def chunk_nbytes(self, key: EntryKey, layout: KVLayout, chunk_id: str, num_tokens: int) -> int:
        return ff.chunk_file_nbytes(key, layout, chunk_id, num_tokens)

    def write_chunk(self, key: EntryKey, layout: KVLayout, chunk_id: str, token_ids: torch.Tensor,
                    payload: torch.Tensor) -> int:
        path = self._file(key, chunk_id, ".kv")
        self._make_dir(key)
        return ff.write_chunk(path, key, layout, chunk_id, token_ids, payload)

    def read_chunk(self, key: EntryKey, layout: KVLayout, chunk_id: str, num_tokens: int,
                   into: torch.Tensor | None = None) -> torch.Tensor:
        return ff.read_chunk(self._file(key, chunk_id, ".kv"), key, layout, chunk_id, num_tokens, into)

    def open_layers(self, key: EntryKey, layout: KVLayout, chunk_id: str, num_tokens: int) -> ff.ChunkLayers | None:
        """The chunk open for layer-wise reads, or None if it can only be read whole (see `LowerTier`)."""
        return ff.open_chunk_layers(self._file(key, chunk_id, ".kv"), key, layout, chunk_id, num_tokens)

    def write_manifest(self, key: EntryKey, incarnation: str, data: bytes) -> int:
        path = self._file(key, incarnation, ".manifest")
        d = self._make_dir(key)
        ff.fsync_dir(d)   # the chunk files written since the last manifest: durable before it names them
        ff.write_atomic(path, data)
        return len(data)

    def remove(self, key: EntryKey, incarnation: str, chunk_ids: list[str], manifest: bool) -> None:
        manifest_path, chunk_paths = self._file(key, incarnation, ".manifest"), [self._file(key, c, ".kv")
                                                                                  for c in chunk_ids]
        d = manifest_path.parent
        if not d.is_dir():
            return
        if manifest and manifest_path.exists():
            manifest_path.unlink()
            ff.fsync_dir(d)
        for path in chunk_paths:
            path.unlink(missing_ok=True)
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

