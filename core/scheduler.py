"""Continuous batching: which requests run this step, with how many new tokens each.

Requests join the running batch at any step and leave it the step they finish.  Each step
the scheduler first gives every running request its next token(s), preempting by recompute
when the block pool runs dry (the victim is the lowest-priority running request: the last
in ``order_key`` order), and then, if nobody was preempted, admits waiting requests in
``order_key`` order while ``max_num_seqs``, the token budget ``max_num_batched_tokens`` and
free blocks allow.  A preempted request loses its blocks and later recomputes its prompt
and the tokens it had generated, so it resumes with the same result.

Policies are plugins (``register_schedulers``); the mechanism lives here so a policy only
says who goes first.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from pagedllm.kv_cache import KVCacheManager
from pagedllm.request import Request, RequestStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = False
    preemption_mode: str = "recompute"  # or "swap": move the victim's blocks to CPU and back

    def __post_init__(self) -> None:
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(
                f"preemption_mode: must be 'recompute' or 'swap', got {self.preemption_mode!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens: must be >= 1, got {self.max_num_batched_tokens}"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_model_len ({self.max_model_len}) unless chunked prefill is enabled"
            )


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler(ABC):
    """What the engine calls on a scheduler policy plugin."""

    name: str = ""
    priority: int = 0

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager):
        self.config = config
        self.kv_cache = kv_cache
        self.num_preemptions = 0

    @abstractmethod
    def add_request(self, request: Request) -> None: ...

    @abstractmethod
    def add_forked(self, request: Request) -> None:
        """Add a running sequence forked from another (it already holds shared blocks)."""

    @abstractmethod
    def abort_request(self, request_id: str) -> Request | None:
        """Drop a request wherever it is and free its blocks; return it if it was known."""

    @abstractmethod
    def schedule(self) -> SchedulerOutput: ...

    @abstractmethod
    def finish(self, request: Request, reason: str) -> None:
        """Mark ``request`` finished, remove it from the batch and free its blocks now."""

    @abstractmethod
    def has_unfinished(self) -> bool: ...

    @property
    @abstractmethod
    def num_running(self) -> int: ...

    @property
    @abstractmethod
    def num_waiting(self) -> int: ...


class ContinuousBatchingScheduler(Scheduler):
    """The shared mechanism; subclasses define ``order_key`` (smaller goes first)."""

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager):
        super().__init__(config, kv_cache)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self.num_swapped_out = 0
        self.num_swapped_in = 0

    @abstractmethod
    def order_key(self, request: Request) -> tuple: ...

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def add_forked(self, request: Request) -> None:
        """Add a sequence forked from a running one: it shares the parent's blocks and runs
        from the next step."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def abort_request(self, request_id: str) -> Request | None:
        for queue in (self.waiting, self.running, self.swapped):
            for req in queue:
                if req.request_id == request_id:
                    self.finish(req, "abort")
                    return req
        return None

    def finish(self, request: Request, reason: str) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        for queue in (self.running, self.waiting, self.swapped):
            if request in queue:
                queue.remove(request)
                break
        if not request.hold_blocks or reason == "abort":
            self.kv_cache.free(request.request_id)

    def _preempt(self, victim: Request) -> None:
        victim.metrics.num_preemptions += 1
        self.num_preemptions += 1
        if self.config.preemption_mode == "swap" and self.kv_cache.swap_out(victim.request_id):
            victim.status = RequestStatus.SWAPPED
            self.num_swapped_out += 1
            self.swapped.append(victim)
            return
        self.kv_cache.free(victim.request_id)
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.PREEMPTED
        self.waiting.append(victim)

    def _chunk(self, request: Request, budget: int) -> int:
        remaining = request.num_tokens - request.num_computed_tokens
        if self.config.enable_chunked_prefill:
            return min(remaining, budget)
        return remaining if remaining <= budget else 0

    def _admit(self, req: Request, budget: int, out: SchedulerOutput) -> bool:
        """Reserve blocks for a waiting request's first chunk (reusing cached prefix blocks)
        and schedule it; False, with nothing held, when it does not fit now."""
        kv = self.kv_cache
        fresh = req.num_computed_tokens == 0
        matched = kv.match_prefix(req.request_id, req.all_token_ids, req.cache_key) if fresh else 0
        req.num_computed_tokens += matched
        n = self._chunk(req, budget)
        if n == 0 or not kv.allocate_slots(req.request_id, req.num_computed_tokens + n,
                                           write_from=req.num_computed_tokens):
            if matched:  # give the cached blocks back; the match is redone next time
                kv.free(req.request_id)
                req.num_computed_tokens = 0
            return False
        if fresh:
            kv.record_prefix_query(req.num_tokens, matched)
        out.scheduled.append(ScheduledRequest(req, n))
        return True

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self.running.sort(key=self.order_key)

        # Running requests first, in priority order; the lowest-priority ones make room.
        index = 0
        while index < len(self.running) and budget > 0:
            req = self.running[index]
            n = self._chunk(req, budget)
            if n == 0:
                index += 1
                continue
            while not self.kv_cache.allocate_slots(req.request_id, req.num_computed_tokens + n,
                                                   write_from=req.num_computed_tokens):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, n))
                budget -= n
                index += 1

        if out.preempted:
            return out  # memory is short: admit nobody this step

        # Swapped-out requests come back before new ones are admitted.
        self.swapped.sort(key=self.order_key)
        while self.swapped and len(self.running) < self.config.max_num_seqs and budget > 0:
            req = self.swapped[0]
            if not self.kv_cache.can_swap_in(req.request_id, extra_tokens=1):
                break
            self.kv_cache.swap_in(req.request_id)
            self.num_swapped_in += 1
            self.swapped.pop(0)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            n = self._chunk(req, budget)
            if n and self.kv_cache.allocate_slots(req.request_id, req.num_computed_tokens + n,
                                                  write_from=req.num_computed_tokens):
                out.scheduled.append(ScheduledRequest(req, n))
                budget -= n
        if self.swapped:
            return out

        self.waiting.sort(key=self.order_key)
        while self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
            req = self.waiting[0]
            if not self._admit(req, budget, out):
                break
            self.waiting.pop(0)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            budget -= out.scheduled[-1].num_new_tokens
        return out
