"""What the backends share: their names, the extra that installs llama.cpp, the threads setting, the
refusal error, and which selectors every backend can run."""

from __future__ import annotations

import os
from pathlib import Path

BACKENDS = ("torch", "llama.cpp")
AUTO = "auto"
LLAMACPP_EXTRA = "select-to-think[llamacpp]"
THREADS_ENV = "S2T_THREADS"  # CPU threads for llama.cpp, set by `s2t --threads N`


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not installed), or cannot run this method or model."""


def reads_only_logits(selector: str | os.PathLike | None) -> bool:
    """Whether a trained selector directory holds a feature selector, which reads only the SLM's
    next-token logits (so the llama.cpp backend runs it). A directory without a selector config is not
    one (loading it later says so); an unreadable config raises
    :class:`~s2t.policies.checkpoint.SelectorCheckpointError` naming what is wrong."""
    from s2t.policies.checkpoint import CONFIG_NAME
    from s2t.policies.learned_selector import selector_kind

    if not selector or not (Path(selector) / CONFIG_NAME).is_file():
        return False
    return selector_kind(selector) == "features"
