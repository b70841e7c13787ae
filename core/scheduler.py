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

    def __post_init__(self) -> None:
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

    @abstractmethod
    def order_key(self, request: Request) -> tuple: ...

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> Request | None:
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.request_id == request_id:
                    self.finish(req, "abort")
                    return req
        return None

    def finish(self, request: Request, reason: str) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv_cache.free(request.request_id)

    def _preempt(self, victim: Request) -> None:
        self.kv_cache.free(victim.request_id)
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.PREEMPTED
        victim.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(victim)

    def _chunk(self, request: Request, budget: int) -> int:
        remaining = request.num_tokens - request.num_computed_tokens
        if self.config.enable_chunked_prefill:
            return min(remaining, budget)
        return remaining if remaining <= budget else 0

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
            while not self.kv_cache.allocate_slots(req.request_id, req.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, n))
                budget -= n
                index += 1

        # Admit waiting requests, unless memory was short this step.
        if not out.preempted:
            self.waiting.sort(key=self.order_key)
            while self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
                req = self.waiting[0]
                n = self._chunk(req, budget)
                if n == 0:
                    break
                if not self.kv_cache.allocate_slots(req.request_id, req.num_computed_tokens + n):
                    break
                self.waiting.pop(0)
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                out.scheduled.append(ScheduledRequest(req, n))
                budget -= n
        return out
