"""Qwen2 / Qwen2.5: Llama's shape with biases on q, k and v (and usually tied embeddings)."""
from __future__ import annotations

from pagedllm import hookimpl

from .decoder import DecoderForCausalLM, DecoderOptions


class Qwen2ForCausalLM(DecoderForCausalLM):
    options = DecoderOptions(qkv_bias=True)


@hookimpl
def register_model_architectures():
    return {"Qwen2ForCausalLM": Qwen2ForCausalLM}
