"""The offline API: ``LLM(...).generate(prompts, params)`` and ``.chat(messages, params)``."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from pagedllm.config import EngineConfig
from pagedllm.engine import LLMEngine
from pagedllm.gc_freeze import frozen_gc
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import InvalidRequestError, SamplingParams

PromptType = str | dict


class LLM:
    """Offline batch inference over the engine; arguments are ``EngineConfig`` fields."""

    def __init__(self, model: str | None = None, **kwargs: Any):
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order.

        Every prompt is validated before any starts: a bad one raises ``ValueError`` naming
        its index and field, and the engine is left as it was.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"sampling_params: {len(params_list)} given for {len(prompts)} prompts")
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        requests = []
        for i, (prompt, params, prio) in enumerate(zip(prompts, params_list, priorities)):
            try:
                requests.append(self.engine.make_request(str(next(self._ids)), prompt, params, prio))
            except InvalidRequestError as exc:
                message = str(exc).removeprefix(f"{exc.field}: ")  # the field is named once
                raise InvalidRequestError(exc.field, f"prompt {i}: {message}") from None
        for req in requests:
            self.engine.submit(req)
        return self._run(requests, use_tqdm and len(requests) > 1)

    def _run(self, requests, show_progress: bool) -> list[RequestOutput]:
        order = {r.request_id: i for i, r in enumerate(requests)}
        results: list[RequestOutput | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="Processed prompts", disable=not show_progress)
        with frozen_gc():  # see gc_freeze: no full collections over the loaded model
            try:
                left = len(requests)
                while left:
                    for out in self.engine.step(final_only=True):
                        if out.finished and out.request_id in order:
                            results[order[out.request_id]] = out
                            left -= 1
                            bar.update(1)
            finally:
                bar.close()
                for r in requests:  # an exception mid-run must not leave requests holding blocks
                    if not r.group.is_finished:
                        self.engine.abort_request(r.request_id)
        return results  # type: ignore[return-value]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of ``{"role", "content"}``) or many,
        formatted with the tokenizer's chat template."""
        tok = self.engine.tokenizer
        if tok is None:
            raise InvalidRequestError("messages", "this model has no tokenizer to format chats")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conv in conversations:
            ids = tok.apply_chat_template(conv, chat_template=chat_template, tokenize=True,
                                          add_generation_prompt=add_generation_prompt)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            prompts.append({"prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def beam_search(self, prompts: PromptType | Sequence[PromptType],
                    params: "BeamSearchParams") -> list["BeamSearchOutput"]:
        """Beam search (vLLM's shape): the ``beam_width`` best continuations of each prompt,
        best first, chosen by HF transformers' ``num_beams`` rules (``early_stopping`` too),
        so the same weights give HF's beams and scores.  Beams share their common blocks
        copy-on-write."""
        from pagedllm.beam_search import beam_search

        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        token_lists = []
        for i, p in enumerate(prompts):
            try:
                req = self.engine.make_request(f"beam-check-{i}", p, SamplingParams(
                    max_tokens=params.max_tokens, ignore_eos=True))
            except InvalidRequestError as exc:
                message = str(exc).removeprefix(f"{exc.field}: ")
                raise InvalidRequestError(exc.field, f"prompt {i}: {message}") from None
            token_lists.append(req.prompt_token_ids)
        return beam_search(self.engine, token_lists, params)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()
