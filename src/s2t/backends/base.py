"""What the backends share: their names, the extra that installs llama.cpp, and the refusal error."""

from __future__ import annotations

BACKENDS = ("torch", "llama.cpp")
AUTO = "auto"
LLAMACPP_EXTRA = "select-to-think[llamacpp]"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not installed), or cannot run this method or model."""
