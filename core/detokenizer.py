"""Incremental detokenization that never emits half of a multi-byte character.

Decoding token by token breaks words whose bytes span tokens, and decoding a suffix alone
can lose a leading space.  So each step decodes a short window that starts a few tokens back
(``prefix_offset``) and emits only what the newest tokens add past what was already emitted
(``read_offset``), holding back while the text ends in U+FFFD (an incomplete UTF-8 sequence).
"""
from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> str:
        """Append one generated token; return the text it completes (may be empty)."""
        self.tokens.append(token_id)
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT_CHAR):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            return delta
        return ""
