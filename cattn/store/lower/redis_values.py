"""Values of the shared tier, read back from bytes: the disk format's frame (magic, format version,
xxh3_64 of the header) and manifest checks, applied to a Redis value instead of a file.

`fileformat` reads frames from file descriptors; these are the same checks on a ``bytes`` value, and
they tell a foreign value (well formed, another session's or layout's) from a corrupt one.
"""
from __future__ import annotations

import json
import struct

import xxhash

from cattn.store.errors import FormatError
from cattn.store.lower import fileformat as ff
from cattn.store.contract import EntryKey
from cattn.store.layout import KVLayout

_PREFIX, _SUM = struct.Struct("<8sIIQ"), struct.Struct("<Q")   # the disk format's frame prefix and checksum


class Absent(FormatError):
    """A key the manifest names is gone (expired, evicted by ``maxmemory``, removed)."""


class Foreign(FormatError):
    """A value that checks out but belongs to another session, chunk or layout."""


def parse_frame(data: bytes) -> tuple[dict, bytes]:
    """``(meta, blob)`` of a value that is one disk-format frame; FormatError if it is not exactly that."""
    if len(data) < _PREFIX.size + _SUM.size:
        raise FormatError("value shorter than a frame")
    magic, version, json_len, blob_len = _PREFIX.unpack_from(data)
    if magic != ff.MAGIC:
        raise FormatError(f"bad magic {magic[:8]!r}")
    if version != ff.FORMAT_VERSION:
        raise FormatError(f"format version {version}, this build reads {ff.FORMAT_VERSION}")
    end = _PREFIX.size + json_len + blob_len
    if end + _SUM.size != len(data):
        raise FormatError("frame length does not match the value")
    if xxhash.xxh3_64_intdigest(memoryview(data)[:end]) != _SUM.unpack_from(data, end)[0]:
        raise FormatError("header checksum mismatch")
    try:
        meta = json.loads(data[_PREFIX.size:_PREFIX.size + json_len])
    except ValueError as exc:
        raise FormatError(f"header json: {exc}") from None
    if not isinstance(meta, dict):
        raise FormatError("header json is not an object")
    return meta, data[_PREFIX.size + json_len:end]


def check_key(meta: dict, key: EntryKey, layout: KVLayout | None, kind: str) -> KVLayout:
    """The frame's layout; `Foreign` if it names another kind, key or layout."""
    try:
        return ff.check_meta(meta, key, layout, kind)
    except FormatError as exc:
        raise Foreign(str(exc)) from None


def manifest_of(data: bytes, key: EntryKey) -> dict:
    """A manifest value's meta, checked as `fileformat.read_manifest` checks a manifest file."""
    meta, _ = parse_frame(data)
    meta["layout"] = check_key(meta, key, None, "manifest")
    return ff.check_manifest_fields(meta)
