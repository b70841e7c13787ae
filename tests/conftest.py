"""Shared fixtures.  The real SmolLM2 model is loaded once per session and shared."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-tensor tests: they gain nothing from threads,
    and on a busy 2-core machine OpenMP's spinning makes them several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """The seeded random tiny Llama checkpoint (``tiny_models``), built once per session;
    tests only read it."""
    from tiny_models import build_tiny_model

    d = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama", d)
    return str(d)


@pytest.fixture(scope="session")
def smollm2_path():
    from pagedllm.loader.default_model import resolve_default_model

    return resolve_default_model()


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_path):
    from pagedllm import LLM

    return LLM(model=str(smollm2_path), dtype="float32", device="cpu")
