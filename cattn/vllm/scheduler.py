"""The scheduler side: find each new request's stored prefix in the `SessionDirectory`, plan its load,
plan saves at finish, pass on what vLLM's scheduler shows of its queue, and learn from the workers'
`StepReport`s what every rank now holds."""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from cattn.store.contract import EntryKey, common_prefix
from cattn.vllm.config import CattnVllmConfig
from cattn.vllm.directory import SessionDirectory, plain_ints
from cattn.vllm.jobs import LoadJob, QueueUpdate, RequestResult, SaveJob, StepReport
from cattn.vllm.keys import block_chain, client_session, content_session, tenant_of
from cattn.vllm.shift import ShiftSupport
from cattn.vllm.truncation import Shift, find_shift

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What the lookup found for one request."""

    tenant: str
    key: EntryKey | None      # the session it matched (or its client id); None: content, no match
    by_content: bool
    stored: int               # tokens every rank holds for key
    common: int               # of them, how many equal the request's first tokens
    usable: int               # what vLLM may take: common, at most prompt - 1, whole blocks
    external: int = 0         # tokens the connector loads (after vLLM's own prefix cache)
    shift: Shift | None = None   # a truncated conversation: usable = shift.at + shift.length


class SchedulerSide:
    """One engine's scheduler role. ``world_size`` workers each hold a shard of every session."""

    def __init__(self, config: CattnVllmConfig, directory: SessionDirectory, world_size: int,
                 shifting: ShiftSupport | None = None):
        self.config, self.directory, self.world_size = config, directory, world_size
        self.shifting = shifting if config.truncation else None   # None: prefixes only
        self.model, self.block_size = directory.model, directory.block_size
        self.plans: dict[str, Plan] = {}
        self.need_load: dict[str, object] = {}       # req_id -> request, loads for the next step
        self.unsent: list[SaveJob] = []               # planned at finish, not yet in a step's metadata
        self.in_flight: dict[str, SaveJob] = {}      # sent to the workers, not reported done by all
        self.saving: dict[EntryKey, int] = {}        # saves planned or in flight per session
        self.results: dict[str, RequestResult] = {}
        self.saved_by: dict[str, set[int]] = {}      # req_id -> ranks that stored their shard
        self.failed_by: dict[str, set[int]] = {}     # req_id -> ranks that failed to
        self.waiting: OrderedDict[str, EntryKey] = OrderedDict()   # seen, not started: the look-ahead
        self.queue = QueueUpdate()

    # ---- lookup ------------------------------------------------------------------------------------

    def _identify(self, request) -> tuple[str, EntryKey | None, bool]:
        tenant = tenant_of(request.cache_salt, self.config.default_tenant)
        params = request.kv_transfer_params or {}
        if self.config.session_param in params:
            return tenant, EntryKey(tenant, self.model, client_session(params[self.config.session_param])), False
        return tenant, None, True

    def match(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        prompt = plain_ints(request.prompt_token_ids or [])
        tenant, key, by_content = self._identify(request)
        if by_content and (session := self.directory.find(tenant, prompt)) is not None:
            key = EntryKey(tenant, self.model, session)
        if key is not None and key in self.saving:
            return None, False   # ask again next step: this session's previous turn is being written
        stored = self.directory.tokens(key) if key is not None else None
        common = 0 if stored is None else common_prefix(stored, prompt)
        usable = min(common, len(prompt) - 1) // self.block_size * self.block_size
        shift = self._shift(key, stored, prompt, usable) if stored else None
        if shift is not None:
            usable = shift.at + shift.length
        self.plans[request.request_id] = Plan(tenant, key, by_content, len(stored or ()), common, usable, shift=shift)
        if stored:
            self._queue(request.request_id, key)
        if usable <= num_computed_tokens:
            return 0, False
        return usable - num_computed_tokens, False

    def _shift(self, key: EntryKey, stored: list[int], prompt: list[int], usable: int) -> Shift | None:
        """A truncated conversation's longer loadable prefix (whole blocks), if truncation is on and the
        engine can shift it exactly; a refusal is logged and the plain prefix is served."""
        if self.shifting is None:
            return None
        bs = self.block_size
        found = find_shift(stored, prompt, min_length=bs)
        if found is None:
            return None
        end = min(found.at + found.length, len(prompt) - 1) // bs * bs
        if end <= usable:
            return None
        shift = Shift(found.at, found.by, end - found.at)
        reason = self.shifting.refusal(shift.stored_end, len(prompt))
        if reason is not None:
            log.warning("cattn: truncated history of session %r not loaded (%d tokens recomputed): %s",
                        key.session, end - usable, reason)
            return None
        return shift

    def _queue(self, req_id: str, key: EntryKey) -> None:
        """The request is waiting: it joins the look-ahead, and the workers' stores prefetch its session."""
        if req_id not in self.waiting:
            self.waiting[req_id] = key
            self.queue.upcoming = list(dict.fromkeys(self.waiting.values()))

    def allocated(self, request, num_external_tokens: int) -> None:
        plan = self.plans.get(request.request_id)
        key = self.waiting.pop(request.request_id, None)
        if key is not None:
            self.queue.started.append(key)
            self.queue.upcoming = list(dict.fromkeys(self.waiting.values()))
        if plan is not None and num_external_tokens > 0:
            plan.external = num_external_tokens
            self.need_load[request.request_id] = request

    # ---- the step's metadata -----------------------------------------------------------------------

    def build(self, scheduler_output) -> tuple[list[LoadJob], list[SaveJob], QueueUpdate]:
        loads = []
        for new in scheduler_output.scheduled_new_reqs:
            if (request := self.need_load.pop(new.req_id, None)) is not None:
                loads.append(self._load_job(request, new.block_ids[0]))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):   # a request resumed after preemption: all its blocks
            if req_id in self.need_load and req_id in cached.resumed_req_ids and cached.new_block_ids[i]:
                loads.append(self._load_job(self.need_load.pop(req_id), cached.new_block_ids[i][0]))
        if self.need_load:   # allocated but not scheduled: nothing was promised to vLLM for them yet
            log.warning("cattn: %d planned loads were not scheduled", len(self.need_load))
            self.need_load.clear()
        saves = self.send_unsent()
        queue, self.queue = self.queue, QueueUpdate()
        return loads, saves, queue

    def _load_job(self, request, block_ids: list[int]) -> LoadJob:
        plan = self.plans[request.request_id]
        at, by = (plan.shift.at, plan.shift.by) if plan.shift is not None else (0, 0)
        return LoadJob(request.request_id, plan.key, plain_ints(request.prompt_token_ids[:plan.usable]),
                       plan.usable - plan.external, list(block_ids), at, by)

    # ---- what the workers did ----------------------------------------------------------------------

    def reported(self, report: StepReport | None, finished_sending: set[str] | None) -> None:
        """Take one step's merged worker report; ``finished_sending``: the requests whose save every
        rank finished (vLLM counts the ranks), listed now if every rank stored its shard."""
        if report is not None:
            for req_id, result in report.loads.items():
                self.results[req_id] = result
                plan = self.plans.get(req_id)
                if result.load_failed and plan is not None and plan.key is not None:
                    self.directory.drop(plan.key)   # some rank cannot serve it: saved whole again at finish
            for req_id, ranks in report.saved.items():
                self.saved_by.setdefault(req_id, set()).update(ranks)
            for req_id, ranks in report.save_failed.items():
                self.failed_by.setdefault(req_id, set()).update(ranks)
        for req_id in finished_sending or ():
            job = self.in_flight.pop(req_id, None)
            saved, failed = self.saved_by.pop(req_id, set()), self.failed_by.pop(req_id, set())
            if job is None:
                continue
            if len(saved) == self.world_size and not failed:
                self.directory.put(job.key, job.token_ids)
            else:
                log.warning("cattn: session %r not saved on rank(s) %s; its next request recomputes it",
                            job.key.session, sorted(failed or set(range(self.world_size)) - saved))
                self.directory.drop(job.key)
            left = self.saving.get(job.key, 1) - 1
            if left > 0:
                self.saving[job.key] = left
            else:
                self.saving.pop(job.key, None)

    def has_pending_saves(self) -> bool:
        return bool(self.unsent or self.in_flight)

    # ---- finish ------------------------------------------------------------------------------------

    def finished(self, request, block_ids: list[int], *, computed: int, savable: bool) -> tuple[bool, dict | None]:
        """Plan the save of the request's new tokens (the first ``computed`` have final KV; nothing
        if not ``savable``: aborted or failed); True keeps its blocks until the save is done."""
        plan = self.plans.pop(request.request_id, None)
        self.waiting.pop(request.request_id, None)
        self.need_load.pop(request.request_id, None)
        result = self.results.pop(request.request_id, RequestResult())
        if plan is None:
            return False, None
        tokens = plain_ints(request.all_token_ids[:computed])
        key, start = plan.key, min(plan.common, computed)
        if key is not None and not result.load_failed:
            # what is listed now (an earlier identical request may have saved more since the lookup)
            listed = self.directory.tokens(key)
            start = 0 if listed is None else common_prefix(listed, tokens)
        if result.load_failed:
            start = 0   # what is stored could not be read on some rank: write the whole history again
        elif plan.shift is not None:
            # a truncated turn: its blocks hold re-rotated keys, and saving them from the common prefix
            # on would overwrite the original; the stored session stays as it was computed
            start = computed
        elif plan.by_content and key is None:
            # a new conversation: a session of its own. One that matched a stored conversation
            # continues it from the first differing token (usually the re-rendered end of the last
            # reply), as an edited turn does; another conversation that shared the dropped tail
            # then finds a shorter prefix, never a wrong one.
            chain = block_chain(tokens, self.block_size)
            key = EntryKey(plan.tenant, self.model, content_session(chain)) if chain else None
            start = 0
        # Whole blocks only: a backend lays a block out as it likes (the CPU one puts all its K rows before
        # its V rows), so the connector moves a block's rows as they are, never a part of a block.
        bs = self.block_size
        start, end = start // bs * bs, computed // bs * bs
        tokens = tokens[:end]
        report = dict(session=None if key is None else key.session, loaded_tokens=result.loaded_tokens,
                      load_failed=result.load_failed, from_disk=result.from_disk, load_s=result.load_s,
                      matched_tokens=plan.usable, saved_tokens=0,
                      shifted_by=0 if plan.shift is None else plan.shift.by,
                      shift_at=0 if plan.shift is None else plan.shift.at)
        if key is None or end <= start or not savable:   # nothing new, or nothing trustworthy
            return False, {"cattn": report}
        report["saved_tokens"] = end - start
        self.saving[key] = self.saving.get(key, 0) + 1
        self.directory.index(key, tokens)   # now, so that the next turn finds the session and waits for the save
        self.unsent.append(SaveJob(request.request_id, key, tokens, start, list(block_ids)))
        return True, {"cattn": report}

    def send_unsent(self) -> list[SaveJob]:
        """Saves planned but not yet handed to the workers in a step, handed over now (the engine is
        shutting down); `reported` lists them as usual."""
        saves, self.unsent = self.unsent, []
        self.in_flight.update((job.req_id, job) for job in saves)
        return saves
