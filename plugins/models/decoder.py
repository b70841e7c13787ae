"""The decoder-only transformer shared by Llama, Mistral, Qwen2 and Qwen3.

Parameter names mirror HF transformers (``model.layers.N.self_attn.o_proj.weight`` ...), so a
checkpoint loads by name, except that q/k/v and gate/up are each one matmul: ``qkv_proj`` and
``gate_up_proj`` hold the checkpoint's tensors stacked (``MERGED`` maps the names both ways).
Architectures differ only in a few switches (``DecoderOptions``): biases on q/k/v, an RMSNorm
on q and k, tied embeddings.  Attention is the backend plugin's; norms, rotary and the MLP's
activation are ``fused_ops`` (one Triton kernel each on CUDA).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.attention import AttentionMetadata

from .fused_ops import rms_norm, rotary, silu_and_mul, use_fused
from .rope import RotaryEmbedding, rope_parameters

# Checkpoint projection -> (our stacked parameter, its shard index).
MERGED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


@dataclass
class DecoderOptions:
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``, or with ``residual``: (``norm(x + residual)``, ``x + residual``)."""
        out, new_residual = rms_norm(x, self.weight, self.eps, residual)
        return out if residual is None else (out, new_residual)


def _act(name: str):
    if name in ("silu", "swish"):
        return F.silu
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"hidden_act: {name!r} is not supported (silu, gelu, gelu_pytorch_tanh)")


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.shard_sizes = {"gate_up_proj": [intermediate, intermediate]}
        self.silu = act in ("silu", "swish")
        self.act = _act(act)

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        if self.silu:
            return self.down_proj(silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class SelfAttention(nn.Module):
    def __init__(self, config, options: DecoderOptions, attention_factory, rotary: RotaryEmbedding):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.num_heads
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(hidden, q_size + 2 * kv_size, bias=options.qkv_bias)
        self.shard_sizes = {"qkv_proj": [q_size, kv_size, kv_size]}
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=options.o_bias)
        if options.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.rotary = rotary
        self.attn = attention_factory(self.num_heads, self.num_kv_heads, self.head_dim,
                                      self.head_dim**-0.5)

    def forward(self, x, positions, rope, kv_cache, metadata):
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.shard_sizes["qkv_proj"], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(q, k, positions, *rope)
        o = self.attn.forward(q, k, v, kv_cache, metadata)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, config, options, attention_factory, rotary):
        super().__init__()
        self.self_attn = SelfAttention(config, options, attention_factory, rotary)
        self.mlp = MLP(config.hidden_size, config.intermediate_size,
                       getattr(config, "hidden_act", "silu"), options.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, residual, positions, rope, kv_cache, metadata):
        """Returns (this layer's MLP output, the residual stream before it); the next norm
        adds them, so each add is fused into a norm."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, rope, kv_cache, metadata)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderBody(nn.Module):
    def __init__(self, config, options, attention_factory):
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rotary = RotaryEmbedding(head_dim, rope_parameters(config))
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, options, attention_factory, self.rotary)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DecoderForCausalLM(nn.Module):
    """The model class the engine drives (see the ``register_model_architectures`` spec)."""

    options = DecoderOptions()

    def __init__(self, config, attention_factory, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.config = config
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        with torch.device("meta"):
            self.model = DecoderBody(config, self.options, attention_factory)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.to_empty(device=device)
        self.to(dtype)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _place(self, name: str) -> torch.Tensor | None:
        """The tensor (a parameter, or a shard of a stacked one) a checkpoint name loads into."""
        module_path, _, leaf = name.rpartition(".")
        owner_path, _, proj = module_path.rpartition(".")
        if proj in MERGED:
            stacked, index = MERGED[proj]
            try:
                owner = self.get_submodule(owner_path)
            except AttributeError:
                return None
            sizes = owner.shard_sizes[stacked]
            param = getattr(getattr(owner, stacked), leaf, None)
            if param is None:
                return None
            return param.narrow(0, sum(sizes[:index]), sizes[index])
        return dict(self.named_parameters(remove_duplicate=False)).get(name)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Our weights under the checkpoint's names (stacked ones split back), e.g. to load
        an HF transformers twin of this model."""
        out = {}
        for name, param in self.named_parameters(remove_duplicate=False):
            module_path, _, leaf = name.rpartition(".")
            owner_path, _, stacked = module_path.rpartition(".")
            projs = [p for p, (s, _) in MERGED.items() if s == stacked]
            if not projs:
                out[name] = param
                continue
            sizes = self.get_submodule(owner_path).shard_sizes[stacked]
            for proj, part in zip(projs, param.split(sizes, dim=0)):
                out[f"{owner_path}.{proj}.{leaf}"] = part
        if self.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        expected = set(self.hf_state_dict())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            target = self._place(name) if name in expected else None
            if target is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(target.shape)}"
                )
            with torch.no_grad():
                target.copy_(tensor)
            loaded.add(name)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")

    def forward(self, input_ids, positions, kv_caches, metadata: AttentionMetadata):
        x = self.model.embed_tokens(input_ids)
        rotary_emb = self.model.rotary
        # The fused rotary computes cos/sin itself; the reference path shares one table.
        cos_sin = None if use_fused(x) else rotary_emb.cos_sin(positions, x.dtype)
        rope = (rotary_emb.inverse_frequencies(x.device), cos_sin)
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x, residual = layer(x, residual, positions, rope, kv_cache, metadata)
        return self.model.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
