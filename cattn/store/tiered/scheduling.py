"""`TieredStore`'s scheduling hooks: what the job queue tells the store (`update_queue`, `job_started`)
and the prefetches it starts (`prefetch`), for the policy, the prefetch lane and the device tier.

`SchedulingHooks` is a part of `TieredStore`, apart only to keep each file about one thing: it uses the
store's ``_state`` (`StoreState`), ``_readahead`` (`ReadAhead`) and ``device``.
"""
from __future__ import annotations

import time
from collections.abc import Hashable, Sequence

from cattn.store.contract import EntryKey, check_key


class SchedulingHooks:
    """`TieredStore`'s `update_queue`, `job_started` and `prefetch` (see the module docstring)."""

    def update_queue(self, upcoming: Sequence[Hashable], *, prefetch_window: int | None = None,
                     eviction_window: int | None = None, starts_in: Sequence[float] | None = None) -> list[EntryKey]:
        """The job queue changed: tell the policy, drop what it says has expired, then `prefetch`.

        Args:
            upcoming: the session key of each queued job, soonest first (a session once per job).
            prefetch_window, eviction_window: the policy's look-ahead windows, in jobs
                (`cattn.replay.queue.JobQueue.windows`); None: the whole queue.
            starts_in: seconds from now until each queued job is expected to start (one per entry of
                ``upcoming``). With it, a prefetch the disk cannot finish in time is not read, and the
                reads kept are the most that can be on time (`cattn.store.prefetch.deadlines.on_time`).

        Returns:
            the prefetch plan: the keys to read from disk, in order.
        """
        for k in upcoming:
            check_key(k, "upcoming[i]")
        st = self._state
        with st.lock:
            self._readahead.set_due_locked(upcoming, starts_in)  # checks starts_in before anything changes
            st.policy.update_queue(upcoming, prefetch_window=prefetch_window, eviction_window=eviction_window)
            if self.device is not None:
                self.device.update_queue(upcoming, prefetch_window=prefetch_window, eviction_window=eviction_window)
            now = time.time()
            for key in st.policy.expired([k for k, e in st.entries.items() if not e.busy()], now):
                if (e := st.entries.get(key)) is not None and not e.busy():
                    st.remove_locked(key, e, evicted_from="disk" if e.disk_nbytes else "dram")
        plan = self.prefetch()
        if self.device is not None:   # demoted sessions with a job soon come back up from DRAM (not disk)
            with st.lock:
                in_dram = {k for k, e in st.entries.items() if all(c.offset is not None for c, _, _ in e.views)}
            self.device.prefetch(self, in_dram)
        return plan

    def job_started(self, key: EntryKey) -> None:
        """Tell the policy that ``key``'s job left the queue and started (its deadline is gone; with
        ``partial_prefetch``, a read of it in flight stops after its chunk in flight)."""
        check_key(key)
        if self.device is not None:
            self.device.job_started(key)
        with self._state.lock:
            self._readahead.started_locked(key)
            self._state.policy.start(key, time.time())

    def prefetch(self) -> list[EntryKey]:
        """Read the policy's `prefetch` choices from disk into DRAM in the background, one at a time
        (`cattn.store.prefetch.lane`), below the high watermark, demoting only sessions the policy values
        less than the one read; returns the plan (the keys to read, in order)."""
        with self._state.lock:
            return self._readahead.kick_locked()
