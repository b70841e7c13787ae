"""What an attention backend is: per-step metadata in, attention output out.

The engine builds one ``AttentionMetadata`` per step and hands the same object to every
layer.  A backend plugin subclasses ``AttentionBackend`` (see the hook spec
``register_attention_backends`` for the contract).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """One flat, unpadded step: sequence ``i`` owns query rows
    ``query_start_loc[i] : query_start_loc[i+1]``, which sit at the end of its
    ``seq_lens[i]`` tokens (so its first new token is at position ``seq_lens[i] - query_len``).
    """

    slot_mapping: torch.Tensor  # [num_tokens] int32 or int64: each new K/V's slot; < 0: skip
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: tokens in context after this step
    # [num_seqs, width] int32: row i holds sequence i's blocks, then 0 up to the widest
    # table of the step; a CUDA-graph batch's rows are wider (a fixed width), and what lies
    # past the widest table there is unspecified: read a row only up to its sequence's
    # ``cdiv(seq_lens[i], block_size)`` blocks.
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int
    # Host copies, so a backend can plan without a device-to-host sync.
    query_lens_host: list[int]
    seq_lens_host: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)


@dataclass
class RotaryInputs:
    """What a backend that fuses the rotary embedding needs to apply it (``fuses_rotary``).

    Row t of ``cos``/``sin`` ([num_tokens, head_dim] float32, the two halves equal) holds
    token t's table, rounded to the activation dtype as the reference rounds it; the
    rotation is ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``, each
    product and the sum rounded to the activation dtype.  With ``q_norm``/``k_norm``
    (Qwen3), each head is first RMS-normalised over head_dim (``eps``) and scaled by them.

    ``by_position`` (only for a backend whose ``rotary_by_position`` is True): ``cos`` and
    ``sin`` are whole tables over positions, [max_positions, head_dim], and token t's row
    is its position, ``seq_lens[t] - 1`` (``fuses_rotary`` steps are decode steps), so the
    model gathers no rows a step.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    eps: float = 0.0
    by_position: bool = False


@dataclass
class AttentionPartials:
    """A decode step's attention output left in partitions (``forward_partials``), for its
    consumer (the model's o_proj) to combine on the way in.

    For decode row i, query head h and partition p: ``out[i, h, p]`` is the partition's
    softmax-weighted values (normalized within the partition), ``m[i, h, p]`` its largest
    score and ``l[i, h, p]`` its softmax sum, scores in log2 units (``q . k * scale *
    log2(e)``, sums of ``exp2(score - m)``).  Row i's partitions split its ``seq_lens[i]``
    keys evenly in whole ``granule``s: partition p holds keys ``[p * size, (p + 1) * size)``
    with ``size = cdiv(cdiv(seq_lens[i], num_splits), granule) * granule``; only the first
    ``cdiv(seq_lens[i], size)`` are written.  The attention output of (i, h) is
    ``sum_p exp2(m_p - M) l_p out_p / sum_p exp2(m_p - M) l_p`` over those (``M`` their
    largest ``m``), rounded to ``dtype`` (``combine`` computes it).
    """

    out: torch.Tensor  # [rows, num_heads, num_splits, head_dim] float32
    m: torch.Tensor  # [rows, num_heads, num_splits] float32
    l: torch.Tensor  # noqa: E741  [rows, num_heads, num_splits] float32
    seq_lens: torch.Tensor  # [rows] int32, on the device
    num_splits: int
    granule: int
    dtype: torch.dtype

    def combine(self) -> torch.Tensor:
        """The attention output, [rows, num_heads * head_dim] in ``dtype`` (torch; the
        reference for a consumer's fused combine)."""
        rows, heads, splits, dim = self.out.shape
        lens = self.seq_lens.long()
        size = -(-(-(-lens // splits)) // self.granule) * self.granule
        used = -(-lens // size)  # [rows]
        ok = torch.arange(splits, device=lens.device)[None, :] < used[:, None]  # [rows, S]
        m = self.m.masked_fill(~ok[:, None, :], float("-inf"))
        top = m.amax(dim=-1, keepdim=True)
        w = torch.exp2(m - top) * self.l.masked_fill(~ok[:, None, :], 0.0)
        out = self.out.masked_fill(~ok[:, None, :, None], 0.0)  # unwritten: any bits
        o = (out * w[..., None]).sum(dim=2) / w.sum(dim=-1, keepdim=True)
        return o.to(self.dtype).reshape(rows, heads * dim)


class AttentionBackend(ABC):
    """One layer's attention over the paged KV cache."""

    name: str = ""
    priority: int = 0
    block_dim: int = 1  # which axis of the layer's cache tensor indexes blocks
    cuda_graph_decode: bool = False  # decode-only forwards may be captured (see the hook spec)
    rotary_by_position: bool = False  # takes RotaryInputs.by_position tables (the hook spec)

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    @classmethod
    def supports(cls, head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
        return True

    @classmethod
    def cuda_graph_context_buckets(cls, batch_size: int) -> tuple[int, ...]:
        """Context lengths, besides the model's, to capture decode graphs of this batch
        size for (see the hook spec); none by default."""
        return ()

    @staticmethod
    @abstractmethod
    def kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]: ...

    def fuses_rotary(self, metadata: AttentionMetadata) -> bool:
        """Whether ``forward`` applies the rotary embedding itself in this step (see the
        hook spec); then the model passes q and k unrotated, with ``rotary=``."""
        return False

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        # Given only in steps where fuses_rotary(metadata) said True.
        rotary: RotaryInputs | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...

    def forward_partials(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        rotary: RotaryInputs | None = None,
    ) -> AttentionPartials | None:
        """``forward`` for a decode-only step, its output left in partitions for the
        model's o_proj to combine (see the hook spec); None (the base class's answer)
        where the backend does not offer it for this step, and then nothing has run."""
        return None
