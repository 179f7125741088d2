"""The scheduler side: find each new request's stored prefix, plan its load, plan saves at finish,
and feed the store's scheduler-aware policy from what vLLM's scheduler shows of its queue."""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from cattn.store.contract import EntryKey, common_prefix
from cattn.vllm.engine_state import EngineState, RequestResult
from cattn.vllm.jobs import LoadJob, SaveJob
from cattn.vllm.keys import block_chain, client_session, content_session, tenant_of

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What the lookup found for one request."""

    tenant: str
    key: EntryKey | None      # the session it matched (or its client id); None: content, no match
    by_content: bool
    stored: int               # tokens the store holds for key
    common: int               # of them, how many equal the request's first tokens
    usable: int               # what vLLM may take: common, at most prompt - 1, whole blocks
    external: int = 0         # tokens the connector loads (after vLLM's own prefix cache)


class SchedulerSide:
    def __init__(self, shared: EngineState):
        self.shared = shared
        self.plans: dict[str, Plan] = {}
        self.need_load: dict[str, object] = {}       # req_id -> request, loads for the next step
        self.saves: list[SaveJob] = []
        self.waiting: OrderedDict[str, EntryKey] = OrderedDict()   # seen, not started: the look-ahead

    # ---- lookup ------------------------------------------------------------------------------------

    def _identify(self, request) -> tuple[str, EntryKey | None, bool]:
        cfg, shared = self.shared.config, self.shared
        tenant = tenant_of(request.cache_salt, cfg.default_tenant)
        params = request.kv_transfer_params or {}
        if cfg.session_param in params:
            return tenant, EntryKey(tenant, shared.model, client_session(params[cfg.session_param])), False
        return tenant, None, True

    def match(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        prompt = list(request.prompt_token_ids or [])
        tenant, key, by_content = self._identify(request)
        bs, stored, common = self.shared.block_size, 0, 0
        if by_content:
            chain = block_chain(prompt, bs)
            with self.shared.lock:
                session = next((self.shared.index[(tenant, d)] for d in reversed(chain)
                                if (tenant, d) in self.shared.index), None)
            if session is not None:
                key = EntryKey(tenant, self.shared.model, session)
        with self.shared.lock:
            if key is not None and key in self.shared.saving:
                return None, False   # ask again next step: this session's previous turn is being written
        if key is not None:
            ids = self.shared.store.lookup(key)
            if ids is not None:
                ids = ids.tolist()
                stored, common = len(ids), common_prefix(ids, prompt)
        usable = min(common, len(prompt) - 1) // bs * bs
        self.plans[request.request_id] = Plan(tenant, key, by_content, stored, common, usable)
        if key is not None and stored:
            self._queue(request.request_id, key)
        if usable <= num_computed_tokens:
            return 0, False
        return usable - num_computed_tokens, False

    def _queue(self, req_id: str, key: EntryKey) -> None:
        """The request is waiting: it joins the look-ahead, and the store prefetches its session."""
        if req_id not in self.waiting:
            self.waiting[req_id] = key
            self.shared.store.update_queue(list(dict.fromkeys(self.waiting.values())))

    def allocated(self, request, num_external_tokens: int) -> None:
        plan = self.plans.get(request.request_id)
        key = self.waiting.pop(request.request_id, None)
        if key is not None:
            self.shared.store.job_started(key)
        if plan is not None and num_external_tokens > 0:
            plan.external = num_external_tokens
            self.need_load[request.request_id] = request

    # ---- the step's metadata -----------------------------------------------------------------------

    def build(self, scheduler_output) -> tuple[list[LoadJob], list[SaveJob]]:
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
        saves, self.saves = self.saves, []
        return loads, saves

    def _load_job(self, request, block_ids: list[int]) -> LoadJob:
        plan = self.plans[request.request_id]
        return LoadJob(request.request_id, plan.key, list(request.prompt_token_ids[:plan.usable]),
                       plan.usable - plan.external, list(block_ids))

    # ---- finish ------------------------------------------------------------------------------------

    def finished(self, request, block_ids: list[int]) -> tuple[bool, dict | None]:
        """Plan the save of the request's new tokens; True keeps its blocks until the save is done."""
        plan = self.plans.pop(request.request_id, None)
        self.waiting.pop(request.request_id, None)
        self.need_load.pop(request.request_id, None)
        with self.shared.lock:
            result = self.shared.results.pop(request.request_id, RequestResult())
        if plan is None:
            return False, None
        n = request.num_computed_tokens
        tokens = list(request.all_token_ids[:n])
        key, start = plan.key, min(plan.common, n)
        if key is not None and not result.load_failed:
            # what is stored now (an earlier identical request may have saved more since the lookup)
            ids = self.shared.store.lookup(key)
            start = 0 if ids is None else common_prefix(ids.tolist(), tokens)
        if result.load_failed:
            start = 0   # what is stored could not be read: write the whole history again
        elif plan.by_content and key is None:
            # a new conversation: a session of its own. One that matched a stored conversation
            # continues it from the first differing token (usually the re-rendered end of the last
            # reply), as an edited turn does; another conversation that shared the dropped tail
            # then finds a shorter prefix, never a wrong one.
            chain = block_chain(tokens, self.shared.block_size)
            key = EntryKey(plan.tenant, self.shared.model, content_session(chain)) if chain else None
            start = 0
        # Whole blocks only: a backend lays a block out as it likes (the CPU one puts all its K rows before
        # its V rows), so the connector moves a block's rows as they are, never a part of a block.
        bs = self.shared.block_size
        start, end = start // bs * bs, n // bs * bs
        tokens = tokens[:end]
        report = dict(session=None if key is None else key.session, loaded_tokens=result.loaded_tokens,
                      load_failed=result.load_failed, from_disk=result.from_disk, load_s=result.load_s,
                      matched_tokens=plan.usable, saved_tokens=0)
        if key is None or end <= start:   # nothing new: the store holds every whole block already
            return False, {"cattn": report}
        report["saved_tokens"] = end - start
        with self.shared.lock:
            self.shared.saving[key] = self.shared.saving.get(key, 0) + 1
            # indexed now, so that the conversation's next turn finds the session and waits for the save
            self.shared.index_locked(key, tokens)
        self.saves.append(SaveJob(request.request_id, key, tokens, start, list(block_ids)))
        return True, {"cattn": report}

    def take_unsent_saves(self) -> list[SaveJob]:
        """Saves planned but not yet handed to the worker in a step (the engine is shutting down)."""
        saves, self.saves = self.saves, []
        return saves
