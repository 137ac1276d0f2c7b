"""Selectors: at a triggered step, pick the next token.

A selector sees a :class:`StepContext` and returns one token id per sequence; the engine
uses it only where the trigger fired. Selectors that need the LLM say so with ``needs_llm``
so that the engine loads the LLM, and runs it, only for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from s2t.policies.candidates import CandidateSet


@dataclass
class StepContext:
    """Everything a selector may look at for one decoding step of a batch."""

    slm_logits: torch.Tensor  # (batch, vocab)
    candidates: CandidateSet
    fired: torch.Tensor  # (batch,) bool
    llm_logits: torch.Tensor | None = None  # (batch, vocab), present when the selector needs the LLM
    generators: list[torch.Generator] = field(default_factory=list)
    default_tokens: torch.Tensor | None = (
        None  # (batch,) the token each row takes where the trigger did not fire
    )
    # For selectors that score candidates with the SLM itself (S2T-Local): the SLM's ModelStream and the
    # batch's token history. Such a selector may advance the SLM by the chosen token; it then sets
    # ``next_slm_logits`` (batch, vocab) and ``slm_tokens_read`` (batch,) and the engine skips its own step.
    slm_stream: Any = None
    ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    next_slm_logits: torch.Tensor | None = None
    slm_tokens_read: torch.Tensor | None = None
    # Which sequence each row is (the scheduler's request ids; with ``decode``, the prompt's index):
    # rows shift as sequences join and leave the batch.
    sequence_ids: list[int] = field(default_factory=list)


class Selector:
    name = "selector"
    needs_llm = False

    def select(self, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name}


class SLMSelector(Selector):
    """The SLM's own top-1: plain greedy decoding."""

    name = "slm"

    def select(self, ctx: StepContext) -> torch.Tensor:
        return ctx.candidates.ids[:, 0]


class LLMSelector(Selector):
    """S2T: the LLM's argmax restricted to the SLM's (valid) candidates."""

    name = "llm"
    needs_llm = True

    def select(self, ctx: StepContext) -> torch.Tensor:
        scores = ctx.llm_logits.float().gather(-1, ctx.candidates.ids)
        scores = scores.masked_fill(~ctx.candidates.valid, float("-inf"))
        return ctx.candidates.ids.gather(-1, scores.argmax(-1, keepdim=True)).squeeze(-1)


class TakeoverSelector(Selector):
    """Control: the LLM's full-vocabulary argmax, ignoring the candidates."""

    name = "takeover"
    needs_llm = True

    def select(self, ctx: StepContext) -> torch.Tensor:
        return ctx.llm_logits.argmax(-1)


class RandomSelector(Selector):
    """Control: a uniformly random valid candidate."""

    name = "random"

    def select(self, ctx: StepContext) -> torch.Tensor:
        index = torch.zeros(len(ctx.generators), dtype=torch.long)
        # Draw only for rows that fired, so a sequence's random stream does not depend on its batch.
        for row in ctx.fired.nonzero().flatten().tolist():
            valid = ctx.candidates.valid[row].nonzero().flatten().cpu()
            index[row] = valid[torch.randint(len(valid), (), generator=ctx.generators[row])]
        index = index.to(ctx.candidates.ids.device)
        return ctx.candidates.ids.gather(-1, index[:, None]).squeeze(-1)


SELECTORS: dict[str, type[Selector]] = {
    s.name: s for s in (SLMSelector, LLMSelector, TakeoverSelector, RandomSelector)
}


def make_selector(name: str) -> Selector:
    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}; choose from {', '.join(SELECTORS)}")
    return SELECTORS[name]()
