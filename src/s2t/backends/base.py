"""What the backends share: their names, the extra that installs llama.cpp, and the refusal error."""

from __future__ import annotations

BACKENDS = ("torch", "llama.cpp")
AUTO = "auto"
LLAMACPP_EXTRA = "select-to-think[llamacpp]"
THREADS_ENV = "S2T_THREADS"  # CPU threads for llama.cpp, set by `s2t --threads N`


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not installed), or cannot run this method or model."""
