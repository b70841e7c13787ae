"""``step_inputs.copy_in``: a small step's inputs copied from the host by one kernel that
takes the awaited tokens on the way.  Natively on a GPU (from pinned memory), or on CPU
tensors under ``TRITON_INTERPRET=1`` (CI runs this module that way from
``test_triton_backend.test_interpreted_checks_pass``)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from pagedllm import step_inputs

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = [pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not (CUDA or INTERPRET),
    reason="needs triton and a CUDA device or TRITON_INTERPRET=1")]
if CUDA:
    pytestmark.append(pytest.mark.gpu)
DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.mark.parametrize("n,num_ids", [(5, 3), (1100, 40), (2048, 0)])
def test_copy_in_copies_and_takes_referenced_tokens(n, num_ids):
    # n past one block (1100), and a buffer without ids (num_ids 0): a negative value is
    # a reference only among the first num_ids (later ones, like a padded slot's -1, are
    # data), and each reference -(r + 1) takes row r of the previous step's tokens.
    gen = torch.Generator().manual_seed(n)
    src = torch.randint(0, 1000, (n,), generator=gen, dtype=torch.int32)
    src[num_ids::7] = -1
    prev = torch.randint(0, 50000, (9,), generator=gen)  # int64, as an argmax is
    refs = list(range(0, num_ids, 2))
    for i in refs:
        src[i] = -(i % 9 + 1)
    want = src.clone()
    for i in refs:
        want[i] = int(prev[i % 9])
    host = src.pin_memory() if CUDA else src
    dst = torch.full((n,), 7, dtype=torch.int32, device=DEVICE)
    assert step_inputs.applies(n, DEVICE, force=True)
    step_inputs.copy_in(host, dst, prev.to(DEVICE), num_ids)
    assert torch.equal(dst.cpu(), want)
    # Nothing to take: the values are copied as they are.
    dst2 = torch.zeros(n, dtype=torch.int32, device=DEVICE)
    step_inputs.copy_in(host, dst2, None, num_ids)
    assert torch.equal(dst2.cpu(), src)


def test_copy_in_rejects_mismatched_buffers():
    src = torch.zeros(8, dtype=torch.int32)
    with pytest.raises(ValueError, match="int32 of one size"):
        step_inputs.copy_in(src, torch.zeros(9, dtype=torch.int32, device=DEVICE), None, 0)
    with pytest.raises(ValueError, match="int32 of one size"):
        step_inputs.copy_in(src.long(), torch.zeros(8, dtype=torch.int32, device=DEVICE),
                            None, 0)


def test_applies_only_to_small_cuda_buffers():
    assert not step_inputs.applies(16, torch.device("cpu"))
    assert not step_inputs.applies(step_inputs.MAX_ELEMENTS + 1, DEVICE, force=True)
    assert not step_inputs.applies(0, DEVICE, force=True)
    if CUDA:
        assert step_inputs.applies(16, DEVICE) == step_inputs.ENABLED
