"""Resolves the ``model`` argument to a config, a weight iterator and a tokenizer."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pagedllm.loader import gguf_file, hf_dir
from pagedllm.loader.default_model import resolve_default_model
from pagedllm.loader.errors import ModelLoadError


@dataclass
class LoadedCheckpoint:
    path: Path
    hf_config: Any
    weights: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    tokenizer: Any  # an HF tokenizer, or None when the checkpoint ships none
    checkpoint_dtype: torch.dtype | None
    format: str  # "hf" or "gguf"


def _config_dtype(config) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _hf_tokenizer(model_dir: Path, tokenizer: str | None):
    from transformers import AutoTokenizer

    source = Path(tokenizer) if tokenizer else model_dir
    has_files = any((source / f).exists() for f in
                    ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json"))
    if not has_files:
        if tokenizer:
            raise ModelLoadError(f"tokenizer: {source} holds no tokenizer files")
        return None
    return AutoTokenizer.from_pretrained(str(source))


def _gguf_tokenizer(path: Path):
    """Convert the GGUF's tokenizer once and keep the HF files beside it for later loads."""
    from transformers import AutoTokenizer

    cached = path.with_name(path.name + ".tokenizer")
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(cached))
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read the GGUF tokenizer ({exc})") from exc
    try:
        tok.save_pretrained(str(cached))
    except OSError:
        pass  # a read-only location only costs a slower next load
    return tok


def _dummy_checkpoint(model: str | None, tokenizer: str | None) -> LoadedCheckpoint:
    """Random weights for a preset shape or a config.json (benchmarks need no checkpoint)."""
    from pagedllm.loader.presets import PRESETS, preset_config

    if model in PRESETS:
        config, path = preset_config(model), Path(model)
    else:
        path = Path(model or "").expanduser()
        cfg_file = path / "config.json" if path.is_dir() else path
        if not cfg_file.is_file():
            raise ModelLoadError(
                f"model: with load_format='dummy', give a preset ({', '.join(PRESETS)}) or a "
                f"config.json path; got {model!r}")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(cfg_file.parent))
    tok = _hf_tokenizer(Path(tokenizer), None) if tokenizer else None
    return LoadedCheckpoint(path=path, hf_config=config, weights=lambda: iter(()),
                            tokenizer=tok, checkpoint_dtype=None, format="dummy")


def load_checkpoint(model: str | None, tokenizer: str | None = None,
                    load_format: str = "auto") -> LoadedCheckpoint:
    if load_format == "dummy":
        return _dummy_checkpoint(model, tokenizer)
    if load_format != "auto":
        raise ModelLoadError(f"load_format: must be 'auto' or 'dummy', got {load_format!r}")
    path = resolve_default_model() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model: {model!r} is not an existing path (an HF checkpoint directory or a .gguf file)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model: {path} is a file but not a .gguf file")
        reader = gguf_file.open_reader(path)
        config = gguf_file.load_config(path, reader)
        return LoadedCheckpoint(
            path=path,
            hf_config=config,
            weights=lambda: gguf_file.iter_gguf_tensors(path, reader, config),
            tokenizer=_gguf_tokenizer(path),
            checkpoint_dtype=None,
            format="gguf",
        )
    if not (path / "config.json").exists():
        raise ModelLoadError(f"model: {path} has no config.json (not an HF checkpoint directory)")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path / 'config.json'}: cannot be read ({exc})") from exc
    files = hf_dir.safetensors_files(path)
    hf_dir.check_safetensors_headers(files)
    return LoadedCheckpoint(
        path=path,
        hf_config=config,
        weights=lambda: hf_dir.iter_safetensors(files),
        tokenizer=_hf_tokenizer(path, tokenizer),
        checkpoint_dtype=_config_dtype(config),
        format="hf",
    )
