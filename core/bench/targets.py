"""Issue 5's targets against the figures the benchmarks wrote with ``--json``: one line a
target (figure, its peer, the limit, met or not), the short table a GPU run ends with.

    python -m pagedllm.bench.targets DIR

reads ``DIR/w1.json`` (``bench throughput --compare hf``), ``DIR/w2-qwen3.json`` and
``DIR/w2-llama8b.json`` (``bench latency --compare hf``) and ``DIR/w6.json`` (``bench
kernels`` at batch 128, context 4096); a missing file shows as "not run".
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from pagedllm.bench.figures import HF_PEER as HF
from pagedllm.bench.figures import read_figures

W1_OUTPUT_TOKENS = 133_966  # BENCHMARKS.md: W1's 256 requests ask for this many


@dataclass(frozen=True)
class Check:
    target: str  # what issue 5 asks, in words
    figure: str  # what was measured, in words ("" when not run)
    peer: str  # the peer in the same run, or the floor
    met: bool | None  # None: not run


def _w1(f: dict | None) -> list[Check]:
    if f is None:
        return [Check(t, "", "", None) for t in
                ("W1 >= 15,000 out tok/s", "W1 >= 30x HF", "W1 >= 60 % of the ceiling")]
    ours = f["engines"]["pagedllm"]["out_tok_s"]
    hf = f["engines"].get(HF, {}).get("out_tok_s")
    ceiling = f.get("ceiling_tok_s")
    where = f"{f['device']}, {f['model']}, {f['output_tokens']:,} tokens"
    checks = [
        Check("W1 >= 15,000 out tok/s", f"{ours:,.0f} tok/s ({where})",
              f"HF {hf:,.0f} tok/s" if hf else "HF not run", ours >= 15_000),
        Check("W1 >= 30x HF", f"{ours / hf:.1f}x" if hf else "", f"HF {hf:,.0f} tok/s"
              if hf else "HF not run", ours / hf >= 30 if hf else None),
        Check("W1 >= 60 % of the ceiling", f"{ours / ceiling:.1%}" if ceiling else "",
              f"ceiling {ceiling:,.0f} tok/s" if ceiling else "no ceiling (CPU)",
              ours / ceiling >= 0.60 if ceiling else None),
    ]
    if f["model"] != "qwen3-0.6b" or f["output_tokens"] != W1_OUTPUT_TOKENS:
        # Another model or request count: figures, but no verdict on W1.
        checks = [Check(c.target, c.figure + " (not W1)", c.peer, None) for c in checks]
    return checks


def _w2(f: dict | None, model: str, label: str, limit: float) -> Check:
    target = f"W2 {label} TPOT <= {limit}x the floor"
    if f is None:
        return Check(target, "", "", None)
    tpot = f["engines"]["pagedllm"]["tpot_s"]
    floor = f.get("floor_s")
    hf = f["engines"].get(HF, {}).get("tpot_s")
    device = f.get("device_step_s")
    figure = f"{tpot * 1e3:.3f} ms" + (f" = {tpot / floor:.2f}x" if floor else "") + \
        (f" (device {device * 1e3:.3f} ms)" if device else "") + f", {f['device']}"
    peer = (f"floor {floor * 1e3:.3f} ms" if floor else "no floor (CPU)") + \
        (f", HF {hf * 1e3:.2f} ms" if hf else "")
    if f["model"] != model:
        return Check(target, figure + f" ({f['model']}, not {model})", peer, None)
    return Check(target, figure, peer, tpot <= limit * floor if floor else None)


def _w6(f: dict | None, batch: int = 128, context: int = 4096) -> Check:
    target = f"W6 decode B={batch} ctx={context} >= 80 % of copy"
    row = next((r for r in (f or {}).get("rows", [])
                if r["batch"] == batch and r["context"] == context), None)
    if row is None or not row.get("triton"):
        return Check(target, "", "", None)
    ours, ref = row["triton"], row.get("torch")
    return Check(target, f"{ours['us']:.1f} us = {ours['of_copy']:.1%} of copy, {f['device']}",
                 f"torch backend {ref['us']:,.0f} us" if ref else "torch backend not run",
                 ours["of_copy"] >= 0.80)


def check(directory: str | Path) -> list[Check]:
    d = Path(directory)
    return _w1(read_figures(d / "w1.json")) + [
        _w2(read_figures(d / "w2-qwen3.json"), "qwen3-0.6b", "Qwen3-0.6B", 2.0),
        _w2(read_figures(d / "w2-llama8b.json"), "llama-3.1-8b", "Llama-3.1-8B", 1.15),
        _w6(read_figures(d / "w6.json")),
    ]


def table(checks: list[Check]) -> str:
    def word(c: Check) -> str:
        if c.met is None:  # figures of another workload, or of no GPU, are shown unjudged
            return "unjudged" if c.figure else "not run"
        return "met" if c.met else "MISSED"

    lines = [f"{'target':<42} {'':<8} figure | peer"]
    lines += [f"{c.target:<42} {word(c):<8} {c.figure} | {c.peer}" for c in checks]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="where the benchmarks wrote their --json files")
    checks = check(parser.parse_args(argv).directory)
    print(table(checks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
