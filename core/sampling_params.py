"""SamplingParams: how one request chooses its tokens and when it stops (vLLM's field names)."""
from __future__ import annotations

from dataclasses import dataclass, field


class InvalidRequestError(ValueError):
    """A request field is out of range; the message names the field and its limit."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass
class SamplingParams:
    """Per-request sampling and stopping options.

    ``temperature=0`` is greedy.  ``top_k=-1`` (or 0) and ``top_p=1`` disable those filters.
    Penalties follow vLLM: ``repetition_penalty`` (1 = off) scales logits of tokens seen in the
    prompt or output; ``presence_penalty``/``frequency_penalty`` (0 = off) subtract for tokens
    already generated.  ``logprobs=k`` returns the top-k log-probabilities (plus the sampled
    token's) of the model's distribution at each generated position.
    """

    n: int = 1
    best_of: int | None = None  # sample this many sequences, return the n most likely
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    stop_strings: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    @property
    def num_sequences(self) -> int:
        """Sequences generated for the request: best_of when given, else n."""
        return self.best_of or self.n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise InvalidRequestError("n", f"must be an integer >= 1, got {self.n!r}")
        if self.best_of is not None and (not isinstance(self.best_of, int) or self.best_of < self.n):
            raise InvalidRequestError("best_of", f"must be an integer >= n ({self.n}), got {self.best_of!r}")
        if (self.best_of or self.n) > 1 and self.temperature == 0 and self.best_of != self.n \
                and self.best_of is not None:
            raise InvalidRequestError("best_of", "must equal n under greedy sampling (temperature 0)")
        if self.temperature < 0:
            raise InvalidRequestError("temperature", f"must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise InvalidRequestError("top_k", f"must be -1 (disabled) or >= 0, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise InvalidRequestError("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                "min_tokens", f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        if self.repetition_penalty <= 0:
            raise InvalidRequestError(
                "repetition_penalty", f"must be > 0, got {self.repetition_penalty}"
            )
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise InvalidRequestError(
                "presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}"
            )
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise InvalidRequestError(
                "frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequestError("logprobs", f"must be in [0, 20], got {self.logprobs}")
        if any(not s for s in self.stop_strings):
            raise InvalidRequestError("stop", "stop strings must be non-empty")
