"""Llama (Llama 2 and 3, with ``llama3`` rope scaling; SmolLM2) and Mistral."""
from __future__ import annotations

from pagedllm import hookimpl

from .decoder import DecoderForCausalLM, DecoderOptions


class LlamaForCausalLM(DecoderForCausalLM):
    def __init__(self, config, attention_factory, dtype, device):
        # Llama configs carry their bias switches; read them per checkpoint.
        self.options = DecoderOptions(
            qkv_bias=bool(getattr(config, "attention_bias", False)),
            o_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )
        super().__init__(config, attention_factory, dtype, device)


class MistralForCausalLM(DecoderForCausalLM):
    options = DecoderOptions()


@hookimpl
def register_model_architectures():
    return {"LlamaForCausalLM": LlamaForCausalLM, "MistralForCausalLM": MistralForCausalLM}
