"""Training the LLM-free trigger (:class:`s2t.policies.learned_trigger.LearnedTrigger`) from collected groups.

Features per decoding step (:mod:`s2t.policies.features`): the SLM's last hidden state, its
top-64 entropy, its top-1/top-2 margin and its top-16 probabilities, standardised; a logistic
regression predicts the step's label. Two labels:

- ``kl@Q`` (default ``kl@0.95``): the step's KL(SLM‖LLM) over the SLM's top-64 lies in the top
  ``1 - Q`` of the training positions' KL — where the paper's KL trigger would fire, so the
  learned trigger imitates it without running the LLM (the paper's "criticality logit");
- ``divergent``: the LLM's top-1 differs from the SLM's.

Its threshold is set for a target trigger rate on the *training* problems. Validation
(held-out training problems) compares it with the entropy and margin triggers at the same
rate: AUROC and recall of the label.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from s2t.policies.features import LOGIT_FEATURES, step_features, without_hidden
from s2t.policies.learned_selector import model_fingerprint
from s2t.policies.learned_trigger import LearnedTrigger, LearnedTriggerConfig
from s2t.training.collect import (
    check_rebuildable,
    collected_records,
    collection_problem_digests,
    read_features,
    rebuild_position_tensors,
)
from s2t.training.objective import split_problems

log = logging.getLogger(__name__)


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


TRIGGER_LABELS = "divergent, or kl@Q (KL in its top 1-Q, e.g. kl@0.95)"


def parse_label(label: str) -> float | None:
    """``"divergent"`` -> None; ``"kl@0.95"`` -> 0.95; anything else raises ``ValueError``."""
    from s2t.policies.triggers import check_quantile

    if label == "divergent":
        return None
    if label.startswith("kl@"):
        try:
            quantile = float(label[3:])
        except ValueError:
            raise ValueError(f"trigger label {label!r}: {label[3:]!r} is not a number") from None
        check_quantile(quantile)
        return quantile
    raise ValueError(f"unknown trigger label {label!r}; choose {TRIGGER_LABELS}")


def _without_feature_files(groups_dir: Path, records: list[dict]) -> list[dict]:
    """The records whose ``features/`` file is missing (rebuilt from the record, where it allows)."""
    return [r for r in records if not (groups_dir / r["features"]).is_file()]


def check_trigger_data(groups_dir: str | Path, label: str = "kl@0.95") -> None:
    """Check, before any model loads, that a trigger can be trained on ``label`` from a collection:
    the label parses, every missing feature file can be rebuilt from its record, and for a ``kl``
    label every feature file holds the per-position KL (reading only the files' headers).

    Raises:
        ValueError: an unknown label, or a ``kl`` label on problems without per-position KL.
        FileNotFoundError: not a collection, or missing feature files that cannot be rebuilt.
    """
    from safetensors import safe_open

    from s2t.training.collect import check_records_rebuildable

    groups_dir = Path(groups_dir)
    kl_label = parse_label(label) is not None
    records = collected_records(groups_dir, need_features=False)
    missing = _without_feature_files(groups_dir, records)
    check_records_rebuildable(groups_dir, missing)
    if not kl_label:
        return
    rebuilt = {r["problem_id"] for r in missing}  # from their records, which carry the KL (checked above)
    for r in records:
        if r["problem_id"] in rebuilt:
            continue
        try:
            with safe_open(str(groups_dir / r["features"]), framework="pt") as f:
                has_kl = "position_kl" in f.keys()
        except Exception:  # a damaged file: reading it says which and how to redo it
            read_features(groups_dir, r)
            raise
        if not has_kl:
            raise ValueError(
                f"{groups_dir} records no per-position KL for {r['problem_id']} (collected before it was "
                "recorded), so a trigger cannot learn the kl label from it: collect again with `s2t collect "
                "--out NEW_DIR`, or train with --trigger-label divergent"
            )


def load_position_features(
    groups_dir: str | Path,
    min_step: int = 3,
    with_kl: bool = False,
    with_llm_rank: bool = False,
    slm=None,
    progress: bool = True,
):
    """Per-position features, divergence labels and problem indices of a collection run.

    With ``with_kl`` one more item is returned: each position's KL(SLM‖LLM) over the SLM's
    top-64; a collection made before KL was recorded raises ``ValueError`` naming the fix. With
    ``with_llm_rank`` one more (last): the 1-based rank (int64) of the LLM's top-1 token under the SLM.
    A problem whose ``features/`` file is missing is rebuilt from its record with ``slm``
    (:func:`s2t.training.collect.rebuild_position_tensors`); :func:`s2t.training.collect.check_rebuildable`
    raises ``FileNotFoundError`` or ``ValueError`` before any work where that cannot be done.
    """
    groups_dir = Path(groups_dir)
    feats, labels, problems, entropy, margin, kl, ranks = [], [], [], [], [], [], []
    records = collected_records(groups_dir, need_features=False)
    missing = _without_feature_files(groups_dir, records)
    if missing:
        check_rebuildable(groups_dir, missing, slm)  # before any work
        log.info("rebuilding the per-position features of %d problems with the SLM", len(missing))
    rebuild = {r["problem_id"] for r in missing}
    for i, rec in enumerate(tqdm(records, desc="position features", disable=not (progress and missing))):
        t = (
            rebuild_position_tensors(rec, slm)
            if rec["problem_id"] in rebuild
            else read_features(groups_dir, rec)
        )
        if with_kl:
            if "position_kl" not in t:
                raise ValueError(
                    f"{groups_dir} records no per-position KL (collected before it was recorded), so a trigger "
                    "cannot learn the kl label from it: collect again with `s2t collect --out NEW_DIR`, or "
                    "train with --trigger-label divergent"
                )
            kl.append(t["position_kl"][min_step:].float())
        e, m = t["position_entropy"], t["position_margin"]
        x = step_features(t["position_hidden"], e, m, t["position_slm_topk_probs"])[min_step:]
        feats.append(x)
        if with_llm_rank:
            ranks.append(t["position_llm_top1_rank"][min_step:])
        labels.append(t["position_divergent"][min_step:])
        problems.append(torch.full((len(x),), i, dtype=torch.long))
        entropy.append(e[min_step:])
        margin.append(m[min_step:])
    cat = torch.cat
    out = (
        cat(feats),
        cat(labels).bool(),
        cat(problems),
        cat(entropy),
        cat(margin),
        [r["problem_id"] for r in records],
    )
    return (*out, *([cat(kl)] if with_kl else []), *([cat(ranks)] if with_llm_rank else []))


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, epochs: int, weight_decay: float):
    """Class-balanced, L2-regularised logistic regression on standardised ``x`` (N, F) for labels ``y``
    (N,) bool, fitted with L-BFGS; returns (weight (F,), bias, mean (F,), std (F,))."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-4)
    xs = (x - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    pos_weight = (~y).sum() / y.sum().clamp_min(1)
    opt = torch.optim.LBFGS([w, b], max_iter=epochs, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xs @ w + b, y.float(), pos_weight=pos_weight)
        loss = loss + weight_decay * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), mean, std


TRIGGER_FEATURES = ("auto", "logits")  # what the trigger may read: tuned, or the logit features only

# the model choices tried on an inner split of the training problems
WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1, 1.0)


def _choose_model(
    x: torch.Tensor,
    y: torch.Tensor,
    problem: torch.Tensor,
    train_p: set[int],
    train: torch.Tensor,
    seed: int,
    epochs: int,
    candidates: tuple[str, ...] = ("all", "no-hidden"),
) -> dict:
    """Choose the trigger's features (among ``candidates``: with or without the hidden state) and
    weight decay by AUROC on 10% of the *training* problems ``train_p`` (whose positions ``train``
    marks), fitting on the rest; the validation problems are never seen.

    Returns ``{"features": "all" | "no-hidden", "weight_decay", "inner_auroc"}``.
    """
    order = sorted(train_p)
    random.Random(seed + 1).shuffle(order)
    inner = set(order[: max(1, round(0.1 * len(order)))])
    sel = torch.tensor([int(p) in inner for p in problem]) & train
    fit = train & ~sel
    best = {"features": candidates[0], "weight_decay": WEIGHT_DECAYS[0], "inner_auroc": float("nan")}
    if not fit.any() or not y[fit].any() or not y[sel].any() or y[sel].all():
        return best
    for features in candidates:
        cols = x if features == "all" else without_hidden(x)
        for wd in WEIGHT_DECAYS:
            w, b, mean, std = _fit_logistic(cols[fit], y[fit], epochs, wd)
            auroc = _auroc(((cols[sel] - mean) / std) @ w + b, y[sel])
            if auroc == auroc and not auroc <= best["inner_auroc"]:  # a number, above the best (or the first)
                best = {"features": features, "weight_decay": wd, "inner_auroc": auroc}
    return best


def train_trigger(
    groups_dir: str | Path,
    slm,
    base_model: str,
    target_rate: float = 0.05,
    val_fraction: float = 0.1,
    seed: int = 0,
    epochs: int = 200,
    weight_decay: float = 1e-3,
    label: str = "kl@0.95",
    tune: bool = True,
    features: str = "auto",
) -> LearnedTrigger:
    """Fit the logistic trigger on training problems and set its threshold for ``target_rate``.

    ``label`` is what it learns to predict (see the module docstring); a ``kl@Q`` label's cutoff
    is the ``Q`` quantile of the *training* problems' per-position KL. With ``tune``, the features
    (with or without the hidden state) and the weight decay are chosen on an inner split of the
    training problems (:func:`_choose_model`; the hidden state's 896 weights overfit a few dozen
    problems); without it, all features and ``weight_decay``. ``features="logits"`` leaves the hidden
    state out whatever the tuning says: such a trigger also runs on the llama.cpp backend, which
    exposes no hidden states (``"auto"``: the tuning decides).

    Raises:
        ValueError: a target rate outside (0, 1), an unknown label, or a ``kl`` label on a
            collection without per-position KL; see also :func:`load_position_features`.
        FileNotFoundError: a missing feature file that cannot be rebuilt from its record.
    """
    if not 0.0 < target_rate < 1.0:
        raise ValueError(f"target trigger rate must lie strictly between 0 and 1; got {target_rate}")
    if features not in TRIGGER_FEATURES:
        raise ValueError(f"trigger features must be one of {', '.join(TRIGGER_FEATURES)}; got {features!r}")
    kl_quantile = parse_label(label)
    loaded = load_position_features(groups_dir, with_kl=kl_quantile is not None, slm=slm)
    x, y, problem, entropy, margin, _ = loaded[:6]
    train_p, val_p = split_problems(int(problem.max()) + 1, val_fraction, seed)
    tr = torch.tensor([int(p) in train_p for p in problem])
    va = ~tr
    kl_cutoff = None
    if kl_quantile is not None:
        kl = loaded[6]
        kl_cutoff = float(torch.quantile(kl[tr].double(), kl_quantile))
        y = kl >= kl_cutoff
    torch.manual_seed(seed)
    candidates = ("no-hidden",) if features == "logits" else ("all", "no-hidden")
    choice = _choose_model(x, y, problem, train_p, tr, seed, epochs, candidates) if tune else None
    if choice is None and features == "logits":
        choice = {"features": "no-hidden", "weight_decay": weight_decay, "inner_auroc": None}
    cheap = without_hidden(x)
    if choice is not None and choice["features"] == "no-hidden":
        # the same checkpoint format: the hidden state's weights are zero
        hidden = x.shape[1] - LOGIT_FEATURES
        cw, b, cmean, cstd = _fit_logistic(cheap[tr], y[tr], epochs, choice["weight_decay"])
        w, mean, std = torch.zeros(x.shape[1]), torch.zeros(x.shape[1]), torch.ones(x.shape[1])
        w[hidden:], mean[hidden:], std[hidden:] = cw, cmean, cstd
    else:
        w, b, mean, std = _fit_logistic(
            x[tr], y[tr], epochs, choice["weight_decay"] if choice else weight_decay
        )
    scores = torch.sigmoid(((x - mean) / std) @ w + b)
    # the ladder's middle rung: the same model without the hidden state (entropy, margin, top-16 probabilities)
    cw, cb, cmean, cstd = _fit_logistic(cheap[tr], y[tr], epochs, weight_decay)
    cheap_scores = torch.sigmoid(((cheap - cmean) / cstd) @ cw + cb)
    threshold = float(torch.quantile(scores[tr].double(), 1 - target_rate))
    metrics = {
        "train_positions": int(tr.sum()),
        "validation_positions": int(va.sum()),
        "validation_problems": len(val_p),
        "label": label,
        "label_share": float(y.float().mean()),
        "kl_cutoff": kl_cutoff,
        "model_choice": choice,
    }
    if va.any():
        # recall of the label at the target rate: the share of labelled steps each trigger catches
        rungs = (
            ("learned", scores[va]),
            ("shallow", cheap_scores[va]),
            ("entropy", entropy[va]),
            ("margin", -margin[va]),
        )
        for name, s in rungs:
            metrics[name] = {
                "auroc": _auroc(s, y[va]),
                f"recall_at_{target_rate:g}": _recall_at_rate(s, y[va], target_rate),
            }
        metrics["learned"]["validation_trigger_rate"] = float((scores[va] >= threshold).float().mean())
    config = LearnedTriggerConfig(
        base_model,
        model_fingerprint(slm.model),
        threshold,
        target_rate,
        metrics,
        problem_ids=[r["problem_id"] for r in collected_records(groups_dir, need_features=False)],
        problem_digests=collection_problem_digests(groups_dir),
    )
    return LearnedTrigger(w, b, mean, std, config)
