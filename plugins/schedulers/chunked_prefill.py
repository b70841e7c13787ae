"""Chunked prefill: decode tokens and prompt chunks share each step's token budget.

Without chunking a long prompt is computed in one step, and every running request waits for
it: one long prefill stalls all decodes.  Here each step spends ``max_num_batched_tokens`` in
this order:

1. running requests that are decoding (one token each: cheap, and it keeps latency flat),
2. running requests still partway through their prompt (or a recompute), in arrival order,
3. waiting requests, admitted with as large a first chunk as the budget has left.

So a long prompt is split over as many steps as the budget says, and every decoding request
still gets its token every step while it is prefilled (as long as the budget covers one
token per running request; vLLM requires ``max_num_batched_tokens >= max_num_seqs``).

The mechanism is the core's: ``ContinuousBatchingScheduler`` serves running requests in
``order_key`` order, then admits waiting ones, and splits prompts by the budget when
``SchedulerConfig.enable_chunked_prefill`` is on.  This policy turns chunking on and orders
decodes ahead of prefills.  The request preempted first when blocks run out is the last in
that order: the newest request still prefilling (it loses the least finished work and frees
its blocks for requests that are already producing tokens), then the newest decode.
"""
from __future__ import annotations

from dataclasses import replace

from pagedllm import hookimpl
from pagedllm.kv_cache import KVCacheManager
from pagedllm.request import Request, RequestStatus
from pagedllm.scheduler import ContinuousBatchingScheduler, SchedulerConfig


class ChunkedPrefillScheduler(ContinuousBatchingScheduler):
    name = "chunked_prefill"
    # Read by the engine before it builds (and validates) the SchedulerConfig: this policy
    # chunks, so a token budget below max_model_len is valid with no other flag.
    chunked_prefill = True

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager):
        if not config.enable_chunked_prefill:
            config = replace(config, enable_chunked_prefill=True)
        super().__init__(config, kv_cache)

    def order_key(self, request: Request) -> tuple:
        # A running request one token behind is decoding; anything further behind is
        # prefilling (its prompt, or a recompute after preemption).  Waiting requests all
        # rank as prefills, so they are admitted first come, first served.
        decoding = (request.status == RequestStatus.RUNNING
                    and request.num_tokens - request.num_computed_tokens <= 1)
        return (0 if decoding else 1, request.arrival_index)


@hookimpl
def register_schedulers():
    return [ChunkedPrefillScheduler]
