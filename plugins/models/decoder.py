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

from pagedllm.attention import AttentionMetadata, RotaryInputs

from . import fused_ops
from .fused_ops import (argmax, combine_linear, combine_linear_applies, linear, norm_mlp,
                        norm_mlp_applies, rms_norm, rms_norm_linear, rotary, silu_and_mul,
                        silu_mul_linear, silu_mul_linear_sum, silu_mul_linear_sum_applies,
                        use_fused)
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


class Linear(nn.Linear):
    """``nn.Linear`` whose few-row products (decode at small batch) run as a Triton GEMV
    on CUDA (``fused_ops.linear``); quantization plugins replace it like any nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool):
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)
        self.shard_sizes = {"gate_up_proj": [intermediate, intermediate]}
        self.silu = act in ("silu", "swish")
        self.act = _act(act)

    def forward(self, x):
        return self.down(self.gate_up_proj(x))

    def down(self, gate_up, down_sum=None):
        """The MLP from its gate/up projection on.  ``down_sum``: (this layer's float32 sum,
        the one to zero) where down_proj may run split over its input columns
        (``fused_ops.silu_mul_linear_sum``): the output is then that float32 sum, which the
        next norm rounds."""
        if self.silu:
            if type(self.down_proj) is Linear:  # not replaced by a quantization method
                if down_sum is not None and self.down_proj.bias is None:
                    out, zero = down_sum
                    return silu_mul_linear_sum(gate_up, self.down_proj.weight,
                                               out[:gate_up.shape[0]], zero)
                return silu_mul_linear(gate_up, self.down_proj.weight, self.down_proj.bias)
            return self.down_proj(silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class SelfAttention(nn.Module):
    def __init__(self, config, options: DecoderOptions, attention_factory):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.num_heads
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(hidden, q_size + 2 * kv_size, bias=options.qkv_bias)
        self.shard_sizes = {"qkv_proj": [q_size, kv_size, kv_size]}
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=options.o_bias)
        if options.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.attn = attention_factory(self.num_heads, self.num_kv_heads, self.head_dim,
                                      self.head_dim**-0.5)

    def forward(self, x, rope, kv_cache, metadata):
        return self.attend(self.qkv_proj(x), rope, kv_cache, metadata)

    def attend(self, qkv, rope, kv_cache, metadata, o_sum=None):
        """Attention from the qkv projection on, through o_proj; ``rope`` is the step's
        (cos, sin, by_position): rows (``RotaryEmbedding.cos_sin``), or with by_position
        whole tables for a backend that reads them itself (``RotaryInputs.by_position``).
        ``o_sum``: (this layer's float32 sum, the one to zero) where o_proj may take the
        attention as partitions (``fused_ops.combine_linear``): the output is then that
        float32 sum, which the next norm rounds."""
        t = qkv.shape[0]
        q, k, v = qkv.split(self.shard_sizes["qkv_proj"], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        qk_norm = None
        if self.q_norm is not None:  # applied inside the rotary op
            qk_norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        cos, sin, by_position = rope
        if self.attn.fuses_rotary(metadata):  # the backend rotates inside its kernels
            if not by_position:
                cos, sin = cos.reshape(t, -1).float(), sin.reshape(t, -1).float()
            fused = RotaryInputs(cos, sin, *(qk_norm or (None, None, 0.0)),
                                 by_position=by_position)
            # o_sum is given where combine_linear applies to the step (_o_proj_sums).
            if o_sum is not None and type(self.o_proj) is Linear and self.o_proj.bias is None:
                partials = self.attn.forward_partials(q, k, v, kv_cache, metadata,
                                                      rotary=fused)
                if partials is not None:
                    out, zero = o_sum
                    return combine_linear(partials, self.o_proj.weight, out[:t], zero)
            o = self.attn.forward(q, k, v, kv_cache, metadata, rotary=fused)
        else:
            q, k = rotary(q, k, (cos, sin), qk_norm=qk_norm)
            o = self.attn.forward(q, k, v, kv_cache, metadata)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, config, options, attention_factory):
        super().__init__()
        self.self_attn = SelfAttention(config, options, attention_factory)
        self.mlp = MLP(config.hidden_size, config.intermediate_size,
                       getattr(config, "hidden_act", "silu"), options.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, residual, rope, kv_cache, metadata, mlp_sum=None, ids=None,
                o_sum=None, down_sum=None):
        """Returns (this layer's MLP output, the residual stream before it); the next norm
        adds them, so each add is fused into a norm (and at decode each norm into the
        projection after it).  ``mlp_sum``: (this layer's float32 sum, the previous
        layer's) where the one-launch MLP may run (``fused_ops.norm_mlp``): the output is
        then that float32 sum, which the next norm rounds.  ``ids`` (the first layer): x is
        the embedding table and the input its rows ``ids``, gathered inside the first
        projection where it can (``fused_ops.rms_norm_linear``).  ``o_sum``: see
        ``SelfAttention.attend``; ``down_sum``: ``MLP.down``."""
        attn = self.self_attn
        qkv, residual = _norm_then_project(self.input_layernorm, attn.qkv_proj, x, residual,
                                           ids)
        h = attn.attend(qkv, rope, kv_cache, metadata, o_sum)
        mlp, norm = self.mlp, self.post_attention_layernorm
        if (mlp_sum is not None and mlp.silu and type(mlp.gate_up_proj) is Linear
                and type(mlp.down_proj) is Linear and mlp.gate_up_proj.bias is None
                and mlp.down_proj.bias is None
                and norm_mlp_applies(h, mlp.gate_up_proj.weight, mlp.down_proj.weight)):
            out, zero = mlp_sum
            residual = norm_mlp(h, residual, norm.weight, norm.eps, mlp.gate_up_proj.weight,
                                mlp.down_proj.weight, out, zero)
            return out, residual
        gate_up, residual = _norm_then_project(self.post_attention_layernorm,
                                               self.mlp.gate_up_proj, h, residual)
        return self.mlp.down(gate_up, down_sum), residual


def _norm_then_project(norm: RMSNorm, proj: nn.Module, x, residual, ids=None):
    """(proj(norm(x + residual)), x + residual), with x alone when residual is None; with
    ``ids``, x is the embedding table and its rows ``ids`` stand for x."""
    if type(proj) is Linear:  # not replaced by a quantization method: one fused op
        return rms_norm_linear(x, residual, norm.weight, norm.eps, proj.weight, proj.bias,
                               ids=ids)
    if ids is not None:
        x = F.embedding(ids, x)
    if residual is None:
        return proj(norm(x)), x
    h, residual = norm(x, residual)
    return proj(h), residual


class DecoderBody(nn.Module):
    def __init__(self, config, options, attention_factory):
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rotary = RotaryEmbedding(
            head_dim, rope_parameters(config),
            getattr(config, "max_position_embeddings", None) or 2048)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, options, attention_factory)
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
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.to_empty(device=device)
        self.to(dtype)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # The one-launch MLP's float32 sums (``_mlp_sums``); a plain attribute, not a
        # buffer: no checkpoint holds it.
        self.mlp_sum_buffers: torch.Tensor | None = None
        self.o_proj_sum_buffers: torch.Tensor | None = None  # ``_o_proj_sums``
        self.down_sum_buffers: torch.Tensor | None = None  # ``_down_sums``

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
        # The first layer gathers its input rows from the table itself.
        x = table = self.model.embed_tokens.weight
        # Once per step, for every layer: the rows, or (decode steps of a backend that reads
        # them itself) the whole tables.
        attn = self.model.layers[0].self_attn.attn
        if use_fused(x) and attn.rotary_by_position and attn.fuses_rotary(metadata):
            rope = (*self.model.rotary.tables(x.device, x.dtype), True)
        else:
            rope = (*self.model.rotary.cos_sin(positions, x.dtype, as_float32=use_fused(x)),
                    False)
        residual = None
        sums = self._mlp_sums(table, input_ids.shape[0])
        o_sums = self._o_proj_sums(input_ids.shape[0]) if attn.fuses_rotary(metadata) else None
        d_sums = self._down_sums(input_ids.shape[0]) if sums is None else None
        for i, (layer, kv_cache) in enumerate(zip(self.model.layers, kv_caches)):
            # Layer i adds into sum i and zeroes sum i - 1 (the last one, at layer 0), which
            # the norm after it has read: every sum is zero again when its turn comes.
            x, residual = layer(x, residual, rope, kv_cache, metadata,
                                None if sums is None else (sums[i], sums[i - 1]),
                                ids=input_ids if i == 0 else None,
                                o_sum=None if o_sums is None else (o_sums[i],
                                                                   o_sums[i - 1].view(-1)),
                                down_sum=None if d_sums is None else (d_sums[i],
                                                                      d_sums[i - 1].view(-1)))
        return self.model.norm(x, residual)[0]

    def _layer_sums(self, attr: str, rows: int, width: int, device: torch.device
                    ) -> torch.Tensor | None:
        """[layers, rows, width] float32 sums kept in attribute ``attr`` (zeros when made,
        kept zero between uses by the kernels: layer i adds into sum i and zeroes sum
        i - 1), or None for a one-layer model, whose layer would zero the sum it adds into
        (sums[i - 1] is sums[i])."""
        if len(self.model.layers) < 2:
            return None
        sums = getattr(self, attr)
        if sums is None or sums.device != device:
            sums = torch.zeros(len(self.model.layers), rows, width, dtype=torch.float32,
                               device=device)
            setattr(self, attr, sums)
        return sums

    def _mlp_sums(self, x: torch.Tensor, rows: int) -> torch.Tensor | None:
        """[layers, 1, hidden] float32 sums for the one-launch MLP at one row
        (``_layer_sums``), or None where it does not run."""
        if not (fused_ops.FUSED_MLP and rows == 1 and use_fused(x)):
            return None
        return self._layer_sums("mlp_sum_buffers", 1, x.shape[-1], x.device)

    def _o_proj_sums(self, rows: int) -> torch.Tensor | None:
        """[layers, O_PROJ_MAX_ROWS, hidden] float32 sums for o_proj over attention
        partitions (``_layer_sums``), or None where it cannot run this step."""
        o_proj = self.model.layers[0].self_attn.o_proj
        # A quantization method's module may have no ``weight``: it keeps its own o_proj.
        if not (type(o_proj) is Linear and combine_linear_applies(rows, o_proj.weight)):
            return None
        weight = o_proj.weight
        return self._layer_sums("o_proj_sum_buffers", fused_ops.O_PROJ_MAX_ROWS,
                                weight.shape[0], weight.device)

    def _down_sums(self, rows: int) -> torch.Tensor | None:
        """[layers, O_PROJ_MAX_ROWS, hidden] float32 sums for down_proj split over its
        columns (``fused_ops.silu_mul_linear_sum``, ``_layer_sums``), or None where it
        does not run this step."""
        mlp = self.model.layers[0].mlp
        down = mlp.down_proj
        if not (mlp.silu and type(down) is Linear and down.bias is None
                and silu_mul_linear_sum_applies(rows, down.weight)):
            return None
        return self._layer_sums("down_sum_buffers", fused_ops.O_PROJ_MAX_ROWS,
                                down.weight.shape[0], down.weight.device)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def greedy_ids(self, logits: torch.Tensor,
                   ids_out: torch.Tensor | None = None) -> torch.Tensor:
        return argmax(logits, ids_out=ids_out)
