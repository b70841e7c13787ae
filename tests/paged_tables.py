"""Block tables as the engine leaves them after churn, for attention tests."""
from __future__ import annotations

import random


def shuffled_block_tables(rng: random.Random, lengths: list[int], block_size: int,
                          spare: int) -> tuple[list[list[int]], int]:
    """One table per sequence of ``lengths`` tokens, over shuffled, non-contiguous block
    ids, with ``spare`` blocks nobody owns; and the number of blocks."""
    needed = [-(-n // block_size) for n in lengths]
    num_blocks = sum(needed) + spare
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    tables, at = [], 0
    for n in needed:
        tables.append(ids[at: at + n])
        at += n
    return tables, num_blocks
