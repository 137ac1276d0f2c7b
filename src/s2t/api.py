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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from s2t.builtin_models import cache_root
from s2t.engine import CostRecord, Method, Scheduler, decode_stream
from s2t.methods import build_method, calibrate, needs_calibration, trigger_statistics
from s2t.models import LoadedModel, check_same_vocabulary, load_model, resolve_dtype, stop_token_ids
from s2t.policies.triggers import NeverTrigger, RandomTrigger
from s2t.prompts import DEFAULT_SYSTEM_PROMPT, build_prompt
from s2t.runs import locked, write_json_atomic

logger = logging.getLogger(__name__)

LLM_ALONE = "llm"  # the method name for decoding with the LLM alone (a baseline, not an S2T method)


@dataclass
class GenerationOutput:
    """A generated answer: its text, new token ids, why it stopped, and what it cost."""

    text: str
    token_ids: list[int]
    finish_reason: str
    cost: CostRecord
    trigger_steps: list[int]


ModelArg = str | PreTrainedModel | LoadedModel


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
        self._trigger_statistics: dict[
            str, torch.Tensor
        ] = {}  # calibration statistics, by trigger and questions
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
        self, questions: Sequence[str], system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    ) -> list[list[int]]:
        return [build_prompt(self.tokenizer, q, system_prompt) for q in questions]

    def local_selector(self, directory) -> tuple[S2TGenerator, object]:
        """Load a trained S2T-Local selector for this generator's SLM (refused for another SLM).

        Returns the generator to decode ``s2t-local`` with and the selector: this generator for a
        head-mode selector, or a new one around the SLM with the selector's LoRA adapter merged in
        (the LLM is never part of it).
        """
        from s2t.local.selector import LocalSelector, load_adapted_slm, selector_directory

        selector = LocalSelector.from_pretrained(selector_directory(directory), model=self.slm.model)
        if selector.config.training.get("mode") != "lora":
            return self, selector
        adapted = load_adapted_slm(self.slm.model, directory)
        return S2TGenerator(LoadedModel(f"{self.slm.name}+lora", adapted, self.slm.tokenizer)), selector

    def make_method(self, method: str | Method = "greedy", **method_kwargs) -> Method:
        if isinstance(method, Method):
            return method
        return build_method(method, **method_kwargs)

    def calibrate(
        self,
        method: Method,
        calibration_questions: Sequence[str],
        *,
        max_new_tokens: int = 256,
        batch_size: int = 8,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        use_cache: bool = True,
    ) -> float:
        """Calibrate ``method``'s trigger on training questions; thresholds are cached on disk.

        The trigger's statistics on the calibration questions are kept in memory too, so that a
        sweep over quantiles of one trigger decodes the calibration questions once. A learned
        trigger (one that reads hidden states) is specific to its selector and is never cached.
        """
        use_cache = use_cache and not method.trigger.needs_hidden
        key = self._calibration_key(method, calibration_questions, max_new_tokens, system_prompt)
        cache_file = cache_root() / "calibration.json"
        cached = json.loads(cache_file.read_text()) if use_cache and cache_file.is_file() else {}
        if key in cached:
            method.trigger.threshold = cached[key]
            return cached[key]
        stats_key = self._calibration_key(
            method, calibration_questions, max_new_tokens, system_prompt, quantile=False
        )
        if stats_key not in self._trigger_statistics and not isinstance(
            method.trigger, RandomTrigger | NeverTrigger
        ):
            statistics = trigger_statistics(
                method.trigger,
                self.slm.model,
                self.encode(calibration_questions, system_prompt),
                llm=self.llm.model if method.trigger.needs_llm else None,
                min_step=method.min_step,
                batch_size=batch_size,
                decode_stream=self.decode_stream,
                **self._decode_kwargs(max_new_tokens),
            )
            if use_cache:
                self._trigger_statistics[stats_key] = statistics
        else:
            statistics = self._trigger_statistics.get(stats_key)
        threshold = calibrate(method, self.slm.model, [], statistics=statistics)
        if use_cache:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            with locked(cache_file.with_name(".calibration.json.lock")):
                fresh = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
                fresh[key] = threshold
                write_json_atomic(cache_file, fresh)
        return threshold

    def _calibration_key(
        self, method, questions, max_new_tokens, system_prompt, quantile: bool = True
    ) -> str:
        llm_name = self._llm.name if self._llm else self._llm_arg if isinstance(self._llm_arg, str) else None
        blob = json.dumps(
            [
                self.slm.name,
                llm_name if method.trigger.needs_llm else None,
                method.trigger.name,
                method.quantile if quantile else None,
                method.min_step,
                max_new_tokens,
                system_prompt,
                list(questions),
            ]
            + ([self.backend] if self.backend != "torch" else []),  # torch keys stay as they were
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def _engine_kwargs(self, model: LoadedModel | None = None) -> dict:
        model = model or self.slm
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else stop_token_ids(model)[0]
        return {"vocab_size": self.vocab_size, "stop_ids": stop_token_ids(model), "pad_id": pad}

    def _decode_kwargs(self, max_new_tokens: int, model: LoadedModel | None = None) -> dict:
        return {**self._engine_kwargs(model), "max_new_tokens": max_new_tokens}

    def scheduler(self, method: str | Method = "greedy", max_batch_size: int = 8, **kwargs) -> Scheduler:
        """A continuous batch (:class:`~s2t.engine.Scheduler`) decoding with ``method``, for serving.

        Keyword arguments are those of :meth:`method_models` (calibration, method options).
        """
        decoder, llm, method_obj = self.method_models(method, batch_size=max_batch_size, **kwargs)
        return Scheduler(
            decoder.model, method_obj, llm=llm, max_batch_size=max_batch_size, **self._engine_kwargs(decoder)
        )

    def generate(
        self, questions: Sequence[str], method: str | Method = "greedy", **kwargs
    ) -> list[GenerationOutput]:
        """Answer each question with ``method``; returns texts, token ids and cost records in order.

        ``method`` is a :class:`~s2t.engine.Method` or a name: ``greedy``, ``s2t``, ``takeover``,
        ``random-select``, or ``llm`` (the LLM alone). Other keyword arguments are those of
        :meth:`generate_stream`.
        """
        outputs: list[GenerationOutput | None] = [None] * len(questions)
        for i, out in self.generate_stream(questions, method, **kwargs):
            outputs[i] = out
        return outputs

    def generate_stream(
        self,
        questions: Sequence[str],
        method: str | Method = "greedy",
        *,
        max_new_tokens: int = 512,
        batch_size: int = 8,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        calibration_questions: Sequence[str] | None = None,
        progress: bool = False,
        **method_kwargs,
    ) -> Iterator[tuple[int, GenerationOutput]]:
        """Answer the questions in one continuous batch of ``batch_size`` sequences; yield
        ``(question index, output)`` as each finishes (a finished sequence's place goes to the next
        question at once).

        Keyword arguments other than those listed (``trigger``, ``threshold``, ``quantile``, ``k``,
        ``ratio``, ``min_step``) build a named method. A method whose trigger has no threshold is
        calibrated on ``calibration_questions``.
        """
        prompts = self.encode(questions, system_prompt)
        seeds = list(seeds) if seeds is not None else [seed * 1_000_003 + i for i in range(len(prompts))]
        decoder, llm, method_obj = self.method_models(
            method, calibration_questions, batch_size, **method_kwargs
        )
        label = method if isinstance(method, str) else method.name
        if temperature > 0:
            label = f"{label}, sampling at T={temperature:g}, top-p {top_p:g}"
        bar = tqdm(total=len(prompts), desc=f"decoding ({label})", unit="prompt", disable=not progress)
        steps = tqdm(desc="  tokens", unit="step", leave=False, disable=not progress)

        def show_step(step: int, running: int) -> None:
            steps.update(1)
            steps.set_postfix(running=running, refresh=False)

        for i, g in self.decode_stream(
            decoder.model,
            prompts,
            method_obj,
            llm=llm,
            temperature=temperature,
            top_p=top_p,
            seeds=seeds,
            max_batch_size=batch_size,
            on_step=show_step if progress else None,
            **self._decode_kwargs(max_new_tokens, decoder),
        ):
            if method == LLM_ALONE:
                g.cost = _as_llm_cost(g.cost)
            text = self.tokenizer.decode(g.token_ids, skip_special_tokens=True)
            bar.update(1)
            yield i, GenerationOutput(text, g.token_ids, g.finish_reason, g.cost, g.trigger_steps)
        steps.close()
        bar.close()

    def method_models(
        self,
        method: str | Method,
        calibration_questions: Sequence[str] | None = None,
        batch_size: int = 8,
        **method_kwargs,
    ) -> tuple[LoadedModel, PreTrainedModel | None, Method]:
        """The decoding model, the LLM it needs (or None) and the method object for ``method``.

        ``llm`` (the LLM alone) decodes greedily with the LLM; other names build a method (loading the
        LLM only if it needs one), calibrating its trigger on ``calibration_questions`` when it has no
        threshold.
        """
        if method == LLM_ALONE:
            return self.llm, None, build_method("greedy")
        method_obj = self.make_method(method, **method_kwargs)
        if needs_calibration(method_obj):
            if not calibration_questions:
                raise ValueError(
                    f"the {method_obj.trigger.name!r} trigger has no threshold: pass threshold=, or "
                    "calibration_questions= (training problems) to calibrate it as a quantile"
                )
            self.calibrate(method_obj, calibration_questions, batch_size=batch_size)
        return self.slm, (self.llm.model if method_obj.needs_llm else None), method_obj


def _as_llm_cost(cost: CostRecord) -> CostRecord:
    """The LLM decoding alone: its forward passes belong in the LLM columns."""
    return CostRecord(
        generated_tokens=cost.generated_tokens,
        llm_forward_calls=cost.slm_forward_calls,
        llm_forward_tokens=cost.slm_forward_tokens,
        wall_time_s=cost.wall_time_s,
    )
