"""Named decoding methods (greedy, s2t, takeover, random-select) and trigger calibration.

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
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from s2t.engine import Method
from s2t.engine import decode_stream as engine_decode_stream
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

DEFAULT_QUANTILE = 0.95
DEFAULT_K = 8

# method name -> selector name; "greedy" never triggers
METHOD_SELECTORS = {"greedy": "slm", "s2t": "llm", "takeover": "takeover", "random-select": "random"}

# Triggers a method-name setting may use: the built-in ones and the learned one stored with a selector.
SETTING_TRIGGERS = (*TRIGGERS, "learned")
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
) -> Method:
    """Build a named method. Without a threshold the trigger must be calibrated (see :func:`calibrate`).

    ``selector`` overrides the named method's selector (used by S2T-Local's learned selector).
    """
    if name == "greedy":
        return Method(NeverTrigger(), TopK(1), make_selector("slm"), min_step, name="greedy")
    if name not in METHOD_SELECTORS and selector is None:
        if name == "s2t-local":
            raise ValueError("the s2t-local method needs a trained selector (selector=LocalSelector...)")
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_SELECTORS)}")
    if quantile is not None:
        check_quantile(quantile)
    trig: Trigger = trigger if isinstance(trigger, Trigger) else make_trigger(trigger, threshold)
    selector = selector or make_selector(METHOD_SELECTORS[name])
    if threshold is None and quantile is None and not isinstance(trig, NeverTrigger):
        quantile = DEFAULT_QUANTILE
    return Method(trig, make_candidates(k, ratio), selector, min_step, name=name, quantile=quantile)


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
