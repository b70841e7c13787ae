"""An HF checkpoint directory: config.json, *.safetensors (sharded or not), tokenizer files."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from pagedllm.loader.errors import ModelLoadError


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise ModelLoadError(f"{f}: named in {index.name} but missing")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no *.safetensors files (only safetensors is supported)")
    return files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except ModelLoadError:
            raise
        except Exception as exc:  # safetensors reports truncation as a generic error
            raise ModelLoadError(f"{path}: cannot read safetensors file ({exc})") from exc


def check_safetensors_headers(files: list[Path]) -> None:
    """Fail early, naming the file, when a file is shorter than its header says."""
    for path in files:
        try:
            with open(path, "rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(header_len))
        except Exception as exc:
            raise ModelLoadError(f"{path}: not a valid safetensors file ({exc})") from exc
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        size = path.stat().st_size
        if size < 8 + header_len + end:
            raise ModelLoadError(
                f"{path}: truncated safetensors file ({size} bytes, header needs {8 + header_len + end})"
            )
