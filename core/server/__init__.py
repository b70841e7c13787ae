"""The OpenAI-compatible HTTP server: ``protocol`` (the schema), ``app`` (FastAPI endpoints),
``metrics`` (Prometheus), ``launcher`` (uvicorn, signals, start-up logs)."""
from pagedllm.server.app import ServerSettings, build_app

__all__ = ["ServerSettings", "build_app"]
