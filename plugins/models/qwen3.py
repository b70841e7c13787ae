"""Qwen3 (dense): no q/k/v bias, an RMSNorm over each head of q and k before rotary."""
from __future__ import annotations

from pagedllm import hookimpl

from .decoder import DecoderForCausalLM, DecoderOptions


class Qwen3ForCausalLM(DecoderForCausalLM):
    def __init__(self, config, attention_factory, dtype, device):
        bias = bool(getattr(config, "attention_bias", False))
        self.options = DecoderOptions(qkv_bias=bias, o_bias=bias, qk_norm=True)
        super().__init__(config, attention_factory, dtype, device)


@hookimpl
def register_model_architectures():
    return {"Qwen3ForCausalLM": Qwen3ForCausalLM}
