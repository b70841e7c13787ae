"""EngineConfig: every knob of the engine, with vLLM's names."""
from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@dataclass
class EngineConfig:
    model: str | None = None  # HF directory or .gguf file; None = the default SmolLM2 model
    tokenizer: str | None = None  # tokenizer directory, when not the model's own
    load_format: str = "auto"  # or "dummy": random weights for a preset shape or config.json
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    attention_backend: str = "auto"
    scheduler: str = "fcfs"
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: size the cache from kv_cache_memory_gb
    kv_cache_memory_gb: float = 1.0  # CPU: KV cache budget (GiB) when num_kv_blocks is not given
    gpu_memory_utilization: float = 0.9  # CUDA: share of the device for weights, activations, KV
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: 2048 when chunking, else max(max_model_len, 2048)
    max_model_len: int | None = None  # None: the model's context length
    enable_chunked_prefill: bool = False
    enable_prefix_caching: bool = True
    preemption_mode: str = "recompute"  # or "swap"
    swap_space: float = 4.0  # GiB of CPU swap space per engine, used when preemption_mode="swap"
    seed: int = 0
    enforce_eager: bool = False  # CUDA: never replay decode steps from CUDA graphs
    # Queue step n+1 before reading step n's tokens, so host work overlaps the device.
    # None: on for CUDA, off on CPU (where the host is the device and nothing overlaps).
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb: must be > 0, got {self.kv_cache_memory_gb}")
        if self.swap_space < 0:
            raise ValueError(f"swap_space: must be >= 0 GiB, got {self.swap_space}")

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"device: {self.device!r} is not a torch device ({exc})") from exc
        # Without this, a missing GPU surfaces later as an AssertionError from deep in torch.
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise ValueError(f"device: {self.device!r} asked for, but torch sees no CUDA device")
            if device.index is not None and device.index >= count:
                raise ValueError(f"device: {self.device!r} asked for, but torch sees {count} "
                                 f"CUDA device(s)")
        return device

    def resolve_dtype(self, checkpoint_dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
        if self.dtype != "auto":
            dtype = _DTYPES.get(self.dtype)
            if dtype is None:
                raise ValueError(
                    f"dtype: {self.dtype!r} is not one of auto, float32, bfloat16, float16"
                )
            return dtype
        if device.type == "cpu":
            return torch.float32  # half-precision matmuls are slow or missing on most CPUs
        if checkpoint_dtype in (torch.float16, torch.bfloat16):
            return checkpoint_dtype
        return torch.bfloat16
