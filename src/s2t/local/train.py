"""Train the S2T-Local selector from collected groups.

``head`` mode (CPU-friendly): the SLM stays frozen; only the 16 reserved output rows (the score
bins) are trained, on candidate hidden states precomputed once by ``s2t collect``. Minutes on
a CPU.

``lora`` mode: peft LoRA (r=16, α=32, dropout 0.05 on the attention and MLP projections) plus
the bins, and 0.1·KL to the frozen SLM on the prefix so ordinary generation is preserved. Each
problem's trajectory and all its groups' candidates go through the SLM in one forward pass under
a 4D mask (:mod:`s2t.local.lora`), which makes it practical on a CPU with ``lora_layers``.

The loss (paper): cross-entropy over candidate scores with the LLM's best candidate as target +
hinge (margin 1.0) against the hardest negative + 0.1·KL(LLM probabilities renormalised over
the candidates ‖ softmax of the scores). Scores are expected bin values in [0, 1]; the losses
see them divided by ``score_temperature`` (0.1), which sets how sharp the selection may get.

Problems, not groups, are split into training and validation parts, so validation metrics
measure generalisation to unseen problems. All of it uses the collection's *training* split.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from s2t.local.collect import collected_records, collection_config
from s2t.local.selector import LocalSelector
from s2t.runs import write_json_atomic

logger = logging.getLogger(__name__)

MODES = ("head", "lora")
LORA_DEFAULT_LR = 5e-5  # the paper's


@dataclass
class TrainConfig:
    groups: str  # a collection run directory
    out: str
    mode: str = "head"
    groups_subset: str = "all"  # all | divergent (only groups where SLM and LLM disagree)
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
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
        if self.k is not None and self.k < 2:
            raise ValueError(f"k must be >= 2 (a selection needs two candidates); got {self.k}")
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


@dataclass
class GroupTensors:
    hidden: torch.Tensor  # (N, K, H) float16
    llm_probs: torch.Tensor  # (N, K)
    slm_probs: torch.Tensor  # (N, K)
    divergent: torch.Tensor  # (N,) bool
    problem: torch.Tensor  # (N,) index into problem_ids
    problem_ids: list[str]


def load_groups(groups_dir: str | Path) -> tuple[GroupTensors, dict]:
    """Load a collection run: its config and every group's tensors."""
    groups_dir = Path(groups_dir)
    config = collection_config(groups_dir)
    records = collected_records(groups_dir)
    if not records:
        raise ValueError(f"{groups_dir} holds no collected problems yet")
    hidden, llm, slm, div, prob, ids = [], [], [], [], [], []
    for i, rec in enumerate(records):
        t = load_file(str(groups_dir / rec["features"]))
        n = t["candidate_hidden"].shape[0]
        hidden.append(t["candidate_hidden"])
        llm.append(t["candidate_llm_probs"])
        slm.append(t["candidate_slm_probs"])
        div.append(torch.tensor([g["divergent"] for g in rec["groups"]], dtype=torch.bool).reshape(n))
        prob.append(torch.full((n,), i, dtype=torch.long))
        ids.append(rec["problem_id"])
    data = GroupTensors(
        torch.cat(hidden), torch.cat(llm), torch.cat(slm), torch.cat(div), torch.cat(prob), ids
    )
    return data, config


def split_problems(n_problems: int, val_fraction: float, seed: int) -> tuple[set[int], set[int]]:
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


def train_head(cfg: TrainConfig, slm=None, progress: bool = True) -> LocalSelector:
    """Train only the score bins on precomputed candidate hidden states (frozen SLM)."""
    from s2t.models import load_model

    data, collect_cfg = load_groups(cfg.groups)
    slm = slm or load_model(collect_cfg["slm"], dtype=cfg.dtype)
    selector = LocalSelector.initial(slm.model, collect_cfg["slm"], len(slm.tokenizer))
    selector.config.score_temperature = cfg.score_temperature
    if data.hidden.shape[-1] != selector.config.hidden_size:
        raise ValueError(
            f"collected hidden states have size {data.hidden.shape[-1]}, the SLM has {selector.config.hidden_size}: "
            "the groups were collected with another SLM"
        )
    train_p, val_p = split_problems(len(data.problem_ids), cfg.val_fraction, cfg.seed)
    keep = torch.ones(len(data.problem), dtype=torch.bool) if cfg.groups_subset == "all" else data.divergent
    in_train = keep & torch.tensor([int(p) in train_p for p in data.problem])
    in_val = keep & torch.tensor([int(p) in val_p for p in data.problem])
    if not in_train.any():
        raise ValueError("no training groups (collect more problems, or lower --val-fraction)")

    torch.manual_seed(cfg.seed)
    bins = torch.nn.Parameter(torch.randn_like(selector.bins) * 0.01)
    optimizer = torch.optim.AdamW([bins], lr=cfg.lr, weight_decay=cfg.weight_decay)
    x_train, y_train = data.hidden[in_train].float(), data.llm_probs[in_train]
    history = []
    best_state, best_val = bins.detach().clone(), float("-inf")
    for epoch in tqdm(range(cfg.epochs), desc="training bins", disable=not progress):
        perm = torch.randperm(len(x_train))
        total = 0.0
        for start in range(0, len(perm), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            logits = selector.scores(x_train[idx], bins) / cfg.score_temperature
            loss = selector_loss(logits, y_train[idx], cfg)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([bins], cfg.grad_clip)
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        with torch.no_grad():
            val = (
                selection_metrics(selector.scores(data.hidden[in_val].float(), bins), data.llm_probs[in_val], data.slm_probs[in_val])
                if in_val.any()
                else {}
            )  # fmt: skip
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": total / len(x_train),
                **{f"val_{k}": v for k, v in val.items()},
            }
        )
        score = val.get("agreement_with_llm", -total)
        if score > best_val:
            best_val, best_state = score, bins.detach().clone()
    selector.bins = best_state
    with torch.no_grad():
        metrics = {
            "train": selection_metrics(selector.scores(x_train), y_train, data.slm_probs[in_train]),
            "validation": selection_metrics(
                selector.scores(data.hidden[in_val].float()), data.llm_probs[in_val], data.slm_probs[in_val]
            )
            if in_val.any()
            else None,
        }
    selector.config.training = {
        "mode": "head",
        "config": asdict(cfg),
        "collection": {k: collect_cfg.get(k) for k in ("dataset", "split", "mode", "k", "slm", "llm")},
        "train_problem_ids": sorted(data.problem_ids[i] for i in train_p),
        "validation_problem_ids": sorted(data.problem_ids[i] for i in val_p),
        "metrics": metrics,
    }
    selector.save_pretrained(cfg.out)
    write_json_atomic(Path(cfg.out) / "training_history.json", history)
    return selector


def train(cfg: TrainConfig, progress: bool = True, resume: bool = False, **kwargs) -> LocalSelector:
    """Train a selector in ``cfg.mode``; ``resume`` continues a LoRA run from its checkpoint."""
    if cfg.mode == "head":
        if resume:
            raise ValueError("--resume applies to lora mode; head training takes minutes and restarts")
        return train_head(cfg, progress=progress, **kwargs)
    from s2t.local.lora import train_lora

    return train_lora(cfg, progress=progress, resume=resume, **kwargs)
