"""The ``triton`` attention backend: paged attention in Triton kernels, for CUDA GPUs.

It keeps the reference cache layout ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(``block_dim`` 1), so swapping and copying blocks work as for ``torch``.  One ``forward``:

1. ``write_kv_kernel`` puts the new K/V at ``slot_mapping`` (a decode-only step skips it:
   the decode kernel writes each sequence's new token itself, one launch fewer a layer);
2. decode rows (one query token) go to the flash-decoding kernel, split over the context
   length so that small batches of long sequences still fill the GPU; the last partition
   of each sequence to finish combines them.  In a decode-only step the kernel also applies
   the rotary embedding (``fuses_rotary``), so a decoding layer's attention is one launch;
3. every other row (prompts, prompt chunks, prefix-cache hits, several tokens at a time) goes
   to the causal flash-attention prefill kernel.

Mixed batches need no device-to-host sync: the launch plan (which rows decode, which query
tiles exist, how far to split) comes from ``metadata``'s host lists, is built once per step
(all layers share the metadata object) and reaches the device in one asynchronous copy, or
none when the decode rows are a prefix of the batch and nothing else runs.

Triton is imported lazily: without it (or on a CPU) the module still imports and
``supports`` says no.  With ``TRITON_INTERPRET=1`` set before Triton is first imported, the
kernels run in Triton's interpreter on CPU tensors, slowly; that is how CI tests them.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from types import ModuleType

import torch

from pagedllm import hookimpl
from pagedllm.attention import (AttentionBackend, AttentionMetadata, AttentionPartials,
                                RotaryInputs)
from pagedllm.dependent_launch import pdl_launch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PLAN_ATTR = "_triton_attention_plans"  # per-step launch plans, cached on the metadata


def interpreting() -> bool:
    """Whether Triton will run kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _kernels() -> ModuleType | None:
    """The kernels module, or None when Triton is missing or fails to import."""
    try:
        if importlib.util.find_spec("triton") is None:
            return None
        from pagedllm.plugins.attention import triton_kernels
    except Exception:  # a broken Triton install must not break the registry
        return None
    return triton_kernels


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _decode_only(md: AttentionMetadata) -> bool:
    """Every row of the step is one decode token."""
    return md.max_query_len == 1


@dataclass
class _Plan:
    """Where each row of one step goes; built from the metadata's host lists."""

    num_decodes: int
    decode_ids: torch.Tensor | None  # [num_decodes] batch rows; None: rows 0..num_decodes-1
    max_decode_len: int
    num_tiles: int
    tile_seq: torch.Tensor | None  # [num_tiles] batch row of each prefill query tile
    tile_start: torch.Tensor | None  # [num_tiles] its first query token within the row


def _build_plan(md: AttentionMetadata, block_q: int, device: torch.device) -> _Plan:
    qlens, lens = md.query_lens_host, md.seq_lens_host
    decodes = [i for i, n in enumerate(qlens) if n == 1]
    tile_seq, tile_start = [], []
    for i, n in enumerate(qlens):
        if n != 1:
            for s in range(0, n, block_q):
                tile_seq.append(i)
                tile_start.append(s)
    dense = decodes == list(range(len(decodes)))
    # Each list starts on a 16-byte boundary (4 int32): the kernels are specialized on
    # their pointers' alignment, and offsets that moved would compile new variants.
    pad = [0] * (-len(tile_seq) % 4)
    head = [] if dense else decodes + [0] * (-len(decodes) % 4)
    host = head + tile_seq + pad + tile_start
    ids = None
    if host:
        ids = torch.tensor(host, dtype=torch.int32)
        if device.type == "cuda":  # pinned + non_blocking: no wait for the device
            ids = ids.pin_memory().to(device, non_blocking=True)
        else:
            ids = ids.to(device)
    nd, nt = len(decodes), len(tile_seq)
    off, off2 = len(head), len(head) + nt + len(pad)
    return _Plan(
        num_decodes=nd,
        decode_ids=None if dense else ids[:nd],
        max_decode_len=max((lens[i] for i in decodes), default=0),
        num_tiles=nt,
        tile_seq=ids[off : off + nt] if nt else None,
        tile_start=ids[off2 : off2 + nt] if nt else None,
    )


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    priority = 10  # beats "torch" (0) under attention_backend="auto" wherever it runs
    block_dim = 1
    # Decode launches depend on the host lists only through their length and max_seq_len
    # (the split count); padded rows (seq_len 1, slot -1) are harmless.
    cuda_graph_decode = True

    # Decode splitting: aim for about this many programs per SM, never splitting a sequence
    # into partitions shorter than ``decode_min_partition`` tokens.  A test or a benchmark
    # can set them on an instance to force (or forbid) splitting; PAGEDLLM_DECODE_PROGRAMS_PER_SM
    # sets the first, for benchmarking.
    decode_programs_per_sm = int(os.environ.get("PAGEDLLM_DECODE_PROGRAMS_PER_SM", 4))
    decode_min_partition = 128
    decode_max_splits = 128
    # Warps per decode program.  On the H200 (device call 2, 2026-12-02, ``bench kernels``)
    # 4 beat 8 from B=8 up (W6 B=128 ctx 4096: 501 against 586 us) and tied at B=1 (W2:
    # 0.797 against 0.796 ms), though ptxas has 4 warps spill 130-190 bytes and 8 none.
    # PAGEDLLM_DECODE_WARPS overrides it, for benchmarking.
    decode_num_warps = int(os.environ.get("PAGEDLLM_DECODE_WARPS", 4))
    # Keys per decode tile (None: by dtype, ``_decode_config``) and a register cap per
    # thread (None: the compiler's choice, 255 at 4 warps, so two programs an SM).  Not yet
    # measured on a GPU: ptxas for sm90 has 16 keys under a 128-register cap spill 84 bytes
    # (4 programs an SM), against 192 bytes uncapped at 64 keys.  PAGEDLLM_DECODE_BLOCK_N
    # and PAGEDLLM_DECODE_MAXNREG set them, for benchmarking.
    decode_block_n = int(os.environ.get("PAGEDLLM_DECODE_BLOCK_N", 0)) or None
    decode_maxnreg = int(os.environ.get("PAGEDLLM_DECODE_MAXNREG", 0)) or None
    # Decode launches of at most ``decode_per_head_max_batch`` sequences, none longer than
    # ``decode_per_head_max_len``, use ``decode_head_kernel``: one-warp programs per query
    # head, no tl.dot, no cross-warp reductions, for latency-bound small batches of short
    # contexts; the rest the group-tile kernel, which loads each K/V tile once per group.
    # On the H200 (2026-12-02): W2 Qwen3-0.6B (contexts 128-192) 0.631 ms of device time a
    # step against 0.709 with the group kernel; but at B=1 with 4k/32k contexts (W6 shape)
    # 37.5/220 us against 18.9/54.7, as its partitions grow to many tiles, each a DRAM round
    # trip.  Up to 512 keys its partitions stay one tile.  CUDA graphs of small batches are
    # captured for that length too (``cuda_graph_context_buckets``), so a short decode uses
    # it even where the model's context is long.  Then: keys per tile, programs per SM (it
    # has 1-warp programs) and warps.  PAGEDLLM_DECODE_PER_HEAD_MAX_BATCH (0: never),
    # PAGEDLLM_DECODE_PER_HEAD_MAX_LEN, PAGEDLLM_DECODE_HEAD_BLOCK_N,
    # PAGEDLLM_DECODE_HEAD_PROGRAMS_PER_SM and PAGEDLLM_DECODE_HEAD_WARPS override them, for
    # benchmarking.
    decode_per_head_max_batch = int(os.environ.get("PAGEDLLM_DECODE_PER_HEAD_MAX_BATCH", 4))
    decode_per_head_max_len = int(os.environ.get("PAGEDLLM_DECODE_PER_HEAD_MAX_LEN", 512))
    decode_head_block_n = int(os.environ.get("PAGEDLLM_DECODE_HEAD_BLOCK_N", 16))
    decode_head_programs_per_sm = int(os.environ.get("PAGEDLLM_DECODE_HEAD_PROGRAMS_PER_SM", 4))
    decode_head_warps = int(os.environ.get("PAGEDLLM_DECODE_HEAD_WARPS", 1))
    decode_head_min_partition: int | None = None  # None: one tile (a test sets more)
    # forward_partials' dtypes: float32 keeps the kernel's own combine (and so HF parity
    # of o_proj's one fixed-order sum).
    partials_dtypes = (torch.float16, torch.bfloat16)
    # Profiling only (``bench latency --ablate combine``): partitions never combined.
    decode_ablate_combine = False

    @classmethod
    def supports(cls, head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
        device = torch.device(device)
        if dtype not in _DTYPES or not (16 <= head_dim <= 256) or head_dim & (head_dim - 1):
            return False
        if device.type == "cuda":
            if not interpreting():
                if not torch.cuda.is_available():
                    return False
                major, _ = torch.cuda.get_device_capability(device)
                if major < 8 and dtype == torch.bfloat16:  # bf16 tensor cores: Ampere on
                    return False
        elif not (device.type == "cpu" and interpreting()):
            return False
        return _kernels() is not None

    @staticmethod
    def kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim):
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
            raise ValueError(f"head_dim: {head_dim} is not a power of two in [16, 256], "
                             f"which the triton backend needs")
        self.group = num_heads // num_kv_heads
        self._k: ModuleType | None = None
        self._num_sms: int | None = None
        # [rows, num_kv_heads] int32 counters of finished partitions, zero between steps
        # (the combining program resets its own); grown eagerly, never inside a graph
        # capture, as the warm-up run before each capture has the graph's batch size.
        self._counters: torch.Tensor | None = None
        self._old_counters: list[torch.Tensor] = []
        self._no_table: torch.Tensor | None = None

    # ---- configuration -----------------------------------------------------------------

    def _prefill_config(self, dtype: torch.dtype) -> tuple[int, int, int, int]:
        """(BLOCK_M rows, BLOCK_N keys, num_warps, num_stages) for the prefill kernel."""
        d, wide = self.head_dim, dtype == torch.float32
        if d <= 64:
            block_m, block_n, warps, stages = 128, 64, 4, 3
        elif d <= 128:
            block_m, block_n, warps, stages = 128, 64, 8, 2
        else:
            block_m, block_n, warps, stages = 64, 32, 8, 2
        if wide:  # twice the bytes per tile
            block_m, block_n = max(block_m // 2, 32), max(block_n // 2, 16)
        return max(block_m, _next_pow2(self.group)), block_n, warps, stages

    def _decode_config(self, dtype: torch.dtype) -> tuple[int, int, int]:
        """(BLOCK_N keys, num_warps, num_stages) for the decode kernel.

        Swept on an H100 over W6 shapes (B 1-64, context 4k-32k, bf16, head_dim 128): 64 keys,
        2 stages was within 1% of the best per shape on average; 3 stages (96 KB of shared
        memory, two programs per SM) lost 18% at B=16.  Warps: ``decode_num_warps``.
        """
        warps = self.decode_num_warps
        block_n = 64 if self.head_dim <= 128 and dtype != torch.float32 else 32
        return self.decode_block_n or block_n, warps, 2

    @classmethod
    def cuda_graph_context_buckets(cls, batch_size: int) -> tuple[int, ...]:
        """The short-context graphs worth capturing: where ``decode_head_kernel`` applies."""
        if batch_size <= cls.decode_per_head_max_batch and cls.decode_per_head_max_len > 0:
            return (cls.decode_per_head_max_len,)
        return ()

    def _per_head(self, num_decodes: int, max_len: int) -> bool:
        """Whether a decode launch of ``num_decodes`` sequences, the longest ``max_len``
        tokens, uses ``decode_head_kernel``."""
        return (num_decodes <= self.decode_per_head_max_batch
                and max_len <= self.decode_per_head_max_len)

    def _splits(self, num_decodes: int, max_len: int, device) -> int:
        """Partitions per sequence for one decode launch (the kernel sizes each sequence's)."""
        if self._num_sms is None:
            self._num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                             if device.type == "cuda" else 4)
        if self._per_head(num_decodes, max_len):
            # Partitions of one tile: the kernel is latency-bound, and one-warp programs
            # are cheap, so as many as the length allows (or programs per SM ask).
            programs, per_sm = num_decodes * self.num_heads, self.decode_head_programs_per_sm
            min_partition = self.decode_head_min_partition or self.decode_head_block_n
            want = max(_cdiv(per_sm * self._num_sms, programs), _cdiv(max_len, min_partition))
        else:
            programs, per_sm = num_decodes * self.num_kv_heads, self.decode_programs_per_sm
            min_partition = self.decode_min_partition
            want = _cdiv(per_sm * self._num_sms, programs)
        return max(1, min(want, _cdiv(max_len, min_partition), self.decode_max_splits))

    def _unused_table(self, device: torch.device) -> torch.Tensor:
        """A float32 stand-in for the rotary tables of a step that passes none."""
        t = self._no_table
        if t is None or t.device != device:
            t = self._no_table = torch.zeros(self.head_dim, dtype=torch.float32, device=device)
        return t

    def _counters_for(self, rows: int, device: torch.device) -> torch.Tensor:
        c = self._counters
        if c is None or c.shape[0] < rows or c.device != device:
            if c is not None:  # a captured graph may still use it: never free it
                self._old_counters.append(c)
            # num_heads a row: the per-head kernel counts per query head; the group kernel
            # indexes row * num_kv_heads + kv_head, inside the same (zeroed) span.
            c = self._counters = torch.zeros((max(256, _next_pow2(rows)), self.num_heads),
                                             dtype=torch.int32, device=device)
        return c

    def _kernels(self) -> ModuleType:
        k = self._k
        if k is None:
            k = self._k = _kernels()
            if k is None:
                raise RuntimeError("the triton attention backend needs the `triton` package")
        return k

    # ---- forward -----------------------------------------------------------------------

    # Decode tokens sit at position seq_len - 1: the kernels read cos/sin rows from whole
    # tables themselves (RotaryInputs.by_position), so the model gathers none a step.
    # PAGEDLLM_ROTARY_TABLES=0 has the model gather rows instead, for benchmarking.
    rotary_by_position = os.environ.get("PAGEDLLM_ROTARY_TABLES", "1") == "1"

    def fuses_rotary(self, metadata: AttentionMetadata) -> bool:
        """Decode-only steps (rows in batch order, CUDA-graph steps among them): the decode
        kernel rotates q and the new key itself."""
        return _decode_only(metadata)

    def forward(self, query, key, value, kv_cache, metadata: AttentionMetadata,
                rotary: RotaryInputs | None = None):
        return self._forward(query, key, value, kv_cache, metadata, rotary, False)

    def forward_partials(self, query, key, value, kv_cache, metadata: AttentionMetadata,
                         rotary: RotaryInputs | None = None) -> AttentionPartials | None:
        """Offered where ``decode_head_kernel`` runs (small decode batches of short
        contexts, half precision): its partitions, uncombined, so no program waits on the
        others' (the combine's atomic and reloads cost the W2 Qwen3-0.6B step about 1.2 us
        a layer, H200)."""
        if not (_decode_only(metadata) and query.dtype in self.partials_dtypes
                and self._per_head(metadata.num_seqs, metadata.max_seq_len)):
            return None
        return self._forward(query, key, value, kv_cache, metadata, rotary, True)

    def _forward(self, query, key, value, kv_cache, metadata: AttentionMetadata,
                 rotary: RotaryInputs | None, partials: bool):
        k = self._kernels()
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        if key_cache.stride(-1) != 1:
            raise ValueError("kv_cache: head_dim must be the innermost, contiguous axis")
        block_size = key_cache.shape[1]
        query, key, value = (t if t.stride(-1) == 1 else t.contiguous()
                             for t in (query, key, value))
        out = (query if partials  # not written: a stand-in of the right dtype
               else torch.empty(query.shape, dtype=query.dtype, device=query.device))
        num_tokens = query.shape[0]
        if num_tokens == 0 and not partials:
            return out
        cb, cs, ch = key_cache.stride(0), key_cache.stride(1), key_cache.stride(2)
        dot_fp32 = k.INTERPRETED or key_cache.dtype == torch.float32
        dot = dict(DOT_FP32=dot_fp32, DOT_PRECISION="ieee" if dot_fp32 else "tf32")
        launch = pdl_launch(query.device)

        block_m, block_n, warps, stages = self._prefill_config(key_cache.dtype)
        if k.INTERPRETED:  # the interpreter's cost grows with tile size: fit it to the batch
            block_m = min(block_m, max(16, _next_pow2(metadata.max_query_len * self.group)))
            block_n = 64
        block_q = block_m // self.group
        plans = metadata.__dict__.setdefault(_PLAN_ATTR, {})
        plan = plans.get(block_q)
        if plan is None:
            plan = plans[block_q] = _build_plan(metadata, block_q, query.device)

        # A decode-only step (every row one new token, rows in batch order: CUDA-graph
        # steps among them) writes its K/V inside the decode kernel, one launch fewer a
        # layer; any other step writes every new token first.
        fused_write = _decode_only(metadata)
        if rotary is not None and not fused_write:
            raise ValueError("rotary: given for a step fuses_rotary() declined")
        if not fused_write:
            # Tokens per program: about 8K elements of (kv head, dim) each.
            kvh_pad = _next_pow2(self.num_kv_heads)
            block_t = max(1, 8192 // (kvh_pad * self.head_dim))
            k.write_kv_kernel[(_cdiv(key.shape[0], block_t),)](
                key, value, key_cache, value_cache, metadata.slot_mapping, key.shape[0],
                key.stride(0), key.stride(1), value.stride(0), value.stride(1), cb, cs, ch,
                NUM_KV_HEADS=self.num_kv_heads, HEAD_DIM=self.head_dim,
                BLOCK_SIZE=block_size, KVH_PAD=kvh_pad, BLOCK_T=block_t, **launch,
                num_warps=4,
            )

        common = (metadata.block_tables, metadata.seq_lens, metadata.query_start_loc)
        strides = (query.stride(0), query.stride(1), out.stride(0), out.stride(1),
                   cb, cs, ch, metadata.block_tables.stride(0))
        if partials:  # a decode-only step (forward_partials): no prefill tiles
            return self._decode(k, query, key_cache, value_cache, out, metadata, plan,
                                strides, dot, (key, value), fused_write, rotary, launch,
                                partials=True)
        if plan.num_decodes:
            self._decode(k, query, key_cache, value_cache, out, metadata, plan, strides, dot,
                         (key, value), fused_write, rotary, launch)
        if plan.num_tiles:
            k.prefill_kernel[(plan.num_tiles, self.num_kv_heads)](
                query, key_cache, value_cache, out, *common, plan.tile_seq, plan.tile_start,
                self.scale, *strides,
                GROUP=self.group, HEAD_DIM=self.head_dim, BLOCK_SIZE=block_size,
                BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, **dot, **launch,
                num_warps=warps, num_stages=stages,
            )
        return out

    def _decode(self, k, query, key_cache, value_cache, out, md, plan: _Plan, strides, dot,
                new_kv: tuple[torch.Tensor, torch.Tensor], write_kv: bool,
                rotary: RotaryInputs | None, launch: dict, partials: bool = False
                ) -> AttentionPartials | None:
        """``new_kv``: (key, value) of the step's tokens (rotated by ``rotary`` when given, as
        q is): the kernel takes each sequence's new token from them, not from the cache,
        and with ``write_kv`` stores it in the cache too.  ``partials`` (``forward_partials``:
        the per-head kernel applies): every partition stored, none combined, and returned."""
        nd = plan.num_decodes
        per_head = self._per_head(nd, plan.max_decode_len)
        block_n, warps, stages = self._decode_config(key_cache.dtype)
        splits = self._splits(nd, plan.max_decode_len, query.device)
        dense = plan.decode_ids is None
        ids = md.seq_lens if dense else plan.decode_ids  # unused when dense
        if partials and not (per_head and dense):  # forward_partials checked the same rule
            raise RuntimeError("attention partials need the per-head kernel's batch order")
        if partials or splits > 1:
            shape = (nd, self.num_heads, splits)
            part_m = torch.empty(shape, dtype=torch.float32, device=query.device)
            part_l = torch.empty(shape, dtype=torch.float32, device=query.device)
            part_o = torch.empty(shape + (self.head_dim,), dtype=torch.float32,
                                 device=query.device)
            # with partials nothing is combined here: no counters (part_m stands in)
            counters = part_m if partials else self._counters_for(nd, query.device)
        else:
            part_m = part_l = part_o = counters = out  # unused
        key, value = new_kv
        if rotary is not None:
            cos, sin = rotary.cos, rotary.sin
            if cos.stride(-1) != 1 or sin.stride(0) != cos.stride(0):
                cos, sin = cos.contiguous(), sin.contiguous()
            q_norm = rotary.q_norm if rotary.q_norm is not None else query  # unused if None
            k_norm = rotary.k_norm if rotary.k_norm is not None else query
            rope = (cos, sin, q_norm, k_norm, rotary.eps, cos.stride(0))
        else:  # unused, but of the dtypes and alignment of the real ones: one compiled variant
            table = self._unused_table(query.device)
            rope = (table, table, query, query, 0.0, self.head_dim)
        args = (
            query, key_cache, value_cache, out, part_o, part_m, part_l, counters,
            md.block_tables, md.seq_lens, md.query_start_loc, ids,
            key, value, md.slot_mapping, int(write_kv),
            0 if rotary is None else ((2 if rotary.q_norm is not None else 1)
                                      + (4 if rotary.by_position else 0)), *rope,
            self.scale, *strides,
            key.stride(0), key.stride(1), value.stride(0), value.stride(1))
        if per_head:
            # Its dependents (o_proj's GEMV at batch 1) may launch at its start
            # (dependent_launch.EARLY_TRIGGER_KINDS): measured for this kernel only.
            launch = pdl_launch(query.device, "attention")
            combine = not (partials or self.decode_ablate_combine)
            k.decode_head_kernel[(nd, self.num_heads, splits)](
                *args, ONE_SPLIT=splits == 1 and not partials, DENSE=dense, GROUP=self.group,
                HEAD_DIM=self.head_dim, BLOCK_SIZE=key_cache.shape[1],
                BLOCK_N=self.decode_head_block_n, **launch, num_warps=self.decode_head_warps,
                num_stages=1, **({} if combine else {"COMBINE": False}))
            if partials:
                return AttentionPartials(part_o, part_m, part_l, md.seq_lens[:nd], splits,
                                         self.decode_head_block_n, query.dtype)
            return None
        k.decode_kernel[(nd, self.num_kv_heads, splits)](
            *args, ONE_SPLIT=splits == 1, DENSE=dense,
            GROUP=self.group, GROUP_PAD=max(16, _next_pow2(self.group)),
            GROUP_P2=_next_pow2(self.group),
            HEAD_DIM=self.head_dim, BLOCK_SIZE=key_cache.shape[1], BLOCK_N=block_n,
            **dot, **launch, num_warps=warps, num_stages=stages,
            **({"maxnreg": self.decode_maxnreg} if self.decode_maxnreg else {}),
        )


@hookimpl
def register_attention_backends():
    return [TritonAttentionBackend]
