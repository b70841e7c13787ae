"""The ceilings a figure is set against, measured in the same run: device copy bandwidth
(bytes read + written per second) and the bf16 matmul rate."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Ceilings:
    copy_bytes_per_s: float
    matmul_flop_per_s: float
    device: str


def _time_cuda(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def measure_ceilings() -> Ceilings:
    if not torch.cuda.is_available():
        raise RuntimeError("ceilings are measured on a CUDA device; none is available")
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_s = _time_cuda(lambda: dst.copy_(src), 20)
    del src, dst
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    mm_s = _time_cuda(lambda: a @ b, 20)
    return Ceilings(2 * (1 << 30) / copy_s, 2 * n**3 / mm_s, torch.cuda.get_device_name())


def model_bytes_and_params(model) -> tuple[int, int]:
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() * p.element_size() for p in params), sum(p.numel() for p in params)


def release_kv_cache(engine) -> None:
    """Hand the engine's KV cache back to the device so a peer can run in the same process."""
    import gc

    engine.kv_caches.clear()
    engine.runner.kv_caches = []
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hf_twin(engine):
    """An HF transformers model with the engine's exact weights, for side-by-side runs.
    Call it after the engine's own measurement: it frees the engine's KV cache first."""
    from transformers import AutoModelForCausalLM

    release_kv_cache(engine)
    # Built on the device: initialising billions of random weights on the host takes minutes,
    # and they are all overwritten below.
    with torch.device(engine.device):
        hf = AutoModelForCausalLM.from_config(engine.hf_config, dtype=engine.dtype,
                                              attn_implementation="sdpa").eval()
    ours = engine.model.hf_state_dict() if hasattr(engine.model, "hf_state_dict") \
        else engine.model.state_dict()
    missing, unexpected = hf.load_state_dict(ours, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied: tie_weights
    if missing or unexpected:
        raise ValueError(f"HF twin: weights missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(engine.hf_config, "tie_word_embeddings", False):
        hf.tie_weights()
    return hf
