"""What a speculative drafter plugin is (hook: ``register_speculative_drafters``)."""
from __future__ import annotations

from abc import ABC, abstractmethod


class SpeculativeDrafter(ABC):
    name: str = ""
    priority: int = 0

    @abstractmethod
    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Up to ``k`` guessed next tokens for a sequence whose tokens so far are ``token_ids``."""
