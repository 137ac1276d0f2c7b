"""Triggers: decide at each decoding step whether the step is a divergence point.

A trigger computes one *statistic* per sequence from the next-token logits and fires where
the statistic is on the critical side of its threshold. Thresholds are given directly or
calibrated as a quantile of the statistic seen while greedily decoding calibration prompts
(quantile 0.95 ≈ a 5% trigger rate).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

TOP_N_FOR_STATISTICS = 64  # the reference computes KL and entropy over the SLM's top-64


def _top_n_renormalised(slm_logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the SLM's top-n tokens renormalised over that set, and their ids."""
    n = min(n, slm_logits.shape[-1])
    top_logits, top_ids = slm_logits.float().topk(n, dim=-1)
    return torch.log_softmax(top_logits, dim=-1), top_ids


class Trigger(ABC):
    """Decides whether a step is a divergence point (where the SLM should ask a selector)."""

    name: str = "trigger"
    needs_llm: bool = False  # True when the statistic needs the LLM's logits at every step
    needs_hidden: bool = False  # True when the statistic needs the SLM's last hidden state
    higher_is_critical: bool = True  # fire when statistic >= threshold (else when <=)
    threshold_range: tuple[float, float] = (0.0, math.inf)  # the statistic's possible values

    def __init__(self, threshold: float | None = None):
        if threshold is not None:
            low, high = self.threshold_range
            if not (low <= threshold <= high):
                raise ValueError(
                    f"threshold for the {self.name!r} trigger must lie in [{low}, {high}]; got {threshold}"
                )
        self.threshold = threshold

    @abstractmethod
    def statistic(self, slm_logits: torch.Tensor, llm_logits: torch.Tensor | None) -> torch.Tensor:
        """One float per sequence: how critical this step looks."""

    def fires(
        self,
        slm_logits: torch.Tensor,
        llm_logits: torch.Tensor | None,
        generators: list[torch.Generator],
        slm_hidden: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (fired, statistic), both of shape (batch,)."""
        if self.threshold is None:
            raise ValueError(f"the {self.name!r} trigger has no threshold: give one or calibrate it")
        stat = (
            self.statistic(slm_logits, llm_logits)
            if not self.needs_hidden
            else self.statistic(slm_logits, slm_hidden)
        )
        return self.critical(stat), stat

    def critical(self, statistic: torch.Tensor) -> torch.Tensor:
        """Where ``statistic`` (any shape) is on the firing side of the threshold: a bool tensor."""
        if self.threshold is None:
            raise ValueError(f"the {self.name!r} trigger has no threshold: give one or calibrate it")
        return statistic >= self.threshold if self.higher_is_critical else statistic <= self.threshold

    def threshold_for_quantile(self, statistics: torch.Tensor, quantile: float) -> float:
        """The threshold at which the trigger fires on a ``1 - quantile`` share of the given steps."""
        check_quantile(quantile)
        if statistics.numel() == 0:
            raise ValueError("cannot calibrate a trigger on zero decoding steps")
        q = quantile if self.higher_is_critical else 1.0 - quantile
        return float(torch.quantile(statistics.double().flatten(), q))

    def calibrate(self, statistics: torch.Tensor, quantile: float) -> None:
        self.threshold = self.threshold_for_quantile(statistics, quantile)

    def describe(self) -> dict:
        return {"name": self.name, "threshold": self.threshold}


def check_quantile(quantile: float) -> None:
    if not (0.0 < quantile < 1.0) or math.isnan(quantile):
        raise ValueError(f"quantile must lie strictly between 0 and 1; got {quantile}")


class NeverTrigger(Trigger):
    """Plain SLM decoding."""

    name = "never"

    def fires(self, slm_logits, llm_logits, generators, slm_hidden=None):
        stat = torch.zeros(slm_logits.shape[0], device=slm_logits.device)
        return torch.zeros_like(stat, dtype=torch.bool), stat

    def statistic(self, slm_logits, llm_logits):
        return torch.zeros(slm_logits.shape[0], device=slm_logits.device)

    def calibrate(self, statistics, quantile):  # nothing to calibrate
        check_quantile(quantile)


class AlwaysTrigger(NeverTrigger):
    """Intervene at every step (after the warm-up steps)."""

    name = "always"

    def fires(self, slm_logits, llm_logits, generators, slm_hidden=None):
        stat = torch.ones(slm_logits.shape[0], device=slm_logits.device)
        return torch.ones_like(stat, dtype=torch.bool), stat


class EntropyTrigger(Trigger):
    """Entropy of the SLM's top-64 distribution (renormalised); needs no LLM."""

    name = "entropy"

    def statistic(self, slm_logits, llm_logits):
        logp, _ = _top_n_renormalised(slm_logits, TOP_N_FOR_STATISTICS)
        return -(logp.exp() * logp).sum(-1)


class MarginTrigger(Trigger):
    """Top-1 minus top-2 SLM probability; fires when the margin is *small*. Needs no LLM."""

    name = "margin"
    higher_is_critical = False
    threshold_range = (0.0, 1.0)

    def statistic(self, slm_logits, llm_logits):
        top2 = torch.softmax(slm_logits.float(), dim=-1).topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]


class KLTrigger(Trigger):
    """KL(p_SLM ‖ p_LLM) over the SLM's top-64 tokens, both renormalised; needs the LLM every step."""

    name = "kl"
    needs_llm = True

    def statistic(self, slm_logits, llm_logits):
        if llm_logits is None:
            raise ValueError("the kl trigger needs the LLM's logits")
        logp, top_ids = _top_n_renormalised(slm_logits, TOP_N_FOR_STATISTICS)
        logq = torch.log_softmax(llm_logits.float().gather(-1, top_ids), dim=-1)
        return (logp.exp() * (logp - logq)).sum(-1)


class RandomTrigger(Trigger):
    """Control: fire with a fixed probability ``rate`` per step, independently of the models."""

    name = "random"
    threshold_range = (0.0, 1.0)  # the threshold is the firing probability

    def __init__(self, rate: float | None = None):
        super().__init__(threshold=rate)

    def statistic(self, slm_logits, llm_logits):
        raise NotImplementedError("the random trigger has no model statistic")

    def fires(self, slm_logits, llm_logits, generators, slm_hidden=None):
        if self.threshold is None:
            raise ValueError("the random trigger needs a rate (threshold) or a quantile")
        u = torch.stack([torch.rand((), generator=g) for g in generators]).to(slm_logits.device)
        return u < self.threshold, u

    def calibrate(self, statistics, quantile):
        check_quantile(quantile)
        self.threshold = 1.0 - quantile

    def threshold_for_quantile(self, statistics, quantile):
        check_quantile(quantile)
        return 1.0 - quantile


TRIGGERS: dict[str, type[Trigger]] = {
    t.name: t for t in (NeverTrigger, AlwaysTrigger, EntropyTrigger, MarginTrigger, KLTrigger, RandomTrigger)
}


def make_trigger(name: str, threshold: float | None = None) -> Trigger:
    """Build a trigger by name (``never``, ``always``, ``kl``, ``entropy``, ``margin``, ``random``)."""
    if name not in TRIGGERS:
        raise ValueError(f"unknown trigger {name!r}; choose from {', '.join(TRIGGERS)}")
    return TRIGGERS[name](threshold)
