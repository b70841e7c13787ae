"""A request as the engine tracks it: its tokens, how many have K/V computed, its status."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from pagedllm.outputs import Logprob, RequestMetrics
from pagedllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, after its blocks were taken back
    SWAPPED = "swapped"  # preempted, its blocks moved to the CPU swap space
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One sequence being generated.

    Prefill and decode are one thing here: ``num_computed_tokens`` (tokens whose K/V are in
    the cache) catches up with ``num_tokens``; when it does, the next token can be sampled.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_id: int | None
    arrival_index: int
    priority: int = 0
    max_tokens: int = 0  # effective limit: SamplingParams.max_tokens or what the context leaves
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    output_text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    generator: torch.Generator | None = None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.monotonic()))
    detokenizer: object | None = None
    cache_key: bytes = b""  # extra prefix-cache key: anything besides tokens that changes K/V
    group: object | None = None  # the RequestGroup (n > 1, best_of) this sequence belongs to
    index: int = 0  # position of this sequence in its group
    hold_blocks: bool = False  # keep the blocks after finishing, until released (beam search)
    # Trailing output tokens sampled on the device whose values the host has not read yet
    # (async scheduling); they stand in ``output_token_ids`` as -1 until then.
    num_pending: int = 0
    # Read from ``params`` once, since the step loop asks every step for every request:
    # whether sampled tokens' log-probabilities are tracked (asked for, or best_of), and
    # whether the next token is a plain argmax (greedy, no penalty, no min_tokens ban).
    needs_logprob: bool = field(init=False)
    plain_greedy: bool = field(init=False)

    def __post_init__(self) -> None:
        p = self.params
        if p.logprobs is not None:
            self.logprobs = []
        self.needs_logprob = p.logprobs is not None or p.num_sequences > p.n
        self.plain_greedy = (p.greedy and p.repetition_penalty == 1.0 and p.min_tokens == 0
                             and not (p.presence_penalty or p.frequency_penalty))

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_id_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED


@dataclass(eq=False)
class RequestGroup:
    """One user request: its sequences (one, or ``best_of``/``n`` forked from the first
    after the prompt is computed, sharing its blocks)."""

    request_id: str
    seqs: list[Request]

    @property
    def first(self) -> Request:
        return self.seqs[0]

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs) and \
            len(self.seqs) == self.first.params.num_sequences

    def needs_fork(self) -> bool:
        return len(self.seqs) == 1 and self.first.params.num_sequences > 1 \
            and not self.first.output_token_ids
