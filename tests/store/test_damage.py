"""A store that one bad file cannot take down: damaged directories, failed constructors, foreign keys,
bytes no checksum covers."""
import os
import struct
import types

import pytest
import torch

from cattn.store.contract import EntryKey, KVEntry
from cattn.store.lower.disk import DiskTier
from cattn.store.layout import KVLayout
from cattn.store.memory import MemoryStore
from cattn.store.policy.base import LRU
from cattn.store.tiered.store import TieredStore

L, H, D = 2, 2, 16
MODEL = "0123abcd"


def make_entry(n, seed):
    g = torch.Generator().manual_seed(seed)
    return KVEntry(torch.randint(0, 50_000, (n,), generator=g), torch.randn(L, n, H, D, generator=g).half(),
                   torch.randn(L, n, H, D, generator=g).half())


def assert_same(got, want):
    assert got is not None
    assert torch.equal(got.token_ids, want.token_ids)
    assert torch.equal(got.k, want.k) and torch.equal(got.v, want.v)


KEYS = {"s0": EntryKey("acme", MODEL, "s0"), "s1": EntryKey("acme", MODEL, "s1"),
        "t0": EntryKey("globex", MODEL, "t0")}


def filled_store(root):
    """Three sessions of two tenants on disk, each of two chunks; returns what each holds."""
    store = TieredStore(1 << 20, DiskTier(root, 1 << 22))
    want = {}
    for i, (name, k) in enumerate(KEYS.items()):
        a, b = make_entry(17 + i, seed=i), make_entry(9, seed=10 + i)
        store.save(k, a)
        store.save(k, b, start=a.num_tokens)
        want[name] = KVEntry(torch.cat([a.token_ids, b.token_ids]), torch.cat([a.k, b.k], 1),
                             torch.cat([a.v, b.v], 1))
    store.close()
    return want


def _damage(kind, root, monkeypatch):
    """Damage s0's part of the directory; returns the damaged path, which the store must leave in place."""
    d = root / "acme" / MODEL / "s0"
    chunk = sorted(d.glob("*.kv"))[0]
    if kind == "subdir_named_like_a_chunk":      # an extra directory: s0's own files are intact
        (d / "0123456789abcdef.kv").mkdir()
        (d / "0123456789abcdef.kv" / "x").write_bytes(b"operator's")
        return d / "0123456789abcdef.kv" / "x"
    elif kind == "subdir_instead_of_chunk":      # a chunk file replaced by a directory of its name
        chunk.unlink()
        chunk.mkdir()
        return chunk
    elif kind == "subdir_instead_of_manifest":
        manifest, = d.glob("*.manifest")
        manifest.unlink()
        manifest.mkdir()
        return manifest
    elif kind == "file_instead_of_session_dir":
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
        d.write_bytes(b"not a directory")
        return d
    elif kind == "file_instead_of_model_dir":
        other = root / "acme" / "fedcba98"
        other.write_bytes(b"not a directory")
        return other
    elif kind == "unreadable_session_dir":
        manifest, = d.glob("*.manifest")
        d.chmod(0)
        # Root reads any directory: make listing this one fail for every user, as the mode does for others.
        real = os.scandir

        def scandir(path="."):
            if os.fspath(path) == os.fspath(d):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path)
        monkeypatch.setattr(os, "scandir", scandir)
        return manifest


DAMAGE = ["subdir_named_like_a_chunk", "subdir_instead_of_chunk", "subdir_instead_of_manifest",
          "file_instead_of_session_dir", "file_instead_of_model_dir", "unreadable_session_dir"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_directory_opens(tmp_path, monkeypatch, kind):
    root = tmp_path / "store"
    want = filled_store(root)
    damaged = _damage(kind, root, monkeypatch)
    s0_dir = root / "acme" / MODEL / "s0"
    try:
        store = TieredStore(1 << 20, DiskTier(root, 1 << 22))
        s = store.stats()["disk"]
        assert s["skipped"] + s["corrupt"] >= 1 and s["skipped"] >= (kind != "unreadable_session_dir")
        if kind in ("subdir_named_like_a_chunk", "file_instead_of_model_dir"):
            assert_same(store.load(KEYS["s0"]), want["s0"])       # the damage was beside it, not in it
        else:
            assert store.lookup(KEYS["s0"]) is None and store.load(KEYS["s0"]) is None
        for name in ("s1", "t0"):                                 # every other session, every tenant
            assert_same(store.load(KEYS[name]), want[name])
        store.close()
    finally:
        monkeypatch.undo()
        if s0_dir.is_dir():
            s0_dir.chmod(0o755)
    assert damaged.exists()                                       # what it did not make, it left alone
    store = TieredStore(1 << 20, DiskTier(root, 1 << 22))         # opened again, it serves the same
    for name in ("s1", "t0"):
        assert_same(store.load(KEYS[name]), want[name])
    store.close()


def test_chmod_unreadable_tenant_dir_is_skipped(tmp_path, monkeypatch):
    """An unreadable directory above the sessions is skipped too (not silently, as a glob would)."""
    root = tmp_path / "store"
    want = filled_store(root)
    real, bad = os.scandir, os.fspath(root / "acme")
    monkeypatch.setattr(os, "scandir", lambda p=".": (_ for _ in ()).throw(PermissionError(13, "denied", bad))
                        if os.fspath(p) == bad else real(p))
    store = TieredStore(1 << 20, DiskTier(root, 1 << 22))
    assert store.stats()["disk"]["skipped"] == 1
    assert store.load(KEYS["s0"]) is None and store.load(KEYS["s1"]) is None
    assert_same(store.load(KEYS["t0"]), want["t0"])
    store.close()


@pytest.mark.parametrize("bad", [dict(high_watermark=0.5, low_watermark=0.6), dict(io_threads=0),
                                 dict(policy="lru"), dict(full_timeout_s=-1.0), dict(dram_bytes=0),
                                 dict(disk_read_bytes_per_s=0.0), "scan_fails"])
def test_lock_is_free_after_a_failed_constructor(tmp_path, monkeypatch, bad):
    root = tmp_path / "store"
    want = filled_store(root)
    if bad == "scan_fails":
        with monkeypatch.context() as m:
            m.setattr(DiskTier, "scan", lambda self: (_ for _ in ()).throw(OSError(5, "I/O error")))
            with pytest.raises(OSError):
                TieredStore(1 << 20, DiskTier(root, 1 << 22))
    else:
        args = dict(dram_bytes=1 << 20) | bad
        with pytest.raises((ValueError, TypeError), match="|".join(k for k in bad)):
            TieredStore(args.pop("dram_bytes"), DiskTier(root, 1 << 22), **args)
    store = TieredStore(1 << 20, DiskTier(root, 1 << 22))   # the same process opens it again
    assert_same(store.load(KEYS["t0"]), want["t0"])
    store.close()


class LookAlike:
    def __init__(self, tenant, model=MODEL, session="s0"):
        self.tenant, self.model, self.session = tenant, model, session

    def __hash__(self):
        return hash((self.tenant, self.model, self.session))


def _bad_keys():
    edited = EntryKey("acme", MODEL, "s0")
    object.__setattr__(edited, "tenant", "..")
    edited2 = EntryKey("acme", MODEL, "s0")
    object.__setattr__(edited2, "session", "../../escape")
    return [(LookAlike("/elsewhere"), TypeError), (LookAlike(".."), TypeError),
            (types.SimpleNamespace(tenant="acme", model=MODEL, session="s0"), TypeError),
            (("acme", MODEL, "s0"), TypeError), (edited, ValueError), (edited2, ValueError)]


@pytest.mark.parametrize("bad_key,exc", _bad_keys())
def test_only_entry_keys_reach_a_store(tmp_path, bad_key, exc):
    root = tmp_path / "store"
    entry = make_entry(5, seed=1)
    layout = KVLayout.of(entry)
    store = TieredStore(1 << 20, DiskTier(root, 1 << 22), policy=LRU())
    disk = DiskTier(tmp_path / "disk2", 1 << 22)
    mem = MemoryStore()
    calls = [lambda s: s.lookup(bad_key), lambda s: s.load(bad_key), lambda s: s.save(bad_key, entry),
             lambda s: s.truncate(bad_key, 1), lambda s: s.delete(bad_key)]
    for s in (store, mem):
        for call in calls:
            with pytest.raises(exc):
                call(s)
    for call in (lambda: store.acquire(bad_key), lambda: store.begin_save(bad_key, entry.token_ids, layout),
                 lambda: store.update_queue([bad_key]), lambda: store.job_started(bad_key)):
        with pytest.raises(exc):
            call()
    payload = torch.zeros(layout.payload_nbytes(5), dtype=torch.uint8)
    for call in (lambda: disk.session_dir(bad_key),
                 lambda: disk.write_chunk(bad_key, layout, "0123456789abcdef", entry.token_ids, payload),
                 lambda: disk.read_chunk(bad_key, layout, "0123456789abcdef", 5),
                 lambda: disk.write_manifest(bad_key, "0123456789abcdef", b"x"),
                 lambda: disk.remove(bad_key, "0123456789abcdef", ["0123456789abcdef"], manifest=True)):
        with pytest.raises(exc):
            call()
    good = EntryKey("acme", MODEL, "s0")
    for name in ("../x", "/abs", "0123456789abcdeg"):                 # chunk ids become file names too
        with pytest.raises(ValueError, match="16 hex"):
            disk.write_chunk(good, layout, name, entry.token_ids, payload)
    store.save(good, entry)
    store.close()
    disk.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk2", "store"]
    assert not os.path.exists("/elsewhere")
    made = {p.relative_to(root).parts[:3] for p in root.rglob("*") if p.is_file() and p.name != ".lock"}
    assert made == {("acme", MODEL, "s0")}
    assert [p.name for p in (tmp_path / "disk2").iterdir()] == [".lock"]


def _frame_len(data: bytes) -> int:
    _, _, jlen, blen = struct.unpack_from("<8sIIQ", data)
    return 24 + jlen + blen + 8


@pytest.mark.parametrize("kind", ["chunk_padding", "chunk_trailing", "manifest_trailing"])
def test_every_byte_of_a_file_is_vouched_for(tmp_path, kind):
    root = tmp_path / "store"
    want = filled_store(root)
    d = root / "acme" / MODEL / "s0"
    if kind == "manifest_trailing":
        path, = d.glob("*.manifest")
        path.write_bytes(path.read_bytes() + b"\0")
    else:
        path = sorted(d.glob("*.kv"))[0]
        data = bytearray(path.read_bytes())
        if kind == "chunk_padding":
            n = _frame_len(data)
            assert n < 4096 and data[n] == 0
            data[n] = 1
        else:
            data += b"\0" * 8
        path.write_bytes(bytes(data))
    store = TieredStore(1 << 20, DiskTier(root, 1 << 22))
    assert store.load(KEYS["s0"]) is None
    assert store.stats()["disk"]["corrupt"] == 1
    for name in ("s1", "t0"):
        assert_same(store.load(KEYS[name]), want[name])
    store.close()


def test_chunk_trailing_bytes_refused_by_the_reader(tmp_path):
    """The chunk reader itself refuses bytes after the payload (not only the manifest's size check)."""
    from cattn.store.errors import FormatError
    from cattn.store.lower import fileformat as ff
    entry = make_entry(7, seed=3)
    layout, key = KVLayout.of(entry), KEYS["s1"]
    payload = torch.cat([entry.k.reshape(-1).view(torch.uint8), entry.v.reshape(-1).view(torch.uint8)])
    path = tmp_path / "c.kv"
    ff.write_chunk(path, key, layout, "0123456789abcdef", entry.token_ids, payload)
    into = torch.empty_like(payload)
    assert torch.equal(ff.read_chunk(path, key, layout, "0123456789abcdef", 7, into), entry.token_ids)
    assert torch.equal(into, payload)
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(FormatError, match="size"):
        ff.read_chunk(path, key, layout, "0123456789abcdef", 7, into)
