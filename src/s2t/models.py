"""The one place that loads models and tokenizers.

A model argument may be a built-in offline name (see :mod:`s2t.builtin_models`), a local
Hugging Face directory, a ``.gguf`` file, or a Hub id. Weights are loaded from safetensors
and remote code is never trusted unless the caller asks for it.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from s2t.builtin_models import BUILTIN_MODELS, prepare_builtin, prepare_gguf_file

logger = logging.getLogger(__name__)

DEFAULT_SLM = "qwen2.5-coder-0.5b-instruct"
DEFAULT_LLM = "qwen2.5-coder-1.5b-instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model argument could not be resolved or loaded."""


class TokenizerMismatchError(ValueError):
    """The SLM and the LLM do not share a vocabulary, so their candidates cannot be compared."""


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the name it was asked for by."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@dataclass(frozen=True)
class ModelSpec:
    """A model to load later, possibly in another process (a Ray worker): name and placement."""

    name: str
    dtype: str | None = None
    device_map: str | None = None

    def load(self) -> LoadedModel:
        return load_model(self.name, dtype=self.dtype, device_map=self.device_map)


@dataclass
class LoadedTokenizer:
    """A tokenizer with the model name it belongs to (for processes that need no weights)."""

    name: str
    tokenizer: PreTrainedTokenizerBase


def load_tokenizer(name: str, trust_remote_code: bool = False) -> LoadedTokenizer:
    """Only the tokenizer of a model argument (built-in name, directory, .gguf or Hub id)."""
    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelLoadError(f"could not load the tokenizer of {name!r}: {e}") from e
    return LoadedTokenizer(name, tokenizer)


def check_model_name(name: str) -> None:
    """Refuse a model argument that cannot name a model, without loading or preparing anything: a
    path that does not exist, a directory without ``config.json``, a file that is not ``.gguf``.
    Built-in names and Hub ids pass (whether the Hub has the id is known only when it loads), so a
    command checks its models before it writes anything.

    Raises:
        ModelLoadError: naming the argument and what is wrong with it.
    """
    if name in BUILTIN_MODELS:
        return
    path = Path(os.path.expanduser(name))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {name}")
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{name!r} is a directory but has no config.json: not a Hugging Face model")
        return
    if path.exists():
        raise ModelLoadError(
            f"{name!r} is a file but not a .gguf file; pass a model directory, a .gguf or a Hub id"
        )
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model path {name!r} does not exist")


def resolve_model_path(name: str) -> str:
    """Turn a model argument into something ``from_pretrained`` accepts (a directory or a Hub id).

    Raises:
        ModelLoadError: see :func:`check_model_name`.
    """
    check_model_name(name)
    if name in BUILTIN_MODELS:
        return str(prepare_builtin(name))
    path = Path(os.path.expanduser(name))
    if path.suffix == ".gguf":
        return str(prepare_gguf_file(path))
    return str(path) if path.is_dir() else name


# transformers' ``device_map`` strategies and device names (a dict map is the Python API's alone)
DEVICE_MAP = re.compile(r"^(auto|balanced|balanced_low_0|sequential|cpu|mps|(cuda|xpu)(:\d+)?)$")


def check_device_map(device_map: str | None) -> None:
    """Refuse a ``--llm-device-map`` that transformers would reject only once the LLM loads: an
    unknown strategy or device, or a device this machine lacks.

    Raises:
        ValueError: not a strategy (auto, balanced, balanced_low_0, sequential) or a device (cpu,
            cuda, cuda:N, mps, xpu:N), or a device torch cannot see here.
    """
    if device_map is None:
        return
    if not DEVICE_MAP.match(device_map):
        raise ValueError(
            f"--llm-device-map {device_map!r} is neither a strategy (auto, balanced, balanced_low_0, "
            "sequential) nor a device (cpu, cuda, cuda:N, mps, xpu:N)"
        )
    kind, _, index = device_map.partition(":")
    backends = {"cuda": torch.cuda, "xpu": getattr(torch, "xpu", None)}
    if kind in backends:
        backend = backends[kind]
        count = backend.device_count() if backend is not None and backend.is_available() else 0
        if count <= int(index or 0):
            raise ValueError(f"--llm-device-map {device_map}: this machine has {count} {kind} device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--llm-device-map mps: this machine has no MPS device")


def check_model_options(
    slm: str, llm: str, llm_dtype: str | None = None, llm_device_map: str | None = None
) -> None:
    """Check the model options of a command before anything loads, whether or not its methods use
    the LLM: :func:`check_model_name` of both, the LLM's dtype and :func:`check_device_map`.

    Raises:
        ModelLoadError, ValueError: naming the option.
    """
    check_model_name(slm)
    check_model_name(llm)
    if llm_dtype is not None and llm_dtype != "gguf":  # what a llama.cpp run records
        parse_dtype(llm_dtype)
    check_device_map(llm_device_map)


@functools.cache
def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU does bfloat16 arithmetic in hardware (x86 AVX512-BF16 or AMX-BF16)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cpu_model_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (else what :mod:`platform` says)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), None)
    return name or platform.processor() or platform.machine()


def cpu_description() -> str:
    """The CPU's model name, whether it computes bfloat16 natively, and its core count, for benchmark
    records (timings are compared only within one machine)."""
    bf16 = "native bfloat16" if cpu_has_native_bfloat16() else "no native bfloat16"
    return f"{cpu_model_name()} ({bf16}), {os.cpu_count()} cores"


# What a run directory's null (or missing) dtype and backend mean: runs made before they were
# recorded decoded in float32 on the torch engine.
LEGACY_DECODING = {"dtype": "float32", "backend": "torch"}


def batch_invariant(backend: str | None, dtype: str | None, llm_dtype: str | None = None) -> bool:
    """Whether a sequence's tokens do not depend on which sequences share its batch.

    True only for float32 on the torch backend (SLM and LLM; ``None`` dtypes and backend mean the
    defaults of runs made before they were recorded: float32, torch): the tests decode alone and in
    batches and compare tokens. bfloat16 and float16 are not batch-invariant: a near-tie in the
    logits can fall either way when the matrix shapes change (on the real 0.5B in bfloat16, GSM8K
    test 0 decoded in a batch of 2 first differs from decoding it alone at step 131). The llama.cpp
    backend is not checked, so it counts as batch-dependent.
    """
    dtype = dtype or LEGACY_DECODING["dtype"]
    return (backend or LEGACY_DECODING["backend"]) == "torch" and {dtype, llm_dtype or dtype} == {"float32"}


def default_dtype(device: str | None = None) -> str:
    """The decoding dtype when none is given: bfloat16 where the hardware computes in it, else float32.

    On this project's CPU (AMD EPYC with AVX512-BF16) bfloat16 decodes 1.5–3.0× faster than float32
    (results/bench/compare.json),
    and the SLM's greedy accuracy on the 100 GSM8K test problems matched float32's within noise (29% vs
    26%, McNemar p = 0.55; results/README.md, "bfloat16 against float32").
    CUDA GPUs with bfloat16 support get it too; other CPUs keep float32, which bfloat16 would slow down.
    ``S2T_DEFAULT_DTYPE`` overrides the choice (the test suite pins float32 with it).
    """
    forced = os.environ.get("S2T_DEFAULT_DTYPE")
    if forced:
        parse_dtype(forced)
        return forced
    on_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if on_cuda:
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if cpu_has_native_bfloat16() else "float32"


def resolve_dtype(dtype: str | None, device: str | None = None) -> str:
    """A dtype name to record: the one given (checked), or :func:`default_dtype`."""
    if dtype is None:
        return default_dtype(device)
    parse_dtype(dtype)
    return dtype


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def load_model(
    name: str,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    device_map: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer for inference (eval mode, no gradients needed).

    ``device_map="auto"`` spreads a large model over the available GPUs; otherwise the model
    goes to ``device`` (default: CUDA when available, else CPU).
    """
    path = resolve_model_path(name)
    torch_dtype = parse_dtype(dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch_dtype,
            device_map=device_map,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except OSError as e:
        raise ModelLoadError(
            f"could not load model {name!r}: it is not a built-in name ({', '.join(BUILTIN_MODELS)}), "
            f"not a local directory or .gguf file, and the Hugging Face Hub could not provide it "
            f"(offline, or no such repository, or no safetensors weights). Original error: {e}"
        ) from e
    if device_map is None:
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    model.requires_grad_(False)
    contiguous_output_head(model)
    return LoadedModel(name=name, model=model, tokenizer=tokenizer)


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """The keyword that hands ``model.forward`` its KV cache: ``cache`` in newer transformers, which
    deprecate (and will drop) ``past_key_values``; ``past_key_values`` before."""
    return {_cache_keyword(type(model)): cache}


@functools.cache
def _cache_keyword(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def contiguous_output_head(model: PreTrainedModel) -> PreTrainedModel:
    """Make the output head read a contiguous copy of its input (once per model; returns the model).

    A forward over several columns with ``logits_to_keep`` hands the head a strided view of the
    hidden states (``hidden[:, -1:]``). ``torch.nn.functional.linear`` cannot fold a strided 3-D
    input into one matrix product, so it expands the (vocab × hidden) weight over the batch and runs
    a batched product: on CPU (torch 2.13) that is 4× slower in float32 and ~250× slower in
    bfloat16, where the expanded weight is copied (17 s for 8 rows of the 0.5B; ``bench/compare.py``
    shows the effect). Copying the few hidden rows first costs nothing.
    """
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_s2t_contiguous_input", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._s2t_contiguous_input = True
    return model


def check_same_vocabulary(slm: LoadedModel | LoadedTokenizer, llm: LoadedModel | LoadedTokenizer) -> None:
    """Fail fast when the two tokenizers differ: a candidate id would mean different text in each."""
    if slm.tokenizer.get_vocab() != llm.tokenizer.get_vocab():
        raise TokenizerMismatchError(
            f"the SLM {slm.name!r} ({len(slm.tokenizer)} tokens, {type(slm.tokenizer).__name__}) and the LLM "
            f"{llm.name!r} ({len(llm.tokenizer)} tokens, {type(llm.tokenizer).__name__}) use different "
            "tokenizers; S2T needs a shared vocabulary (cross-tokenizer pairs are not supported yet)"
        )


def stop_token_ids(loaded: LoadedModel) -> list[int]:
    """Token ids that end generation: the generation config's EOS ids plus the tokenizer's EOS.

    A model loaded by another backend that carries its own ``stop_ids`` (the llama.cpp backend's
    ``LoadedLlamaCpp``, whose GGUF file has no generation config) gives those.
    """
    own = getattr(loaded, "stop_ids", None)
    if own is not None:
        return sorted(own)
    ids: set[int] = set()
    eos = getattr(loaded.model.generation_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(eos)
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(loaded.tokenizer.eos_token_id)
    return sorted(ids)


def pad_token_id(loaded: LoadedModel) -> int:
    """The id that pads finished rows: the tokenizer's pad token, else the first stop id."""
    pad = loaded.tokenizer.pad_token_id
    return pad if pad is not None else stop_token_ids(loaded)[0]


def engine_kwargs(loaded: LoadedModel, max_new_tokens: int | None = None) -> dict:
    """The engine's token settings for a loaded model: ``vocab_size`` (the tokenizer's, so that padded
    output rows are never generated), ``stop_ids``, ``pad_id`` and, if given, ``max_new_tokens``."""
    kwargs = {
        "vocab_size": len(loaded.tokenizer),
        "stop_ids": stop_token_ids(loaded),
        "pad_id": pad_token_id(loaded),
    }
    return kwargs | ({"max_new_tokens": max_new_tokens} if max_new_tokens is not None else {})
