"""First come, first served: the oldest request goes first; the newest is preempted first."""
from __future__ import annotations

from pagedllm import hookimpl
from pagedllm.request import Request
from pagedllm.scheduler import ContinuousBatchingScheduler


class FCFSScheduler(ContinuousBatchingScheduler):
    name = "fcfs"

    def order_key(self, request: Request) -> tuple:
        return (request.arrival_index,)


@hookimpl
def register_schedulers():
    return [FCFSScheduler]
