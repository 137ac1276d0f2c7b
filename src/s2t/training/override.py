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
from tqdm.auto import tqdm

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


def _load(groups_dir, held_out_ids: Sequence[str], k: int, min_step: int) -> dict:
    """The collection's per-position arrays, with ``test`` marking the held-out problems' positions."""
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
    return {
        "full": x.numpy(),
        "cheap": without_hidden(x).numpy(),
        "y": y,
        "problem": problem.numpy(),
        "entropy": entropy.numpy(),
        "test": test,
        "ids": ids,
    }


def _rung_rows(d: dict, fit: np.ndarray, k: int, rates: Sequence[float], seed: int) -> list[dict]:
    """Fit every rung on the positions ``fit`` (bool mask) and score its overrides on ``d["test"]``."""
    y, problem, test = d["y"], d["problem"], d["test"]
    # each rung: (pick, score) on every position; thresholds come from the fitting positions
    rungs: dict[str, tuple[np.ndarray, np.ndarray]] = {
        "entropy, rank 2": (np.ones(len(y), dtype=int), d["entropy"]),
    }
    trees = _fit_trees(d["cheap"][fit], y[fit], seed)
    rungs["trees (logit features)"] = _override_scores(_class_probs(trees, d["cheap"], k), k)
    c = _choose_probe_c(d["full"][fit], y[fit], problem[fit], k, seed)
    probe = _fit_probe(d["full"][fit], y[fit], c)
    rungs[f"probe (hidden + logit, C={c:g})"] = _override_scores(_class_probs(probe, d["full"], k), k)
    rows = []
    for name, (pick, score) in rungs.items():
        by_rate = {}
        for rate in rates:
            threshold = np.quantile(score[fit], 1 - rate)
            override = (score >= threshold) & test
            by_rate[str(rate)] = _metrics(
                pick[test], override[test], y[test], problem[test], len(d["ids"]), seed
            )
        rows.append({"name": name, "rates": by_rate})
    return rows


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
    d = _load(groups_dir, held_out_ids, k, min_step)
    test = d["test"]
    return {
        "groups": str(groups_dir),
        "k": k,
        "positions": int(test.sum()),
        "held_out_problems": len(held_out_ids),
        "train_problems": len(np.unique(d["problem"][~test])),
        "llm_top1_is_slm_top1": float((d["y"][test] == 0).mean()),
        "rows": _rung_rows(d, ~test, k, rates, seed),
    }


def override_learning_curve(
    groups_dir: str | Path,
    held_out_ids: Sequence[str],
    sizes: Sequence[int],
    k: int = 8,
    rates: Sequence[float] = RATES,
    min_step: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """The override ladder against the number of training problems, on the same held-out positions, so
    that the collection's size is decided by measurement (issue 26).

    For each size ``n`` every rung is fitted (and its thresholds set) on the first ``n`` non-held-out
    problems *in collection order*, so a point stays the same as the collection grows. Returns
    ``{"points": [{"train_problems", "train_positions", "rows"}], "positions", ...}``, rows as
    :func:`override_ladder`'s.

    Raises ``ValueError`` as :func:`override_ladder` does, or for a size outside [2, the number of
    non-held-out problems].
    """
    d = _load(groups_dir, held_out_ids, k, min_step)
    test, problem = d["test"], d["problem"]
    pool = [i for i in range(len(d["ids"])) if i not in set(np.unique(problem[test]).tolist())]
    bad = [n for n in sizes if not 2 <= n <= len(pool)]
    if bad:
        raise ValueError(
            f"learning-curve sizes must lie in [2, {len(pool)}] (the non-held-out problems); got {bad}"
        )
    points = []
    for n in tqdm(sorted(sizes), desc="override ladder", unit="size", disable=not progress):
        fit = np.isin(problem, pool[:n])
        rows = _rung_rows(d, fit, k, rates, seed)
        points.append({"train_problems": n, "train_positions": int(fit.sum()), "rows": rows})
    return {
        "groups": str(groups_dir),
        "k": k,
        "positions": int(test.sum()),
        "held_out_problems": len(held_out_ids),
        "held_out_problem_ids": list(held_out_ids),
        "llm_top1_is_slm_top1": float((d["y"][test] == 0).mean()),
        "points": points,
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


def format_override_learning_curve(curve: dict, rates: Sequence[str] = ("0.01", "0.02", "0.05")) -> str:
    """A markdown table: per rung and number of training problems, the net agreements gained per
    1,000 held-out positions at each override rate (95% CIs)."""
    head = " | ".join(f"net per 1,000 at {float(r):.0%}" for r in rates)
    lines = [f"| rung | training problems (positions) | {head} |", "|---|---|" + "---|" * len(rates)]
    for i in range(len(curve["points"][0]["rows"])):
        for point in curve["points"]:
            row = point["rows"][i]
            cells = []
            for r in rates:
                v = row["rates"].get(r, {}).get("net_per_1000")
                cells.append("–" if v is None else f"{v['value']:+.1f} ({v['low']:+.1f} to {v['high']:+.1f})")
            lines.append(
                f"| {row['name']} | {point['train_problems']} ({point['train_positions']:,}) | {' | '.join(cells)} |"
            )
    return "\n".join(lines)
