"""Finding and reading checkpoints: HF directories, GGUF files, and the default model."""
from pagedllm.loader.source import LoadedCheckpoint, load_checkpoint

__all__ = ["LoadedCheckpoint", "load_checkpoint"]
