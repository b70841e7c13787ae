"""Priority scheduling: the request with the smallest ``priority`` value goes first.

vLLM's convention: ``LLM.generate(..., priority=[...])`` gives each request an integer, smaller
is more urgent, and ties are served by arrival.  The order decides three things:

- admission: waiting requests are admitted in priority order, and a request never jumps
  ahead of a more urgent one that is still waiting (head of line, as in fcfs);
- preemption among running requests: when blocks run out while the running batch grows, the
  least urgent running request (largest priority value, newest among equals) goes first;
- preemption for a waiting request (as vLLM's priority policy): when a waiting request cannot
  be admitted for want of blocks or of a sequence slot (``max_num_seqs``), running requests
  of strictly larger priority value are preempted, least urgent first, to make room -- but
  only if that makes enough room, so nobody is evicted for nothing.  Equal priority never
  preempts, so requests of one priority do not evict each other.

The core's mechanism serves the running batch and brings swapped-out requests back; this
policy then does admission itself, where a waiting request goes ahead of swapped-out ones
only if it is strictly more urgent than all of them.  Preemption is the core's (recompute,
or swap when configured), and so is admitting one request (prefix-cache reuse included).
Prompts are split into chunks when ``SchedulerConfig.enable_chunked_prefill`` is on.
"""
from __future__ import annotations

from pagedllm import hookimpl
from pagedllm.request import Request, RequestStatus
from pagedllm.scheduler import ContinuousBatchingScheduler, SchedulerOutput


class PriorityScheduler(ContinuousBatchingScheduler):
    name = "priority"

    def order_key(self, request: Request) -> tuple:
        return (request.priority, request.arrival_index)

    def schedule(self) -> SchedulerOutput:
        # The core serves running and swapped requests; the waiting queue is kept out of its
        # sight (it would admit only while nobody was preempted, and never preempt to admit).
        waiting, self.waiting = self.waiting, []
        try:
            out = super().schedule()
        finally:
            self.waiting = waiting + self.waiting  # plus whoever the core just preempted
        self._admit_by_priority(out)
        return out

    def _admit_by_priority(self, out: SchedulerOutput) -> None:
        budget = self.config.max_num_batched_tokens - out.num_batched_tokens
        while self.waiting and budget > 0:
            self.waiting.sort(key=self.order_key)
            req = self.waiting[0]
            # Swapped-out requests come back before waiting ones of their priority or less.
            if any(s.priority <= req.priority for s in self.swapped):
                break
            victims = [r for r in self.running if r.priority > req.priority]
            # After a preemption this step memory is short: only a request that outranks
            # someone running may still get in (by preempting them).
            if out.preempted and not victims:
                break
            n = self._chunk(req, budget)
            if n == 0:
                break
            victims = self._victims_to_fit(req, req.num_computed_tokens + n, victims)
            if victims is None:
                break
            for victim in victims:
                budget += self._unschedule(out, victim)
                self.running.remove(victim)
                self._preempt(victim)
                out.preempted.append(victim)
            if not self._admit(req, budget, out):
                break  # the estimate was optimistic; the victims queue again anyway
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            budget -= out.scheduled[-1].num_new_tokens

    def _victims_to_fit(self, req: Request, num_tokens: int,
                        candidates: list[Request]) -> list[Request] | None:
        """The fewest least-urgent ``candidates`` whose preemption lets ``req`` hold
        ``num_tokens`` tokens and take a sequence slot: ``[]`` if it fits already, ``None``
        if it cannot fit even with all of them gone.  Cached prefix blocks ``req`` might
        reuse are not counted, so this errs towards preempting one more."""
        need_blocks = self.kv_cache.blocks_needed(req.request_id, num_tokens)
        free_blocks = self.kv_cache.num_free_blocks
        need_seats = len(self.running) + 1 - self.config.max_num_seqs
        chosen: list[Request] = []
        for victim in sorted(candidates, key=self.order_key, reverse=True):
            if free_blocks >= need_blocks and len(chosen) >= need_seats:
                break
            chosen.append(victim)
            free_blocks += self._freeable_blocks(victim)
        if free_blocks >= need_blocks and len(chosen) >= need_seats:
            return chosen
        return None

    def _freeable_blocks(self, request: Request) -> int:
        # A block shared with another table (a cached prefix, a forked sequence) stays
        # allocated when this one lets go of it.
        table = self.kv_cache.block_tables.get(request.request_id, ())
        return sum(1 for b in table if self.kv_cache.pool.ref_counts[b] == 1)

    @staticmethod
    def _unschedule(out: SchedulerOutput, request: Request) -> int:
        """Take ``request`` out of this step's batch; return the tokens it had."""
        for i, item in enumerate(out.scheduled):
            if item.request is request:
                del out.scheduled[i]
                return item.num_new_tokens
        return 0


@hookimpl
def register_schedulers():
    return [PriorityScheduler]
