"""Speculative drafter plugins (hook: ``register_speculative_drafters``)."""
