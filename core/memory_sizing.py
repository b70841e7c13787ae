"""How many KV blocks a CUDA device gets under ``gpu_memory_utilization``.

The engine runs the model once at its largest step (``profile_lengths``: as many tokens as
one step may batch, in sequences no longer than the model's context), reads the peak
memory that run allocated besides the KV cache it used (weights and activations), and
gives the KV cache what is left of ``utilization * total`` once that peak and the memory
held outside this process's allocator (the CUDA context, other processes) are taken off
(``kv_cache_blocks``).  CUDA graphs are captured afterwards: their pool (logged at
capture) comes on top.
"""
from __future__ import annotations


def profile_lengths(max_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> list[int]:
    """The sequence lengths of the profiling run: ``max_batched_tokens`` tokens in
    sequences of at most ``max_model_len``, no more than ``max_num_seqs`` of them (the
    largest step the scheduler can form)."""
    if min(max_batched_tokens, max_num_seqs, max_model_len) < 1:
        raise ValueError("profile_lengths: every argument must be at least 1, got "
                         f"{max_batched_tokens}, {max_num_seqs}, {max_model_len}")
    lens: list[int] = []
    remaining = max_batched_tokens
    while remaining > 0 and len(lens) < max_num_seqs:
        lens.append(min(remaining, max_model_len))
        remaining -= lens[-1]
    return lens


def kv_cache_blocks(total_bytes: int, outside_bytes: int, peak_bytes: int,
                    utilization: float, block_bytes: int) -> int:
    """Whole KV blocks of ``block_bytes`` (all layers' K and V) that fit in
    ``utilization * total_bytes`` beside ``outside_bytes`` (held outside this process's
    allocator) and ``peak_bytes`` (the profiling run's weights and activations).  Raises
    a ``ValueError`` naming ``gpu_memory_utilization`` when not one block fits."""
    budget = utilization * total_bytes - outside_bytes - peak_bytes
    blocks = int(budget // block_bytes) if budget > 0 else 0
    if blocks < 1:
        gib = 2**30
        raise ValueError(
            f"gpu_memory_utilization: {utilization} of {total_bytes / gib:.1f} GiB leaves no "
            f"room for one KV block ({block_bytes / 2**20:.2f} MiB) after the model "
            f"({peak_bytes / gib:.2f} GiB at peak) and {outside_bytes / gib:.2f} GiB held "
            "outside pagedllm; raise it or lower max_num_batched_tokens")
    return blocks
