"""TieredStore against a plain dict: save / load / truncate / delete / evict / prefetch / restart sequences,
with a device tier on top (resident first layers, partial residency, shrinking and demotion under pressure),
with and without partial prefetch (a job that starts mid-read stops it after the chunk in flight), loads
that read the disk one layer at a time (given up after any layer, or read to the end), and a cap on the
tokens of a chunk."""
import collections
import threading
from pathlib import Path

import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cattn.store.contract import EntryKey, KVEntry
from cattn.store.device.tier import DeviceTier, Resident
from cattn.store.lower.disk import DiskTier
from cattn.store.tiered.migration import free_persisted_locked, persist_locked
from cattn.store.policy.base import Scheduler
from cattn.store.tiered.store import TieredStore

L, H, D = 2, 2, 32
DTYPE = torch.float16
TOKEN_BYTES = 2 * L * H * D * 2     # 512: a chunk's 256-byte alignment wastes less than a token
# A session's chunks must fit in the DRAM tier to be loaded, the tokens that edits and truncations
# dropped from partly used chunks included: the sessions here keep to this many chunk tokens.
CHUNK_TOKENS = 90
PAGE = 4                            # the device tier's page size here
LAYER_PAGE_BYTES = 2 * PAGE * H * D * 2
KEYS = [EntryKey(t, m, s) for t in ("acme", "zeta") for m in ("0123abcd", "fedc9876") for s in ("s0", "s1")]


class StartingDisk(DiskTier):
    """A disk tier that can start a session's job from inside the prefetch lane's read of it (``start_on``:
    the key and the store), so that the job starts mid-read, between two chunks, every time."""

    start_on = None

    def read_chunk(self, key, layout, chunk_id, num_tokens, into=None):
        if into is not None and self.start_on and self.start_on[0] == key \
                and threading.current_thread().name.startswith("cattn-store"):
            _, store = self.start_on
            self.start_on = None
            store.job_started(key)   # the lane holds no store lock while it reads
        return super().read_chunk(key, layout, chunk_id, num_tokens, into)


def make_entry(n: int, seed: int) -> KVEntry:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, L, n, H, D, generator=g).clamp_(-RANGE, RANGE).to(DTYPE)
    return KVEntry(torch.randint(0, 50_000, (n,), generator=g), kv[0], kv[1])


RANGE = 4.0
# What a load may differ from what was saved by: nothing (lossless); half an int8 step of the largest scale
# any chunk can have (|x| <= RANGE), plus fp16's rounding. Another token's KV is off by far more.
TOLERANCE = {"lossless": 0.0, "int8": RANGE / 127 / 2 * 1.001 + RANGE * 2.0**-11}


def same_kv(got: torch.Tensor, want: torch.Tensor, kv_format: str) -> bool:
    if kv_format == "lossless":
        return torch.equal(got, want)
    return got.shape == want.shape and bool(((got.float() - want.float()).abs() <= TOLERANCE[kv_format]).all())


def _cat(a: KVEntry, b: KVEntry) -> KVEntry:
    return KVEntry(torch.cat([a.token_ids, b.token_ids]), torch.cat([a.k, b.k], 1), torch.cat([a.v, b.v], 1))


def _take(e: KVEntry, idx: torch.Tensor) -> KVEntry:
    return KVEntry(e.token_ids[idx], e.k[:, idx], e.v[:, idx])


class StoreVsDict(RuleBasedStateMachine):
    KV_FORMAT = "lossless"   # how the store keeps KV (`StoreVsDict8Bit`: int8)

    @initialize(dram_tokens=st.integers(CHUNK_TOKENS + 8, 2 * CHUNK_TOKENS), disk_kib=st.sampled_from([48, 96, 4096]),
                use_disk=st.booleans(), device_pages=st.integers(3, 16), partial=st.booleans(),
                max_chunk_tokens=st.none() | st.integers(4, 40))
    def start(self, dram_tokens, disk_kib, use_disk, device_pages, partial, max_chunk_tokens):
        import tempfile
        self.dir = Path(tempfile.mkdtemp(prefix="cattn-store-"))
        self.dram_bytes, self.disk_bytes = dram_tokens * TOKEN_BYTES, disk_kib * 1024 if use_disk else None
        self.device_bytes = device_pages * LAYER_PAGE_BYTES
        self.partial, self.max_chunk_tokens = partial, max_chunk_tokens
        self.model: dict[EntryKey, KVEntry] = {}
        self.lost = self.drops_before = 0
        self.chunk_tokens = collections.Counter()   # per key: tokens saved since its history was replaced
        self.seen = collections.Counter()
        self.store = self._open()

    def _open(self) -> TieredStore:
        disk = StartingDisk(self.dir, self.disk_bytes) if self.disk_bytes else None
        return TieredStore(self.dram_bytes, disk, policy=Scheduler(), high_watermark=0.8, low_watermark=0.5,
                           device=DeviceTier(self.device_bytes, policy=Scheduler()), partial_prefetch=self.partial,
                           max_chunk_tokens=self.max_chunk_tokens, kv_format=self.KV_FORMAT)

    def _tally(self) -> None:
        """What this run exercised (reported by ``--hypothesis-show-statistics``)."""
        s = self.store.stats()
        for tier, counter in (("dram", "evictions"), ("disk", "hits"), ("disk", "evictions"), ("disk", "prefetched"),
                              ("device", "hits_partial"), ("device", "layers_shrunk"), ("device", "demotions")):
            self.seen[f"{tier} {counter}"] += s.get(tier, {}).get(counter, 0)

    def _drops(self) -> int:
        s = self.store.stats()
        return self.drops_before + s["dram"]["dropped"] + s.get("disk", {}).get("evictions", 0)

    def _lose(self, key: EntryKey) -> None:
        """The store dropped ``key`` for capacity: allowed, but every such loss must be counted."""
        self.lost += 1
        del self.model[key]
        self.chunk_tokens[key] = 0
        assert self.lost <= self._drops()

    def _check(self, key: EntryKey, num_tokens=None) -> None:
        got = self.store.load(key, num_tokens)
        want = self.model.get(key)
        if want is None:
            assert got is None
        elif got is None:
            self._lose(key)
        else:
            n = want.num_tokens if num_tokens is None else min(num_tokens, want.num_tokens)
            assert torch.equal(got.token_ids, want.token_ids[:n])
            assert same_kv(got.k, want.k[:, :n], self.KV_FORMAT) and same_kv(got.v, want.v[:, :n], self.KV_FORMAT)

    @rule(key=st.sampled_from(KEYS), n=st.integers(0, 30), seed=st.integers(0, 2**31), where=st.floats(0, 1.2))
    def save(self, key, n, seed, where):
        self.store.sync()  # no background demotion runs until this save commits
        if key in self.model and self.store.lookup(key) is None:
            self._lose(key)
        have = self.model[key].num_tokens if key in self.model else 0
        start = int(where * have) if where <= 1 else have + 1
        if start <= have and self.chunk_tokens[key] + n > CHUNK_TOKENS:
            start = 0
        entry = make_entry(n, seed)
        try:
            self.store.save(key, entry, start)
        except ValueError:
            # past the stored tokens; or the room this save needed was made by dropping the key itself
            assert start > have or self.store.lookup(key) is None
            if start <= have:
                self._lose(key)
            return
        assert start <= have, "save past the stored tokens must raise ValueError"
        self.model[key] = _cat(_take(self.model[key], torch.arange(start)), entry) if start else entry
        self.chunk_tokens[key] = (self.chunk_tokens[key] if start else 0) + n

    @rule(key=st.sampled_from(KEYS), num_tokens=st.none() | st.integers(0, 80))
    def load(self, key, num_tokens):
        self._check(key, num_tokens)

    @rule(key=st.sampled_from(KEYS), num_tokens=st.none() | st.integers(0, 80), stop=st.none() | st.integers(0, L - 1))
    def load_layerwise(self, key, num_tokens, stop):
        """A load whose chunks on disk are read one layer at a time; ``stop``: its forward gives up after
        that layer and releases the lease while the read may still be going."""
        lease = self.store.acquire(key, num_tokens, layerwise=True)
        want = self.model.get(key)
        if lease is None:
            if want is not None:
                self._lose(key)
            return
        try:
            assert want is not None
            n = want.num_tokens if num_tokens is None else min(num_tokens, want.num_tokens)
            assert torch.equal(lease.token_ids, want.token_ids[:n])
            if lease.streamed:
                event("a layer-wise read from disk")
            for layer in range(L if stop is None else stop + 1):
                lease.wait_layer(layer)
                for i, part in enumerate(("k", "v")):
                    got = [s.layer(layer)[i] for s in lease.segments]
                    assert same_kv(torch.cat(got) if got else getattr(want, part)[layer, :0],
                                   getattr(want, part)[layer, :n], self.KV_FORMAT)
        finally:
            lease.release()

    @rule(key=st.sampled_from(KEYS), num_drop=st.integers(0, 40), keep_first=st.integers(0, 8))
    def truncate(self, key, num_drop, keep_first):
        self.store.truncate(key, num_drop, keep_first)
        if key in self.model:
            e = self.model[key]
            n = e.num_tokens
            keep = torch.cat([torch.arange(min(keep_first, n)), torch.arange(min(keep_first + num_drop, n), n)])
            self.model[key] = _take(e, keep)

    @rule(started=st.none() | st.sampled_from(KEYS), order=st.permutations(KEYS), n=st.integers(1, len(KEYS)))
    def queue(self, started, order, n):
        # the scheduler's hooks: prefetches (which may demote) run in the background from here on
        if started is not None:
            self.store.job_started(started)
        self.store.update_queue(order[:n])

    @precondition(lambda self: self.disk_bytes)
    @rule(key=st.sampled_from(KEYS), n=st.integers(1, 30), seed=st.integers(0, 2**31), layerwise=st.booleans())
    def job_starts_mid_prefetch(self, key, n, seed, layerwise):
        """A session (given one more chunk) demoted to disk is queued alone and its job starts while the
        prefetch lane reads its first chunk: with partial prefetch the read stops after that chunk, and
        the job's load reads the rest (exactly: both checks below); without, the lane reads on."""
        st_ = self.store.state
        self.save(key, n, seed, 1.0)
        self.store.sync()
        with st_.lock:   # down to disk only, if the disk takes it
            e = st_.entries.get(key)
            if e is None or e.busy() or not persist_locked(st_, key, e) or st_.entries.get(key) is not e:
                return
            free_persisted_locked(st_, e)
        st_.disk.start_on = (key, self.store)
        self.store.update_queue([key])
        self.store.sync()
        if st_.disk.start_on is not None:   # the lane did not read it (no room): the job starts now
            st_.disk.start_on = None
            self.store.job_started(key)
        else:
            event("a job started mid-prefetch")
        if key in self.model:   # the job's load: the rest read whole, or a layer at a time
            self.load_layerwise(key, None, None) if layerwise else self._check(key)
        if key in self.model:   # the rest is still on disk, whole: a load of every token reads it exactly
            self._check(key, self.model[key].num_tokens)

    @rule(key=st.sampled_from(KEYS))
    def delete(self, key):
        self.store.delete(key)
        self.model.pop(key, None)
        self.chunk_tokens[key] = 0

    @rule(pick=st.integers(0, len(KEYS) - 1), layers=st.integers(1, L), seed=st.integers(0, 2**31),
          then_load=st.none() | st.integers(1, 80))
    def keep_resident(self, pick, layers, seed, then_load):
        """A turn ends: its first ``layers`` layers' pages (the stored history's K/V, in scattered pages with
        headroom) go to the device tier, which may shrink or demote sessions to stay within budget."""
        stored = [k for k in KEYS if k in self.model]
        if not stored:
            return
        key = stored[pick % len(stored)]
        ids = self.store.lookup(key)
        if ids is None or key not in self.model or ids.numel() == 0:
            return
        want = self.model[key]
        n = want.num_tokens
        cap = -(-n // PAGE) + 2
        pages = torch.randperm(cap, generator=torch.Generator().manual_seed(seed))[:-(-n // PAGE)]
        ks, vs = [], []
        for layer in range(layers):
            for src, out in ((want.k, ks), (want.v, vs)):
                t = torch.zeros(cap, PAGE, H, D, dtype=DTYPE)
                t.view(-1, H, D)[(pages[torch.arange(n) // PAGE] * PAGE + torch.arange(n) % PAGE)] = src[layer]
                out.append(t)
        self.store.device.put(key, Resident(want.token_ids.clone(), pages.tolist(), ks, vs), keep_layers=layers)
        if then_load is not None:   # the session's next turn comes at once (else other rules come between)
            self.load_with_residency(key, then_load)

    @rule(seed=st.integers(0, 2**31))
    def every_session_resident(self, seed):
        """Every stored session ends a turn wanting all its layers on the device: past the budget the tier
        shrinks sessions layer by layer, then demotes them whole; each turn after still serves exactly."""
        before = self.store.stats()["device"]
        for i, key in enumerate(k for k in KEYS if k in self.model and self.model[k].num_tokens):
            self.keep_resident(KEYS.index(key), L, seed + i, None)
        after = self.store.stats()["device"]
        event(f"device: pressure {'yes' if after['layers_shrunk'] > before['layers_shrunk'] else 'no'}")
        for key in KEYS:
            self.load_with_residency(key, None)

    @rule(pick=st.integers(0, len(KEYS) - 1), seed=st.integers(0, 2**31), drop_pages=st.integers(1, 6),
          keep_pages=st.integers(0, 2), partial_page=st.booleans())
    def truncate_resident(self, pick, seed, drop_pages, keep_pages, partial_page):
        """Context overflow of a resident session: whole pages (page ids only) or not (the pages go)."""
        self.keep_resident(pick, L, seed, None)
        stored = [k for k in KEYS if k in self.model]
        if stored:
            key = stored[pick % len(stored)]
            self.truncate(key, PAGE * drop_pages - partial_page, PAGE * keep_pages)
            self.load_with_residency(key, None)

    @rule(key=st.sampled_from(KEYS), num_tokens=st.none() | st.integers(1, 80))
    def load_with_residency(self, key, num_tokens):
        """A turn starts: its resident layers (if any) must hold exactly the stored history's first layers,
        and the store the rest (partial residency); then the pages go back to the tier."""
        want = self.model.get(key)
        n = 0 if want is None else want.num_tokens if num_tokens is None else min(num_tokens, want.num_tokens)
        if want is None or n == 0:
            return
        res = self.store.device.take(key, want.token_ids[:n], L)
        if res is not None:
            event("device: resident layers served")
            assert res.num_tokens == n and 1 <= res.num_layers <= L
            slots = torch.tensor(res.pages)[torch.arange(n) // PAGE] * PAGE + torch.arange(n) % PAGE
            for layer in range(res.num_layers):
                assert torch.equal(res.k[layer].view(-1, H, D)[slots], want.k[layer, :n])
                assert torch.equal(res.v[layer].view(-1, H, D)[slots], want.v[layer, :n])
        self._check(key, n)          # the layers streamed from DRAM (and disk)
        if res is not None:
            self.store.device.put(key, res, keep_layers=res.num_layers)

    @precondition(lambda self: self.disk_bytes)
    @rule(queued=st.none() | st.permutations(KEYS), layerwise=st.booleans(), stop=st.none() | st.integers(0, L - 1))
    def restart(self, queued, layerwise, stop):
        self.store.close()
        self._tally()
        self.drops_before = self._drops()
        self.store = self._open()
        assert self.store.stats()["device"]["entries"] == 0   # the device tier starts empty after a restart
        if queued is not None:  # everything is on disk now: prefetches race the loads below
            self.store.update_queue(queued)
        for key in KEYS:
            if layerwise:   # read from disk a layer at a time (the forward may give up after ``stop``)
                self.load_layerwise(key, None, stop)
            self._check(key)

    @rule()
    def check_everything(self):
        self.store.sync()
        for key in KEYS:
            self._check(key)
            ids = self.store.lookup(key)
            assert (ids is None) == (key not in self.model)
            if ids is not None:   # the whole history, or with partial prefetch a prefix of it
                want = self.model[key].token_ids
                assert torch.equal(ids, want[:ids.numel()]) and (self.partial or ids.numel() == want.numel())

    @invariant()
    def within_capacity(self):
        s = self.store.stats()
        assert s["dram"]["used_bytes"] <= s["dram"]["capacity_bytes"]
        if self.disk_bytes:
            assert s["disk"]["used_bytes"] <= s["disk"]["capacity_bytes"]
        assert s["device"]["used_bytes"] <= s["device"]["capacity_bytes"]

    def teardown(self):
        self.store.sync()
        self._tally()
        for what, n in self.seen.items():
            event(f"{what}: {'yes' if n else 'no'}")
        if self.disk_bytes:
            # the disk accounting is exact: what the store counts is what lies in the directory
            files = sum(p.stat().st_size for p in self.dir.rglob("*") if p.is_file() and p.name != ".lock")
            assert not list(self.dir.rglob("*.tmp"))
            assert files == self.store.stats()["disk"]["used_bytes"]
        self.store.close(persist=False)
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)


StoreVsDict.TestCase.settings = settings(max_examples=30, stateful_step_count=50, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
test_store_vs_dict = StoreVsDict.TestCase


class StoreVsDict8Bit(StoreVsDict):
    """The same sequences with the host tiers in int8: every load within the format's bound of the dict."""

    KV_FORMAT = "int8"


StoreVsDict8Bit.TestCase.settings = settings(max_examples=15, stateful_step_count=50, deadline=None,
                                             suppress_health_check=[HealthCheck.too_slow])
test_store_vs_dict_8_bit = StoreVsDict8Bit.TestCase
