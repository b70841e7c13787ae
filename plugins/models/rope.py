"""Rotary position embeddings, including the ``llama3`` and ``linear`` frequency scalings.

Frequencies are computed in float32 as HF transformers computes them, so logits match it
closely: from each step's positions on the reference path, and once, for every position, into
the table that the fused (CUDA) path gathers its rows from (the same float32 operations on
the same values, so the same tables).
"""
from __future__ import annotations

import math

import torch


def rope_parameters(config) -> dict:
    """The rope settings of an HF config, old (``rope_theta`` + ``rope_scaling``) or new
    (``rope_parameters``) style, as one dict with ``rope_type`` and ``rope_theta``."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if scaling:
        params.update(scaling)
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


def inverse_frequencies(head_dim: int, params: dict) -> torch.Tensor:
    theta = float(params["rope_theta"])
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    kind = params["rope_type"]
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(params["factor"])
    if kind == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and the
        # band in between interpolated smoothly.
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_scaling.rope_type: {kind!r} is not supported (default, linear, llama3)")


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, params: dict, max_positions: int = 2048):
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self._inv_freq_cpu = inverse_frequencies(head_dim, params)
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        # (device, dtype) -> [max_positions, 2, head_dim] float32: cos, sin rounded to dtype
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def inverse_frequencies(self, device: torch.device) -> torch.Tensor:
        inv_freq = self._inv_freq.get(device)
        if inv_freq is None:
            inv_freq = self._inv_freq[device] = self._inv_freq_cpu.to(device)
        return inv_freq

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype, as_float32: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [tokens, 1, head_dim], rounded to ``dtype`` as the reference
        rounds them; ``as_float32`` holds those rounded values in float32 tensors (what the
        fused rotary kernels want), gathered from a table in one kernel (computing them is
        eight small kernels a step).  Positions must be below ``max_positions`` (the engine
        keeps max_model_len within the model's context)."""
        if as_float32:
            rows = self._table(positions.device, dtype).index_select(0, positions)
            return rows[:, 0:1], rows[:, 1:2]
        return self._compute(positions, dtype)

    def tables(self, device: torch.device, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) over every position, each [max_positions, head_dim] float32 holding
        the values ``cos_sin(..., as_float32=True)`` gathers (``RotaryInputs.by_position``)."""
        table = self._table(device, dtype)
        return table[:, 0], table[:, 1]

    def _compute(self, positions: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inverse_frequencies(positions.device)
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]

    def _table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        table = self._tables.get(key)
        if table is None:  # built outside any graph capture: the engine's warm-up runs first
            cos, sin = self._compute(torch.arange(self.max_positions, device=device), dtype)
            table = self._tables[key] = torch.cat((cos, sin), dim=1).float()
        return table


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; the two halves of head_dim rotate as pairs."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
