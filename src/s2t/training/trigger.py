"""An LLM-free trigger learned from collected groups: P(divergence | SLM state).

Features per decoding step: the SLM's last hidden state, its top-64 entropy, its top-1/top-2
margin and its top-16 probabilities, standardised; a logistic regression predicts whether the
LLM's top-1 differs from the SLM's (a divergence point). Its threshold is set for a target
trigger rate on the *training* problems. Validation (held-out training problems) compares it
with the entropy and margin triggers at the same rate: AUROC and recall of divergence points.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from s2t.policies.learned_selector import (
    SelectorCheckpointError,
    matches_fingerprint,
    model_fingerprint,
    read_config,
)
from s2t.policies.triggers import EntropyTrigger, Trigger
from s2t.training.collect import POSITION_TOP_PROBS as TOP_PROBS
from s2t.training.collect import collected_records
from s2t.training.objective import split_problems

WEIGHTS_NAME = "trigger.safetensors"
CONFIG_NAME = "trigger_config.json"


def step_features(slm_logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """(batch, hidden + 2 + 16) features of a decoding step."""
    probs = torch.softmax(slm_logits.float(), -1)
    top = probs.topk(TOP_PROBS, -1).values
    entropy = EntropyTrigger().statistic(slm_logits, None)
    return torch.cat([hidden.float(), entropy[:, None], (top[:, 0] - top[:, 1])[:, None], top], dim=-1)


@dataclass
class LearnedTriggerConfig:
    base_model: str
    base_fingerprint: str
    threshold: float
    target_rate: float
    metrics: dict = field(default_factory=dict)


class LearnedTrigger(Trigger):
    """Fires where the predicted probability of a divergence point is at least the threshold."""

    name = "learned"
    needs_hidden = True
    threshold_range = (0.0, 1.0)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 config: LearnedTriggerConfig):  # fmt: skip
        super().__init__(config.threshold)
        self.weight, self.bias, self.mean, self.std, self.config = weight, bias, mean, std, config

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(((features - self.mean) / self.std) @ self.weight + self.bias)

    def statistic(self, slm_logits, slm_hidden):
        if slm_hidden is None:
            raise ValueError("the learned trigger needs the SLM's hidden state")
        return self.predict(step_features(slm_logits, slm_hidden))

    def calibrate(self, statistics, quantile):
        raise ValueError("the learned trigger's threshold is set at training time (--trigger-rate)")

    def describe(self) -> dict:
        return {"name": self.name, "threshold": self.threshold, "target_rate": self.config.target_rate}

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight, "bias": self.bias.reshape(1), "mean": self.mean, "std": self.std}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / WEIGHTS_NAME))
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path, model=None) -> LearnedTrigger:
        directory = Path(directory)
        if not (directory / WEIGHTS_NAME).is_file():
            raise SelectorCheckpointError(f"no learned trigger in {directory} (train one with `s2t train`)")
        config = read_config(directory / CONFIG_NAME, LearnedTriggerConfig)
        try:
            t = load_file(str(directory / WEIGHTS_NAME))
        except Exception as e:  # safetensors raises several unrelated types on corrupt files
            raise SelectorCheckpointError(f"corrupted trigger checkpoint in {directory}: {e}") from e
        if model is not None and not matches_fingerprint(model, config.base_fingerprint):
            raise SelectorCheckpointError(
                f"this trigger was trained on base model {config.base_model!r}, not this SLM"
            )
        return cls(t["weight"], t["bias"][0], t["mean"], t["std"], config)


def _auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = torch.argsort(torch.argsort(torch.cat([pos, neg]))).double() + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _recall_at_rate(scores: torch.Tensor, labels: torch.Tensor, rate: float) -> float:
    if not labels.any():
        return float("nan")
    cutoff = torch.quantile(scores.double(), 1 - rate)
    return float((scores.double()[labels] >= cutoff).float().mean())


def load_position_features(groups_dir: str | Path, min_step: int = 3):
    """Per-position features, divergence labels and problem indices of a collection run."""
    groups_dir = Path(groups_dir)
    feats, labels, problems, entropy, margin = [], [], [], [], []
    records = collected_records(groups_dir)
    for i, rec in enumerate(records):
        t = load_file(str(groups_dir / rec["features"]))
        hidden = t["position_hidden"].float()
        top = t["position_slm_topk_probs"][:, :TOP_PROBS]
        e, m = t["position_entropy"], t["position_margin"]
        x = torch.cat([hidden, e[:, None], m[:, None], top], dim=-1)[min_step:]
        feats.append(x)
        labels.append(t["position_divergent"][min_step:])
        problems.append(torch.full((len(x),), i, dtype=torch.long))
        entropy.append(e[min_step:])
        margin.append(m[min_step:])
    cat = torch.cat
    return (
        cat(feats),
        cat(labels).bool(),
        cat(problems),
        cat(entropy),
        cat(margin),
        [r["problem_id"] for r in records],
    )


def train_trigger(groups_dir: str | Path, slm, base_model: str, target_rate: float = 0.05, val_fraction: float = 0.1,
                  seed: int = 0, epochs: int = 200, weight_decay: float = 1e-3) -> LearnedTrigger:  # fmt: skip
    """Fit the logistic trigger on training problems and set its threshold for ``target_rate``."""
    if not 0.0 < target_rate < 1.0:
        raise ValueError(f"target trigger rate must lie strictly between 0 and 1; got {target_rate}")
    x, y, problem, entropy, margin, _ = load_position_features(groups_dir)
    train_p, val_p = split_problems(int(problem.max()) + 1, val_fraction, seed)
    tr = torch.tensor([int(p) in train_p for p in problem])
    va = ~tr
    mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-4)
    xs = (x - mean) / std
    torch.manual_seed(seed)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    pos_weight = (~y[tr]).sum() / y[tr].sum().clamp_min(1)
    opt = torch.optim.LBFGS([w, b], max_iter=epochs, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xs[tr] @ w + b, y[tr].float(), pos_weight=pos_weight)
        loss = loss + weight_decay * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    scores = torch.sigmoid(xs @ w + b)
    threshold = float(torch.quantile(scores[tr].double(), 1 - target_rate))
    metrics = {"train_positions": int(tr.sum()), "validation_positions": int(va.sum()),
               "divergence_share": float(y.float().mean())}  # fmt: skip
    if va.any():
        for name, s in (("learned", scores[va]), ("entropy", entropy[va]), ("margin", -margin[va])):
            metrics[name] = {
                "auroc": _auroc(s, y[va]),
                f"recall_at_{target_rate:g}": _recall_at_rate(s, y[va], target_rate),
            }
        metrics["learned"]["validation_trigger_rate"] = float((scores[va] >= threshold).float().mean())
    config = LearnedTriggerConfig(base_model, model_fingerprint(slm.model), threshold, target_rate, metrics)
    return LearnedTrigger(w, b, mean, std, config)
