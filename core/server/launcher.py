"""Running the server: the engine, uvicorn, start-up logs and graceful shutdown.

SIGTERM (or the first Ctrl-C) stops accepting: the listening socket closes, ``/health``
and new requests answer 503, and the running requests go on until they finish or
``shutdown_timeout`` passes, when the engine aborts what is left (streams end with
finish_reason "abort").  Then the process exits with status 0.  A second Ctrl-C exits at
once.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import uvicorn

from pagedllm.async_engine import AsyncLLMEngine
from pagedllm.server.app import ServerSettings, build_app
from pagedllm.server.metrics import ServerMetrics

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_served_name(model: str | None) -> str:
    """vLLM-style served name: the model path's basename, or the default model's name."""
    if model is None:
        return DEFAULT_MODEL_NAME
    return Path(model.rstrip("/\\")).name or model


def _log(msg: str) -> None:
    print(f"pagedllm: {msg}", file=sys.stderr, flush=True)


def plugins_summary() -> str:
    from pagedllm.plugin_manager import get_registry

    seen: dict[str, str] = {}
    for entry in get_registry().all():
        seen.setdefault(entry.plugin, entry.package)
    return ", ".join(f"{name} ({pkg})" for name, pkg in sorted(seen.items()))


class _Server(uvicorn.Server):
    """uvicorn, plus: the first exit signal also starts the engine's drain."""

    def __init__(self, config: uvicorn.Config, on_exit_signal: Callable[[int], None]):
        super().__init__(config)
        self._on_exit_signal = on_exit_signal

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            self._on_exit_signal(sig)
        super().handle_exit(sig, frame)


def build_server(engine: AsyncLLMEngine, settings: ServerSettings, metrics: ServerMetrics,
                 host: str, port: int, log_level: str = "info",
                 access_log: bool = True) -> uvicorn.Server:
    app = build_app(engine, settings, metrics)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=access_log,
        lifespan="on", timeout_keep_alive=5,
        # A backstop: the engine aborts what is left at shutdown_timeout, which ends every
        # stream; uvicorn cancels whatever still hangs a little later.
        timeout_graceful_shutdown=int(settings.shutdown_timeout) + 5)
    return _Server(config, lambda sig: engine.begin_drain(settings.shutdown_timeout))


def run_server(engine_kwargs: dict, *, host: str, port: int, served_model_names: list[str] | None,
               api_key: str | None, max_waiting: int | None, shutdown_timeout: float,
               log_level: str = "info", access_log: bool = True) -> int:
    """Load the model, serve until SIGTERM/SIGINT, drain, return the exit status."""
    from pagedllm.config import EngineConfig
    from pagedllm.engine import LLMEngine

    model = engine_kwargs.get("model")
    names = served_model_names or [default_served_name(model)]
    _log(f"plugins: {plugins_summary()}")
    engine = LLMEngine(EngineConfig(**engine_kwargs), log=_log)
    metrics = ServerMetrics(names[0])
    async_engine = AsyncLLMEngine(engine, max_waiting=max_waiting, observer=metrics, log=_log)
    metrics.attach(async_engine)
    settings = ServerSettings(served_model_names=names, model_path=model, api_key=api_key,
                              shutdown_timeout=shutdown_timeout)
    server = build_server(async_engine, settings, metrics, host, port, log_level, access_log)
    _log(f"serving {', '.join(names)} at http://{host}:{port}/v1 (API key "
         f"{'required' if api_key else 'not required'}; max waiting "
         f"{max_waiting if max_waiting is not None else 'unlimited'}; shutdown timeout "
         f"{shutdown_timeout:g} s; pid {os.getpid()})")
    # uvicorn re-raises the signal it caught once it has shut down gracefully; a no-op
    # SIGTERM handler underneath makes that a clean exit (status 0) after the drain.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        async_engine.shutdown()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if not server.started:
        return 1  # could not bind, or start-up failed (uvicorn logged why)
    _log("shut down")
    return 0
