"""The disk format: chunk files and manifests, each opened by one checksummed header frame.

Frame (little-endian)::

    magic b"CATTNKV\\0" | format version u32 | json length u32 | blob length u64 | json | blob | xxh3_64 u64

The checksum covers everything before it. A *chunk file* is a frame whose json
names the key, chunk id, token count, layout and the payload's xxh3_64, whose
blob is the token ids (int64), then zero padding to a 4096-byte boundary, then
the payload: ``k [L, m, Hkv, D]`` and ``v [L, m, Hkv, D]`` (an 8-bit layout: one block of codes and scales per
layer, `cattn.store.layout`), the bytes of the chunk's host pool extent. The header also holds one
xxh3_64 per layer, over that layer's runs of bytes (``k[l]`` then ``v[l]``, or its block), so that a layer can be read and vouched for alone (`ChunkLayers`: a
history streamed from disk layer by layer while the GPU computes). A *manifest* is a frame alone: the session's chunks
and the token ranges of them that make up its history, in order. A write goes
to a temporary file, is fsynced, renamed into place, and the directory fsynced,
so a reader sees the previous file or the new one, never a torn one.

Every byte of a file is vouched for: a manifest is its frame and nothing after it; a chunk file is its
frame, zero padding up to the payload offset the frame names (which must be the frame's length rounded
up to 4096), then exactly the payload its checksum covers. A byte anywhere else is a `FormatError`.

Anything that does not check out (magic, version, checksum, a field that names
another key or layout, a short file) raises `FormatError`: the caller reports a
miss, never the data.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import struct
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import xxhash

from cattn.store.contract import EntryKey
from cattn.store.errors import FormatError
from cattn.store.layout import KVLayout, align_up

MAGIC = b"CATTNKV\x00"
FORMAT_VERSION = 1
PAYLOAD_ALIGN = 4096
_PREFIX = struct.Struct("<8sIIQ")
_SUM = struct.Struct("<Q")
_MAX_JSON, _MAX_BLOB = 1 << 24, 1 << 32
CHUNK_ID = re.compile(r"[0-9a-f]{16}")


def new_id() -> str:
    """A fresh chunk or incarnation id: 16 random hex digits."""
    return secrets.token_hex(8)


def bytes_of(t: torch.Tensor) -> memoryview:
    """A writable memoryview of contiguous host tensor ``t``'s bytes (no copy; the view keeps ``t`` alive).

    Files hold these bytes as they are: the format is little-endian, like every host torch runs on."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("bytes_of needs a contiguous host tensor")
    raw = (ctypes.c_ubyte * t.nbytes).from_address(t.data_ptr())
    raw.tensor = t  # the memoryview holds `raw`, `raw` holds the tensor
    return memoryview(raw).cast("B")


def pack_frame(meta: dict, blob: bytes = b"") -> bytes:
    body = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(body), len(blob)) + body + blob
    return head + _SUM.pack(xxhash.xxh3_64_intdigest(head))


def read_frame(fd: int) -> tuple[dict, bytes, int]:
    """``(meta, blob, frame length)`` of the frame at the start of open file ``fd``."""
    prefix = os.pread(fd, _PREFIX.size, 0)
    if len(prefix) < _PREFIX.size:
        raise FormatError("file shorter than a header")
    magic, version, json_len, blob_len = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise FormatError(f"bad magic {magic!r}")
    if version != FORMAT_VERSION:
        raise FormatError(f"format version {version}, this build reads {FORMAT_VERSION}")
    if json_len > _MAX_JSON or blob_len > _MAX_BLOB:
        raise FormatError("header lengths out of range")
    rest = os.pread(fd, json_len + blob_len + _SUM.size, _PREFIX.size)
    if len(rest) < json_len + blob_len + _SUM.size:
        raise FormatError("header truncated")
    (stored,) = _SUM.unpack(rest[-_SUM.size:])
    if xxhash.xxh3_64_intdigest(prefix + rest[:-_SUM.size]) != stored:
        raise FormatError("header checksum mismatch")
    try:
        meta = json.loads(rest[:json_len])
    except ValueError as exc:
        raise FormatError(f"header json: {exc}") from None
    if not isinstance(meta, dict):
        raise FormatError("header json is not an object")
    return meta, rest[json_len:json_len + blob_len], _PREFIX.size + len(rest)


def _key_meta(key: EntryKey, layout: KVLayout, kind: str) -> dict:
    return dict(kind=kind, tenant=key.tenant, model=key.model, session=key.session, layout=layout.to_json())


def check_meta(meta: dict, key: EntryKey, layout: KVLayout | None, kind: str) -> KVLayout:
    """The layout a frame's ``meta`` names; `FormatError` if it names another kind, key or layout (than
    ``layout``, where given)."""
    for field, want in (("kind", kind), ("tenant", key.tenant), ("model", key.model), ("session", key.session)):
        if meta.get(field) != want:
            raise FormatError(f"{field} is {meta.get(field)!r}, expected {want!r}")
    try:
        found = KVLayout.from_json(meta["layout"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"layout: {exc!r}") from None
    if layout is not None and found != layout:
        raise FormatError(f"layout {found} differs from {layout}")
    return found


# ---- chunk files ------------------------------------------------------------------------------------

def _layer_sums(data: memoryview, layout: KVLayout, num_tokens: int) -> list[str]:
    """Per layer, the xxh3_64 of its runs of the payload (`KVLayout.layer_spans`), in order."""
    sums = []
    for spans in layout.layer_spans(num_tokens):
        h = xxhash.xxh3_64()
        for start, n in spans:
            h.update(data[start:start + n])
        sums.append(f"{h.intdigest():016x}")
    return sums


def _chunk_header(key, layout, chunk_id, token_ids: torch.Tensor, payload_sum: int,
                  layer_sums: list[str] | None = None) -> tuple[bytes, int]:
    m = token_ids.numel()
    meta = _key_meta(key, layout, "chunk") | dict(chunk=chunk_id, num_tokens=m, payload_offset=0,
                                                 payload_nbytes=layout.payload_nbytes(m),
                                                 payload_xxh3=f"{payload_sum:016x}",
                                                 layer_xxh3=layer_sums or ["0" * 16] * layout.num_layers)
    ids = bytes(bytes_of(token_ids.contiguous())) if m else b""
    # The payload offset is a field of the header it precedes: size the header with a placeholder at
    # least as wide as any real offset, then fill it in.
    offset = align_up(len(pack_frame(meta | dict(payload_offset=10**12), ids)), PAYLOAD_ALIGN)
    meta["payload_offset"] = offset
    return pack_frame(meta, ids), offset


def chunk_file_nbytes(key: EntryKey, layout: KVLayout, chunk_id: str, num_tokens: int) -> int:
    """The exact size of the chunk file `write_chunk` would write."""
    _, offset = _chunk_header(key, layout, chunk_id, torch.zeros(num_tokens, dtype=torch.int64), 0)
    return offset + layout.payload_nbytes(num_tokens)


def write_chunk(path: Path, key: EntryKey, layout: KVLayout, chunk_id: str, token_ids: torch.Tensor,
                payload: torch.Tensor) -> int:
    """Write a chunk file atomically (durable once its directory is fsynced); returns its size.

    Args:
        token_ids: ``[m] int64``, the chunk's tokens.
        payload: ``[layout.payload_nbytes(m)] uint8`` host bytes (a pool extent): k then v.
    """
    data = bytes_of(payload)
    # Checksum while the payload is written (xxhash releases the GIL); the header, whose length does
    # not depend on the checksum's value, is written last over its placeholder.
    m = token_ids.numel()
    checksum: list = []
    hasher = threading.Thread(target=lambda: checksum.extend(
        (xxhash.xxh3_64_intdigest(data), _layer_sums(data, layout, m))))
    hasher.start()
    try:
        placeholder, offset = _chunk_header(key, layout, chunk_id, token_ids, 0)
        with atomic_file(path, drop_cache=True, sync_dir=False) as fd:
            write_all(fd, placeholder + bytes(offset - len(placeholder)), 0)
            write_all(fd, data, offset)
            hasher.join()
            header, _ = _chunk_header(key, layout, chunk_id, token_ids, *checksum)
            write_all(fd, header, 0)
    finally:
        hasher.join()
    return offset + len(data)


def read_chunk(path: Path, key: EntryKey, layout: KVLayout, chunk_id: str, num_tokens: int,
               into: torch.Tensor | None = None) -> torch.Tensor:
    """The chunk's ``[num_tokens] int64`` token ids; with ``into`` (``[>= payload] uint8`` host bytes) also
    its payload, read straight into ``into`` and checksummed. Raises FormatError, OSError."""
    fd = os.open(path, os.O_RDONLY)
    try:
        meta, ids, offset = _open_chunk(fd, key, layout, chunk_id, num_tokens)
        if into is not None:
            _read_checksummed(fd, bytes_of(into[:layout.payload_nbytes(num_tokens)]), offset, meta.get("payload_xxh3"))
        return ids
    finally:
        os.close(fd)


def _open_chunk(fd: int, key: EntryKey, layout: KVLayout, chunk_id: str, num_tokens: int) -> tuple[dict, torch.Tensor, int]:
    """``(header meta, token ids, payload offset)`` of the chunk file open as ``fd``, once its header checks out."""
    meta, blob, frame_len = read_frame(fd)
    check_meta(meta, key, layout, "chunk")
    nbytes = layout.payload_nbytes(num_tokens)
    if meta.get("chunk") != chunk_id or meta.get("num_tokens") != num_tokens \
            or meta.get("payload_nbytes") != nbytes or len(blob) != 8 * num_tokens:
        raise FormatError(f"chunk header does not match chunk {chunk_id} of {num_tokens} tokens")
    offset = meta.get("payload_offset")
    if offset != align_up(frame_len, PAYLOAD_ALIGN) or os.fstat(fd).st_size != offset + nbytes:
        raise FormatError("chunk file size or payload offset does not match its header")
    if os.pread(fd, offset - frame_len, frame_len) != bytes(offset - frame_len):
        raise FormatError("chunk header padding is not zero")
    ids = torch.frombuffer(bytearray(blob), dtype=torch.int64) if num_tokens else torch.empty(0, dtype=torch.int64)
    return meta, ids, offset


class ChunkLayers:
    """A chunk file open for reading one layer at a time, its header checked (`open_chunk_layers`).

    ``token_ids``: ``[num_tokens] int64``. `read_layer` reads layer ``l``'s K and V into a payload buffer
    (``[>= payload] uint8`` host bytes laid out as the file's payload, e.g. the chunk's pool extent) and
    checks that layer's checksum; nothing else of the buffer is touched. Raises FormatError, OSError.
    """

    def __init__(self, fd: int, layout: KVLayout, num_tokens: int, ids: torch.Tensor, offset: int, sums: list[str]):
        self._fd, self.token_ids, self._offset, self._sums = fd, ids, offset, sums
        self._spans = layout.layer_spans(num_tokens)

    def read_layer(self, layer: int, into: torch.Tensor) -> None:
        view, h = bytes_of(into), xxhash.xxh3_64()
        for start, n in self._spans[layer]:
            part, done = view[start:start + n], 0
            while done < n:
                got = os.preadv(self._fd, [part[done:]], self._offset + start + done)
                if got == 0:
                    raise FormatError("chunk payload truncated")
                done += got
            h.update(part)
        if f"{h.intdigest():016x}" != self._sums[layer]:
            raise FormatError(f"chunk layer {layer} checksum mismatch")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def open_chunk_layers(path: Path, key: EntryKey, layout: KVLayout, chunk_id: str, num_tokens: int) -> ChunkLayers | None:
    """The chunk file at ``path`` open for layer-wise reads, or None if its header has no per-layer
    checksums (an earlier writer's file: read it whole). Raises FormatError, OSError."""
    fd = os.open(path, os.O_RDONLY)
    try:
        meta, ids, offset = _open_chunk(fd, key, layout, chunk_id, num_tokens)
        sums = meta.get("layer_xxh3")
        if sums is None:
            os.close(fd)
            return None
        if not (isinstance(sums, list) and len(sums) == layout.num_layers
                and all(isinstance(x, str) and re.fullmatch(r"[0-9a-f]{16}", x) for x in sums)):
            raise FormatError("chunk header's layer checksums are malformed")
        return ChunkLayers(fd, layout, num_tokens, ids, offset, sums)
    except BaseException:
        os.close(fd)
        raise


def _read_checksummed(fd: int, view: memoryview, offset: int, want: str | None, piece: int = 64 << 20) -> None:
    """Read ``len(view)`` bytes at ``offset`` into ``view``, checksumming each piece while the next one is
    read (xxhash releases the GIL)."""
    hasher, hashing = xxhash.xxh3_64(), threading.Thread(target=lambda: None)
    hashing.start()
    try:
        for start in range(0, len(view), piece):
            part, done = view[start:start + piece], 0
            while done < len(part):
                n = os.preadv(fd, [part[done:]], offset + start + done)
                if n == 0:
                    raise FormatError("chunk payload truncated")
                done += n
            hashing.join()
            hashing = threading.Thread(target=hasher.update, args=(part,))
            hashing.start()
    finally:
        hashing.join()
    if f"{hasher.intdigest():016x}" != want:
        raise FormatError("chunk payload checksum mismatch")


# ---- manifests --------------------------------------------------------------------------------------

def pack_manifest(key: EntryKey, layout: KVLayout, incarnation: str, created_ns: int, version: int,
                  chunks: Sequence[tuple[str, int, int]], views: Sequence[tuple[str, int, int]]) -> bytes:
    """A manifest: ``chunks`` as ``(id, num_tokens, file bytes)``, the history as ``views`` ``(id, lo, hi)``."""
    meta = _key_meta(key, layout, "manifest") | dict(
        incarnation=incarnation, created_ns=created_ns, version=version,
        num_tokens=sum(hi - lo for _, lo, hi in views), chunks=[list(c) for c in chunks],
        views=[list(v) for v in views])
    return pack_frame(meta)


def read_manifest(path: Path, key: EntryKey) -> dict:
    """The manifest's meta, its fields checked against ``key`` and each other. Raises FormatError, OSError."""
    fd = os.open(path, os.O_RDONLY)
    try:
        meta, _, frame_len = read_frame(fd)
        if os.fstat(fd).st_size != frame_len:
            raise FormatError("bytes after the manifest's frame")
    finally:
        os.close(fd)
    meta["layout"] = check_meta(meta, key, None, "manifest")
    return check_manifest_fields(meta)


def check_manifest_fields(meta: dict) -> dict:
    """``meta`` with its chunks as ``{id: (num_tokens, file bytes)}`` and views as ``[(id, lo, hi)]``, once
    they agree with each other (wherever the manifest was read from). Raises FormatError."""
    try:
        chunks = {c: (int(m), int(nb)) for c, m, nb in meta["chunks"]}
        views = [(c, int(lo), int(hi)) for c, lo, hi in meta["views"]]
        ok = (all(CHUNK_ID.fullmatch(c) for c in chunks) and CHUNK_ID.fullmatch(meta["incarnation"])
              and isinstance(meta["created_ns"], int) and isinstance(meta["version"], int)
              and all(c in chunks and 0 <= lo < hi <= chunks[c][0] for c, lo, hi in views)
              and meta["num_tokens"] == sum(hi - lo for _, lo, hi in views))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise FormatError("manifest fields are inconsistent")
    meta["chunks"], meta["views"] = chunks, views
    return meta


# ---- atomic writes ----------------------------------------------------------------------------------

def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (see `atomic_file`)."""
    with atomic_file(path) as fd:
        write_all(fd, data, 0)


@contextmanager
def atomic_file(path: Path, drop_cache: bool = False, sync_dir: bool = True):
    """A new file descriptor whose contents replace ``path`` when the block ends without error:
    temporary file, fsync, rename, fsync of the directory. On error the temporary file is removed.

    ``drop_cache`` asks the kernel to drop the file's pages after the fsync: the bytes are already in
    the host pool, and caching them twice would only push other pages out. Without ``sync_dir`` the
    rename is durable only after the caller fsyncs the directory (one fsync for many files).
    """
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        yield fd
        os.fsync(fd)
        if drop_cache:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


def write_all(fd: int, data, offset: int) -> None:
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
