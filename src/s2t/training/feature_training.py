"""Train S2T-Local's feature selector (:mod:`s2t.policies.feature_selector`) from collected groups.

Only each group's record is needed (the SLM's and the LLM's probabilities on the top-K
candidates, entropy, margin): no hidden states, no model forward, a few minutes on a CPU.

The loss is listwise: cross-entropy of the softmax over the K candidate scores against the
LLM's distribution renormalised over the candidates (a soft target), so "keep the top-1" and
"take the second" are weighed by how much the LLM prefers each. The held-out problems (a seeded
split, as every trainer here) choose the epoch kept.

``groups_at`` keeps only the groups where a given trigger would fire (``entropy@0.8`` looks up
the threshold the collection calibrated; ``entropy=0.48`` gives it), so the selector is trained
on the decision points it will meet at inference.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from s2t.policies.feature_selector import FeatureScorer, FeatureSelector, candidate_features
from s2t.runs import write_json_atomic
from s2t.training.collect import (
    collected_groups_at,
    collected_records,
    collection_config,
    collection_dtype,
    collection_summary,
    group_settings,
)
from s2t.training.objective import diverged, split_problems


@dataclass
class FeatureTrainConfig:
    """How a feature selector is trained."""

    groups: str  # a collection run directory
    out: str
    k: int = 8
    groups_at: str | None = None  # keep only groups where these settings fire (None: all groups)
    hidden: int = 64
    epochs: int = 30
    lr: float = 3e-3
    weight_decay: float = 0.01
    batch_size: int = 256
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.k < 2:
            raise ValueError(f"k must be >= 2 (a selection needs two candidates); got {self.k}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1); got {self.val_fraction}")
        if self.epochs < 1 or self.batch_size < 1 or not 0 < self.lr < math.inf or self.hidden < 1:
            raise ValueError(
                "epochs, batch_size and hidden must be >= 1 and lr a finite number > 0; got "
                f"epochs={self.epochs}, batch_size={self.batch_size}, hidden={self.hidden}, lr={self.lr}"
            )
        if self.groups_at:
            group_settings(self.groups_at)


@dataclass
class GroupArrays:
    """Every kept group of a collection, at K candidates, in problem order."""

    slm_probs: torch.Tensor  # (N, K) float32, the SLM's probabilities of its top-K in rank order
    llm_probs: torch.Tensor  # (N, K) float32, the LLM's probabilities of the same candidates
    entropy: torch.Tensor  # (N,) the SLM's top-64 entropy
    margin: torch.Tensor  # (N,) the SLM's top-1 minus top-2 probability
    divergent: torch.Tensor  # (N,) bool: the SLM's top-1 is not the LLM's top-1
    problem: torch.Tensor  # (N,) index into problem_ids
    problem_ids: list[str]
    position: torch.Tensor  # (N,) the group's position in its answer (tokens)
    candidate_ids: torch.Tensor  # (N, K) token ids
    index: torch.Tensor  # (N,) the group's index among all of the collection's groups

    @property
    def llm_best(self) -> torch.Tensor:
        """(N,) rank of the LLM's preferred candidate among the K."""
        return self.llm_probs.argmax(-1)

    def features(self) -> torch.Tensor:
        return candidate_features(self.slm_probs, self.entropy, self.margin)

    def subset(self, mask: torch.Tensor) -> GroupArrays:
        return GroupArrays(
            self.slm_probs[mask],
            self.llm_probs[mask],
            self.entropy[mask],
            self.margin[mask],
            self.divergent[mask],
            self.problem[mask],
            self.problem_ids,
            self.position[mask],
            self.candidate_ids[mask],
            self.index[mask],
        )


def load_group_arrays(groups_dir: str | Path, k: int, groups_at: str | None = None) -> GroupArrays:
    """Every group of a collection at its top ``k`` candidates, optionally only where ``groups_at`` fires.

    Raises:
        ValueError: ``k`` above the collection's K, a ``kl`` setting on a collection without
            per-group KL, or no group left.
    """
    collected_k = collection_config(groups_dir)["k"]
    if k > collected_k:
        raise ValueError(f"k={k} exceeds the collection's K={collected_k}")
    records = collected_records(groups_dir, need_features=False)
    names = ("slm", "llm", "entropy", "margin", "divergent", "problem", "position", "ids")
    rows: dict[str, list] = {n: [] for n in names}
    for i, record in enumerate(records):
        for g in record["groups"]:
            rows["slm"].append(g["slm_probs"][:k])
            rows["llm"].append(g["llm_probs"][:k])
            rows["entropy"].append(g["entropy"])
            rows["margin"].append(g["margin"])
            rows["divergent"].append(g["divergent"])
            rows["problem"].append(i)
            rows["position"].append(g["position"])
            rows["ids"].append(g["candidate_ids"][:k])
    data = GroupArrays(
        torch.tensor(rows["slm"], dtype=torch.float32).reshape(-1, k),
        torch.tensor(rows["llm"], dtype=torch.float32).reshape(-1, k),
        torch.tensor(rows["entropy"], dtype=torch.float32),
        torch.tensor(rows["margin"], dtype=torch.float32),
        torch.tensor(rows["divergent"], dtype=torch.bool),
        torch.tensor(rows["problem"], dtype=torch.long),
        [r["problem_id"] for r in records],
        torch.tensor(rows["position"], dtype=torch.long),
        torch.tensor(rows["ids"], dtype=torch.long).reshape(-1, k),
        torch.arange(len(rows["problem"])),
    )
    if groups_at:
        groups = [g for record in records for g in record["groups"]]
        data = data.subset(collected_groups_at(groups_dir, groups_at, groups))
    if len(data.problem) == 0:
        raise ValueError(f"no groups in {groups_dir}" + (f" where {groups_at} fires" if groups_at else ""))
    return data


def fit_feature_scorer(
    x: torch.Tensor,
    target: torch.Tensor,
    llm_best: torch.Tensor,
    fit: torch.Tensor,
    select: torch.Tensor,
    cfg: FeatureTrainConfig,
    progress: bool = True,
) -> tuple[FeatureScorer, list[dict]]:
    """Fit a :class:`FeatureScorer` with the listwise soft cross-entropy.

    Args:
        x: (N, K, F) float32 candidate features (:func:`candidate_features`).
        target: (N, K) the LLM's distribution renormalised over the K candidates.
        llm_best: (N,) rank of the LLM's preferred candidate.
        fit: (N,) bool, the groups to fit on; ``select``: (N,) bool, the groups whose agreement
            chooses the epoch kept (may be all False: the last epoch is kept).
        cfg: epochs, learning rate, weight decay, batch size, hidden width and seed.

    Returns:
        The scorer in eval mode and the per-epoch history (train loss, agreement on ``select``).
        A diverged epoch (:func:`~s2t.training.objective.diverged`) ends training, unkept.

    Raises:
        ValueError: the first epoch diverged.
    """
    torch.manual_seed(cfg.seed)
    scorer = FeatureScorer(x.shape[-1], cfg.hidden)
    flat = x[fit].reshape(-1, x.shape[-1])
    scorer.mean.copy_(flat.mean(0))
    scorer.std.copy_(flat.std(0).clamp_min(1e-4))
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x_fit, t_fit = x[fit], target[fit]

    def fit_loss() -> float:  # the current state's loss on the training groups
        with torch.no_grad():
            return float(-(t_fit * torch.log_softmax(scorer(x_fit), -1)).sum(-1).mean())

    scorer.eval()
    start_loss = fit_loss()
    history, best_state, best_val = [], None, float("-inf")
    for epoch in tqdm(range(cfg.epochs), desc="training feature selector", disable=not progress):
        scorer.train()
        perm = torch.randperm(len(x_fit))
        total = 0.0
        for start in range(0, len(perm), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            loss = -(t_fit[idx] * torch.log_softmax(scorer(x_fit[idx]), -1)).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        scorer.eval()
        with torch.no_grad():
            val = (
                float((scorer(x[select]).argmax(-1) == llm_best[select]).float().mean())
                if select.any()
                else 0.0
            )
        history.append({"epoch": epoch + 1, "train_loss": total / len(x_fit), "val_agreement": val})
        if diverged(
            epoch + 1,
            best_state is not None,
            end_loss=fit_loss(),
            start_loss=start_loss,
            weights=scorer.parameters(),
        ):
            history[-1]["diverged"] = True
            break
        if best_state is None or val > best_val or not select.any():
            best_val, best_state = val, {n: t.clone() for n, t in scorer.state_dict().items()}
    scorer.load_state_dict(best_state)
    return scorer.eval(), history


def train_feature_selector(cfg: FeatureTrainConfig, slm=None, progress: bool = True) -> FeatureSelector:
    """Fit the feature selector on the training problems' groups and save it to ``cfg.out``.

    ``slm`` (a :class:`~s2t.models.LoadedModel`) pins the checkpoint to the SLM; by default the
    collection's SLM is loaded for its fingerprint.
    """
    from s2t.models import load_model
    from s2t.training.objective import grouped_selection_metrics

    collect_cfg = collection_config(cfg.groups)
    data = load_group_arrays(cfg.groups, cfg.k, cfg.groups_at)
    # the collection's dtype: the learned trigger may rebuild missing per-position features with it
    slm = slm or load_model(collect_cfg["slm"], dtype=collection_dtype(collect_cfg))
    train_p, val_p = split_problems(len(data.problem_ids), cfg.val_fraction, cfg.seed)
    in_train = torch.tensor([int(p) in train_p for p in data.problem], dtype=torch.bool)
    in_val = ~in_train
    if not in_train.any():
        raise ValueError("no training groups (collect more problems, or lower --val-fraction)")
    x = data.features()
    target = data.llm_probs / data.llm_probs.sum(-1, keepdim=True).clamp_min(1e-12)

    scorer, history = fit_feature_scorer(x, target, data.llm_best, in_train, in_val, cfg, progress)

    def metrics(mask):
        with torch.no_grad():
            scores = scorer(x[mask])
        return grouped_selection_metrics(
            scores, data.llm_probs[mask], data.slm_probs[mask], data.divergent[mask]
        )

    selector = FeatureSelector.initial(slm.model, collect_cfg["slm"], cfg.k, cfg.hidden)
    selector.scorer = scorer
    selector.config.training = {
        "mode": "features",
        "config": asdict(cfg),
        "collection": collection_summary(cfg.groups, cfg.groups_at),
        "train_problem_ids": sorted(data.problem_ids[i] for i in train_p),
        "validation_problem_ids": sorted(data.problem_ids[i] for i in val_p),
        "metrics": {"train": metrics(in_train), "validation": metrics(in_val) if in_val.any() else None},
    }
    selector.save_pretrained(cfg.out)
    write_json_atomic(Path(cfg.out) / "training_history.json", history)
    return selector
