"""The workloads of BENCHMARKS.md as request lists, drawn exactly as specified there."""
from __future__ import annotations

import random


def w1_requests(num_requests: int = 256, seed: int = 0, min_len: int = 100, max_len: int = 1024,
                vocab: int = 10000) -> list[tuple[list[int], int]]:
    """W1: prompts of ``randint(min_len, max_len)`` ids each ``randint(0, vocab)``, then for each
    request ``max_tokens = randint(min_len, max_len)``; all from ``random.Random(seed)``.
    With the defaults the draws total 142,827 prompt and 133,966 output tokens."""
    rnd = random.Random(seed)
    prompts = [[rnd.randint(0, vocab) for _ in range(rnd.randint(min_len, max_len))]
               for _ in range(num_requests)]
    outputs = [rnd.randint(min_len, max_len) for _ in range(num_requests)]
    return list(zip(prompts, outputs))
