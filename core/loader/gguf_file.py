"""A GGUF file (llama.cpp's format), read with the ``gguf`` package: the config from its
metadata, tensors dequantized to float32 at load, the tokenizer through transformers' GGUF
support.

llama.cpp stores q/k projections of Llama-family models with the rows of each head
interleaved for its rotary layout; we undo that so the weights are HF's again.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pagedllm.loader.errors import ModelLoadError

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise ModelLoadError(f"GGUF tensor {gguf_name!r} is not one pagedllm knows how to place")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation: per head, rows (pairs, 2) -> (2, pairs)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@functools.cache
def _reader_class():
    import gguf

    class PlainArrayReader(gguf.GGUFReader):
        """``gguf.GGUFReader`` slicing a plain ndarray view of its memory map.  The reader
        takes every metadata value (each of a tokenizer's ~100k strings and merges) as a
        slice of ``np.memmap``, whose subclass hooks run on every slice: a view of the
        same mapped bytes as a base ndarray reads SmolLM2's metadata about 4x faster.
        Same values, same memory; only ``_get`` differs."""

        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
            count = int(count)
            end = offset + np.dtype(dtype).itemsize * count
            arr = plain[offset:end].view(dtype=dtype)[:count]
            order = self.byte_order if override_order is None else override_order
            return arr.view(arr.dtype.newbyteorder(order))

    return PlainArrayReader


def open_reader(path: Path):
    try:
        return _reader_class()(str(path))
    except Exception as exc:  # truncated or corrupt files fail inside numpy memmaps
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def load_config(path: Path, reader):
    """An HF config built from the GGUF metadata (the keys llama.cpp writes per architecture)."""
    from transformers import AutoConfig

    model_type = _field(reader, "general.architecture")
    arch = _ARCHITECTURES.get(model_type)
    if arch is None:
        raise ModelLoadError(
            f"{path}: GGUF architecture {model_type!r} is not supported "
            f"(supported: {', '.join(_ARCHITECTURES)})"
        )
    names = {t.name for t in reader.tensors}

    def meta(key, default=None):
        return _field(reader, f"{model_type}.{key}", default)

    heads = meta("attention.head_count")
    hidden = meta("embedding_length")
    vocab = meta("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    rope = {"rope_type": "default", "rope_theta": float(meta("rope.freq_base", 10000.0))}
    scaling = meta("rope.scaling.type")
    if scaling and scaling != "none":
        rope.update(rope_type=scaling, factor=float(meta("rope.scaling.factor", 1.0)))
    kwargs = dict(
        architectures=[arch],
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=int(heads),
        num_key_value_heads=int(meta("attention.head_count_kv", heads)),
        head_dim=int(meta("attention.key_length", hidden // heads)),
        max_position_embeddings=int(meta("context_length", 2048)),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_parameters=rope,
        # No separate output matrix means the embedding is reused as the LM head.
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"{path}: GGUF metadata does not make a valid config ({exc})") from exc


def iter_gguf_tensors(path: Path, reader, config) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf.quants import dequantize

    permute = config.model_type in ("llama", "mistral")
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    for t in reader.tensors:
        name = hf_name(t.name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        try:
            data = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32, copy=False)
        except Exception as exc:
            raise ModelLoadError(f"{path}: tensor {t.name!r} cannot be read ({exc})") from exc
        if permute and t.name.endswith("attn_q.weight"):
            data = unpermute_rotary(data, n_heads)
        elif permute and t.name.endswith("attn_k.weight"):
            data = unpermute_rotary(data, n_kv)
        yield name, torch.from_numpy(np.array(data, copy=True))  # writable, owned
