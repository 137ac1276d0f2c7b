"""Serving S2T: an OpenAI-compatible HTTP endpoint over the engine's continuous batch.

:class:`~s2t.serving.worker.EngineWorker` drives one :class:`~s2t.engine.Scheduler` in a
background thread; :func:`~s2t.serving.app.create_app` is the FastAPI application whose handlers
enqueue requests and stream tokens back; :func:`~s2t.serving.server.running_server` runs it
under uvicorn (in a thread, for tests and benchmarks). ``s2t serve`` is the command line.
"""

from s2t.serving.app import create_app
from s2t.serving.server import running_server, serve
from s2t.serving.worker import EngineWorker

__all__ = ["EngineWorker", "create_app", "running_server", "serve"]
