"""Beam search over the paged engine, with beams sharing blocks copy-on-write.

Each round runs every live beam for one token and reads the top ``2 * beam_width``
log-probabilities of its next-token distribution.  The best ``beam_width`` continuations
become the next beams: each is a fork of its parent's block table plus one new token, so the
prompt and the common history stay in shared blocks and only a written partial block is
copied.  Parents are released once their children exist.  A candidate ending in EOS becomes
a finished hypothesis, scored ``cumulative logprob / generated_length ** length_penalty``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from pagedllm.request import Request
from pagedllm.sampling_params import InvalidRequestError, SamplingParams


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.beam_width, int) or not 1 <= self.beam_width <= 10:
            raise InvalidRequestError("beam_width", f"must be in [1, 10], got {self.beam_width!r}")
        if self.max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"must be >= 1, got {self.max_tokens}")


@dataclass
class BeamSequence:
    tokens: list[int]  # prompt + generated
    cum_logprob: float = 0.0
    text: str | None = None
    finished: bool = False
    score: float = 0.0


@dataclass
class BeamSearchOutput:
    prompt_token_ids: list[int]
    sequences: list[BeamSequence] = field(default_factory=list)  # best first


@dataclass
class _Beam:
    request: Request
    tokens: list[int]
    cum_logprob: float


def _score(seq_tokens: int, prompt_len: int, cum: float, length_penalty: float) -> float:
    return cum / max(1, seq_tokens - prompt_len) ** length_penalty


def beam_search(engine, prompts: list[list[int]], params: BeamSearchParams) -> list[BeamSearchOutput]:
    ids = itertools.count()
    k = params.beam_width
    step_params = SamplingParams(temperature=0, max_tokens=1, logprobs=min(20, 2 * k),
                                 ignore_eos=True)
    eos = engine.eos_token_ids

    def start(tokens: list[int], parent: Request | None) -> Request:
        req = engine.make_request(f"beam-{next(ids)}", {"prompt_token_ids": tokens}, step_params)
        req.hold_blocks = True
        if parent is not None:  # share the parent's computed tokens instead of recomputing
            engine.kv_manager.fork(parent.request_id, req.request_id)
            req.num_computed_tokens = parent.num_computed_tokens
        engine.submit(req)
        return req

    live = [[_Beam(start(p, None), p, 0.0)] for p in prompts]
    finished: list[list[BeamSequence]] = [[] for _ in prompts]
    for generated in range(params.max_tokens):
        while engine.has_unfinished_requests():
            engine.step()
        for i, prompt in enumerate(prompts):
            candidates = []
            for beam in live[i]:
                for token, lp in beam.request.logprobs[0].items():
                    candidates.append((beam.cum_logprob + lp.logprob, beam, token))
            candidates.sort(key=lambda c: -c[0])
            chosen = []
            for cum, beam, token in candidates:
                tokens = beam.tokens + [token]
                if token in eos and not params.ignore_eos:
                    if len(finished[i]) < k or cum > min(f.cum_logprob for f in finished[i]):
                        finished[i].append(BeamSequence(
                            tokens, cum, finished=True,
                            score=_score(len(tokens), len(prompt), cum, params.length_penalty)))
                    continue
                chosen.append((cum, beam, tokens))
                if len(chosen) == k:
                    break
            last = generated + 1 == params.max_tokens
            new_live = []
            for cum, beam, tokens in chosen:
                if last:
                    finished[i].append(BeamSequence(
                        tokens, cum, score=_score(len(tokens), len(prompt), cum,
                                                  params.length_penalty)))
                else:
                    new_live.append(_Beam(start(tokens, beam.request), tokens, cum))
            for beam in live[i]:
                engine.release(beam.request)
            live[i] = new_live
        if not any(live):
            break
    outputs = []
    tok = engine.tokenizer
    for prompt, done in zip(prompts, finished):
        done.sort(key=lambda s: -s.score)
        for seq in done[:k]:
            if tok is not None:
                seq.text = tok.decode(seq.tokens[len(prompt):], skip_special_tokens=True)
        outputs.append(BeamSearchOutput(prompt, done[:k]))
    return outputs
