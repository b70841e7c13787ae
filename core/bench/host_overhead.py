"""Host time of one engine step, by phase, with the model's work taken out.

    python -m pagedllm.bench.host_overhead [--batch 256] [--steps 200] [--table-width 2560]

Issue 5 asks that the host's work be hidden behind the device's at batch 256.  On the GPU
the W1 step report (``bench throughput``) shows whether it is; this benchmark shows where
the host's time goes, on any machine: an engine on a tiny random model whose forward pass
is replaced by a stub that returns logits at once, so each step's time is the engine's own
Python and numpy (schedule, batch preparation, sampling bookkeeping, output handling).
``--table-width`` makes the step buffer as wide as a CUDA-graph decode batch of the W1
model (max_model_len 40,960 / block 16 = 2,560 block-table columns).

On a 2-core CPU machine quote the ratio of two runs (before and after a change), never the
milliseconds alone.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

TINY_CONFIG = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=1024, hidden_size=32,
    intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    head_dim=16, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True,
    eos_token_id=2)


class _Timed:
    """Wraps a method so each call's time adds to ``totals[name]``."""

    def __init__(self, totals: dict[str, float], name: str, fn):
        self.totals, self.name, self.fn = totals, name, fn

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.totals[self.name] += time.perf_counter() - t


def build_engine(batch: int, table_width: int | None):
    import torch

    from pagedllm import LLM

    directory = Path(tempfile.mkdtemp(prefix="pagedllm-host-"))
    (directory / "config.json").write_text(json.dumps(TINY_CONFIG))
    llm = LLM(model=str(directory), load_format="dummy", device="cpu", dtype="float32",
              max_num_seqs=batch, num_kv_blocks=batch * 100, max_model_len=4096,
              async_scheduling=False)
    engine = llm.engine
    runner = engine.runner
    vocab = engine.vocab_size

    def stub_execute(model_input):
        runner.num_tokens_computed += model_input.num_tokens
        return torch.zeros((len(model_input.sample_requests), vocab)), None

    runner.execute = stub_execute
    if table_width:  # decode steps carry a block table as wide as a graph batch's
        class _Graphs:
            def batch_for(self, n):
                return n

            def buffer(self, size):
                return torch.empty(size, dtype=torch.int32)

            def context_for(self, b, longest):
                return 4096  # the model's length: no shorter graphs

        graphs = _Graphs()
        graphs.table_width = table_width
        runner.graphs = graphs
    return llm


def run(batch: int, steps: int, table_width: int | None, seed: int = 0) -> dict[str, float]:
    from pagedllm import SamplingParams
    from pagedllm.gc_freeze import frozen_gc

    llm = build_engine(batch, table_width)
    engine = llm.engine
    rnd = random.Random(seed)
    for i in range(batch):
        prompt = [rnd.randint(3, 1000) for _ in range(rnd.randint(100, 1024))]
        engine.add_request(f"h{i}", {"prompt_token_ids": prompt},
                           SamplingParams(temperature=0, max_tokens=steps + 100, ignore_eos=True))
    while engine.scheduler.num_waiting:  # the prompts
        engine.step(final_only=True)
    engine.step(final_only=True)

    totals: dict[str, float] = defaultdict(float)
    for obj, name in ((engine.scheduler, "schedule"), (engine.runner, "prepare"),
                      (engine.sampler, "sample"), (engine, "_resolve")):
        setattr(obj, name, _Timed(totals, name, getattr(obj, name)))
    walls = []
    with frozen_gc():
        for _ in range(steps):
            t = time.perf_counter()
            engine.step(final_only=True)
            walls.append(time.perf_counter() - t)
    assert engine.scheduler.num_running == batch, "every request must decode every step"
    out = {name: total / steps for name, total in totals.items()}
    out["other"] = statistics.fmean(walls) - sum(out.values())
    out["step"] = statistics.fmean(walls)
    out["step_median"] = statistics.median(walls)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--table-width", type=int, default=2560,
                        help="block-table columns of a decode step (0: as eager steps)")
    args = parser.parse_args(argv)
    r = run(args.batch, args.steps, args.table_width or None)
    print(f"host time per decode step, batch {args.batch}, {args.steps} steps, device work "
          f"stubbed out, block table {args.table_width or 'as wide as needed'} columns")
    for name in ("schedule", "prepare", "sample", "_resolve", "other"):
        print(f"  {name.lstrip('_'):<10} {r[name] * 1e3:8.3f} ms")
    print(f"  {'step':<10} {r['step'] * 1e3:8.3f} ms (median {r['step_median'] * 1e3:.3f} ms)")


if __name__ == "__main__":
    main()
