"""The learned S2T-Local selector: reserved output rows of the SLM read as 16 score bins.

To score a candidate c, the SLM reads prefix + [c]; the logits of the reserved rows at that
position, softmaxed, give a distribution over 16 bins with values linspace(0, 1, 16), and the
candidate's score is the expected bin value. The candidate with the highest score is chosen.
All K candidates are scored in one forward pass over the prefix's KV cache
(:mod:`s2t.policies.scoring`), and that pass is also the SLM's decoding step for the next token.

The rows are kept beside the model (``bins``) rather than written into its ``lm_head``: this
is the same computation, leaves the loaded model untouched, and lets one SLM serve several
selectors. Checkpoints are safetensors plus a JSON config that pins the base model. A LoRA-mode
selector also carries a peft adapter (``adapter/``), merged into a copy of the SLM by
:func:`load_adapted_slm`: training it is :mod:`s2t.training.lora`'s job, loading it is this module's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import PreTrainedModel

from s2t.policies.checkpoint import (  # noqa: F401 (re-exported: the selectors' checkpoint helpers)
    CONFIG_NAME,
    WEIGHTS_NAME,
    SelectorCheckpointError,
    check_base_model,
    check_builtin_base,
    check_problem_ids,
    check_range,
    check_weights,
    checkpoint_digest,
    matches_fingerprint,
    model_fingerprint,
    read_config,
    save_checkpoint,
)
from s2t.policies.scoring import candidate_hidden_states, keep_candidate
from s2t.policies.selectors import Selector, StepContext

NUM_BINS = 16
PRIORS = ("none", "slm-logprob")  # see LocalSelectorConfig.prior
ADAPTER_DIR = "adapter"  # a LoRA selector's peft adapter, beside its bins


def check_selector_checkpoint(directory: str | Path, k: int | None = None, slm: str | None = None) -> None:
    """Check a trained selector's files without loading any model: its config and weights, and its
    LoRA adapter when it has one. With ``k``, a selector trained on another candidate count is
    refused; with ``slm`` (the run's SLM as named on the command line), a selector trained on another
    *built-in* model is refused. The fingerprint check against the loaded SLM
    (:func:`~s2t.policies.checkpoint.check_base_model`) still follows when the model loads; these
    checks only move the common mistakes before any model loads or any run directory is made.

    Raises:
        SelectorCheckpointError: a file is missing, truncated, corrupted or malformed, or the
            selector was trained on another K or another built-in SLM (the message names both).
    """
    directory = Path(directory)
    selector = load_selector(directory)  # reads the config and the (small) weights of any selector kind
    if selector_kind(directory) == "lora":
        _check_safetensors_dir(directory / ADAPTER_DIR, "adapter_config.json", "LoRA adapter")
        check_adapter(directory, selector.config.adapter_sha256)
    trained_k = getattr(selector.config, "k", None)
    if k is not None and trained_k is not None and trained_k != k:
        raise SelectorCheckpointError(
            f"the selector in {directory} was trained on K={trained_k} candidates; got K={k} "
            f"(run S2T-Local with --k {trained_k}, or /k{trained_k} in the method name)"
        )
    check_builtin_base(selector.config.base_model, slm, f"the selector in {directory}")


def adapter_digest(directory: str | Path) -> str:
    """The SHA-256 of a LoRA selector's adapter weights (its ``adapter/*.safetensors``, in name order)."""
    digest = hashlib.sha256()
    for path in sorted((Path(directory) / ADAPTER_DIR).glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def check_adapter(directory: str | Path, recorded: str | None) -> None:
    """Refuse a LoRA adapter whose weights are not the ones saved with the selector (``recorded``;
    None for a selector saved before the hash was recorded, which is not checked).

    Raises:
        SelectorCheckpointError: naming the adapter.
    """
    if recorded is not None:
        check_weights(
            Path(directory) / ADAPTER_DIR, recorded, "LoRA adapter", actual=adapter_digest(directory)
        )


def _check_safetensors_dir(directory: Path, config_name: str, what: str) -> None:
    from safetensors import safe_open

    weights = sorted(directory.glob("*.safetensors"))
    if not (directory / config_name).is_file() or not weights:
        raise SelectorCheckpointError(f"the {what} in {directory} is missing ({config_name} + *.safetensors)")
    try:
        json.loads((directory / config_name).read_text())
        for path in weights:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # reads every tensor: a truncated file fails here
                    f.get_tensor(key)
    except Exception as e:  # safetensors and json raise several unrelated types on corrupt files
        raise SelectorCheckpointError(f"corrupted {what} in {directory}: {e}") from e


def reserved_ids(model: PreTrainedModel, vocab_size: int, n: int = NUM_BINS) -> list[int]:
    """The first ``n`` output rows above the tokenizer's vocabulary (never generated)."""
    rows = model.get_output_embeddings().weight.shape[0]
    if rows - vocab_size < n:
        raise ValueError(
            f"the model has only {rows - vocab_size} output rows above the tokenizer's {vocab_size} tokens; "
            f"S2T-Local needs {n} reserved rows"
        )
    return list(range(vocab_size, vocab_size + n))


@dataclass
class LocalSelectorConfig:
    base_model: str
    base_fingerprint: str
    vocab_size: int
    hidden_size: int
    reserved_ids: list[int]
    num_bins: int = NUM_BINS
    score_temperature: float = 0.1  # scores in [0, 1] are divided by this before softmax losses
    # "slm-logprob": selection logits are score / temperature + the SLM's log-probability of the candidate,
    # so a selector with constant scores is greedy and training learns only where to leave the top-1;
    # "none": score / temperature alone (selectors trained before the prior, which collapsed onto the top-1).
    prior: str = "none"
    training: dict = field(default_factory=dict)  # how it was trained: data, split, problem ids, metrics
    weights_sha256: str | None = None  # of selector.safetensors, recorded at save (None: saved before)
    adapter_sha256: str | None = None  # a LoRA selector's adapter/*.safetensors (see adapter_digest)

    def __post_init__(self):
        check_problem_ids(self.training)
        if self.prior not in PRIORS:
            raise ValueError(f"prior = {self.prior!r} is none of {', '.join(PRIORS)}")
        check_range("score_temperature", self.score_temperature, 0, low_open=True)
        for name in ("vocab_size", "hidden_size", "num_bins"):
            check_range(name, getattr(self, name), 1)


class LocalSelector(Selector):
    """Choose among candidates by the learned bin score; needs no LLM."""

    name = "local"
    needs_llm = False

    def __init__(self, bins: torch.Tensor, config: LocalSelectorConfig):
        if bins.shape != (config.num_bins, config.hidden_size):
            raise SelectorCheckpointError(
                f"bins have shape {tuple(bins.shape)}, expected ({config.num_bins}, {config.hidden_size})"
            )
        self.bins = bins.float()
        self.config = config
        self.bin_values = torch.linspace(0, 1, config.num_bins)

    @classmethod
    def initial(
        cls, model: PreTrainedModel, base_model: str, vocab_size: int, prior: str = "slm-logprob"
    ) -> LocalSelector:
        """A selector initialised from the model's own reserved output rows (before training)."""
        ids = reserved_ids(model, vocab_size)
        bins = model.get_output_embeddings().weight[ids].detach().float().cpu().clone()
        config = LocalSelectorConfig(
            base_model, model_fingerprint(model), vocab_size, bins.shape[1], ids, prior=prior
        )
        return cls(bins, config)

    def selection_logits(
        self, hidden: torch.Tensor, slm_probs: torch.Tensor, bins: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(..., K) logits over the K candidates: what the losses softmax and the selection argmaxes.

        ``hidden`` (..., K, hidden) are the candidates' hidden states, ``slm_probs`` (..., K) the
        SLM's probabilities of them (used with the ``slm-logprob`` prior).
        """
        logits = self.scores(hidden, bins) / self.config.score_temperature
        if self.config.prior == "slm-logprob":
            logits = logits + slm_probs.to(logits.device).float().clamp_min(1e-9).log()
        return logits

    def scores(self, hidden: torch.Tensor, bins: torch.Tensor | None = None) -> torch.Tensor:
        """Expected bin value in [0, 1] for hidden states (..., hidden)."""
        bins = self.bins if bins is None else bins
        probs = torch.softmax(hidden.float() @ bins.to(hidden.device).T, dim=-1)
        return probs @ self.bin_values.to(hidden.device)

    def check_base(self, model: PreTrainedModel) -> None:
        check_base_model(model, self.config.base_model, self.config.base_fingerprint)

    def select(self, ctx: StepContext) -> torch.Tensor:
        stream = ctx.slm_stream
        if stream is None:
            raise RuntimeError("the local selector needs the engine's SLM stream")
        model = stream.model
        batch, k = ctx.candidates.ids.shape
        candidates = ctx.candidates.ids.clone()
        idle = ~ctx.fired
        # Rows that did not fire take their default token; placing it in every column makes this
        # forward pass their ordinary decoding step.
        candidates[idle] = ctx.default_tokens[idle, None]
        prefix = stream.seen
        hidden = candidate_hidden_states(model, stream.cache, ctx.mask, candidates)
        slm_probs = torch.softmax(ctx.slm_logits.float(), -1).gather(-1, candidates.to(ctx.slm_logits.device))
        scores = (
            self.selection_logits(hidden, slm_probs).cpu().masked_fill(~ctx.candidates.valid, float("-inf"))
        )
        index = torch.where(ctx.fired, scores.argmax(-1), torch.zeros(batch, dtype=torch.long))
        keep_candidate(stream.cache, prefix, index)
        stream.seen = prefix + 1
        chosen_hidden = hidden[torch.arange(batch), index.to(hidden.device)]
        with torch.inference_mode():
            logits = model.get_output_embeddings()(chosen_hidden)
        ctx.next_slm_logits = logits[:, : stream.vocab_size].float().cpu()
        if stream.keep_hidden:
            stream.last_hidden = chosen_hidden.float().cpu()
        ctx.slm_tokens_read = torch.where(
            ctx.fired, torch.full((batch,), k), torch.ones(batch, dtype=torch.long)
        )
        return candidates[torch.arange(batch), index]

    def describe(self) -> dict:
        return {"name": self.name, "base_model": self.config.base_model, "num_bins": self.config.num_bins}

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_checkpoint(directory, WEIGHTS_NAME, {"bins": self.bins}, CONFIG_NAME, self.config)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, model: PreTrainedModel | None = None) -> LocalSelector:
        """Load a selector; with ``model``, refuse it unless it was trained on that very SLM."""
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
            raise SelectorCheckpointError(
                f"{directory} is not a selector checkpoint ({CONFIG_NAME} + {WEIGHTS_NAME})"
            )
        config = read_config(directory / CONFIG_NAME, LocalSelectorConfig)
        check_weights(directory / WEIGHTS_NAME, config.weights_sha256)
        try:
            bins = load_file(str(directory / WEIGHTS_NAME))["bins"]
        except (SafetensorError, KeyError, OSError) as e:
            raise SelectorCheckpointError(f"corrupted selector checkpoint in {directory}: {e}") from e
        if bins.shape != (config.num_bins, config.hidden_size):
            raise SelectorCheckpointError(
                f"{directory / WEIGHTS_NAME} does not fit {CONFIG_NAME} (num_bins={config.num_bins}, "
                f"hidden_size={config.hidden_size}): its bins have shape {tuple(bins.shape)}"
            )
        selector = cls(bins, config)
        if model is not None:
            selector.check_base(model)
        return selector


SELECTOR_KINDS = ("head", "lora", "features")


def selector_kind(directory: str | Path) -> str:
    """Which kind of S2T-Local selector a checkpoint holds: ``head``, ``lora`` or ``features``.

    Raises:
        SelectorCheckpointError: no readable config, or a kind this release does not know.
    """
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).exists():
        raise SelectorCheckpointError(f"no selector at {directory}: the directory does not exist")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        aside = Path(directory) / ".replaced"
        hint = (
            f"; an interrupted `s2t train --overwrite` left the earlier training in {aside}: move its "
            "files back, or run `s2t train` on this --out again, which puts them back"
            if aside.is_dir()
            else ""
        )
        raise SelectorCheckpointError(
            f"{directory} is not a selector checkpoint (no {CONFIG_NAME}){hint}"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SelectorCheckpointError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise SelectorCheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}")
    training = data.get("training") or {}
    if not isinstance(training, dict):
        raise SelectorCheckpointError(f"{path} is malformed (training = {training!r} is not an object)")
    kind = data.get("kind") or training.get("mode") or "head"
    if kind not in SELECTOR_KINDS:
        raise SelectorCheckpointError(
            f"{directory} holds a selector of kind {kind!r}, which this release cannot load; "
            f"known kinds: {', '.join(SELECTOR_KINDS)}"
        )
    return kind


def load_selector(directory: str | Path, model: PreTrainedModel | None = None) -> Selector:
    """Load any kind of trained S2T-Local selector; with ``model``, refuse one trained on another SLM.

    A ``lora`` selector's adapter is not merged here: see :func:`load_adapted_slm`.
    """
    from s2t.policies.feature_selector import FeatureSelector

    if selector_kind(directory) == "features":
        return FeatureSelector.from_pretrained(directory, model=model)
    return LocalSelector.from_pretrained(directory, model=model)


def load_adapted_slm(model, selector_dir: str | Path):
    """A copy of ``model`` with the selector's LoRA adapter merged in (the base model is untouched)."""
    import copy

    from peft import PeftModel

    check_adapter(
        selector_dir, read_config(Path(selector_dir) / CONFIG_NAME, LocalSelectorConfig).adapter_sha256
    )
    adapted = PeftModel.from_pretrained(copy.deepcopy(model), str(Path(selector_dir) / ADAPTER_DIR))
    merged = adapted.merge_and_unload()
    merged.eval().requires_grad_(False)
    return merged
