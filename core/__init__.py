"""pagedllm: a pluggable LLM inference engine with a paged KV cache and continuous batching.

``from pagedllm import LLM, SamplingParams, hookimpl``
"""
from pagedllm.hookspecs import hookimpl
from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.sampling_params import InvalidRequestError, SamplingParams

__all__ = [
    "LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput",
    "Logprob", "InvalidRequestError", "hookimpl", "BeamSearchParams", "BeamSearchOutput",
]
__version__ = "0.1.0"


def __getattr__(name):  # keep `import pagedllm` light for plugins that only need hookimpl
    if name == "LLM":
        from pagedllm.llm import LLM
        return LLM
    if name == "LLMEngine":
        from pagedllm.engine import LLMEngine
        return LLMEngine
    if name in ("BeamSearchParams", "BeamSearchOutput"):
        from pagedllm import beam_search
        return getattr(beam_search, name)
    if name == "EngineConfig":
        from pagedllm.config import EngineConfig
        return EngineConfig
    raise AttributeError(name)
