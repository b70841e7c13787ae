"""When Triton kernels are launched with programmatic dependent launch (PDL)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pagedllm.dependent_launch import pdl_enabled


def test_never_on_cpu():
    assert not pdl_enabled(torch.device("cpu"))


@pytest.mark.parametrize("env,expected", [({"PAGEDLLM_PDL": "0"}, False),
                                          ({"TRITON_INTERPRET": "1"}, False)])
def test_switched_off_by_environment(env, expected):
    # The answer is cached per process, so each setting gets a fresh interpreter.  On a
    # machine without CUDA the device query would raise: the switch is read before it.
    code = ("import torch; from pagedllm.dependent_launch import _cuda_enabled; "
            "print(_cuda_enabled(0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_for_hopper_and_later():
    device = torch.device("cuda")
    from pagedllm.dependent_launch import _triton_has_gdc
    want = (torch.cuda.get_device_capability()[0] >= 9 and _triton_has_gdc()
            and os.environ.get("PAGEDLLM_PDL", "1") != "0")
    assert pdl_enabled(device) == want


@pytest.fixture
def trigger_settings():
    """The early-trigger settings are read once per process: re-read them around a test."""
    import pagedllm.dependent_launch as dl

    dl._early_trigger.cache_clear()
    yield dl._early_trigger.cache_clear
    dl._early_trigger.cache_clear()


@pytest.mark.usefixtures("trigger_settings")
@pytest.mark.parametrize("setting,mode", [("1", 1), ("early", 2), ("2", 2)])
def test_trigger_placement_by_environment(monkeypatch, setting, mode):
    # Where PDL is on, PAGEDLLM_PDL=early moves the kernels' trigger to their start
    # (USE_PDL 2); off (the CPU here), every setting launches without PDL.
    import pagedllm.dependent_launch as dl

    monkeypatch.setenv("PAGEDLLM_PDL", setting)
    assert dl.pdl_launch(torch.device("cpu")) == {"USE_PDL": 0, "launch_pdl": False}
    monkeypatch.setattr(dl, "pdl_enabled", lambda device: True)
    assert dl.pdl_launch(torch.device("cpu")) == {"USE_PDL": mode, "launch_pdl": True}


@pytest.mark.usefixtures("trigger_settings")
def test_early_trigger_by_kind(monkeypatch):
    import pagedllm.dependent_launch as dl

    monkeypatch.setenv("PAGEDLLM_PDL_EARLY", "plain,attention")
    monkeypatch.setattr(dl, "pdl_enabled", lambda device: True)
    cpu = torch.device("cpu")
    assert [dl.pdl_mode(cpu, kind) for kind in ("plain", "attention", "norm", None)] == [
        2, 2, 1, 1]


def test_attention_triggers_early_by_default(monkeypatch, trigger_settings):
    import pagedllm.dependent_launch as dl

    monkeypatch.delenv("PAGEDLLM_PDL_EARLY", raising=False)
    monkeypatch.delenv("PAGEDLLM_PDL", raising=False)
    monkeypatch.setattr(dl, "pdl_enabled", lambda device: True)
    cpu = torch.device("cpu")
    assert [dl.pdl_mode(cpu, kind) for kind in ("attention", "plain", "norm", "silu")] == [
        2, 1, 1, 1]
    monkeypatch.setenv("PAGEDLLM_PDL_EARLY", "")
    trigger_settings()
    assert dl.pdl_mode(cpu, "attention") == 1
