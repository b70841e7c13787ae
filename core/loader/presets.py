"""Model shapes for ``load_format="dummy"``: random weights of a known architecture, for
benchmarks (BENCHMARKS.md W1/W2 use the Qwen3-0.6B and Llama-3.1-8B shapes)."""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    "qwen3-0.6b": dict(
        model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936,
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
        max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, eos_token_id=151645,
    ),
    "llama-3.1-8b": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256,
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
        max_position_embeddings=131072, rms_norm_eps=1e-5, eos_token_id=128001,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    ),
}


def preset_config(name: str):
    from transformers import AutoConfig

    spec = dict(PRESETS[name])
    model_type = spec.pop("model_type")
    return AutoConfig.for_model(model_type, **spec)
