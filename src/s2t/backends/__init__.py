"""Decoding backends: which runtime runs the models under the one method definition.

``torch`` is :mod:`s2t.engine` (GPUs, S2T-Local's K-token candidate scoring, training);
``llama.cpp`` is :mod:`s2t.backends.llama_cpp` (GGUF files on CPUs, llama-cpp-python). Both feed
next-token logits to the same trigger, candidate and selector objects (:func:`s2t.engine.choose_tokens`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path

from s2t.backends.base import AUTO, BACKENDS, LLAMACPP_EXTRA, BackendUnavailableError, reads_only_logits

# Methods that only the torch engine runs: S2T-Local with a head or LoRA selector scores K candidates
# with the SLM itself (a feature selector reads only the logits, so every backend runs it), and the
# learned trigger reads the SLM's hidden state.
TORCH_ONLY_METHODS = ("s2t-local",)
TORCH_ONLY_TRIGGERS = ("learned",)  # unless the stored trigger reads no hidden state
__all__ = [
    "AUTO",
    "BACKENDS",
    "LLAMACPP_EXTRA",
    "BackendUnavailableError",
    "make_generator",
    "resolve_backend",
]


def check_backend_name(backend: str) -> str:
    if backend not in (AUTO, *BACKENDS):
        raise ValueError(f"backend must be one of {AUTO}, {', '.join(BACKENDS)}; got {backend!r}")
    return backend


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def is_gguf_model(name: str) -> bool:
    """Whether a model argument names a GGUF file: a built-in name (GGUF parts on PyPI) or a ``.gguf`` path."""
    from s2t.builtin_models import BUILTIN_MODELS

    return name in BUILTIN_MODELS or Path(os.path.expanduser(name)).suffix == ".gguf"


def torch_only_reason(
    methods: Iterable, trigger: str | None = None, selector: str | os.PathLike | None = None
) -> str | None:
    """Why these methods need the torch engine (None when the llama.cpp backend runs them all).

    ``methods`` are checked :class:`~s2t.methods.MethodSpec` objects (None stands for ``maj@K``, which
    decodes greedily), or method names; ``trigger`` and ``selector`` are the run's, used by the names
    that carry no setting of their own.
    """
    from s2t.policies.learned_trigger import trigger_reads_hidden

    for item in methods:
        if item is None:
            continue
        if not isinstance(item, str):  # a MethodSpec: its method, trigger and selector are resolved
            name, method, used = item.name, item.method, item.trigger
            own_selector = item.selector
            consults_trigger = True
        else:
            own_selector = selector
            name = item
            base, _, setting = name.partition("/")
            method = base.split(":")[0]
            consults_trigger = bool(setting) or method in ("s2t", "takeover", "random-select")
            used = setting.split("/")[0].split("@")[0].split("=")[0] if setting else trigger
        if method in TORCH_ONLY_METHODS and not reads_only_logits(own_selector):
            return (
                f"{name} scores its K candidates with the SLM itself (K-token decoding under a 4D mask; "
                "a --mode features selector reads only the logits and runs on llama.cpp)"
            )
        if consults_trigger and used in TORCH_ONLY_TRIGGERS and trigger_reads_hidden(own_selector):
            return (
                f"{name} uses a learned trigger that reads the SLM's hidden state (one whose training "
                "chose the logit features alone runs on llama.cpp)"
            )
    return None


def refuse_on_llama_cpp(
    methods: Iterable, trigger: str | None = None, selector: str | os.PathLike | None = None
) -> None:
    """Refuse methods the llama.cpp backend cannot run, naming the backend that can."""
    reason = torch_only_reason(methods, trigger, selector)
    if reason:
        raise BackendUnavailableError(
            f"the llama.cpp backend cannot run this method: {reason}; use --backend torch"
        )


def resolve_backend(
    backend: str,
    models: Iterable[str | None],
    methods: Iterable = (),
    trigger: str | None = None,
    device: str | None = None,
    selector: str | os.PathLike | None = None,
) -> str:
    """The backend to run on: the one asked for (checked), or for ``auto`` llama.cpp when it is
    installed, no GPU is in use, every model is a GGUF file and every method runs on it; else torch.

    Asking for llama.cpp explicitly without llama-cpp-python, with a model that is not a GGUF file, or
    with a method only the torch engine runs is refused with an error that says what to do.
    """
    check_backend_name(backend)
    models, methods = [m for m in models if m is not None], list(methods)
    if backend == "torch":
        return backend
    if backend == AUTO:
        on_gpu = device.startswith("cuda") if device else _cuda_available()
        usable = (
            not on_gpu
            and llama_cpp_installed()
            and all(is_gguf_model(m) for m in models)
            and torch_only_reason(methods, trigger, selector) is None
        )
        return "llama.cpp" if usable else "torch"
    for name in models:
        if not is_gguf_model(name):
            raise BackendUnavailableError(
                f"the llama.cpp backend runs GGUF files; {name!r} is not one (give a .gguf file or a "
                "built-in name, or use --backend torch)"
            )
    if not llama_cpp_installed():
        raise BackendUnavailableError(
            "the llama.cpp backend needs llama-cpp-python, which is not installed: "
            f"pip install '{LLAMACPP_EXTRA}' (it builds from source, about 10 minutes)"
        )
    refuse_on_llama_cpp(methods, trigger, selector)
    return backend


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def make_generator(backend: str, slm: str, llm: str | None = None, **kwargs):
    """An :class:`~s2t.api.S2TGenerator` on an already resolved ``backend`` (see :func:`resolve_backend`).

    Keyword arguments are the generator's (the llama.cpp one ignores the torch-only ``dtype``,
    ``llm_dtype`` and ``llm_device_map``).
    """
    if backend == "llama.cpp":
        from s2t.backends.llama_cpp import LlamaCppGenerator

        return LlamaCppGenerator(slm, llm=llm, **kwargs)
    if backend != "torch":
        raise ValueError(f"resolve the backend first ({', '.join(BACKENDS)}); got {backend!r}")
    from s2t.api import S2TGenerator

    return S2TGenerator(slm, llm=llm, **kwargs)
