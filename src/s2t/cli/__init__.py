"""The ``s2t`` command line: a thin layer over the Python API, one module per command group."""

from s2t.cli import analyze, evaluate, generate, local, serve  # noqa: F401  (registers commands)
from s2t.cli.app import app

__all__ = ["app"]
