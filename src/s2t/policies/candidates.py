"""Candidate sets: which of the SLM's next tokens a selector may choose from."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CandidateSet:
    """The SLM's top-K tokens per sequence, best first.

    ``valid`` masks out candidates removed by a filter; the SLM's top-1 is always valid.
    """

    ids: torch.Tensor  # (batch, K) token ids
    slm_probs: torch.Tensor  # (batch, K) the SLM's full-vocabulary probabilities of those ids
    valid: torch.Tensor  # (batch, K) bool


class TopK:
    """The SLM's K most likely next tokens."""

    name = "topk"

    def __init__(self, k: int = 8):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"K must be an integer >= 1; got {k!r}")
        self.k = k

    def check_vocab(self, vocab_size: int) -> None:
        if self.k > vocab_size:
            raise ValueError(f"K={self.k} exceeds the tokenizer's vocabulary ({vocab_size} tokens)")

    def __call__(self, slm_logits: torch.Tensor) -> CandidateSet:
        """(batch, vocab) logits → the top-K candidates, best first, ties broken towards the lower token id.

        ``torch.topk`` leaves the order of tied values unspecified, while greedy decoding takes
        ``argmax``, the lowest id among the tied maxima. The first candidate is therefore always the
        greedy token (bfloat16 logits tie often), so a selector that keeps its first candidate decodes
        exactly greedy's tokens and an override is counted only where the token changes.
        """
        probs = torch.softmax(slm_logits.float(), dim=-1)
        top_probs, top_ids = probs.topk(self.k, dim=-1)
        by_id = top_ids.argsort(dim=-1)  # then a stable sort by probability keeps ties in id order
        top_ids, top_probs = top_ids.gather(-1, by_id), top_probs.gather(-1, by_id)
        order = top_probs.argsort(dim=-1, descending=True, stable=True)
        top_ids, top_probs = top_ids.gather(-1, order), top_probs.gather(-1, order)
        # more than K tokens tied at the maximum: topk may have left out argmax's token
        top_ids[:, 0] = slm_logits.argmax(-1).to(top_ids.device)
        return CandidateSet(top_ids, top_probs, torch.ones_like(top_ids, dtype=torch.bool))

    def describe(self) -> dict:
        return {"name": self.name, "k": self.k}


class RatioFilter(TopK):
    """Top-K, keeping only tokens whose probability exceeds ``ratio`` × the top-1 probability."""

    name = "ratio"

    def __init__(self, k: int = 8, ratio: float = 0.1):
        super().__init__(k)
        if not (0.0 <= ratio <= 1.0):
            raise ValueError(f"candidate ratio must lie in [0, 1]; got {ratio}")
        self.ratio = ratio

    def __call__(self, slm_logits: torch.Tensor) -> CandidateSet:
        cands = super().__call__(slm_logits)
        cands.valid = cands.slm_probs >= self.ratio * cands.slm_probs[:, :1]
        return cands

    def describe(self) -> dict:
        return {"name": self.name, "k": self.k, "ratio": self.ratio}


def make_candidates(k: int = 8, ratio: float | None = None) -> TopK:
    return TopK(k) if ratio is None else RatioFilter(k, ratio)
