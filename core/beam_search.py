"""Beam search over the paged engine, with beams sharing blocks copy-on-write.

Each round runs every live beam for one token and reads the top ``K`` log-probabilities of
its next-token distribution, ``K = max(2, 1 + number of EOS ids) * beam_width`` (capped at
the engine's 20 logprobs): the global top ``K`` continuations of a prompt lie among them.
The best ``beam_width`` continuations that do not end become the next beams: each is a fork
of its parent's block table plus one new token, so the prompt and the common history stay
in shared blocks and only a written partial block is copied.  Parents are released once
their children exist.

The rules are HF transformers' ``generate(num_beams=...)``, ``early_stopping`` included,
so the same weights give the same beams:
- a continuation ends when its token is an EOS id (unless ``ignore_eos``) or it reaches
  ``max_tokens``; only one ranked among the top ``beam_width`` becomes a finished
  hypothesis, scored ``cumulative logprob / generated_length ** length_penalty`` (the EOS
  token counted), and the best ``beam_width`` hypotheses are kept;
- a prompt is done once ``beam_width`` hypotheses exist and (with ``early_stopping``
  False, the default) the best live beam, scored at its current length, cannot beat the
  worst of them; with True, at once; with "never", scored at ``max_tokens`` when
  ``length_penalty`` > 0.
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
    # HF's: False stops a prompt once its best live beam, scored at its current length,
    # can't beat the worst hypothesis; True once beam_width hypotheses exist; "never" as
    # False, but scoring the live beam at max_tokens when length_penalty > 0.
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        if self.early_stopping not in (True, False, "never"):
            raise InvalidRequestError("early_stopping",
                                      f"must be true, false or 'never', got {self.early_stopping!r}")
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


def _score(generated: int, cum: float, length_penalty: float) -> float:
    return cum / max(1, generated) ** length_penalty


def beam_search(engine, prompts: list[list[int]], params: BeamSearchParams) -> list[BeamSearchOutput]:
    ids = itertools.count()
    k = params.beam_width
    eos = set() if params.ignore_eos else set(engine.eos_token_ids)
    width = min(20, max(2, 1 + len(eos)) * k)  # HF's candidates per step, within our logprobs cap
    step_params = SamplingParams(temperature=0, max_tokens=1, logprobs=width, ignore_eos=True)

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
    for generated in range(1, params.max_tokens + 1):
        while engine.has_unfinished_requests():
            engine.step()
        last = generated == params.max_tokens
        for i in range(len(prompts)):
            if not live[i]:
                continue
            candidates = [(beam.cum_logprob + lp.logprob, beam, token)
                          for beam in live[i] for token, lp in beam.request.logprobs[0].items()]
            candidates.sort(key=lambda c: -c[0])  # stable: ties keep beam, then token order
            chosen = []
            for rank, (cum, beam, token) in enumerate(candidates[:width]):
                tokens = beam.tokens + [token]
                if last or token in eos:
                    if rank < k:  # lower ranks only stand by to keep k beams going
                        finished[i].append(BeamSequence(tokens, cum, finished=token in eos,
                                                        score=_score(generated, cum,
                                                                     params.length_penalty)))
                elif len(chosen) < k:
                    chosen.append((cum, beam, tokens))
            finished[i].sort(key=lambda s: -s.score)
            del finished[i][k:]
            parents = live[i]
            # Done once k hypotheses exist and, unless early_stopping is True, the best live
            # beam scores no better than the worst of them (HF's heuristic).
            length = generated
            if params.early_stopping == "never" and params.length_penalty > 0:
                length = params.max_tokens
            best_live = _score(length, chosen[0][0], params.length_penalty) if chosen else None
            if (last or best_live is None
                    or (len(finished[i]) == k and (params.early_stopping is True
                                                   or best_live <= finished[i][-1].score))):
                live[i] = []
            else:
                live[i] = [_Beam(start(tokens, beam.request), tokens, cum)
                           for cum, beam, tokens in chosen]
            for beam in parents:  # after the children forked their blocks
                engine.release(beam.request)
        if not any(live):
            break
    outputs = []
    tok = engine.tokenizer
    for prompt, done in zip(prompts, finished):
        for seq in done:
            if tok is not None:
                seq.text = tok.decode(seq.tokens[len(prompt):], skip_special_tokens=True)
        outputs.append(BeamSearchOutput(prompt, done))
    return outputs
