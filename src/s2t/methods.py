"""Named decoding methods, :class:`MethodSpec` (a method's whole configuration) and trigger calibration.

A :class:`MethodSpec` is what every entry point (``s2t generate``, ``s2t serve``, ``s2t eval``,
the lm-eval adapter, :class:`s2t.api.S2TGenerator`) builds from its options with
:meth:`MethodSpec.parse`, which validates everything before any model loads;
:meth:`s2t.api.S2TGenerator.resolve` turns it into the decoding model, the LLM (or None) and a
finished :class:`~s2t.engine.Method`. The accepted method names are :data:`METHODS`.

A method name fixes the selector; the trigger, K and candidate filter are options, so that
S2T and its controls can be compared at exactly the same trigger points.

A name may also carry its own trigger setting, so that one run can hold a sweep over trigger
rates (:class:`TriggerSetting`)::

    s2t/entropy@0.8      the entropy trigger calibrated at its 0.8 quantile (~20% of steps)
    s2t/margin=0.3       the margin trigger at the threshold 0.3
    s2t/always           intervene at every step
    takeover/kl@0.95/k4  Takeover at the KL trigger's 0.95 quantile, with K=4 candidates
"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from s2t.data import PROBLEM_DIGEST_CHARS, Problem
from s2t.engine import Method
from s2t.engine import decode_stream as engine_decode_stream
from s2t.method_names import LLM_ALONE, LOCAL_METHOD, METHOD_SELECTORS, METHODS, TRIGGER_NAMES
from s2t.policies.candidates import TopK, make_candidates
from s2t.policies.selectors import Selector, make_selector
from s2t.policies.triggers import (
    TRIGGERS,
    NeverTrigger,
    RandomTrigger,
    Trigger,
    check_quantile,
    make_trigger,
)

logger = logging.getLogger(__name__)

DEFAULT_QUANTILE = 0.95
# Triggers that take no quantile: always and never have no threshold, the learned one keeps its own.
UNCALIBRATED_TRIGGERS = ("always", "never", "learned")
DEFAULT_K = 8

# Methods that consult a trigger, and so may carry their own trigger setting in their name.
TRIGGERED_METHODS = (*(m for m in METHOD_SELECTORS if m != "greedy"), LOCAL_METHOD)
# METHOD:LABEL (s2t-local:lora, s2t:hidden/learned): a labelled variant of a method that reads --selector
# (S2T-Local, or a learned trigger) lets a second selector join a run directory
_LABELLED_PATTERN = re.compile(r"^(?P<method>[a-z0-9-]+):(?P<label>[a-z0-9][a-z0-9._-]*)$")
LABEL_SYNTAX = (
    "METHOD:LABEL (a lowercase letter or digit, then lowercase letters, digits, '.', '_', '-') on a method "
    "that reads --selector"
)
_MAJORITY_PATTERN = re.compile(r"^maj@(?P<k>[0-9]+)$")
DEFAULT_MAX_NEW_TOKENS = 512

# Triggers a method-name setting may use: the built-in ones and the learned one stored with a selector.
SETTING_TRIGGERS = TRIGGER_NAMES
# the methods whose selector chooses among the SLM's top-K (takeover's LLM reads its whole vocabulary)
SELECTING_METHODS = ("s2t", "random-select", LOCAL_METHOD)
_TRIGGER_PART = re.compile(r"^(?P<trigger>[a-z]+)(?:(?P<op>[@=])(?P<value>.+))?$")
_K_PART = re.compile(r"^k(?P<k>[0-9]+)$")
SETTING_SYNTAX = "METHOD/TRIGGER[@QUANTILE|=THRESHOLD][/kK], e.g. s2t/entropy@0.8, s2t/margin=0.3, s2t/always"


@dataclass(frozen=True)
class TriggerSetting:
    """A trigger configuration written into a method's name (``s2t/entropy@0.8/k4``).

    Exactly one of ``quantile`` (calibrated on training problems) and ``threshold`` is set for
    a trigger that has a threshold; neither for ``always`` and ``never``. ``k`` overrides the
    run's candidate-set size when given.
    """

    trigger: str
    quantile: float | None = None
    threshold: float | None = None
    k: int | None = None

    @property
    def label(self) -> str:
        """The canonical spelling: equal settings have equal labels (``@0.80`` is ``@0.8``)."""
        value = f"@{self.quantile!r}" if self.quantile is not None else ""
        value = f"={self.threshold!r}" if self.threshold is not None else value
        return self.trigger + value + (f"/k{self.k}" if self.k is not None else "")

    def method_kwargs(self) -> dict:
        kwargs = {"trigger": self.trigger, "threshold": self.threshold, "quantile": self.quantile}
        return kwargs | ({"k": self.k} if self.k is not None else {})


def split_method_name(name: str) -> tuple[str, TriggerSetting | None]:
    """``"s2t/entropy@0.8"`` -> ``("s2t", TriggerSetting("entropy", quantile=0.8))``; a plain name
    gives ``(name, None)``. A malformed or out-of-range setting raises ``ValueError`` naming the method.
    """
    base, *parts = name.split("/")
    if not parts:
        return name, None
    try:
        return base, _parse_setting(parts)
    except ValueError as e:
        raise ValueError(f"method {name!r}: {e} (syntax: {SETTING_SYNTAX})") from None


def _parse_setting(parts: list[str]) -> TriggerSetting:
    match = _TRIGGER_PART.match(parts[0])
    if not match:
        raise ValueError(f"cannot read the trigger setting {parts[0]!r}")
    trigger, op, raw = match["trigger"], match["op"], match["value"]
    if trigger not in SETTING_TRIGGERS:
        raise ValueError(f"unknown trigger {trigger!r}; choose from {', '.join(SETTING_TRIGGERS)}")
    k = None
    for part in parts[1:]:
        k_match = _K_PART.match(part)
        if not k_match or k is not None:
            raise ValueError(
                f"cannot read {part!r}: after the trigger only one /kK (candidate count) may follow"
            )
        k = int(k_match["k"])
        TopK(k)  # validates K >= 1
    if trigger in ("always", "never"):
        if op:
            raise ValueError(f"the {trigger!r} trigger takes no quantile or threshold")
        return TriggerSetting(trigger, k=k)
    if not op:  # the learned trigger keeps the threshold stored with it; others are calibrated at 0.95
        return (
            TriggerSetting(trigger, k=k)
            if trigger == "learned"
            else TriggerSetting(trigger, DEFAULT_QUANTILE, k=k)
        )
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{raw!r} is not a number") from None
    if math.isnan(value):
        raise ValueError("a quantile or threshold cannot be NaN")
    if op == "@":
        check_quantile(value)
        return TriggerSetting(trigger, quantile=value, k=k)
    if trigger in TRIGGERS:
        make_trigger(trigger, value)  # validates the threshold's range
    return TriggerSetting(trigger, threshold=value, k=k)


def build_method(
    name: str,
    trigger: str | Trigger = "entropy",
    threshold: float | None = None,
    quantile: float | None = None,
    k: int = DEFAULT_K,
    ratio: float | None = None,
    min_step: int = 3,
    selector: Selector | None = None,
    label: str | None = None,
) -> Method:
    """Build a named method. Without a threshold the trigger must be calibrated (see :func:`calibrate`).

    ``selector`` overrides the named method's selector (used by S2T-Local's learned selector);
    ``label`` is the built method's name (default ``name``).
    """
    if name == "greedy":
        return Method(NeverTrigger(), TopK(1), make_selector("slm"), min_step, name=label or "greedy")
    if name not in METHOD_SELECTORS and selector is None:
        if name == "s2t-local":
            raise ValueError("the s2t-local method needs a trained selector (selector=LocalSelector...)")
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_SELECTORS)}")
    if quantile is not None:
        check_quantile(quantile)
    trig: Trigger = trigger if isinstance(trigger, Trigger) else make_trigger(trigger, threshold)
    selector = selector or make_selector(METHOD_SELECTORS[name])
    if trig.threshold is None and quantile is None and not isinstance(trig, NeverTrigger):
        quantile = DEFAULT_QUANTILE
    return Method(trig, make_candidates(k, ratio), selector, min_step, name=label or name, quantile=quantile)


def needs_calibration(method: Method) -> bool:
    return method.trigger.threshold is None and not isinstance(method.trigger, NeverTrigger)


@torch.inference_mode()
def trigger_statistics(
    trigger: Trigger,
    slm: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    *,
    llm: PreTrainedModel | None = None,
    min_step: int = 3,
    batch_size: int = 8,
    decode_stream: Callable | None = None,
    **decode_kwargs,
) -> torch.Tensor:
    """The trigger's statistic at every step (after ``min_step``) of greedy SLM decoding of ``prompts``.

    ``decode_stream`` is the backend's decoding loop (default: :func:`s2t.engine.decode_stream`).
    """
    probe = copy.copy(trigger)
    # A threshold that can never be crossed: decode greedily while recording the statistic.
    probe.threshold = float("inf") if trigger.higher_is_critical else float("-inf")
    method = Method(probe, TopK(1), make_selector("slm"), min_step, name="calibration")
    values: list[float] = []
    gens = dict(
        (decode_stream or engine_decode_stream)(
            slm, prompts, method, llm=llm, record_statistics=True, max_batch_size=batch_size, **decode_kwargs
        )
    )
    for i in range(len(prompts)):
        values.extend(gens[i].statistics or [])
    return torch.tensor(values, dtype=torch.float64)


def calibrate(
    method: Method,
    slm: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    quantile: float | None = None,
    *,
    llm: PreTrainedModel | None = None,
    statistics: torch.Tensor | None = None,
    **kwargs,
) -> float:
    """Set ``method``'s trigger threshold to the ``quantile`` of its statistic on calibration prompts.

    Use training problems: test problems are for reporting, never for choosing thresholds.
    ``quantile`` defaults to the method's own (``method.quantile``), else 0.95. ``statistics``
    (from :func:`trigger_statistics` on the same prompts) skips decoding them again.
    """
    quantile = quantile if quantile is not None else (method.quantile or DEFAULT_QUANTILE)
    check_quantile(quantile)
    method.quantile = quantile
    trigger = method.trigger
    if isinstance(trigger, RandomTrigger | NeverTrigger):
        trigger.calibrate(torch.empty(0), quantile)
        return trigger.threshold if trigger.threshold is not None else float("nan")
    if statistics is None and trigger.needs_llm and llm is None:
        raise ValueError(f"calibrating the {trigger.name!r} trigger needs the LLM")
    if statistics is None:
        statistics = trigger_statistics(trigger, slm, prompts, llm=llm, min_step=method.min_step, **kwargs)
    trigger.calibrate(statistics, quantile)
    return float(trigger.threshold)


def split_label(base: str) -> tuple[str, str | None]:
    """``"s2t-local:lora"`` -> ``("s2t-local", "lora")``; an unlabelled name gives ``(base, None)``.
    Only triggered methods take labels; anything else is returned whole (and is then unknown)."""
    match = _LABELLED_PATTERN.match(base)
    if match and match["method"] in TRIGGERED_METHODS:
        return match["method"], match["label"]
    return base, None


def is_local_method(name: str) -> bool:
    """``s2t-local`` or a labelled variant ``s2t-local:LABEL`` (e.g. ``s2t-local:lora``), with or
    without a trigger setting (``s2t-local/margin@0.8``)."""
    return base_method(name) == LOCAL_METHOD


def base_method(name: str) -> str:
    """The entry of :data:`METHODS` behind a name: ``s2t-local:lora/margin@0.8`` -> ``s2t-local``,
    ``s2t:hidden/learned`` -> ``s2t``."""
    return split_label(name.split("/", 1)[0])[0]


def method_needs_llm(name: str, trigger: str = "entropy") -> bool:
    """Whether method ``name`` loads the LLM, from the name alone: the LLM alone, S2T and Takeover
    always do, and any method whose trigger (the name's setting, else ``trigger``, the run's
    ``--trigger``) reads the LLM (``kl``). Greedy and maj@K never do."""
    if majority_samples(name) is not None:
        return False
    base, setting = split_method_name(name)
    method = base_method(base)
    if method in (LLM_ALONE, "s2t", "takeover"):
        return True
    if method == "greedy":
        return False
    trigger = setting.trigger if setting is not None else trigger
    return trigger in TRIGGERS and TRIGGERS[trigger].needs_llm


MAX_MAJORITY_SAMPLES = 256  # maj@K decodes K samples of each problem in one batch


def majority_samples(name: str) -> int | None:
    """K for ``maj@K`` (K samples, majority vote; an evaluation baseline), else None."""
    match = _MAJORITY_PATTERN.match(name)
    return int(match["k"]) if match and 1 <= int(match["k"]) <= MAX_MAJORITY_SAMPLES else None


def canonical_method_name(name: str, majority: bool = False) -> str:
    """Check a method name and return its canonical spelling (``s2t/entropy@0.80`` -> ``s2t/entropy@0.8``).

    Names are those of :data:`METHODS` (and labelled variants ``METHOD:LABEL`` of the triggered methods), with ``maj@K`` where
    ``majority`` (``s2t eval``). Raises ``ValueError`` naming the method for an unknown method, a
    malformed or out-of-range trigger setting, a setting on a method without a trigger, or an LLM
    trigger on S2T-Local.
    """
    base, setting = split_method_name(name)
    majority_k = _MAJORITY_PATTERN.match(base) if majority else None
    if majority_k and not 1 <= int(majority_k["k"]) <= MAX_MAJORITY_SAMPLES:
        raise ValueError(f"method {name!r}: maj@K takes 1 <= K <= {MAX_MAJORITY_SAMPLES} samples per problem")
    known_majority = majority_k is not None
    if known_majority and setting is None:
        return f"maj@{int(majority_k['k'])}"  # maj@02 is maj@2
    if not (base in METHODS or split_label(base)[1] is not None or known_majority):
        raise ValueError(
            f"unknown method {name!r}; choose from {', '.join(METHODS)} (or {LABEL_SYNTAX}: "
            f"{', '.join(TRIGGERED_METHODS)}){', maj@K' if majority else ''}; a trigger setting follows a "
            f"'/' ({SETTING_SYNTAX})"
        )
    if setting is None:
        return base
    if base_method(base) not in TRIGGERED_METHODS:
        raise ValueError(
            f"method {name!r}: {base} consults no trigger, so it takes no trigger setting; "
            f"settings apply to {', '.join(TRIGGERED_METHODS)}"
        )
    _check_local_trigger(name, setting.trigger)
    return f"{base}/{setting.label}"


def check_unread_options(specs: Sequence[MethodSpec | None], options: dict, calibration) -> None:
    """Check the options that none of ``specs`` reads, as a plain ``takeover`` would read them (the
    trigger, its threshold or quantile, K, the ratio; ``options`` are :meth:`MethodSpec.parse`'s), and
    a ``selector`` that no spec reads, so that a typo fails rather than being ignored. Nothing loads.

    Raises:
        ValueError: naming the option (``SelectorCheckpointError`` for a selector that is not one).
    """
    # as takeover reads them: the same options, without the K >= 2 that selecting methods add
    MethodSpec.parse("takeover", **options, calibration=calibration)
    selector = options.get("selector")
    if selector is None or any(s is not None and s.selector for s in specs):
        return
    from s2t.policies.learned_selector import CONFIG_NAME, check_selector_checkpoint
    from s2t.policies.learned_trigger import CONFIG_NAME as TRIGGER_CONFIG
    from s2t.policies.learned_trigger import LearnedTrigger

    if (Path(selector) / TRIGGER_CONFIG).is_file() and not (Path(selector) / CONFIG_NAME).is_file():
        LearnedTrigger.from_pretrained(selector)  # a directory may hold a learned trigger alone
    else:
        check_selector_checkpoint(selector, slm=options.get("slm"))  # names what is missing


def _check_local_trigger(name: str, trigger: str) -> None:
    if is_local_method(name) and trigger in TRIGGERS and TRIGGERS[trigger].needs_llm:
        raise ValueError(
            f"method {name!r}: S2T-Local runs without an LLM, and the {trigger!r} trigger needs one; "
            "use an SLM-only trigger (entropy, margin, random, learned)"
        )


@dataclass(frozen=True)
class CalibrationSource:
    """Where and how a trigger is calibrated: the first ``problems`` questions of ``dataset``/``split``
    (training problems, never evaluated ones), greedily decoded by the SLM for ``max_new_tokens``.

    This is the whole calibration definition: two entry points with equal sources and equal
    models calibrate the same method to the same threshold.
    """

    dataset: str = "gsm8k"
    split: str = "train"
    problems: int = 8
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    data_dir: str | None = field(default=None, compare=False)  # where the files are, not what they are
    questions: tuple[str, ...] | None = None  # given questions instead of a dataset (the Python API)

    @classmethod
    def for_dataset(cls, dataset: str | None = None, **kwargs) -> CalibrationSource:
        """The training split of ``dataset`` when the registry has one, else GSM8K's training split."""
        from s2t.data import DATASETS

        spec = DATASETS.get(dataset) if dataset else None
        return cls(dataset=dataset if spec is not None and "train" in spec.splits else "gsm8k", **kwargs)

    def check(self) -> None:
        """Raise ``ValueError`` unless this source can calibrate (at least one problem and token)."""
        if self.problems < 1:
            raise ValueError(
                f"--calibration-problems must be >= 1 (or give --threshold); got {self.problems}"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"the calibration token budget must be >= 1; got {self.max_new_tokens}")

    @classmethod
    def from_questions(cls, questions: Sequence[str], **kwargs) -> CalibrationSource:
        """Calibrate on the given (training) questions rather than on a dataset's problems."""
        return cls(problems=max(len(questions), 1), questions=tuple(questions), **kwargs)

    def load(self) -> tuple[list[str], list[str] | None]:
        """The calibration questions and their problem ids (None for given questions)."""
        if self.questions is not None:
            return list(self.questions), None
        from s2t.data import load_problems

        problems = load_problems(self.dataset, self.split, limit=self.problems, data_dir=self.data_dir)
        return [p.question for p in problems], [p.id for p in problems]

    def identity(self) -> list:
        """What determines the calibration: the questions (given or named) and the token budget."""
        named = [self.dataset, self.split, self.problems]
        return [list(self.questions) if self.questions is not None else named, self.max_new_tokens]

    def describe(self) -> str:
        what = "given questions" if self.questions is not None else f"{self.dataset} {self.split} problems"
        return f"{self.problems} {what}, {self.max_new_tokens} new tokens each"


@dataclass(frozen=True)
class MethodSpec:
    """A decoding method's whole configuration, checked, before any model loads.

    ``name`` is the method's canonical name (``s2t``, ``s2t/entropy@0.8/k4``, ``s2t-local:lora``);
    ``method`` is its entry of :data:`METHODS`. The trigger has either a ``threshold`` or a
    ``quantile`` to be calibrated on ``calibration`` (neither for ``always``/``never``, and the
    learned trigger keeps the threshold stored with it unless one is given). ``selector`` is a
    trained selector's directory (``s2t-local``, and the learned trigger stored beside it).
    Build one with :meth:`parse`; :meth:`s2t.api.S2TGenerator.resolve` turns it into a method.
    """

    name: str
    method: str
    trigger: str = "never"
    quantile: float | None = None
    threshold: float | None = None
    k: int = DEFAULT_K
    ratio: float | None = None
    min_step: int = 3
    selector: str | None = None
    calibration: CalibrationSource | None = field(default_factory=CalibrationSource)

    @classmethod
    def parse(
        cls,
        name: str,
        *,
        trigger: str = "entropy",
        threshold: float | None = None,
        quantile: float | None = None,
        k: int = DEFAULT_K,
        ratio: float | None = None,
        min_step: int = 3,
        selector: str | None = None,
        calibration: CalibrationSource | None = CalibrationSource(),
        slm: str | None = None,
    ) -> MethodSpec:
        """The spec of method ``name`` under an entry point's options.

        A trigger setting in the name (``s2t/margin@0.8/k4``) replaces the options' trigger,
        threshold, quantile and K. Without a threshold the trigger is calibrated at ``quantile``
        (default 0.95) on ``calibration`` (None: refuse to calibrate). Greedy and the LLM alone
        ignore the trigger options. ``slm``, the SLM as the entry point names it, lets a selector
        trained on another built-in SLM be refused here rather than once the model has loaded.

        Raises:
            ValueError: an unknown method or trigger, a quantile outside (0, 1), a threshold outside
                the trigger's range, K < 1 (K < 2 for a method that selects among the top-K: s2t,
                random-select, s2t-local), a ratio outside (0, 1], a negative ``min_step``, an LLM
                trigger on s2t-local, or a missing, truncated or corrupted ``selector`` where the
                method or the learned trigger needs one (:class:`SelectorCheckpointError`).
        """
        name = canonical_method_name(name.strip())
        base, setting = split_method_name(name)
        method = base_method(base)
        if min_step < 0:
            raise ValueError(f"min_step must be >= 0; got {min_step}")
        if method in ("greedy", LLM_ALONE):
            return cls(name, method, min_step=min_step, calibration=calibration)
        if setting is not None:
            trigger, threshold, quantile = setting.trigger, setting.threshold, setting.quantile
            k = setting.k if setting.k is not None else k
        if trigger not in SETTING_TRIGGERS:
            raise ValueError(f"unknown trigger {trigger!r}; choose from {', '.join(SETTING_TRIGGERS)}")
        _check_local_trigger(name, trigger)
        uses_selector = method == LOCAL_METHOD or trigger == "learned"
        label = split_label(base)[1]
        if label is not None and not uses_selector:
            raise ValueError(
                f"method {name!r}: a label tells apart the selectors (or learned triggers) of one run "
                f"directory, and {method} at the {trigger!r} trigger reads none; drop ':{label}', or use "
                "the learned trigger (e.g. s2t:LABEL/learned)"
            )
        if uses_selector and not selector:
            needs = "the s2t-local method" if method == LOCAL_METHOD else "the learned trigger"
            raise ValueError(
                f"{needs} needs a trained selector: pass --selector DIR (in Python, selector=DIR; see `s2t train`)"
            )
        make_candidates(k, ratio)  # validates K and the ratio
        if k < 2 and method in SELECTING_METHODS:
            raise ValueError(
                f"method {name!r}: K must be >= 2, since {method} selects among the SLM's top-K candidates "
                f"(at K = 1 it decodes greedy's tokens); got K = {k}"
            )
        if threshold is not None and trigger in ("always", "never"):
            raise ValueError(f"the {trigger!r} trigger takes no threshold; got {threshold}")
        if threshold is not None:
            quantile = None
            if trigger in TRIGGERS:
                make_trigger(trigger, threshold)  # validates the threshold's range
            elif not 0.0 <= threshold <= 1.0:
                raise ValueError(
                    f"threshold for the 'learned' trigger must lie in [0.0, 1.0]; got {threshold}"
                )
        elif trigger in ("always", "never"):
            quantile = None
        elif trigger == "learned":
            if setting is not None and quantile is not None:
                raise ValueError(
                    f"method {name!r}: the learned trigger's threshold is set at training time "
                    "(--trigger-rate); give learned=THRESHOLD or plain learned"
                )
            quantile = None
        else:
            quantile = DEFAULT_QUANTILE if quantile is None else quantile
            check_quantile(quantile)
        if quantile is not None and trigger != "random":
            if calibration is None:
                raise ValueError(
                    f"the {trigger!r} trigger has no threshold: pass threshold=, or calibration_questions= "
                    "(training problems) or calibration=CalibrationSource(...) to calibrate it as a quantile"
                )
            calibration.check()
        if uses_selector:
            from s2t.policies.checkpoint import check_builtin_base
            from s2t.policies.learned_selector import check_selector_checkpoint
            from s2t.policies.learned_trigger import LearnedTrigger

            if method == LOCAL_METHOD:
                check_selector_checkpoint(selector, k=k, slm=slm)
            if trigger == "learned":
                learned = LearnedTrigger.from_pretrained(selector)  # reads the trigger's small files only
                check_builtin_base(learned.config.base_model, slm, f"the learned trigger in {selector}")
        return cls(
            name,
            method,
            trigger,
            quantile,
            threshold,
            k,
            ratio,
            min_step,
            selector if uses_selector else None,
            calibration,
        )

    @property
    def needs_llm(self) -> bool:
        """Whether this method loads the LLM (decided before any model loads)."""
        return method_needs_llm(self.method, self.trigger)

    @property
    def needs_calibration(self) -> bool:
        return self.quantile is not None


def selector_training_overlap(
    selector: str, specs: Sequence[MethodSpec], problems: Sequence[Problem]
) -> dict[str, set[str]]:
    """The ids of ``problems`` that the selector in ``selector`` (where a spec is S2T-Local) or its
    learned trigger (where a spec uses it) was trained or validated on, keyed ``"the selector"`` /
    ``"the learned trigger"``; read from their configs, no model loads. A trigger saved before it
    recorded its problems cannot be checked (a warning says so)."""
    from s2t.policies.learned_selector import load_selector
    from s2t.policies.learned_trigger import LearnedTrigger

    evaluated = {p.id for p in problems}
    # by content too: training problems relabelled (a training file evaluated as a test split)
    by_content = {p.digest[:PROBLEM_DIGEST_CHARS]: p.id for p in problems}

    def leaked(ids, digests) -> set[str]:
        """By question where the checkpoint records its problems' digests (an id is only a label:
        another file's ``gsm8k/train/0`` may be another problem), else by id."""
        return {by_content[d] for d in digests if d in by_content} if digests else set(ids) & evaluated

    overlap = {}
    if any(is_local_method(s.name) for s in specs):
        training = load_selector(selector).config.training
        seen = set(training.get("train_problem_ids", [])) | set(training.get("validation_problem_ids", []))
        digests = (training.get("collection") or {}).get("problem_digests") or []
        overlap["the selector"] = leaked(seen, digests)
    if any(s.trigger == "learned" for s in specs):
        config = LearnedTrigger.from_pretrained(selector).config
        if not config.problem_ids:
            logger.warning(
                "the learned trigger in %s records no problems (saved before they were recorded): "
                "it cannot be checked for leakage; retrain it with `s2t train` to have it checked",
                selector,
            )
        overlap["the learned trigger"] = leaked(config.problem_ids, config.problem_digests)
    return overlap
