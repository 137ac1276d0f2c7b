"""The Python API: :class:`S2TGenerator`, a ``generate()`` that feels like transformers.

>>> gen = S2TGenerator("qwen2.5-coder-0.5b-instruct", llm="qwen2.5-coder-1.5b-instruct")
>>> out = gen.generate(["What is 7 * 6?"], method="s2t", trigger="entropy", threshold=1.0)
>>> out[0].text, out[0].cost.llm_forward_calls

Models may be names (loaded here) or already-loaded ``PreTrainedModel`` objects. The LLM is
loaded only when a method needs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from s2t.builtin_models import cache_root
from s2t.data import question_digest
from s2t.engine import CostRecord, Method, Scheduler, decode_stream
from s2t.methods import (
    LLM_ALONE,
    LOCAL_METHOD,
    CalibrationSource,
    MethodSpec,
    build_method,
    needs_calibration,
    trigger_statistics,
)
from s2t.models import LoadedModel, check_same_vocabulary, engine_kwargs, load_model, resolve_dtype
from s2t.policies.candidates import TopK
from s2t.policies.triggers import make_trigger
from s2t.prompts import DEFAULT_SYSTEM_PROMPT, build_prompt
from s2t.runs import locked, write_json_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "LLM_ALONE",
    "CalibrationStore",
    "Calibrator",
    "GenerationOutput",
    "ResolvedMethod",
    "S2TGenerator",
]


@dataclass(frozen=True)
class ResolvedMethod:
    """What decodes a :class:`~s2t.methods.MethodSpec`: the decoding model (the SLM, the SLM with a
    LoRA selector's adapter merged in, or the LLM alone), the LLM it consults (or None) and the method."""

    decoder: LoadedModel
    llm: PreTrainedModel | None
    method: Method
    llm_alone: bool = False


@dataclass
class GenerationOutput:
    """A generated answer: its text, new token ids, why it stopped, and what it cost."""

    text: str
    token_ids: list[int]
    finish_reason: str
    cost: CostRecord
    trigger_steps: list[int]


ModelArg = str | PreTrainedModel | LoadedModel
# One question, or a sequence of them; a single string is one question, never its characters.
QuestionsArg = str | Sequence[str]
# A method name, its checked spec, a method built by hand, or one already resolved.
MethodArg = str | MethodSpec | Method | ResolvedMethod


class S2TGenerator:
    """Decode questions with an SLM, optionally helped by an LLM, with any S2T method.

    Args:
        slm: model name/path/Hub id, a loaded ``PreTrainedModel`` (then pass ``tokenizer``), or a ``LoadedModel``.
        llm: the same kinds of argument, or None. A name is loaded on first use by a method that needs it.
        tokenizer: the tokenizer for already-loaded models (shared by SLM and LLM).
        dtype, device: for models loaded here (``llm_dtype``/``llm_device_map`` for the LLM); dtype
            defaults to :func:`s2t.models.default_dtype` (bfloat16 on hardware that computes in it).
    """

    # The decoding loop: the torch engine's continuous batch (the llama.cpp backend brings its own).
    decode_stream = staticmethod(decode_stream)
    backend = "torch"

    def __init__(
        self,
        slm: ModelArg,
        llm: ModelArg | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        dtype: str | None = None,
        device: str | None = None,
        llm_dtype: str | None = None,
        llm_device_map: str | None = None,
    ):
        dtype = resolve_dtype(dtype, device)  # bfloat16 where the hardware has it (models.default_dtype)
        self.slm = self._as_loaded(slm, tokenizer, dtype=dtype, device=device)
        self._llm_arg = llm
        self._llm: LoadedModel | None = None
        self._llm_kwargs = {"dtype": llm_dtype or dtype, "device": device, "device_map": llm_device_map}
        self._tokenizer = tokenizer
        # selector directory -> (decoder, selector), loaded once each (see _local_selector)
        self._local_selectors: dict[str, tuple[LoadedModel, object]] = {}
        self.calibrator = Calibrator(self)
        if llm is not None and not isinstance(llm, str):
            self._llm = self._as_loaded(llm, tokenizer)
            check_same_vocabulary(self.slm, self._llm)

    @staticmethod
    def _as_loaded(model: ModelArg, tokenizer=None, **load_kwargs) -> LoadedModel:
        if isinstance(model, LoadedModel):
            return model
        if isinstance(model, PreTrainedModel):
            if tokenizer is None:
                raise ValueError("pass tokenizer= when giving an already-loaded PreTrainedModel")
            return LoadedModel(model.name_or_path or type(model).__name__, model, tokenizer)
        return load_model(model, **load_kwargs)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.slm.tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.slm.tokenizer)

    def engine_description(self) -> str:
        """What decodes, for people reading a result: the backend and the weights' precision, e.g.
        ``"torch, float32"`` (the LLM's dtype follows when it is loaded and differs)."""
        dtypes = [str(next(self.slm.model.parameters()).dtype).removeprefix("torch.")]
        if self._llm is not None:
            llm_dtype = str(next(self._llm.model.parameters()).dtype).removeprefix("torch.")
            dtypes += [f"LLM {llm_dtype}"] if llm_dtype != dtypes[0] else []
        return f"{self.backend}, {', '.join(dtypes)}"

    @property
    def llm(self) -> LoadedModel:
        """The LLM, loaded on first access (and checked against the SLM's vocabulary)."""
        if self._llm is None:
            if self._llm_arg is None:
                raise ValueError("this method needs an LLM; pass llm= to S2TGenerator")
            self._llm = self._as_loaded(self._llm_arg, self._tokenizer, **self._llm_kwargs)
            check_same_vocabulary(self.slm, self._llm)
        return self._llm

    @property
    def llm_loaded(self) -> bool:
        return self._llm is not None

    def encode(
        self, questions: QuestionsArg, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    ) -> list[list[int]]:
        """The chat prompt's token ids for each question (a single string is one question)."""
        return [build_prompt(self.tokenizer, q, system_prompt) for q in _as_questions(questions)]

    def resolve(
        self, spec: MethodSpec | str, calibrator: Calibrator | None = None, **options
    ) -> ResolvedMethod:
        """The decoding model, the LLM (or None) and the finished method for ``spec``.

        ``spec`` is a :class:`~s2t.methods.MethodSpec`, or a method name parsed with ``options``
        (those of :meth:`MethodSpec.parse`). A trained selector is loaded and checked against this
        SLM; a LoRA-mode selector's adapter is merged into a copy of the SLM, which then decodes. A
        trigger without a threshold is calibrated first (by ``calibrator``, default :attr:`calibrator`,
        whose store is the model cache's ``calibration.json``), so the method is
        built once, complete, and never changed afterwards. The LLM is loaded only if the method needs it.

        A method name calibrates only on a source it is given: ``calibration_questions=`` (a list of
        training questions) or ``calibration=`` (a :class:`~s2t.methods.CalibrationSource`); without
        either, a trigger that needs calibration is refused with ``ValueError`` (pass ``threshold=``).
        A ``MethodSpec`` keeps the source it was parsed with (GSM8K train unless told otherwise).
        """
        if isinstance(spec, str):
            questions = options.pop("calibration_questions", None)
            if "calibration" not in options:  # the Python API calibrates only on questions it is given
                options["calibration"] = (
                    CalibrationSource.from_questions(_as_questions(questions)) if questions else None
                )
            spec = MethodSpec.parse(spec, **options)
        if spec.method != LLM_ALONE:  # before any calibration: a K the SLM cannot give fails at once
            TopK(spec.k).check_vocab(self.vocab_size)
        if spec.method == LLM_ALONE:
            greedy = build_method("greedy", min_step=spec.min_step, label=spec.name)
            return ResolvedMethod(self.llm, None, greedy, llm_alone=True)
        decoder, selector = self.slm, None
        if spec.method == LOCAL_METHOD:
            decoder, selector = self._local_selector(spec.selector)
        threshold = spec.threshold
        if spec.needs_calibration:
            threshold = (calibrator or self.calibrator).threshold(spec)
        trigger = self._trigger(spec, threshold)
        method = build_method(
            spec.method,
            trigger=trigger,
            quantile=spec.quantile,
            k=spec.k,
            ratio=spec.ratio,
            min_step=spec.min_step,
            selector=selector,
            label=spec.name,
        )
        return ResolvedMethod(decoder, self.llm.model if method.needs_llm else None, method)

    def _trigger(self, spec: MethodSpec, threshold: float | None):
        if spec.trigger != "learned":
            return make_trigger(spec.trigger, threshold)
        from s2t.policies.learned_trigger import LearnedTrigger

        return LearnedTrigger.from_pretrained(spec.selector, model=self.slm.model, threshold=threshold)

    def _local_selector(self, directory: str) -> tuple[LoadedModel, object]:
        """The model that decodes with a trained selector, and the selector (loaded once per directory,
        by :meth:`_load_local_selector`)."""
        key = str(directory)
        if key not in self._local_selectors:
            self._local_selectors[key] = self._load_local_selector(directory)
        return self._local_selectors[key]

    def _load_local_selector(self, directory: str) -> tuple[LoadedModel, object]:
        """Load a trained selector and the model that decodes with it (a backend overrides this).

        A head-mode selector decodes with this SLM; a LoRA-mode one with a copy of it that has the
        selector's adapter merged in. A selector trained on another SLM is refused.
        """
        from s2t.policies.learned_selector import load_adapted_slm, load_selector, selector_kind

        selector = load_selector(directory, model=self.slm.model)
        if selector_kind(directory) != "lora":
            return self.slm, selector
        adapted = load_adapted_slm(self.slm.model, directory)
        return LoadedModel(f"{self.slm.name}+lora", adapted, self.slm.tokenizer), selector

    def local_selector_config(self, directory: str):
        """The loaded selector's config (its training record: problem ids, mode, metrics)."""
        return self._local_selector(directory)[1].config

    def llm_name(self) -> str | None:
        if self._llm is not None:
            return self._llm.name
        return self._llm_arg if isinstance(self._llm_arg, str) else None

    def decode_kwargs(self, max_new_tokens: int, model: LoadedModel | None = None) -> dict:
        """The engine's token settings (vocabulary size, stop ids, pad id, budget) for ``model`` (the SLM)."""
        return engine_kwargs(model or self.slm, max_new_tokens)

    def scheduler(
        self,
        method: MethodArg = "greedy",
        max_batch_size: int = 8,
        prefill_chunk: int | None = None,
        **kwargs,
    ) -> Scheduler:
        """A continuous batch (:class:`~s2t.engine.Scheduler`) decoding with ``method``, for serving.

        ``prefill_chunk`` reads longer prompts that many tokens per step (chunked prefill). Other
        keyword arguments are those of :meth:`MethodSpec.parse` (method options, calibration source).
        """
        resolved = self._resolved(method, **kwargs)
        return self._new_scheduler(resolved, max_batch_size=max_batch_size, prefill_chunk=prefill_chunk)

    def _new_scheduler(
        self, resolved: ResolvedMethod, *, max_batch_size: int, prefill_chunk: int | None
    ) -> Scheduler:
        """The backend's continuous batch for a resolved method (the llama.cpp generator builds its own)."""
        return Scheduler(
            resolved.decoder.model,
            resolved.method,
            llm=resolved.llm,
            max_batch_size=max_batch_size,
            prefill_chunk=prefill_chunk,
            **engine_kwargs(resolved.decoder),
        )

    def generate(
        self, questions: QuestionsArg, method: MethodArg = "greedy", **kwargs
    ) -> list[GenerationOutput]:
        """Answer each question with ``method``; returns texts, token ids and cost records in order.

        ``questions`` is a list of questions, or one question as a string (then the list holds one
        output). ``method`` is a name (one of :data:`s2t.methods.METHODS`, ``llm`` being the LLM
        alone), a :class:`~s2t.methods.MethodSpec`, a :class:`ResolvedMethod` or a built
        :class:`~s2t.engine.Method`. Other keyword arguments are those of :meth:`generate_stream`.
        """
        questions = _as_questions(questions)
        outputs: list[GenerationOutput | None] = [None] * len(questions)
        for i, out in self.generate_stream(questions, method, **kwargs):
            outputs[i] = out
        return outputs

    def generate_stream(
        self,
        questions: QuestionsArg,
        method: MethodArg = "greedy",
        *,
        max_new_tokens: int = 512,
        batch_size: int = 8,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        progress: bool = False,
        **method_options,
    ) -> Iterator[tuple[int, GenerationOutput]]:
        """Answer the questions in one continuous batch of ``batch_size`` sequences; yield
        ``(question index, output)`` as each finishes (a finished sequence's place goes to the next
        question at once). A single string is one question (index 0).

        ``method`` is a name, a :class:`~s2t.methods.MethodSpec`, a :class:`ResolvedMethod` or a built
        :class:`~s2t.engine.Method`. Other keyword arguments (``trigger``, ``threshold``,
        ``quantile``, ``k``, ``ratio``, ``min_step``, ``selector``, ``calibration``) are those of
        :meth:`MethodSpec.parse`, and ``calibration_questions``. With a method *name*, a trigger
        without a threshold is calibrated only on what is given: ``calibration_questions=`` (training
        questions) or ``calibration=`` (a :class:`~s2t.methods.CalibrationSource`, e.g.
        ``CalibrationSource("gsm8k", "train")``); with neither it is refused (``ValueError``: pass
        ``threshold=``). A :class:`~s2t.methods.MethodSpec` carries its own source
        (``MethodSpec.parse`` defaults to GSM8K train). See :meth:`resolve`.
        """
        prompts = self.encode(questions, system_prompt)
        seeds = list(seeds) if seeds is not None else [seed * 1_000_003 + i for i in range(len(prompts))]
        resolved = self._resolved(method, **method_options)
        label = resolved.method.name
        if temperature > 0:
            label = f"{label}, sampling at T={temperature:g}, top-p {top_p:g}"
        bar = tqdm(total=len(prompts), desc=f"decoding ({label})", unit="prompt", disable=not progress)
        steps = tqdm(desc="  tokens", unit="step", leave=False, disable=not progress)

        def show_step(step: int, running: int) -> None:
            steps.update(1)
            steps.set_postfix(running=running, refresh=False)

        for i, g in self.decode_stream(
            resolved.decoder.model,
            prompts,
            resolved.method,
            llm=resolved.llm,
            temperature=temperature,
            top_p=top_p,
            seeds=seeds,
            max_batch_size=batch_size,
            on_step=show_step if progress else None,
            **engine_kwargs(resolved.decoder, max_new_tokens),
        ):
            if resolved.llm_alone:
                g.cost = llm_alone_cost(g.cost)
            text = self.tokenizer.decode(g.token_ids, skip_special_tokens=True)
            bar.update(1)
            yield i, GenerationOutput(text, g.token_ids, g.finish_reason, g.cost, g.trigger_steps)
        steps.close()
        bar.close()

    def _resolved(self, method: MethodArg, **options) -> ResolvedMethod:
        if isinstance(method, ResolvedMethod):
            return method
        if not isinstance(method, Method):
            return self.resolve(method, **options)
        # a method built by hand (build_method): decoded by this SLM, as given
        if needs_calibration(method):
            raise ValueError(
                f"the {method.trigger.name!r} trigger has no threshold: pass threshold=, or a method name "
                "(its trigger is then calibrated on training problems, see MethodSpec.calibration)"
            )
        return ResolvedMethod(self.slm, self.llm.model if method.needs_llm else None, method)


def _as_questions(questions: QuestionsArg) -> list[str]:
    """A list of questions: a single string is one question (never its characters)."""
    if isinstance(questions, str):
        return [questions]
    if isinstance(questions, (bytes, bytearray)):
        raise TypeError("questions must be a string or a sequence of strings; got bytes (decode it first)")
    questions = list(questions)
    for i, q in enumerate(questions):
        if not isinstance(q, str):
            raise TypeError(
                f"questions must be a string or a sequence of strings; questions[{i}] is {type(q).__name__}"
            )
    return questions


def llm_alone_cost(cost: CostRecord) -> CostRecord:
    """The cost of the LLM decoding alone: the engine counts the decoding model's forward passes
    as the SLM's, and here they belong in the LLM columns (used by ``generate`` and ``s2t serve``)."""
    return CostRecord(
        generated_tokens=cost.generated_tokens,
        llm_forward_calls=cost.slm_forward_calls,
        llm_forward_tokens=cost.slm_forward_tokens,
        wall_time_s=cost.wall_time_s,
    )


class CalibrationStore:
    """Calibrated thresholds in one JSON file, one entry per key: ``{"trigger", "quantile",
    "threshold", "problems"}``. ``path=None`` keeps the entries in memory only; ``read_only``
    refuses new entries (a distributed worker holds its driver's thresholds)."""

    def __init__(self, path: str | Path | None, entries: dict | None = None, read_only: bool = False):
        self.path = Path(path) if path is not None else None
        self._entries = dict(entries or {})
        self.read_only = read_only

    def entries(self) -> dict[str, dict]:
        if self.path is not None and self.path.is_file():
            stored = json.loads(self.path.read_text())
            return {k: v for k, v in stored.items() if isinstance(v, dict)}  # older caches held bare floats
        return dict(self._entries)

    def get(self, key: str) -> dict | None:
        return self.entries().get(key)

    def put(self, key: str, entry: dict) -> dict:
        """Store ``entry`` unless another process stored ``key`` first; returns the stored entry."""
        if self.path is None:
            return self._entries.setdefault(key, entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with locked(self.path.with_name(f".{self.path.name}.lock")):
            stored = json.loads(self.path.read_text()) if self.path.is_file() else {}
            stored.setdefault(key, entry)
            write_json_atomic(self.path, stored)
        return stored[key]


class Calibrator:
    """The one place trigger thresholds are calibrated: the ``quantile`` of the trigger's statistic
    while the SLM greedily decodes the spec's :class:`~s2t.methods.CalibrationSource` (after
    ``min_step``), stored in a :class:`CalibrationStore`.

    By default the store is ``calibration.json`` in the model cache, keyed by everything that
    determines the threshold (models, trigger, quantile, min_step, source, token budget, prompt).
    An evaluation run keys its own ``calibration.json`` by ``trigger@quantile`` alone
    (``scoped=False``): the run's config pins the rest. A trigger's statistics are kept in memory,
    so that a sweep over quantiles decodes the calibration questions once per trigger.
    """

    def __init__(
        self,
        generator: S2TGenerator,
        store: CalibrationStore | None = None,
        *,
        scoped: bool = True,
        batch_size: int = 8,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        evaluated_questions: Iterable[str] | None = None,
    ):
        self.generator = generator
        self.store = store if store is not None else CalibrationStore(cache_root() / "calibration.json")
        self.scoped = scoped
        self.batch_size = batch_size
        self.system_prompt = system_prompt
        # compared by content, not id: a training file relabelled as a test split is still caught, and
        # a file of other problems whose ids happen to match the calibration's is not refused
        self.evaluated_questions = {question_digest(q) for q in evaluated_questions or ()}
        self._statistics: dict[str, torch.Tensor] = {}

    @staticmethod
    def label(spec: MethodSpec) -> str:
        """``entropy@0.95``: one entry per trigger and quantile."""
        return f"{spec.trigger}@{spec.quantile}"

    def key(self, spec: MethodSpec) -> str:
        return f"{self._scope(spec, quantile=True)}/{self.label(spec)}" if self.scoped else self.label(spec)

    def _scope(self, spec: MethodSpec, quantile: bool = False) -> str:
        needs_llm = make_trigger(spec.trigger).needs_llm
        blob = json.dumps(
            [
                self.generator.slm.name,
                self.generator.llm_name() if needs_llm else None,
                spec.trigger,
                spec.quantile if quantile else None,
                spec.min_step,
                self.system_prompt,
                spec.calibration.identity(),
            ]
            # thresholds measured on llama.cpp are not reused for torch, nor the reverse; torch keys
            # stay as they were
            + ([self.generator.backend] if self.generator.backend != "torch" else [])
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def threshold(self, spec: MethodSpec) -> float:
        """The calibrated threshold for ``spec``'s trigger and quantile (stored, or computed and stored).

        Raises:
            ValueError: the calibration problems overlap the evaluated ones, or the trigger cannot be
                calibrated; RuntimeError: a read-only store lacks the entry.
        """
        key = self.key(spec)
        entry = self.store.get(key)
        if entry is not None:
            return entry["threshold"]
        if self.store.read_only:
            raise RuntimeError(
                f"this process cannot calibrate (its store is read-only): give it the threshold for {self.label(spec)}"
            )
        if spec.calibration is None:
            if spec.trigger == "random":  # its threshold is the firing rate, 1 - quantile: nothing to decode
                return make_trigger("random").threshold_for_quantile(torch.empty(0), spec.quantile)
            raise ValueError(f"the {spec.trigger!r} trigger has no threshold and no calibration source")
        questions, ids = spec.calibration.load()
        overlap = [
            ids[i] if ids else repr(q[:40])
            for i, q in enumerate(questions)
            if question_digest(q) in self.evaluated_questions
        ]
        if overlap:
            raise ValueError(
                f"{len(overlap)} calibration problems are among the evaluated problems (the same question; "
                f"e.g. {overlap[0]}): thresholds must be chosen on training problems only"
            )
        trigger = make_trigger(spec.trigger)
        statistics = torch.empty(0) if spec.trigger == "random" else self._trigger_statistics(spec, questions)
        threshold = trigger.threshold_for_quantile(statistics, spec.quantile)
        entry = {"trigger": spec.trigger, "quantile": spec.quantile, "threshold": threshold, "problems": ids}
        logger.info("calibrated %s: threshold %.4g", self.label(spec), threshold)
        return self.store.put(key, entry)["threshold"]

    def _trigger_statistics(self, spec: MethodSpec, questions: Sequence[str]) -> torch.Tensor:
        scope = self._scope(spec)
        if scope not in self._statistics:
            gen = self.generator
            trigger = make_trigger(spec.trigger)
            started = time.perf_counter()
            logger.info(
                "calibrating the %s trigger: greedy decoding of %d calibration problems (up to %d new tokens each)",
                spec.trigger,
                len(questions),
                spec.calibration.max_new_tokens,
            )
            self._statistics[scope] = trigger_statistics(
                trigger,
                gen.slm.model,
                gen.encode(questions, self.system_prompt),
                llm=gen.llm.model if trigger.needs_llm else None,
                min_step=spec.min_step,
                batch_size=self.batch_size,
                decode_stream=gen.decode_stream,
                **gen.decode_kwargs(spec.calibration.max_new_tokens),
            )
            logger.info("decoded the calibration problems in %.0f s", time.perf_counter() - started)
        return self._statistics[scope]
