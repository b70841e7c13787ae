"""Benchmarks, each measured side by side with its peer in the same run."""
