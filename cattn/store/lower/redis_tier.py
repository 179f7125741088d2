"""The shared tier: sessions' chunks and manifests on Redis (one server, or a Redis Cluster).

Keys of one session share the hash tag ``{tenant/model/session}``, so they live in one
cluster slot (pipelines and multi-key commands stay on one node)::

    <prefix>:{<tenant>/<model>/<session>}:m             the manifest (the disk format's, as it is)
    <prefix>:{<tenant>/<model>/<session>}:c:<chunk>     chunk header: a disk-format frame, token ids as blob
    <prefix>:{<tenant>/<model>/<session>}:c:<chunk>:<i> payload piece i (k then v bytes, ``piece_bytes`` each)

Values reuse the disk format's frame (magic, format version, xxh3_64 of the header) and
its payload checksum (xxh3_64 over the whole payload, recorded in the header). The
manifest is written last, after every chunk it names: a session without one is a miss.

Failure is a miss: every command runs under ``timeout_s`` with no retries; a timeout or
a server error raises `RemoteTierError` (an OSError: the store then recomputes), is
counted by reason, and marks the server down for ``retry_after_s``, during which calls
fail at once. The client reconnects on the first call after that. On a cluster, a failure
of a session's call marks only the node serving its slot down (the client and its slot map
stay, and redis-py refreshes the map): a dead master costs only its own sessions.
"""
from __future__ import annotations

import logging
import threading
import time

import torch
import xxhash

from cattn.store.errors import FormatError, RemoteTierError
from cattn.store.lower import fileformat as ff
from cattn.store.contract import EntryKey
from cattn.store.layout import KVLayout
from cattn.store.metrics import TierMetrics
from cattn.store.lower.redis_client import RedisOptions, connect
from cattn.store.lower.redis_values import Absent, Foreign, check_key, manifest_of, parse_frame
from cattn.store.lower.base import LowerTier, StoredEntry

log = logging.getLogger(__name__)


class RedisTier(LowerTier):
    """A `LowerTier` on Redis, shared by the stores of many machines; thread-safe.

    `scan` finds nothing (the shared tier may hold every machine's sessions); the store asks
    `find` for a session its own index lacks. ``write_through``: the store publishes every commit.
    """

    finds_shared = True
    write_through = True

    def __init__(self, options: RedisOptions | None = None, **kwargs):
        self.options = o = options or RedisOptions(**kwargs)
        if not o.urls or not all(isinstance(u, str) and u.split("://")[0] in ("redis", "rediss") for u in o.urls):
            raise ValueError(f"redis urls must be redis:// or rediss:// URLs, got {o.urls!r}")
        if not o.timeout_s > 0 or not o.retry_after_s >= 0 or o.piece_bytes <= 0 or o.capacity_bytes <= 0:
            raise ValueError(f"redis timeout_s, piece_bytes, capacity_bytes must be > 0 and retry_after_s >= 0: {o}")
        if o.ttl_s is not None and not o.ttl_s > 0:
            raise ValueError(f"redis ttl_s must be > 0 or None, got {o.ttl_s!r}")
        self.capacity, self.metrics = o.capacity_bytes, TierMetrics()
        self._lock, self._redis, self._down_until = threading.RLock(), None, 0.0
        self._nodes_down: dict[str, float] = {}   # cluster: node name -> when calls to it may try again
        self._px = None if o.ttl_s is None else max(1, int(o.ttl_s * 1000))
        # Sessions whose last read failed in transport or found a key absent: the store drops such a
        # session as unusable, and that drop must not delete what other machines can still read.
        self._unreachable: set[EntryKey] = set()

    # ---- keys and calls --------------------------------------------------------------------------

    def _key(self, key: EntryKey, *parts: str) -> str:
        return ":".join((self.options.prefix, f"{{{key.tenant}/{key.model}/{key.session}}}", *parts))

    def _call(self, fn, key: EntryKey):
        """``fn(client)`` for ``key``'s keys, failures turned into RemoteTierError (counted by the caller's
        reason). On a cluster, a failure marks down only the node that serves ``key``'s slot."""
        import redis

        with self._lock:
            now = time.monotonic()
            if now < self._down_until:
                raise RemoteTierError("redis marked down after a recent failure")
            if self._redis is None:
                try:
                    self._redis = connect(self.options)
                except (redis.RedisError, redis.exceptions.RedisClusterException, OSError) as exc:
                    self._down(exc)
            client = self._redis
            node = self._node_of(client, key)
            if node is not None and now < self._nodes_down.get(node, 0.0):
                raise RemoteTierError(f"redis node {node} marked down after a recent failure")
        try:
            return fn(client)
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            self._down(exc, node)

    def _node_of(self, client, key: EntryKey) -> str | None:
        """On a cluster, the node that serves ``key``'s slot in the client's slot map (its name, or the
        slot's if the map has no node for it); None for one server."""
        if not self.options.cluster:
            return None
        import redis

        name = self._key(key, "m")
        try:
            return client.get_node_from_key(name).name
        except (redis.RedisError, redis.exceptions.RedisClusterException):
            return f"slot {client.keyslot(name)}"

    def _down(self, exc: Exception, node: str | None = None):
        """Raise ``exc`` as a RemoteTierError, marking down for ``retry_after_s`` the cluster ``node`` the
        call went to, or else the whole server (then a fresh client, and slot map, at the next call).
        A cluster that no node answers is marked down whole."""
        import redis

        unreachable = getattr(redis.exceptions, "RedisClusterUnreachableError", ())
        with self._lock:
            until = time.monotonic() + self.options.retry_after_s
            if node is not None and not isinstance(exc, unreachable):
                # The client stays: its other nodes serve their sessions, and redis-py asked for a fresh
                # slot map (a replica promoted in the node's place serves its sessions once it has it).
                self._nodes_down[node] = until
            else:
                self._down_until = until
                if not isinstance(exc, redis.ResponseError) and self._redis is not None:
                    old, self._redis = self._redis, None   # a fresh client (and topology) at the next call
                    self._nodes_down.clear()
                    try:
                        old.close()
                    except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
                        pass
        reason = "timeout" if isinstance(exc, redis.TimeoutError) else "server_error"
        raise RemoteTierError(f"redis {reason}: {exc}", reason) from exc

    def _fail(self, exc: BaseException) -> None:
        """Count a failed read by reason (the caller re-raises)."""
        if isinstance(exc, RemoteTierError):
            self.metrics.miss(exc.reason)
        elif isinstance(exc, Absent):
            self.metrics.miss("absent")
        elif isinstance(exc, Foreign):
            self.metrics.miss("foreign")
        else:
            self.metrics.miss("corrupt")

    # ---- LowerTier ---------------------------------------------------------------------------------

    def scan(self) -> tuple[list[StoredEntry], int]:
        return [], 0

    def _pieces(self, nbytes: int) -> int:
        return -(-nbytes // self.options.piece_bytes)

    def _header(self, key, layout, chunk_id, token_ids: torch.Tensor, payload_sum: int) -> bytes:
        m = token_ids.numel()
        nbytes = layout.payload_nbytes(m)
        meta = dict(kind="chunk", tenant=key.tenant, model=key.model, session=key.session,
                    layout=layout.to_json(), chunk=chunk_id, num_tokens=m, payload_offset=0, payload_nbytes=nbytes,
                    payload_xxh3=f"{payload_sum:016x}", piece_bytes=self.options.piece_bytes,
                    pieces=self._pieces(nbytes))
        return ff.pack_frame(meta, bytes(ff.bytes_of(token_ids.contiguous())) if m else b"")

    def chunk_nbytes(self, key: EntryKey, layout: KVLayout, chunk_id: str, num_tokens: int) -> int:
        header = self._header(key, layout, chunk_id, torch.zeros(num_tokens, dtype=torch.int64), 0)
        return len(header) + layout.payload_nbytes(num_tokens)

    def write_chunk(self, key: EntryKey, layout: KVLayout, chunk_id: str, token_ids: torch.Tensor,
                    payload: torch.Tensor) -> int:
        data, step = ff.bytes_of(payload), self.options.piece_bytes
        # Checksum while the pieces go out (xxhash releases the GIL); the header, which records the
        # checksum, follows them. A reader finds the header last written, so never a header over
        # pieces it does not describe: a piece missing or from elsewhere fails the checksum.
        checksum: list[int] = []
        hasher = threading.Thread(target=lambda: checksum.append(xxhash.xxh3_64_intdigest(data)))

        def write(r):
            pipe = r.pipeline(transaction=False)
            for i in range(self._pieces(len(data))):   # memoryview slices: the pool's bytes go out uncopied
                pipe.set(self._key(key, "c", chunk_id, str(i)), data[i * step:(i + 1) * step], px=self._px)
            hasher.start()
            try:
                pipe.execute()
            finally:
                hasher.join()
            r.set(self._key(key, "c", chunk_id), header(), px=self._px)

        def header() -> bytes:
            return self._header(key, layout, chunk_id, token_ids, checksum[0])
        self._timed_write(write, key)
        self.metrics.add(bytes_in=len(data))
        return self.chunk_nbytes(key, layout, chunk_id, token_ids.numel())

    def read_chunk(self, key: EntryKey, layout: KVLayout, chunk_id: str, num_tokens: int,
                   into: torch.Tensor | None = None) -> torch.Tensor:
        try:
            with self.metrics.timed("read"):
                ids = self._read_chunk(key, layout, chunk_id, num_tokens, into)
        except (FormatError, RemoteTierError) as exc:
            self._fail(exc)
            if isinstance(exc, (RemoteTierError, Absent)):   # not a bad value: maybe a node in failover
                with self._lock:
                    self._unreachable.add(key)
            raise
        if into is not None:
            self.metrics.add(hits=1, bytes_out=layout.payload_nbytes(num_tokens))
        return ids

    def _read_chunk(self, key, layout, chunk_id, num_tokens, into):
        nbytes = layout.payload_nbytes(num_tokens)
        npieces = self._pieces(nbytes)
        hkey = self._key(key, "c", chunk_id)
        if into is None:
            values = [self._call(lambda r: r.get(hkey), key)]
        else:
            names = [hkey] + [self._key(key, "c", chunk_id, str(i)) for i in range(npieces)]
            values = self._call(lambda r: _get_many(r, names), key)
        if values[0] is None:
            raise Absent(f"chunk {chunk_id} of session {key.session!r} is not in redis")
        meta, blob = parse_frame(values[0])
        check_key(meta, key, layout, "chunk")
        if (meta.get("chunk") != chunk_id or meta.get("num_tokens") != num_tokens or len(blob) != 8 * num_tokens
                or meta.get("payload_nbytes") != nbytes):
            raise Foreign(f"chunk header does not match chunk {chunk_id} of {num_tokens} tokens")
        if into is not None:
            pieces = values[1:]
            if meta.get("pieces") != npieces:   # written by a store with another piece size: fetch its pieces
                want = meta.get("pieces")
                if not isinstance(want, int) or not 0 < want <= max(nbytes, 1):
                    raise FormatError(f"chunk header names {want!r} pieces")
                names = [self._key(key, "c", chunk_id, str(i)) for i in range(want)]
                pieces = self._call(lambda r: _get_many(r, names), key)
            if any(p is None for p in pieces):
                raise Absent(f"a piece of chunk {chunk_id} of session {key.session!r} is not in redis")
            out, pos, hasher = ff.bytes_of(into[:nbytes]), 0, xxhash.xxh3_64()
            for piece in pieces:
                if pos + len(piece) > nbytes:
                    raise FormatError("chunk payload longer than its header says")
                out[pos:pos + len(piece)] = piece
                hasher.update(piece)
                pos += len(piece)
            if pos != nbytes or f"{hasher.intdigest():016x}" != meta.get("payload_xxh3"):
                raise FormatError("chunk payload checksum mismatch")
        return torch.frombuffer(bytearray(blob), dtype=torch.int64) if num_tokens else torch.empty(0, dtype=torch.int64)

    def write_manifest(self, key: EntryKey, incarnation: str, data: bytes) -> int:
        names = []
        if self._px is not None:   # the chunks it names live as long as it does (older turns' chunks too)
            meta, _ = parse_frame(data)
            layout = KVLayout.from_json(meta["layout"])
            for chunk_id, m, _ in meta["chunks"]:
                names.append(self._key(key, "c", chunk_id))
                names += [self._key(key, "c", chunk_id, str(i)) for i in range(self._pieces(layout.payload_nbytes(m)))]

        def write(r):
            pipe = r.pipeline(transaction=False)
            for name in names:
                pipe.pexpire(name, self._px)
            pipe.set(self._key(key, "m"), data, px=self._px)
            pipe.execute()
        self._timed_write(write, key)
        return len(data)

    def _timed_write(self, write, key: EntryKey) -> None:
        """Run ``write(client)`` through `_call`, timed as a write; a failure is counted, then raised."""
        try:
            with self.metrics.timed("write"):
                self._call(write, key)
        except RemoteTierError:
            self.metrics.add(write_errors=1)
            raise

    def remove(self, key: EntryKey, incarnation: str, chunk_ids: list[str], manifest: bool) -> None:
        """Best effort: a removal that fails leaves keys that TTL or maxmemory reclaim; a manifest is
        removed only if it is still ``incarnation``'s (another machine may have replaced the session).
        After a read of ``key`` failed in transport or found a key absent (not a bad value: a node in
        failover may lack what another has), its shared keys are kept."""
        with self._lock:
            if manifest and key in self._unreachable:
                self._unreachable.discard(key)
                log.info("session %r: dropped here after a failed read; kept in redis", key.session)
                return
        def remove(r):
            if manifest:
                raw = r.get(self._key(key, "m"))
                try:
                    if raw is not None and manifest_of(raw, key)["incarnation"] == incarnation:
                        r.delete(self._key(key, "m"))
                except FormatError:
                    r.delete(self._key(key, "m"))
            names = [self._key(key, "c", c, *extra) for c in chunk_ids for extra in [()] + [
                (str(i),) for i in range(self._pieces_of(r, key, c))]]
            if names:
                r.delete(*names)
        try:
            self._call(remove, key)
        except RemoteTierError as exc:
            self.metrics.add(remove_errors=1)
            log.warning("removing session %r from redis failed: %s", key.session, exc)

    def _pieces_of(self, r, key: EntryKey, chunk_id: str) -> int:
        raw = r.get(self._key(key, "c", chunk_id))
        try:
            return int(parse_frame(raw)[0].get("pieces", 0)) if raw is not None else 0
        except (FormatError, TypeError, ValueError):
            return 0

    def close(self) -> None:
        with self._lock:
            if self._redis is not None:
                self._redis.close()
                self._redis = None

    # ---- the shared part ---------------------------------------------------------------------------

    def find(self, key: EntryKey) -> StoredEntry | None:
        """The committed manifest of ``key`` in Redis, or None (a miss, counted by reason). A corrupt
        or foreign manifest is deleted."""
        mkey = self._key(key, "m")
        try:
            with self.metrics.timed("read"):
                raw = self._call(lambda r: r.get(mkey), key)
                if raw is None:
                    raise Absent("no manifest")
                meta = manifest_of(raw, key)
        except (FormatError, RemoteTierError) as exc:
            self._fail(exc)
            if isinstance(exc, FormatError) and not isinstance(exc, Absent):
                log.warning("session %r: manifest in redis unusable (%s); deleted", key.session, exc)
                try:
                    self._call(lambda r: r.delete(mkey), key)
                except RemoteTierError:
                    pass
            return None
        return StoredEntry(key, meta["layout"], meta["incarnation"], meta["created_ns"], meta["version"],
                           meta["chunks"], meta["views"], len(raw))

    def tier_stats(self) -> dict:
        """``{"redis": counters}`` for `TieredStore.stats`: hits (chunks read), misses by reason, bytes,
        write and remove errors, read/write latency histograms, ``up`` (1 unless marked down)."""
        up = int(time.monotonic() >= self._down_until)
        return {"redis": dict(self.metrics.snapshot(), up=up)}


def _get_many(r, names: list[str]) -> list:
    pipe = r.pipeline(transaction=False)
    for name in names:
        pipe.get(name)
    return pipe.execute()
