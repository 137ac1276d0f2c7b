"""What the two selector trainers share: the training configuration, the paper's loss, the
problem split and the selection metrics.

:mod:`s2t.training.train` (``head`` mode and the ``train`` entry point) and :mod:`s2t.training.lora`
(``lora`` mode) both build on this module; it imports neither. The loss (paper): cross-entropy
over candidate scores with the LLM's best candidate as target + hinge (margin 1.0) against the
hardest negative + 0.1·KL(LLM probabilities renormalised over the candidates ‖ softmax of the
scores). Scores are expected bin values in [0, 1]; the losses see them divided by
``score_temperature`` (0.1), which sets how sharp the selection may get.

Problems, not groups, are split into training and validation parts, so validation metrics
measure generalisation to unseen problems.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

MODES = ("head", "lora")
LORA_DEFAULT_LR = 5e-5  # the paper's


@dataclass
class TrainConfig:
    """How a selector is trained, in either mode (head mode ignores the lora-mode fields)."""

    groups: str  # a collection run directory
    out: str
    mode: str = "head"
    groups_subset: str = "all"  # all | divergent (only groups where SLM and LLM disagree)
    groups_at: str | None = None  # keep only groups where these trigger settings fire (None: all)
    epochs: int = 30
    lr: float = 1e-2
    batch_size: int = 256
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    hinge_margin: float = 1.0
    kl_weight: float = 0.1
    score_temperature: float = 0.1
    val_fraction: float = 0.1
    seed: int = 0
    dtype: str | None = None
    # lora mode
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    prefix_kl_weight: float = 0.1
    prefix_kl_tokens: int = 64  # each group's KL window: its context's last tokens
    k: int | None = None  # candidates per group in training (the SLM's top-K); None: the collection's K
    lora_layers: int | None = None  # adapt only the top N decoder layers; None: all
    bins_lr: float | None = None  # lora: the bins' learning rate (they start near zero); None: lr
    frozen_top: int = 64  # the frozen SLM's top-T tokens kept as KL targets (the rest is one bucket)
    checkpoint_every: int = 50  # problems between checkpoints (and one at each epoch's end); 0: epochs only
    eval_every: int = 100  # problems between validation points (and one at each epoch's end); 0: epochs only

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.groups_subset not in ("all", "divergent"):
            raise ValueError(f"groups_subset must be 'all' or 'divergent'; got {self.groups_subset!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1); got {self.val_fraction}")
        if self.epochs < 1 or self.batch_size < 1 or not 0 < self.lr < math.inf:
            raise ValueError(
                "epochs and batch_size must be >= 1 and lr a finite number > 0; got "
                f"epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr}"
            )
        if self.bins_lr is not None and not 0 < self.bins_lr < math.inf:
            raise ValueError(f"bins_lr must be a finite number > 0; got {self.bins_lr}")
        nonnegative = ("weight_decay", "grad_clip", "hinge_margin", "kl_weight", "prefix_kl_weight")
        for name in nonnegative:
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0; got {getattr(self, name)}")
        if not 0 < self.score_temperature < math.inf:
            raise ValueError(f"score_temperature must be a finite number > 0; got {self.score_temperature}")
        if self.lora_r < 1 or self.lora_alpha < 1:
            raise ValueError(f"lora_r and lora_alpha must be >= 1; got {self.lora_r}, {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must lie in [0, 1); got {self.lora_dropout}")
        if self.k is not None and self.k < 2:
            raise ValueError(f"k must be >= 2 (a selection needs two candidates); got {self.k}")
        if self.groups_at:
            from s2t.training.collect import group_settings

            group_settings(self.groups_at)
        if self.lora_layers is not None and self.lora_layers < 1:
            raise ValueError(f"lora_layers must be >= 1 (or None for all layers); got {self.lora_layers}")
        if self.frozen_top < 1 or self.prefix_kl_tokens < 1:
            raise ValueError("frozen_top and prefix_kl_tokens must be >= 1")
        if self.checkpoint_every < 0 or self.eval_every < 0:
            raise ValueError("checkpoint_every and eval_every must be >= 0")


def selector_loss(logits: torch.Tensor, llm_probs: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """The paper's loss on (groups, K) candidate logits (scores / temperature)."""
    target = llm_probs.argmax(-1)
    ce = F.cross_entropy(logits, target)
    positive = logits.gather(-1, target[:, None]).squeeze(-1)
    hardest = logits.masked_fill(F.one_hot(target, logits.shape[-1]).bool(), float("-inf")).max(-1).values
    hinge = F.relu(cfg.hinge_margin - (positive - hardest)).mean()
    teacher = llm_probs / llm_probs.sum(-1, keepdim=True).clamp_min(1e-12)
    kl = F.kl_div(F.log_softmax(logits, -1), teacher, reduction="batchmean")
    return ce + hinge + cfg.kl_weight * kl


DIVERGENCE_FACTOR = 100.0  # an end-of-epoch loss this many times the untrained state's is divergence
WEIGHT_LIMIT = torch.finfo(torch.float16).max  # a weight beyond float16's range has blown up


def diverged(
    epoch: int,
    kept_any: bool,
    *,
    end_loss: float | None = None,
    start_loss: float | None = None,
    weights=(),
) -> bool:
    """Whether the state after ``epoch`` (or a step of it) diverged: its loss on the training groups
    (``end_loss``) is not finite or above :data:`DIVERGENCE_FACTOR` times the untrained state's
    (``start_loss``), or one of its ``weights`` (tensors) is not finite or lies beyond float16's range
    (:data:`WEIGHT_LIMIT`; a bounded loss can hide such weights, which overflow in half precision). Such
    a state (a too-high learning rate) is never kept, and the trainer stops there, keeping its best
    earlier one.

    Raises:
        ValueError: it diverged and no earlier state can be kept (``kept_any`` False).
    """
    peaks = [w.detach().abs().max().float().cpu() for w in weights if w.numel()]
    largest = float(torch.stack(peaks).max()) if peaks else 0.0  # torch's max propagates a NaN
    loss_ok = end_loss is None or (
        math.isfinite(end_loss)
        and (start_loss is None or end_loss <= DIVERGENCE_FACTOR * max(start_loss, 1e-3))
    )
    if loss_ok and largest <= WEIGHT_LIMIT:  # (a NaN weight fails this comparison)
        return False
    what = [f"its largest weight is {largest:.3g}"]
    if end_loss is not None:
        what.insert(
            0,
            f"its loss went from {start_loss:.4g} to {end_loss:.4g}"
            if start_loss is not None
            else f"its loss is {end_loss:.4g}",
        )
    if not kept_any:
        raise ValueError(
            f"training diverged in epoch {epoch} ({', '.join(what)}) and no earlier state can be kept: lower --lr"
        )
    logger.warning("training diverged in epoch %d (%s): keeping an earlier state", epoch, ", ".join(what))
    return True


def split_problems(n_problems: int, val_fraction: float, seed: int) -> tuple[set[int], set[int]]:
    """Training and validation problem indices: a seeded shuffle holds out ``val_fraction`` of them."""
    order = list(range(n_problems))
    random.Random(seed).shuffle(order)
    n_val = int(round(n_problems * val_fraction))
    return set(order[n_val:]), set(order[:n_val])


def selection_metrics(scores: torch.Tensor, data_llm: torch.Tensor, data_slm: torch.Tensor) -> dict:
    """How often the selector (and, for reference, the SLM's top-1) picks the LLM's best candidate."""
    best = data_llm.argmax(-1)
    picked = scores.argmax(-1)
    slm_top = data_slm.argmax(-1)
    llm_mass = data_llm / data_llm.sum(-1, keepdim=True).clamp_min(1e-12)
    return {
        "n_groups": int(len(best)),
        "agreement_with_llm": float((picked == best).float().mean()) if len(best) else float("nan"),
        "slm_top1_agreement_with_llm": float((slm_top == best).float().mean()) if len(best) else float("nan"),
        "llm_prob_of_pick": float(llm_mass.gather(-1, picked[:, None]).mean()) if len(best) else float("nan"),
        "llm_prob_of_slm_top1": float(llm_mass.gather(-1, slm_top[:, None]).mean())
        if len(best)
        else float("nan"),
    }


def grouped_selection_metrics(
    scores: torch.Tensor, llm: torch.Tensor, slm: torch.Tensor, divergent: torch.Tensor
) -> dict:
    """:func:`selection_metrics` on all groups and on the divergent ones (SLM top-1 ≠ LLM top-1)."""
    return {
        "all": selection_metrics(scores, llm, slm),
        "divergent": selection_metrics(scores[divergent], llm[divergent], slm[divergent]),
    }
