"""Turns each sampled row of logits into a token: penalties, temperature, top-k/p, min-p,
per-request seeds, and log-probabilities of the model's own distribution.

Rows are processed independently and a seeded request draws only from its own generator,
so a seeded request gets the same tokens alone or in any batch.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from pagedllm.outputs import Logprob
from pagedllm.request import Request


# The token ids' copy to the host on a side stream, so the next step's inputs (their copy
# and fill, or ``step_inputs``' kernel) need not queue behind it; the step after waits for
# it only before its model runs (``Sampler.copy_done``), as that may overwrite the ids (a
# decode graph's argmax).
# Measured (H200, W2 Qwen3-0.6B, 2026-12-02 session 5): TPOT 0.590 against 0.594 ms, and
# 0.583 against 0.588 with o_proj over partitions; device time the same.
# PAGEDLLM_SIDE_COPY=0 turns it off.
SIDE_COPY = os.environ.get("PAGEDLLM_SIDE_COPY", "1") == "1"


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None
    # {token_id: Logprob} of the top-k plus the sampled token, when the request asked.
    top_logprobs: dict[int, Logprob] | None = None


def _apply_penalties(logits: torch.Tensor, row: int, req: Request) -> None:
    p = req.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(req.all_token_ids)), device=logits.device, dtype=torch.long)
        vals = logits[row, seen]
        logits[row, seen] = torch.where(
            vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
        )
    if (p.presence_penalty or p.frequency_penalty) and req.output_token_ids:
        out = torch.tensor(req.output_token_ids, device=logits.device, dtype=torch.long)
        counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
        logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _adjusts_logits(req: Request) -> bool:
    """Whether penalties or a min_tokens ban change this row's logits before choosing."""
    p = req.params
    return (p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty)
            or len(req.output_token_ids) < p.min_tokens)


def _filter(logits: torch.Tensor, req: Request) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on one row; returns probabilities."""
    p = req.params
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already cover top_p; the first always stays.
        drop = (torch.cumsum(probs, dim=-1) - probs) > p.top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    return probs


@dataclass
class SampledBatch:
    """One step's sampled tokens, still on the device; ``Sampler.to_host`` reads them."""

    requests: list[Request]
    token_ids: torch.Tensor  # [len(requests)] int64, on the device
    raw_logprobs: torch.Tensor | None  # [len(requests), vocab] float32, when any row needs them
    host_token_ids: torch.Tensor  # where the one device-to-host copy lands
    copied: torch.cuda.Event | None  # recorded after that copy (CUDA only)


class Sampler:
    """Two phases, so the host can queue the next step between them: ``sample`` launches the
    choice of every row on the device and one asynchronous copy of the token ids; ``to_host``
    waits for that copy and builds ``SampledToken``s (log-probabilities included)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator  # for requests without a seed of their own
        self.last_wait_s = 0.0  # how long the last ``to_host`` waited for the device
        self.side_copy = SIDE_COPY
        self._side: torch.cuda.Stream | None = None
        # The last side-stream copy's event, until the next step's model waits for it.
        self._copy_pending: torch.cuda.Event | None = None

    def copy_done(self) -> None:
        """Make the current stream wait (on the device) for the last token-id copy, before
        anything that may overwrite the ids it reads; a no-op without a side copy."""
        if self._copy_pending is not None:
            torch.cuda.current_stream().wait_event(self._copy_pending)
            self._copy_pending = None

    def __call__(self, logits: torch.Tensor, requests: list[Request],
                 tokenizer_decode=None) -> list[SampledToken]:
        return self.to_host(self.sample(logits, requests), tokenizer_decode)

    def sample(self, logits: torch.Tensor, requests: list[Request],
               greedy_ids: torch.Tensor | None = None) -> SampledBatch:
        """``greedy_ids``: ``logits.argmax(-1)`` when already computed (inside a decode
        graph); taken as the choice when every row is plain greedy."""
        want_logprobs = any(r.needs_logprob for r in requests)
        # Greedy rows with nothing to adjust take one batched argmax; the rest go row by row.
        if all(r.plain_greedy for r in requests):  # the common case, decided cheaply
            plain = list(range(len(requests)))
        else:
            plain = [i for i, r in enumerate(requests)
                     if r.params.greedy and not _adjusts_logits(r)]
        if len(plain) == len(requests):
            # The argmax of half-precision logits is the argmax of their float32 copy.
            chosen = greedy_ids if greedy_ids is not None else logits.argmax(dim=-1)
            raw_logprobs = torch.log_softmax(logits.float(), dim=-1) if want_logprobs else None
        else:
            logits = logits.float()
            raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
            logits = logits.clone()
            chosen = torch.empty(len(requests), dtype=torch.long, device=logits.device)
            if plain:
                rows = torch.tensor(plain, device=logits.device)
                chosen[rows] = logits.index_select(0, rows).argmax(dim=-1)
            plain_set = set(plain)
            for row, req in enumerate(requests):
                if row not in plain_set:
                    self._choose_row(logits, row, req, chosen)
        cuda = chosen.device.type == "cuda"
        host = torch.empty(chosen.shape, dtype=chosen.dtype, pin_memory=cuda)
        event = None
        if cuda and self.side_copy:
            if self._side is None:
                self._side = torch.cuda.Stream(chosen.device)
            ready = torch.cuda.Event()
            ready.record()
            self._side.wait_event(ready)
            with torch.cuda.stream(self._side):
                host.copy_(chosen, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            chosen.record_stream(self._side)  # its memory waits for the copy too
            self._copy_pending = event
        else:
            host.copy_(chosen, non_blocking=cuda)
            if cuda:
                event = torch.cuda.Event()
                event.record()
        return SampledBatch(list(requests), chosen, raw_logprobs, host, event)

    def _choose_row(self, logits: torch.Tensor, row: int, req: Request,
                    chosen: torch.Tensor) -> None:
        p = req.params
        _apply_penalties(logits, row, req)
        if len(req.output_token_ids) < p.min_tokens:
            banned = list(p.stop_token_ids)
            if req.eos_token_id is not None:
                banned.append(req.eos_token_id)
            if banned:
                logits[row, banned] = float("-inf")
        if p.greedy:
            chosen[row] = torch.argmax(logits[row])
            return
        probs = _filter(logits[row], req)
        gen = req.generator if req.generator is not None else self.generator
        chosen[row] = torch.multinomial(probs, 1, generator=gen)[0]

    def to_host(self, batch: SampledBatch, tokenizer_decode=None) -> list[SampledToken]:
        if batch.copied is not None:
            t = time.perf_counter()
            batch.copied.synchronize()
            self.last_wait_s = time.perf_counter() - t
        chosen = batch.host_token_ids.tolist()
        if batch.raw_logprobs is None:  # no row tracks log-probabilities
            return [SampledToken(token) for token in chosen]
        results = []
        for row, (req, token) in enumerate(zip(batch.requests, chosen)):
            if not req.needs_logprob:
                results.append(SampledToken(token))
                continue
            lp = batch.raw_logprobs[row]
            sampled_lp = float(lp[token])
            k = req.params.logprobs
            if k is None:  # tracked for best_of ranking only
                results.append(SampledToken(token, sampled_lp))
                continue
            rank = int((lp > sampled_lp).sum()) + 1
            top: dict[int, Logprob] = {}
            if k > 0:
                vals, ids = torch.topk(lp, k)
                for r, (v, i) in enumerate(zip(vals.tolist(), ids.tolist()), start=1):
                    top[i] = Logprob(v, r)
            top[token] = Logprob(sampled_lp, rank)
            if tokenizer_decode is not None:
                for tid, entry in top.items():
                    entry.decoded_token = tokenizer_decode([tid])
            results.append(SampledToken(token, sampled_lp, top))
        return results
