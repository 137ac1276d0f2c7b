"""The llama.cpp backend: S2T decoding straight from GGUF files, on llama-cpp-python's C API.

Each model gets one llama.cpp context holding one KV sequence per running problem. A step decodes
the new token of every running sequence in one multi-sequence batch; finished sequences are removed
from the KV cache (``llama_memory_seq_rm``) and their slot goes to the next waiting problem, whose
prompt is prefilled in the next step's batch. The LLM has its own context and is read lazily, as in
the torch engine: at a step where the method needs it, the rows that need it catch up on every token
since their last read in one decode call (the KL trigger reads it at every step). The decision at
each step is :func:`s2t.engine.choose_tokens`, shared with the torch engine, so the trigger,
candidate and selector objects are the same on both backends.

A sequence that reaches the context size (``n_ctx`` per sequence) ends with finish reason
``"length"``. S2T-Local (K-token candidate scoring) and the learned trigger (hidden states) run on
the torch engine only and are refused here.

CPU weight repacking (``use_extra_bufts``) crashes llama.cpp on some CPUs (seen: Intel Xeon with
AMX, on any decode of more than one token). Whether it works is probed once per CPU, llama-cpp-python
version and GGUF file in a subprocess, and the verdict cached (:func:`repack_works`); where the probe
fails, models load without repacking.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from s2t.api import S2TGenerator
from s2t.backends.base import LLAMACPP_EXTRA, THREADS_ENV, BackendUnavailableError, reads_only_logits
from s2t.builtin_models import (
    BUILTIN_MODELS,
    GGUF_MAGIC,
    assemble_gguf,
    builtin_gguf,
    cache_root,
    trim_padding_tokens,
)
from s2t.engine import (
    Method,
    RequestQueue,
    StepOutput,
    _Sequence,
    cancelled_output,
    choose_tokens,
    logprobs_of_prompt,
    token_logprobs,
)
from s2t.engine import decode as engine_decode
from s2t.engine import decode_stream as engine_decode_stream
from s2t.models import ModelLoadError, TokenizerMismatchError, cpu_model_name, engine_kwargs
from s2t.policies.feature_selector import FeatureSelector
from s2t.policies.selectors import LLMSelector, RandomSelector, SLMSelector, TakeoverSelector
from s2t.runs import locked, write_json_atomic

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT = 4096  # KV cells per sequence: prompt + new tokens
BATCH_TOKENS = 512  # tokens per llama_decode call (prompts are split into chunks of this size)
KV_TYPES = {"f16": 1, "f32": 0}  # ggml_type of the KV cache
# selectors that read only next-token logits (the feature selector too); head and LoRA ones score K tokens
SUPPORTED_SELECTORS = (SLMSelector, LLMSelector, TakeoverSelector, RandomSelector, FeatureSelector)
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>")
REPACK_ENV = "S2T_LLAMA_REPACK"  # "0"/"1" overrides the probe's verdict


def import_llama_cpp():
    """The ``llama_cpp`` module, or a clear error naming the extra that installs it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise BackendUnavailableError(
            "the llama.cpp backend needs llama-cpp-python, which is not installed: "
            f"pip install '{LLAMACPP_EXTRA}' (it builds from source, about 10 minutes)"
        ) from e
    return llama_cpp


_QUIET = None


def _quiet(lib) -> None:
    """Route llama.cpp's own logging to nothing (it prints every load detail to stderr)."""
    global _QUIET
    if _QUIET is None:
        _QUIET = lib.llama_log_callback(lambda level, text, data: None)
        lib.llama_log_set(_QUIET, ctypes.c_void_p())
        lib.llama_backend_init()


def default_threads() -> int:
    """llama.cpp's threads: ``$S2T_THREADS`` (``s2t --threads``), else ``$OMP_NUM_THREADS`` (which
    torch obeys), else the cores up to 8."""
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return min(os.cpu_count() or 1, 8)


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` of a GGUF file (checks the magic bytes first)."""
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelLoadError(f"{path} is not a GGUF file (bad magic bytes)")
    from s2t.builtin_models import gguf_reader

    field = gguf_reader(path).get_field("general.architecture")
    if field is None:
        raise ModelLoadError(f"{path} has no general.architecture: not a model GGUF file")
    return bytes(field.parts[field.data[0]]).decode()


# --- repacking probe -------------------------------------------------------------------------------


def _cpu_name() -> str:
    """The CPU's model name and a digest of its feature flags (AMX, AVX512 variants): the probe's key."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    flags = next((line.split(":", 1)[1].strip() for line in info if line.startswith("flags")), "")
    return f"{cpu_model_name()} [{hashlib.sha256(flags.encode()).hexdigest()[:8]}]"


def repack_works(path: Path) -> bool:
    """Whether llama.cpp's CPU weight repacking survives a multi-token decode of ``path`` here.

    Probed once in a subprocess (a crash there is a verdict, not a crash here) and cached per CPU,
    llama-cpp-python version and file. ``$S2T_LLAMA_REPACK`` (0 or 1) overrides it.
    """
    forced = os.environ.get(REPACK_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    lib = import_llama_cpp()
    st = path.stat()
    key = hashlib.sha256(
        f"{_cpu_name()}|{lib.__version__}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    ).hexdigest()[:24]
    cache = cache_root() / "llama_cpp_repack.json"
    verdicts = json.loads(cache.read_text()) if cache.is_file() else {}
    if key in verdicts:
        return verdicts[key]["works"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", REPACK_PROBE, str(path)], capture_output=True, text=True, timeout=300
        )
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    works = code == 0
    if code not in (0, "timeout") and code > 0:  # the probe failed on its own (not a crash): no verdict
        logger.warning(
            "the repacking probe failed (%s); loading %s without repacking", proc.stderr[-500:], path.name
        )
        return False
    if not works:
        logger.warning(
            "llama.cpp with CPU weight repacking crashed on a multi-token decode here (exit %s); "
            "loading %s without repacking",
            code,
            path.name,
        )
    cache.parent.mkdir(parents=True, exist_ok=True)
    with locked(cache.with_name(".llama_cpp_repack.json.lock")):
        fresh = json.loads(cache.read_text()) if cache.is_file() else {}
        fresh[key] = {
            "works": works,
            "exit": code,
            "cpu": _cpu_name(),
            "llama_cpp": lib.__version__,
            "file": str(path),
            "probe_seconds": round(time.perf_counter() - start, 1),
        }
        write_json_atomic(cache, fresh)
    return works


# Loads the file with repacking and decodes one 8-token batch; only llama_cpp is imported (no torch).
REPACK_PROBE = """
import ctypes, sys
import llama_cpp as lib
quiet = lib.llama_log_callback(lambda level, text, data: None)  # kept alive: llama.cpp calls it later
lib.llama_log_set(quiet, ctypes.c_void_p())
lib.llama_backend_init()
params = lib.llama_model_default_params()
params.n_gpu_layers, params.use_extra_bufts = 0, True
model = lib.llama_model_load_from_file(sys.argv[1].encode(), params)
if not model:
    sys.exit(3)
cparams = lib.llama_context_default_params()
cparams.n_ctx, cparams.n_batch, cparams.n_ubatch, cparams.n_threads, cparams.n_threads_batch = 64, 64, 64, 2, 2
ctx = lib.llama_init_from_model(model, cparams)
batch = lib.llama_batch_init(8, 0, 1)
for i in range(8):
    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = i + 1, i, 1, i == 7
    batch.seq_id[i][0] = 0
batch.n_tokens = 8
sys.exit(lib.llama_decode(ctx, batch))
"""


# --- one model ------------------------------------------------------------------------------------


class LlamaCppModel:
    """A GGUF model in llama.cpp with one context: one KV sequence per running problem.

    :meth:`decode` runs one multi-sequence batch and returns each entry's next-token logits.
    ``n_ctx`` is the KV cells per sequence (prompt + new tokens), at most ``n_ctx_train``, the
    positions the model was trained on (the GGUF's ``context_length``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        n_ctx: int = DEFAULT_CONTEXT,
        n_threads: int | None = None,
        kv_type: str = "f16",
        repack: bool | None = None,
    ):
        self.lib = lib = import_llama_cpp()
        self.path = Path(path)
        self.architecture = gguf_architecture(self.path)
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}; got {kv_type!r}")
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1; got {n_ctx}")
        _quiet(lib)
        self.repack = repack_works(self.path) if repack is None else repack
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        params.use_extra_bufts = self.repack
        self._model = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise ModelLoadError(
                f"llama.cpp could not load {self.path} (architecture {self.architecture!r}): this build of "
                f"llama-cpp-python ({lib.__version__}) does not support it, or the file is damaged; "
                "try --backend torch"
            )
        self.vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        # the positions the model was trained on (the GGUF's context_length) bound the context
        self.n_ctx_train = lib.llama_model_n_ctx_train(self._model) or None
        self.n_ctx = min(n_ctx, self.n_ctx_train or n_ctx)
        self.n_threads = n_threads or default_threads()
        self.kv_type = kv_type
        self.n_sequences = 0
        self._ctx = self._scoring = None  # the running batch's context; prompt_logits' own
        self._batch = lib.llama_batch_init(BATCH_TOKENS, 0, 1)
        self.ensure_sequences(1)

    def ensure_sequences(self, n: int) -> None:
        """Make room for ``n`` sequences (a new context when more are needed; the KV cache is cleared)."""
        lib = self.lib
        if n <= self.n_sequences:
            self.clear()
            return
        if self._ctx:
            lib.llama_free(self._ctx)
        self._ctx = self._new_context(n)
        self._memory = lib.llama_get_memory(self._ctx)
        self.n_sequences = n

    def _new_context(self, n: int):
        """A llama.cpp context of ``n`` sequences sharing one pool of n × n_ctx KV cells (a long
        sequence may use a short one's room)."""
        lib = self.lib
        params = lib.llama_context_default_params()
        params.n_ctx = self.n_ctx * n
        params.n_seq_max = n
        params.n_batch = params.n_ubatch = BATCH_TOKENS
        params.n_threads = params.n_threads_batch = self.n_threads
        params.type_k = params.type_v = KV_TYPES[self.kv_type]
        params.kv_unified = True
        params.no_perf = True
        ctx = lib.llama_init_from_model(self._model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n} × {self.n_ctx} tokens")
        return ctx

    def prompt_logits(self, tokens: Sequence[int]) -> torch.Tensor:
        """The logits after each of ``tokens``, read as one new sequence: (len(tokens), n_vocab)
        float32, row ``i`` scoring token ``i + 1``. A context of its own (n_ctx cells, made at the
        first call) holds it, so the running batch's KV cache is untouched.

        Raises:
            ValueError: more tokens than the context holds (``n_ctx``), or none.
        """
        if not 0 < len(tokens) <= self.n_ctx:
            raise ValueError(f"a prompt to score needs 1 to {self.n_ctx} tokens; got {len(tokens)}")
        if self._scoring is None:
            self._scoring = self._new_context(1)
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self._scoring), True)
        out = np.empty((len(tokens), self.n_vocab), dtype=np.float32)
        for start in range(0, len(tokens), BATCH_TOKENS):
            chunk = tokens[start : start + BATCH_TOKENS]
            for j, token in enumerate(chunk):
                self._put(j, token, start + j, 0, True)
            self._run(len(chunk), [(start + j, j) for j in range(len(chunk))], out, self._scoring)
        return torch.from_numpy(out)

    def clear(self) -> None:
        self.lib.llama_memory_clear(self._memory, True)

    def remove(self, sequence: int) -> None:
        """Free one sequence's KV cells."""
        self.lib.llama_memory_seq_rm(self._memory, sequence, -1, -1)

    def decode(self, entries: Sequence[tuple[int, Sequence[int], int]]) -> torch.Tensor:
        """Feed each entry's tokens ``(sequence, tokens, first position)``; return the logits after
        each entry's last token, (entries, n_vocab) float32. One llama_decode per 512 tokens."""
        out = np.empty((len(entries), self.n_vocab), dtype=np.float32)
        filled, outputs = 0, []
        for row, (sequence, tokens, position) in enumerate(entries):
            for j, token in enumerate(tokens):
                if filled == BATCH_TOKENS:
                    self._run(filled, outputs, out)
                    filled, outputs = 0, []
                last = j == len(tokens) - 1
                self._put(filled, token, position + j, sequence, last)
                if last:
                    outputs.append((row, filled))
                filled += 1
        if filled:
            self._run(filled, outputs, out)
        return torch.from_numpy(out)

    def _put(self, index: int, token: int, position: int, sequence: int, logits: bool) -> None:
        """Entry ``index`` of the batch: ``token`` at ``position`` of ``sequence``, its logits kept or not."""
        batch = self._batch
        batch.token[index] = token
        batch.pos[index] = position
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = sequence
        batch.logits[index] = logits

    def _run(self, filled: int, outputs: list[tuple[int, int]], out: np.ndarray, ctx=None) -> None:
        """Decode the batch's first ``filled`` entries in ``ctx`` (default: the running batch's) and
        copy the logits of each ``(row of out, batch index)`` in ``outputs``."""
        ctx = ctx or self._ctx
        self._batch.n_tokens = filled
        code = self.lib.llama_decode(ctx, self._batch)
        if code != 0:
            raise RuntimeError(f"llama_decode failed on {self.path.name} (code {code})")
        for row, index in outputs:
            pointer = self.lib.llama_get_logits_ith(ctx, index)
            out[row] = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def close(self) -> None:
        lib = self.lib
        for name in ("_ctx", "_scoring"):
            if getattr(self, name, None):
                lib.llama_free(getattr(self, name))
                setattr(self, name, None)
        if getattr(self, "_model", None) and hasattr(self, "_batch"):
            lib.llama_batch_free(self._batch)
            lib.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


# --- the continuous batch -------------------------------------------------------------------------


def check_method(method: Method) -> None:
    """Refuse what only the torch engine runs (S2T-Local's scoring, hidden-state triggers)."""
    if method.trigger.needs_hidden:
        raise BackendUnavailableError(
            f"the {method.trigger.name!r} trigger reads the SLM's hidden state, which the llama.cpp backend "
            "does not expose; use --backend torch"
        )
    if not isinstance(method.selector, SUPPORTED_SELECTORS):
        raise BackendUnavailableError(
            f"the llama.cpp backend cannot run the {method.selector.name!r} selector of {method.name!r} "
            "(it scores candidates with the SLM itself); use --backend torch"
        )


class LlamaCppScheduler(RequestQueue):
    """The continuous batch on llama.cpp, with the torch :class:`~s2t.engine.Scheduler`'s interface:
    :meth:`add` requests at any time, :meth:`step` until none is left."""

    def __init__(
        self,
        slm: LlamaCppModel,
        method: Method | None = None,
        *,
        llm: LlamaCppModel | None = None,
        vocab_size: int,
        stop_ids: Sequence[int],
        pad_id: int | None = None,  # unused: sequences are never padded here
        max_batch_size: int | None = None,
        record_statistics: bool = False,
    ):
        super().__init__(record_statistics)
        self.method = method or Method(name="greedy")
        check_method(self.method)
        if self.method.needs_llm and llm is None:
            raise ValueError(f"method {self.method.name!r} needs an LLM but none was given")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1; got {max_batch_size}")
        self.method.candidates.check_vocab(vocab_size)
        self.slm, self.llm = slm, llm if self.method.needs_llm else None
        if vocab_size > slm.n_vocab or (self.llm is not None and self.llm.n_vocab != slm.n_vocab):
            raise TokenizerMismatchError(
                f"vocabulary sizes differ: tokenizer {vocab_size}, SLM {slm.n_vocab}"
                + (f", LLM {self.llm.n_vocab}" if self.llm is not None else "")
            )
        self.vocab_size = vocab_size
        self.stop = set(stop_ids)
        self.max_batch_size = max_batch_size or 8
        for model in (self.slm, self.llm):
            if model is not None:
                model.ensure_sequences(self.max_batch_size)
        self.n_ctx = min(m.n_ctx for m in (self.slm, self.llm) if m is not None)
        self.running: list[_Sequence] = []
        # Always empty: a joining prompt is read whole in the step it joins (llama.cpp splits it into
        # its own batches), so nothing waits half-read as under the torch engine's chunked prefill.
        self.prefilling: list[_Sequence] = []
        self._free = list(range(self.max_batch_size))
        self._slot: dict[int, int] = {}  # sequence id -> KV sequence
        self._llm_read: dict[int, int] = {}  # sequence id -> tokens in the LLM's KV cache
        self.slm_logits: torch.Tensor | None = None  # (running, vocab)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def score_prompt(self, prompt: Sequence[int], top: int) -> list[tuple[float, list[tuple[int, float]]]]:
        """The decoding model's log-probability of each prompt token after the first, with its ``top``
        alternatives (OpenAI's ``echo``), read in a context of its own
        (:meth:`LlamaCppModel.prompt_logits`). Call it between steps."""
        return logprobs_of_prompt(self.slm.prompt_logits(prompt)[:-1, : self.vocab_size], prompt, top)

    def _abort_started(self) -> list[int]:
        dropped = [s.id for s in self.running]
        for s in self.running:
            self._release(s)
        self.running, self.slm_logits = [], None
        return dropped

    @staticmethod
    def _history(s: _Sequence) -> list[int]:
        return [*s.request.prompt, *s.tokens]

    def _read_llm(self, needed: torch.Tensor) -> torch.Tensor:
        """The LLM's next-token logits, valid on the ``needed`` rows: those rows catch up on every
        token since their last read, all in one decode call; other rows are zeros."""
        rows = needed.nonzero().flatten().tolist()
        entries = []
        for i in rows:
            s = self.running[i]
            history, read = self._history(s), self._llm_read[s.id]
            entries.append((self._slot[s.id], history[read:], read))
            self._llm_read[s.id] = len(history)
        logits = torch.zeros((len(self.running), self.vocab_size))
        if entries:
            logits[rows] = self.llm.decode(entries)[:, : self.vocab_size]
        return logits

    def step(self) -> list[StepOutput]:
        """Admit waiting requests, then decode one token for every running sequence."""
        outputs = self._drop_cancelled()
        outputs += self._admit()
        if not self.running:
            return outputs
        start = time.perf_counter()
        rows = self.running
        token, _ = choose_tokens(self.method, rows, self.slm_logits, self._read_llm)
        keep, entries = [], []
        for i, s in enumerate(rows):
            s.tokens.append(int(token[i]))
            s.cost.generated_tokens += 1
            full = len(s.request.prompt) + len(s.tokens) >= self.n_ctx  # no KV cell left for it
            finish = (
                "stop"
                if s.tokens[-1] in self.stop
                else "length"
                if len(s.tokens) >= s.request.max_new_tokens or full
                else None
            )
            out = StepOutput(s.id, s.tokens[-1], s.result(finish) if finish else None)
            if s.request.logprobs is not None:
                out.logprob, out.top_logprobs = token_logprobs(
                    self.slm_logits[i], s.tokens[-1], s.request.logprobs
                )
            outputs.append(out)
            if finish is None:
                keep.append(i)
                entries.append((self._slot[s.id], [s.tokens[-1]], len(s.request.prompt) + len(s.tokens) - 1))
            else:
                self._release(s)
        self.running = [rows[i] for i in keep]
        if self.running:
            self.slm_logits = self.slm.decode(entries)[:, : self.vocab_size]
            for s in self.running:
                s.cost.slm_forward_calls += 1
                s.cost.slm_forward_tokens += 1
        else:
            self.slm_logits = None
        share = (time.perf_counter() - start) / len(rows)
        for s in rows:
            s.cost.wall_time_s += share
        return outputs

    def _admit(self) -> list[StepOutput]:
        """Give free KV sequences to waiting requests and prefill their prompts in one batch."""
        outputs, joining = [], []
        while self.waiting and self._free:
            s = self.waiting.popleft()
            if len(s.request.prompt) > self.n_ctx:  # the prompt alone overflows the context
                outputs.append(StepOutput(s.id, None, s.result("length")))
                continue
            self._slot[s.id], self._llm_read[s.id] = self._free.pop(0), 0
            joining.append(s)
        if not joining:
            return outputs
        start = time.perf_counter()
        logits = self.slm.decode([(self._slot[s.id], list(s.request.prompt), 0) for s in joining])
        logits = logits[:, : self.vocab_size]
        self.slm_logits = logits if not self.running else torch.cat([self.slm_logits, logits])
        self.running.extend(joining)
        share = (time.perf_counter() - start) / len(joining)
        for s in joining:
            s.cost.wall_time_s += share
        return outputs

    def _release(self, s: _Sequence) -> None:
        slot = self._slot.pop(s.id)
        self._llm_read.pop(s.id, None)
        for model in (self.slm, self.llm):
            if model is not None:
                model.remove(slot)
        self._free.append(slot)

    def _drop_cancelled_started(self, cancelled: set[int]) -> list[StepOutput]:
        outputs, keep = [], []
        for i, s in enumerate(self.running):
            if s.id in cancelled:
                outputs.append(cancelled_output(s))
                self._release(s)
            else:
                keep.append(i)
        if len(keep) < len(self.running):
            self.running = [self.running[i] for i in keep]
            self.slm_logits = self.slm_logits[keep] if self.running else None
        return outputs


def decode_stream(
    slm: LlamaCppModel, prompts: Sequence[Sequence[int]], method: Method | None = None, **kwargs
) -> Iterator[tuple[int, object]]:
    """:func:`s2t.engine.decode_stream` on llama.cpp (same arguments): yield ``(prompt index,
    generation)`` as each finishes."""
    return engine_decode_stream(slm, prompts, method, scheduler_class=LlamaCppScheduler, **kwargs)


def decode(
    slm: LlamaCppModel, prompts: Sequence[Sequence[int]], method: Method | None = None, **kwargs
) -> list:
    """:func:`s2t.engine.decode` on llama.cpp: generations in prompt order."""
    return engine_decode(slm, prompts, method, scheduler_class=LlamaCppScheduler, **kwargs)


# --- models by name, and the generator ----------------------------------------------------------


def gguf_file(name: str) -> Path:
    """The GGUF file of a model argument: a ``.gguf`` path, or a built-in name (its parts joined once
    into the cache and kept there)."""
    if name in BUILTIN_MODELS:
        path = builtin_gguf(name)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            assemble_gguf(BUILTIN_MODELS[name], path)
        return path
    path = Path(os.path.expanduser(name))
    if path.suffix != ".gguf":
        raise BackendUnavailableError(
            f"the llama.cpp backend runs GGUF files; {name!r} is not one (give a .gguf file or a built-in "
            "name, or use --backend torch)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return path


def gguf_tokenizer(name: str, path: Path):
    """The Hugging Face tokenizer of a GGUF model: the converted checkpoint's when a built-in model was
    prepared for torch, else read from the GGUF once (slow) and cached beside the other conversions."""
    from transformers import AutoTokenizer

    from s2t.builtin_models import converted_dir, gguf_cache_dir, is_prepared

    if name in BUILTIN_MODELS and is_prepared(name):
        return AutoTokenizer.from_pretrained(str(converted_dir(name)))
    cached = gguf_cache_dir(path).with_name(gguf_cache_dir(path).name + "-tokenizer")
    if not (cached / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        staging = cached.with_name(cached.name + f".{os.getpid()}")
        tokenizer.save_pretrained(staging)
        trim_padding_tokens(staging)
        try:
            os.replace(staging, cached)
        except OSError:  # another process cached it first
            shutil.rmtree(staging, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(cached))


def chat_stop_ids(tokenizer) -> list[int]:
    """Token ids that end generation: the tokenizer's EOS and the chat models' end-of-turn tokens
    (what the torch path writes into a converted checkpoint's generation config)."""
    vocab = tokenizer.get_vocab()
    stop = {vocab[t] for t in (tokenizer.eos_token, *STOP_TOKENS) if t is not None and t in vocab}
    return sorted(stop)


@dataclass
class LoadedLlamaCpp:
    """A llama.cpp model with its tokenizer and the name it was asked for by."""

    name: str
    model: LlamaCppModel
    tokenizer: object
    stop_ids: list[int]


def load_llama_cpp(name: str, tokenizer=None, **model_kwargs) -> LoadedLlamaCpp:
    """Load a GGUF model (a ``.gguf`` path or a built-in name) into llama.cpp, with its tokenizer."""
    path = gguf_file(name)
    model = LlamaCppModel(path, **model_kwargs)
    tokenizer = tokenizer if tokenizer is not None else gguf_tokenizer(name, path)
    return LoadedLlamaCpp(name, model, tokenizer, chat_stop_ids(tokenizer))


class LlamaCppGenerator(S2TGenerator):
    """:class:`~s2t.api.S2TGenerator` on the llama.cpp backend: models are GGUF files (paths or
    built-in names), loaded into llama.cpp; everything else (methods, calibration, prompts) is shared.

    ``n_ctx`` is the context per sequence, ``n_threads`` llama.cpp's threads (default: the cores, up to
    8), ``kv_type`` the KV cache's precision (``f16`` or ``f32``), ``repack`` forces CPU weight
    repacking on or off (default: :func:`repack_works`). ``dtype`` and the LLM's placement options of
    the torch generator are accepted and ignored: the GGUF file fixes the weights' precision.
    """

    backend = "llama.cpp"
    decode_stream = staticmethod(decode_stream)

    def __init__(
        self,
        slm,
        llm=None,
        tokenizer=None,
        *,
        n_ctx: int = DEFAULT_CONTEXT,
        n_threads: int | None = None,
        kv_type: str = "f16",
        repack: bool | None = None,
        **ignored,
    ):
        self._llama_options = {"n_ctx": n_ctx, "n_threads": n_threads, "kv_type": kv_type, "repack": repack}
        super().__init__(slm, llm, tokenizer)

    def engine_description(self) -> str:
        """The backend and the SLM's GGUF file (its quantisation fixes the weights' precision)."""
        return f"{self.backend}, {self.slm.model.path.name}"

    def _as_loaded(self, model, tokenizer=None, **ignored) -> LoadedLlamaCpp:
        if isinstance(model, LoadedLlamaCpp):
            return model
        if not isinstance(model, str | os.PathLike):
            raise ValueError("the llama.cpp backend loads models by name or GGUF path")
        return load_llama_cpp(str(model), tokenizer, **self._llama_options)

    def _load_local_selector(self, directory):
        """A feature selector (it reads only the SLM's logits), checked against the SLM's GGUF file;
        head and LoRA selectors score K candidates with the SLM itself and are refused."""
        if not reads_only_logits(directory):
            raise BackendUnavailableError(
                "S2T-Local with a head or LoRA selector scores its candidates with the SLM itself (K tokens "
                "under a 4D mask), which only the torch engine does; use --backend torch (or a selector "
                "trained with --mode features)"
            )
        selector = FeatureSelector.from_pretrained(directory)
        selector.check_base(self.slm.model.path)
        return self.slm, selector

    def _trigger(self, spec, threshold):
        """A learned trigger is checked against the SLM's GGUF file, and refused if it reads the hidden
        state, which llama.cpp does not expose."""
        if spec.trigger != "learned":
            return super()._trigger(spec, threshold)
        from s2t.policies.learned_trigger import LearnedTrigger

        trigger = LearnedTrigger.from_pretrained(
            spec.selector, model=self.slm.model.path, threshold=threshold
        )
        if trigger.needs_hidden:
            raise BackendUnavailableError(
                f"the learned trigger in {spec.selector} reads the SLM's hidden state, which llama.cpp does "
                "not expose; use --backend torch"
            )
        return trigger

    def _new_scheduler(
        self, resolved, *, max_batch_size: int, prefill_chunk: int | None
    ) -> LlamaCppScheduler:
        # llama.cpp reads a prompt in its own batches: chunked prefill is the torch engine's option
        return LlamaCppScheduler(
            resolved.decoder.model,
            resolved.method,
            llm=resolved.llm,
            max_batch_size=max_batch_size,
            **engine_kwargs(resolved.decoder),
        )
