"""Named decoding methods (greedy, s2t, takeover, random-select) and trigger calibration.

A method name fixes the selector; the trigger, K and candidate filter are options, so that
S2T and its controls can be compared at exactly the same trigger points.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from s2t.engine import Method, decode
from s2t.policies.candidates import TopK, make_candidates
from s2t.policies.selectors import Selector, make_selector
from s2t.policies.triggers import NeverTrigger, RandomTrigger, Trigger, check_quantile, make_trigger

DEFAULT_QUANTILE = 0.95
DEFAULT_K = 8

# method name -> selector name; "greedy" never triggers
METHOD_SELECTORS = {"greedy": "slm", "s2t": "llm", "takeover": "takeover", "random-select": "random"}


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
    **decode_kwargs,
) -> torch.Tensor:
    """The trigger's statistic at every step (after ``min_step``) of greedy SLM decoding of ``prompts``."""
    probe = copy.copy(trigger)
    # A threshold that can never be crossed: decode greedily while recording the statistic.
    probe.threshold = float("inf") if trigger.higher_is_critical else float("-inf")
    method = Method(probe, TopK(1), make_selector("slm"), min_step, name="calibration")
    values: list[float] = []
    gens = decode(
        slm, prompts, method, llm=llm, record_statistics=True, max_batch_size=batch_size, **decode_kwargs
    )
    for g in gens:
        values.extend(g.statistics or [])
    return torch.tensor(values, dtype=torch.float64)


def calibrate(
    method: Method,
    slm: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    quantile: float | None = None,
    *,
    llm: PreTrainedModel | None = None,
    **kwargs,
) -> float:
    """Set ``method``'s trigger threshold to the ``quantile`` of its statistic on calibration prompts.

    Use training problems: test problems are for reporting, never for choosing thresholds.
    ``quantile`` defaults to the method's own (``method.quantile``), else 0.95.
    """
    quantile = quantile if quantile is not None else (method.quantile or DEFAULT_QUANTILE)
    check_quantile(quantile)
    method.quantile = quantile
    trigger = method.trigger
    if isinstance(trigger, RandomTrigger | NeverTrigger):
        trigger.calibrate(torch.empty(0), quantile)
        return trigger.threshold if trigger.threshold is not None else float("nan")
    if trigger.needs_llm and llm is None:
        raise ValueError(f"calibrating the {trigger.name!r} trigger needs the LLM")
    stats = trigger_statistics(trigger, slm, prompts, llm=llm, min_step=method.min_step, **kwargs)
    trigger.calibrate(stats, quantile)
    return float(trigger.threshold)
