"""The figures a benchmark writes with ``--json``: one JSON object a run, read back by
``targets``."""
from __future__ import annotations

import json
from pathlib import Path

# The name the benchmarks give the HF transformers peer's row, and ``targets`` looks up.
HF_PEER = "HF transformers generate"


def device_name(device) -> str:
    """The GPU's name (figures from an H100 and an H200 do not compare), or the device type."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def write_figures(path: str | Path, figures: dict) -> None:
    Path(path).write_text(json.dumps(figures, indent=1))


def read_figures(path: str | Path) -> dict | None:
    """The figures at ``path``; None if the run wrote none (it did not run, or failed)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
