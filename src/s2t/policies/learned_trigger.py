"""The learned LLM-free trigger at inference: P(divergence point | SLM state) from the step features.

A logistic regression over the standardised step features (:mod:`s2t.policies.features`) fires
where the predicted probability of a divergence point is at least its threshold, which is set at
training time for a target trigger rate (:mod:`s2t.training.trigger` trains it). It is stored
beside a trained selector (``trigger.safetensors`` + ``trigger_config.json``).

Training may choose the logit features alone (its hidden-state weights are then zero, in the same
format): such a trigger does not read the hidden state, so backends that do not expose it (llama.cpp)
run it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from s2t.policies.checkpoint import (
    SelectorCheckpointError,
    check_base_model,
    check_range,
    check_weights,
    read_config,
    save_checkpoint,
)
from s2t.policies.features import LOGIT_FEATURES, features_from_logits
from s2t.policies.triggers import Trigger

WEIGHTS_NAME = "trigger.safetensors"
CONFIG_NAME = "trigger_config.json"


@dataclass
class LearnedTriggerConfig:
    base_model: str
    base_fingerprint: str
    threshold: float
    target_rate: float
    metrics: dict = field(default_factory=dict)
    weights_sha256: str | None = None  # of trigger.safetensors, recorded at save (None: saved before)
    # the collection problems it was fitted and validated on (empty: saved before they were recorded),
    # so that an evaluation on any of them is refused as leaky
    problem_ids: list[str] = field(default_factory=list)
    # and their content's digests (s2t.training.collect.collection_problem_digests; empty: saved before)
    problem_digests: list[str] = field(default_factory=list)

    def __post_init__(self):
        check_range("threshold", self.threshold, 0, 1)
        check_range("target_rate", self.target_rate, 0, 1, low_open=True)


class LearnedTrigger(Trigger):
    """Fires where the predicted probability of a divergence point is at least the threshold."""

    name = "learned"
    threshold_range = (0.0, 1.0)

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        config: LearnedTriggerConfig,
    ):
        super().__init__(config.threshold)
        self.weight, self.bias, self.mean, self.std, self.config = weight, bias, mean, std, config
        self.hidden_size = len(weight) - LOGIT_FEATURES
        self.needs_hidden = _reads_hidden(weight)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(((features - self.mean) / self.std) @ self.weight + self.bias)

    def statistic(self, slm_logits, slm_hidden):
        if slm_hidden is None:
            if self.needs_hidden:
                raise ValueError("this learned trigger reads the SLM's hidden state, and none was given")
            # its hidden-state weights are zero: any hidden state gives the same probability
            slm_hidden = torch.zeros(len(slm_logits), self.hidden_size)
        return self.predict(features_from_logits(slm_logits, slm_hidden))

    def calibrate(self, statistics, quantile):
        raise ValueError("the learned trigger's threshold is set at training time (--trigger-rate)")

    def describe(self) -> dict:
        return {"name": self.name, "threshold": self.threshold, "target_rate": self.config.target_rate}

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight, "bias": self.bias.reshape(1), "mean": self.mean, "std": self.std}
        save_checkpoint(directory, WEIGHTS_NAME, tensors, CONFIG_NAME, self.config)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, model=None, threshold: float | None = None
    ) -> LearnedTrigger:
        """Load the trigger stored with a selector; with ``model``, refuse it for another SLM.
        ``threshold`` replaces the stored one (which was set for the training trigger rate)."""
        directory = Path(directory)
        if not (directory / WEIGHTS_NAME).is_file():
            raise SelectorCheckpointError(f"no learned trigger in {directory} (train one with `s2t train`)")
        config = read_config(directory / CONFIG_NAME, LearnedTriggerConfig)
        check_weights(directory / WEIGHTS_NAME, config.weights_sha256, what="trigger")
        try:
            t = load_file(str(directory / WEIGHTS_NAME))
        except Exception as e:  # safetensors raises several unrelated types on corrupt files
            raise SelectorCheckpointError(f"corrupted trigger checkpoint in {directory}: {e}") from e
        if model is not None:
            check_base_model(model, config.base_model, config.base_fingerprint, what="trigger")
        if threshold is not None:
            config = replace(config, threshold=threshold)
        return cls(t["weight"], t["bias"][0], t["mean"], t["std"], config)


def trigger_reads_hidden(directory: str | Path | None) -> bool:
    """Whether the learned trigger stored in ``directory`` reads the SLM's hidden state. True where
    that cannot be told (no directory, or no trigger in it: loading it says what is missing)."""
    if not directory or not (Path(directory) / WEIGHTS_NAME).is_file():
        return True
    try:
        weight = load_file(str(Path(directory) / WEIGHTS_NAME))["weight"]
    except Exception:  # a corrupted file: loading it raises the checkpoint error
        return True
    return _reads_hidden(weight)


def _reads_hidden(weight: torch.Tensor) -> bool:
    """Whether a trigger's weights (hidden + LOGIT_FEATURES,) use the hidden state: training that chose
    the logit features alone stores zeros there."""
    return bool(weight[: len(weight) - LOGIT_FEATURES].any())
