"""Can the SLM alone tell *where* the LLM would pick another of its candidates, and *which*? (issue 26)

The selector ladder (:mod:`s2t.training.ladder`) scores selectors on *groups*: positions a
collection kept. Its figures depend on which positions were kept. The 300-problem collection kept a
position if the SLM's entropy was high *or* the two models disagreed there, so every low-entropy
group is a divergent one, and a model can learn "low entropy here, so not the top-1" from the
collection's own rule, which no inference trigger reproduces.

This module asks the question S2T-Local has to answer at inference, on *every* decoded position of
held-out training problems (a teacher-forced collection records the LLM's top-1 rank under the SLM
at each): a per-position model predicts the rank of the LLM's top-1 among the SLM's top-K (or
"outside"), and the policy overrides the SLM's top-1 with the model's best other candidate where the
model is most confident that it should (a share ``rate`` of positions, thresholded on the training
positions). What counts at an override is whether its pick is the LLM's top-1, against whether the
SLM's top-1 was. An override policy helps only where the first beats the second.

Rungs: the SLM's top-1 (never override: the baseline every figure is relative to), the entropy
heuristic (override with rank 2 where entropy is highest), gradient-boosted trees over the logit
features (scikit-learn), and a logistic probe over the hidden state and logit features
(scikit-learn; its regularisation chosen on an inner split of the training problems).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from s2t.policies.features import without_hidden
from s2t.training.ladder import problem_ratio_cis
from s2t.training.trigger import load_position_features

RATES = (0.01, 0.02, 0.05, 0.10)
PROBE_C = (1e-4, 1e-3, 1e-2, 1e-1)


def _override_scores(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From class probabilities (N, K+1) over the LLM's top-1 rank (0-based; K = outside the top-K):
    the best other candidate's rank (N,) and the override score (N,): its probability minus the
    top-1's."""
    best = 1 + probs[:, 1:k].argmax(1)
    return best, probs[np.arange(len(probs)), best] - probs[:, 0]


def _class_probs(model, x: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((len(x), k + 1))
    out[:, model.classes_] = model.predict_proba(x)
    return out


def _fit_trees(x: np.ndarray, y: np.ndarray, seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, random_state=seed).fit(x, y)


def _fit_probe(x: np.ndarray, y: np.ndarray, c: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=300)).fit(x, y)


def _choose_probe_c(x: np.ndarray, y: np.ndarray, problem: np.ndarray, k: int, seed: int) -> float:
    """The probe's inverse regularisation, by held-out log-likelihood on a fifth of the training problems."""
    ids = np.unique(problem)
    inner = np.isin(problem, np.random.default_rng(seed).permutation(ids)[: max(1, len(ids) // 5)])
    losses = {}
    for c in PROBE_C:
        p = _class_probs(_fit_probe(x[~inner], y[~inner], c), x[inner], k)
        losses[c] = -np.log(p[np.arange(inner.sum()), y[inner]].clip(1e-9)).mean()
    return min(losses, key=losses.get)


def _metrics(
    pick: np.ndarray, override: np.ndarray, y: np.ndarray, problem: np.ndarray, n_problems: int, seed: int
) -> dict:
    """Override rate, the pick's and the top-1's agreement with the LLM where it overrides, and the net
    agreements gained per 1,000 positions, each with a 95% bootstrap CI over problems."""
    ones = np.ones(len(y))
    parts = {
        "override_rate": (override, ones),
        "pick_is_llm_top1": (override & (pick == y), override),
        "top1_is_llm_top1": (override & (y == 0), override),
        "net_per_1000": (1000.0 * (override & (pick == y)) - 1000.0 * (override & (y == 0)), ones),
    }
    return problem_ratio_cis(parts, torch.as_tensor(problem), n_problems, 2000, seed)


def override_ladder(
    groups_dir: str | Path,
    held_out_ids: Sequence[str],
    k: int = 8,
    rates: Sequence[float] = RATES,
    min_step: int = 3,
    seed: int = 0,
) -> dict:
    """Each rung's override figures at each rate, on every position of the held-out problems.

    ``groups_dir`` is a teacher-forced collection that recorded the LLM's top-1 rank per position
    (``s2t collect``); ``held_out_ids`` are problem ids it holds, never fitted on. Thresholds are the
    ``1 - rate`` quantiles of each rung's scores on the *training* positions. Returns ``{"rows": [{"name",
    "rates": {rate: metrics}}], "positions": ..., "train_problems": ...}``; metrics as :func:`_metrics`.

    Raises ``ValueError`` if ``k`` is not in 2..16, a held-out id is not in the collection, or no
    training problem is left.
    """
    if not 2 <= k <= 16:
        raise ValueError(f"k must lie in 2..16 (the collection's top-16); got {k}")
    x, _, problem, entropy, _, ids, rank = load_position_features(groups_dir, min_step, with_llm_rank=True)
    missing = set(held_out_ids) - set(ids)
    if missing:
        raise ValueError(
            f"{len(missing)} held-out problems are not in {groups_dir} (e.g. {sorted(missing)[0]})"
        )
    test = torch.isin(problem, torch.tensor([ids.index(i) for i in held_out_ids])).numpy()
    if test.all():
        raise ValueError("every problem is held out: nothing is left to fit on")
    y = torch.where(rank <= k, rank - 1, torch.full_like(rank, k)).numpy()
    problem = problem.numpy()
    full, cheap = x.numpy(), without_hidden(x).numpy()
    # each rung: (pick, score) on every position; thresholds come from the training positions
    rungs: dict[str, tuple[np.ndarray, np.ndarray]] = {
        "entropy, rank 2": (np.ones(len(y), dtype=int), entropy.numpy()),
    }
    trees = _fit_trees(cheap[~test], y[~test], seed)
    rungs["trees (logit features)"] = _override_scores(_class_probs(trees, cheap, k), k)
    c = _choose_probe_c(full[~test], y[~test], problem[~test], k, seed)
    probe = _fit_probe(full[~test], y[~test], c)
    rungs[f"probe (hidden + logit, C={c:g})"] = _override_scores(_class_probs(probe, full, k), k)
    n_problems = len(ids)
    rows = []
    for name, (pick, score) in rungs.items():
        by_rate = {}
        for rate in rates:
            threshold = np.quantile(score[~test], 1 - rate)
            override = (score >= threshold) & test
            by_rate[str(rate)] = _metrics(
                pick[test], override[test], y[test], problem[test], n_problems, seed
            )
        rows.append({"name": name, "rates": by_rate})
    return {
        "groups": str(groups_dir),
        "k": k,
        "positions": int(test.sum()),
        "held_out_problems": len(held_out_ids),
        "train_problems": len(np.unique(problem[~test])),
        "llm_top1_is_slm_top1": float((y[test] == 0).mean()),
        "rows": rows,
    }


def format_override_ladder(result: dict) -> str:
    """A markdown table: per rung and rate, the pick's and the top-1's agreement where it overrides,
    and the net agreements gained per 1,000 positions (95% CIs)."""

    def cell(v: dict | None, pct: bool = True) -> str:
        if v is None:
            return "–"
        f = (lambda a: f"{a:.1%}") if pct else (lambda a: f"{a:+.1f}")
        return f"{f(v['value'])} ({f(v['low'])} to {f(v['high'])})"

    lines = [
        "| rung | override rate | its pick is the LLM's top-1 | the SLM's top-1 was | net per 1,000 positions |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        for rate, m in row["rates"].items():
            lines.append(
                f"| {row['name']} | {float(rate):.0%} ({m['override_rate']['value']:.1%} held out) | "
                f"{cell(m['pick_is_llm_top1'])} | {cell(m['top1_is_llm_top1'])} | {cell(m['net_per_1000'], False)} |"
            )
    return "\n".join(lines)
