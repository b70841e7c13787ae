"""Scheduler policy plugins: each says who goes first (and who is preempted first)."""
