"""The OpenAI HTTP schema as pydantic models, plus vLLM's extra request fields.

Requests accept OpenAI's fields and vLLM's sampling extras (``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos``, ``min_tokens``, ...), which the ``openai`` client
sends through ``extra_body``.  Unknown fields are ignored, as vLLM does, so clients written
for a newer API still work; fields we know but cannot honour (``tools``, ``logit_bias``,
JSON ``response_format``...) are rejected with 400 naming the field rather than silently
dropped.  Ranges are checked by ``SamplingParams`` so the HTTP and Python APIs agree.
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from pagedllm.sampling_params import InvalidRequestError, SamplingParams

MAX_N = 128  # choices per request: fan-out beyond this is a denial of service, not a use
MAX_LOGPROBS = 20  # what the sampler returns at most
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; clients expect a number


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- requests ------------------------------------------------------------------------------
class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM: usage in every chunk


class SamplingRequest(OpenAIBaseModel):
    """Fields chat and completions share."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = 0  # for the `priority` scheduler: lower values first

    def check_common(self) -> None:
        """What SamplingParams cannot check: fan-out size, unsupported OpenAI fields."""
        if not 1 <= self.n <= MAX_N:
            raise InvalidRequestError("n", f"must be in [1, {MAX_N}], got {self.n}")
        if self.best_of is not None and not self.n <= self.best_of <= MAX_N:
            raise InvalidRequestError("best_of", f"must be in [n, {MAX_N}], got {self.best_of}")
        if self.stream and (self.best_of or self.n) > self.n:
            raise InvalidRequestError("best_of", "cannot stream: the best sequences are only "
                                                 "known at the end; leave it out or equal to n")
        if self.logit_bias:
            raise InvalidRequestError("logit_bias", "is not supported")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options", "is only allowed when stream is true")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The engine request's SamplingParams (the engine seeds sequence ``i`` of ``n`` with
        ``seed + i``, so choice 0 is what the same request with ``n=1`` returns)."""
        return SamplingParams(
            n=self.n,
            best_of=self.best_of,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def check(self) -> None:
        self.check_common()
        if self.suffix:
            raise InvalidRequestError("suffix", "is not supported")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.echo and self.logprobs is not None:
            raise InvalidRequestError("echo", "with logprobs is not supported (no prompt logprobs)")

    def prompts(self) -> list[str | dict]:
        """The engine prompts: strings, or ``{"prompt_token_ids": [...]}``."""
        p = self.prompt
        if isinstance(p, str):
            items: list = [p]
        elif not p:
            raise InvalidRequestError("prompt", "must not be empty")
        elif all(isinstance(x, int) for x in p):
            items = [{"prompt_token_ids": list(p)}]
        elif all(isinstance(x, str) for x in p):
            items = list(p)
        else:
            items = [{"prompt_token_ids": list(x)} for x in p]
        return items


class TextPart(OpenAIBaseModel):
    type: str
    text: str | None = None


class ChatMessage(OpenAIBaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls...: the template may use them
    role: str
    content: str | list[TextPart] | None = None


class ResponseFormat(OpenAIBaseModel):
    type: str


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None
    # vLLM's extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def check(self) -> None:
        self.check_common()
        if not self.messages:
            raise InvalidRequestError("messages", "must not be empty")
        if self.tools:
            raise InvalidRequestError("tools", "tool calling is not supported")
        if self.tool_choice not in (None, "none"):
            raise InvalidRequestError("tool_choice", "tool calling is not supported")
        if self.response_format is not None and self.response_format.type != "text":
            raise InvalidRequestError(
                "response_format", f"type {self.response_format.type!r} is not supported; only 'text'")
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise InvalidRequestError(
                    "top_logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}")
            if not self.logprobs:
                raise InvalidRequestError("top_logprobs", "requires logprobs to be true")
        if self.continue_final_message and self.add_generation_prompt:
            raise InvalidRequestError(
                "continue_final_message", "cannot be combined with add_generation_prompt=true")

    @property
    def max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def conversation(self) -> list[dict[str, Any]]:
        """Messages as the chat template wants them: content as one string."""
        out = []
        for i, m in enumerate(self.messages):
            msg = dict(m.model_extra or {})
            msg["role"] = m.role
            if isinstance(m.content, list):
                texts = []
                for part in m.content:
                    if part.type != "text" or part.text is None:
                        raise InvalidRequestError(
                            f"messages[{i}].content", f"part type {part.type!r} is not supported; "
                            f"only text parts")
                    texts.append(part.text)
                msg["content"] = "\n".join(texts)
            else:
                msg["content"] = m.content if m.content is not None else ""
            out.append(msg)
        return out


class TokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


# ---- responses -----------------------------------------------------------------------------
class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionLogprobs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM: the stop string or token id that ended it


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIBaseModel):
    content: list[ChatLogprobToken] | None = None


class ChatResponseMessage(OpenAIBaseModel):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatDelta(OpenAIBaseModel):
    role: str | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler):
        # OpenAI sends only the keys a delta changes ({} on the last chunk).
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(OpenAIBaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionChunk(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedllm"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo
