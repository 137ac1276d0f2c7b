"""Step features: what the learned trigger reads at one decoding step, defined once.

Training (:mod:`s2t.training.trigger`, from the per-position tensors that collection stores)
and inference (:class:`s2t.policies.learned_trigger.LearnedTrigger`, from the step's logits and
hidden state) both build their inputs with :func:`step_features`, so what the trigger is trained
on and what it sees while decoding cannot drift apart.
"""

from __future__ import annotations

import torch

from s2t.policies.triggers import EntropyTrigger, MarginTrigger

TOP_PROBS = 16  # the SLM's top probabilities kept per step


def logit_statistics(slm_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """The logit-derived parts of the step features, for logits (N, vocab).

    Returns ``entropy`` (N,) (top-64 renormalised, as the entropy trigger), ``margin`` (N,) (top-1
    minus top-2 probability, as the margin trigger) and ``top_probs`` (N, :data:`TOP_PROBS`).
    """
    probs = torch.softmax(slm_logits.float(), -1)
    return {
        "entropy": EntropyTrigger().statistic(slm_logits, None),
        "margin": MarginTrigger().statistic(slm_logits, None),
        "top_probs": probs.topk(TOP_PROBS, -1).values,
    }


def step_features(
    hidden: torch.Tensor, entropy: torch.Tensor, margin: torch.Tensor, top_probs: torch.Tensor
) -> torch.Tensor:
    """(N, hidden + 2 + 16) features: hidden state (N, H), entropy (N,), margin (N,), top-16 probabilities."""
    return torch.cat(
        [hidden.float(), entropy.float()[:, None], margin.float()[:, None], top_probs[:, :TOP_PROBS].float()],
        dim=-1,
    )


# the step features after the hidden state: entropy, margin, top-16 probabilities
LOGIT_FEATURES = 2 + TOP_PROBS


def without_hidden(x: torch.Tensor) -> torch.Tensor:
    """The columns of step features (N, F) that do not read the hidden state (N, LOGIT_FEATURES)."""
    return x[:, -LOGIT_FEATURES:]


def features_from_logits(slm_logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The step features of a decoding step from its logits (N, vocab) and last hidden state (N, H)."""
    stats = logit_statistics(slm_logits)
    return step_features(hidden, stats["entropy"], stats["margin"], stats["top_probs"])


def rank_of(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """The 1-based rank of ``token_ids`` (N,) under ``logits`` (N, vocab): 1 + the number of tokens
    scored strictly higher (e.g. the LLM's top-1 among the SLM's candidates)."""
    return (logits > logits.gather(-1, token_ids[:, None])).sum(-1) + 1
