"""The selector ladder: every selector scored on the same held-out *training* groups (issue 26).

Rungs, bottom up: the SLM's own top-1 (the trivial selector), a shallow-feature model (gradient-
boosted trees from scikit-learn over 22 cheap features of the SLM's distribution: its top-8
probabilities and log-probabilities, entropy, margin, position and two token-id hashes), then the
trained selectors (feature, head, LoRA). A learned selector is worth shipping only if it beats the
shallow model; :func:`verdict` says whether it does.

For each rung, with a 95% bootstrap CI over problems (a problem's groups are resampled together):

- ``agreement``: share of groups where it picks the LLM's preferred candidate;
- ``agreement_divergent``: the same on divergent groups (the SLM's top-1 is not the LLM's);
- ``leave_rate``: share of groups where it does not pick the SLM's top-1;
- ``precision_when_leaving``: of those, the share where its pick is the LLM's;
- ``llm_prob_of_pick``: the LLM's probability of its pick, renormalised over the K candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from s2t.stats import ratio_bootstrap_ci
from s2t.training.feature_training import GroupArrays, load_group_arrays

METRICS = ("agreement", "agreement_divergent", "leave_rate", "precision_when_leaving", "llm_prob_of_pick")


def ladder_metrics(picks: torch.Tensor, data: GroupArrays, n_resamples: int = 2000, seed: int = 0) -> dict:
    """The ladder's figures for ``picks`` (N,) candidate ranks on ``data``'s N groups, with CIs."""
    picks = picks.long()
    best = data.llm_best
    llm = data.llm_probs / data.llm_probs.sum(-1, keepdim=True).clamp_min(1e-12)
    hit = (picks == best).double()
    left = (picks != 0).double()
    parts = {
        "agreement": (hit, torch.ones_like(hit)),
        "agreement_divergent": (hit * data.divergent, data.divergent.double()),
        "leave_rate": (left, torch.ones_like(hit)),
        "precision_when_leaving": (hit * left, left),
        "llm_prob_of_pick": (llm.gather(-1, picks[:, None]).squeeze(-1).double(), torch.ones_like(hit)),
    }
    out = {"n_groups": len(picks), "n_divergent": int(data.divergent.sum())}
    return out | problem_ratio_cis(parts, data.problem, len(data.problem_ids), n_resamples, seed)


def problem_ratio_cis(
    parts: dict, problem: torch.Tensor, n_problems: int, n_resamples: int = 2000, seed: int = 0
) -> dict:
    """For each ``name: (numerators, denominators)`` over items (N,) of problems ``problem`` (N,):
    the pooled ratio with a 95% bootstrap CI over problems (``{"value", "low", "high"}``), or None
    where no problem has a denominator."""
    out = {}
    for name, (num, den) in parts.items():
        per_num = torch.zeros(n_problems, dtype=torch.float64).index_add_(
            0, problem, torch.as_tensor(num).double()
        )
        per_den = torch.zeros(n_problems, dtype=torch.float64).index_add_(
            0, problem, torch.as_tensor(den).double()
        )
        present = per_den > 0
        if not present.any():
            out[name] = None
            continue
        ci = ratio_bootstrap_ci(per_num[present].numpy(), per_den[present].numpy(), n_resamples, seed=seed)
        out[name] = {"value": ci.estimate, "low": ci.low, "high": ci.high}
    return out


def shallow_features(data: GroupArrays, k: int = 8) -> np.ndarray:
    """(N, 22) the shallow model's features (K=8): top-8 probabilities and log-probabilities,
    entropy, margin, position, and hashes of the top-1 and top-2 token ids."""
    probs = data.slm_probs[:, :k].double()
    return torch.cat(
        [
            probs,
            probs.clamp_min(1e-9).log(),
            data.entropy[:, None].double(),
            data.margin[:, None].double(),
            data.position[:, None].double(),
            (data.candidate_ids[:, :2] % 997).double(),
        ],
        -1,
    ).numpy()


def fit_shallow_model(train: GroupArrays, seed: int = 0):
    """Gradient-boosted trees (scikit-learn) predicting the rank of the LLM's preferred candidate."""
    from sklearn.dummy import DummyClassifier
    from sklearn.ensemble import HistGradientBoostingClassifier

    if len(train.llm_best.unique()) < 2:  # one class only: the trees have nothing to split
        return DummyClassifier(strategy="most_frequent").fit(shallow_features(train), train.llm_best.numpy())
    model = HistGradientBoostingClassifier(max_iter=150, learning_rate=0.05, random_state=seed)
    return model.fit(shallow_features(train), train.llm_best.numpy())


def bin_selector_picks(
    selector_dir: str | Path, groups_dir: str | Path, data: GroupArrays, k: int, slm
) -> torch.Tensor:
    """The picks (N,) of a head or LoRA selector on ``data``'s groups.

    A head selector reads the candidates' hidden states that ``s2t collect`` stored (no forward);
    a LoRA selector adapts the SLM, so its groups are scored by one packed forward per problem.
    """
    from s2t.policies.learned_selector import LocalSelector, load_adapted_slm, selector_kind
    from s2t.training.collect import collected_records
    from s2t.training.lora import packed_group_scores
    from s2t.training.packing import check_record, pack_problem

    selector = LocalSelector.from_pretrained(selector_dir, model=slm.model)
    if selector_kind(selector_dir) == "head":
        from s2t.training.train import load_groups

        stored, _ = load_groups(groups_dir)
        hidden = stored.hidden[data.index, :k].float()
        with torch.no_grad():
            return selector.selection_logits(hidden, stored.slm_probs[data.index, :k]).argmax(-1)
    model = load_adapted_slm(slm.model, selector_dir)
    records = collected_records(groups_dir, need_features=False)
    offsets = np.cumsum([0] + [len(r["groups"]) for r in records])
    wanted = set(data.problem.tolist())
    picks = torch.zeros(int(offsets[-1]), dtype=torch.long)
    with torch.no_grad():
        for i in sorted(wanted):
            record = records[i]
            check_record(record, k, str(groups_dir))
            if not record["groups"]:
                continue
            scores = packed_group_scores(model, selector, [(pack_problem(record, k), None)])[0]
            picks[offsets[i] : offsets[i + 1]] = scores.argmax(-1)
    return picks[data.index]


def selector_ladder(
    groups_dir: str | Path,
    validation_problem_ids: Sequence[str],
    k: int = 8,
    groups_at: str | None = None,
    selectors: Sequence[str | Path] = (),
    slm=None,
    seed: int = 0,
) -> dict:
    """Score the ladder on the groups of ``validation_problem_ids`` (the shallow model is fitted on
    the collection's other problems). ``selectors``: trained selector directories of any kind; a
    selector trained on any of the validation problems is refused.

    Returns ``{"k", "groups_at", "validation_problem_ids", "rows": [{"name", **ladder_metrics}]}``.
    """
    from s2t.policies.learned_selector import load_selector, selector_kind

    data = load_group_arrays(groups_dir, k, groups_at)
    held_out = set(validation_problem_ids)
    missing = held_out - set(data.problem_ids)
    if missing:
        raise ValueError(
            f"{groups_dir} holds no groups for {len(missing)} validation problems (e.g. {min(missing)})"
        )
    in_val = torch.tensor([data.problem_ids[p] in held_out for p in data.problem.tolist()], dtype=torch.bool)
    if not in_val.any():
        raise ValueError(
            f"no validation problem holds a group of {groups_dir}: nothing to score the ladder on "
            "(hold out more problems: --val-fraction; bench/selector_agreement.py also takes --hold-out-first)"
        )
    if in_val.all():
        raise ValueError(
            f"every group of {groups_dir} lies in the validation problems: nothing is left to fit the "
            "shallow model on (collect more problems, or hold out fewer)"
        )
    train, val = data.subset(~in_val), data.subset(in_val)
    rows = [{"name": "SLM top-1", **ladder_metrics(torch.zeros(len(val.problem), dtype=torch.long), val)}]
    shallow = fit_shallow_model(train, seed)
    rows.append(
        {
            "name": "shallow (boosted trees, 22 features)",
            **ladder_metrics(torch.from_numpy(shallow.predict(shallow_features(val))), val),
        }
    )
    for directory in selectors:
        kind = selector_kind(directory)
        if slm is None:
            from s2t.models import load_model
            from s2t.training.collect import collection_config

            slm = load_model(collection_config(groups_dir)["slm"])
        selector = load_selector(directory, model=slm.model)
        trained_on = held_out & set(selector.config.training.get("train_problem_ids", []))
        if trained_on:
            raise ValueError(
                f"{directory} was trained on {len(trained_on)} of the validation problems (e.g. {min(trained_on)})"
            )
        if kind == "features":
            picks = selector.group_scores(val.slm_probs, val.entropy, val.margin).argmax(-1)
        else:
            picks = bin_selector_picks(directory, groups_dir, val, k, slm)
        rows.append({"name": f"{kind} ({Path(directory).name})", **ladder_metrics(picks, val)})
    return {"k": k, "groups_at": groups_at, "validation_problem_ids": sorted(held_out), "rows": rows}


def learning_curve(
    groups_dir: str | Path,
    validation_problem_ids: Sequence[str],
    sizes: Sequence[int],
    k: int = 8,
    groups_at: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Agreement against the number of training problems, so the data size is decided by measurement.

    For each size ``n`` the shallow model and a feature selector are fitted on the first ``n`` of a
    seeded shuffle of the collection's non-validation problems (nested subsets: each size adds
    problems to the last), and scored on the same held-out groups of ``validation_problem_ids``
    with :func:`ladder_metrics`. The feature selector's epoch is chosen on 10% of its *fitting*
    problems, never on the held-out ones.

    Returns ``{"k", "groups_at", "validation_problem_ids", "points": [{"train_problems",
    "train_groups", "rows": [...]}]}``; the SLM top-1 row is the same at every size.

    Raises:
        ValueError: a size below 2 or above the number of non-validation problems.
    """
    from s2t.training.feature_training import FeatureTrainConfig, fit_feature_scorer

    data = load_group_arrays(groups_dir, k, groups_at)
    held_out = set(validation_problem_ids)
    pool = [i for i, pid in enumerate(data.problem_ids) if pid not in held_out]
    bad = [n for n in sizes if not 2 <= n <= len(pool)]
    if bad:
        raise ValueError(
            f"learning-curve sizes must lie in [2, {len(pool)}] (the non-validation problems); got {bad}"
        )
    np.random.default_rng(seed).shuffle(pool)
    in_val = torch.tensor([data.problem_ids[p] in held_out for p in data.problem.tolist()], dtype=torch.bool)
    val = data.subset(in_val)
    x, target = data.features(), data.llm_probs / data.llm_probs.sum(-1, keepdim=True).clamp_min(1e-12)
    top1 = {"name": "SLM top-1", **ladder_metrics(torch.zeros(len(val.problem), dtype=torch.long), val)}
    points = []
    for n in sorted(sizes):
        chosen = pool[:n]
        n_select = max(1, round(0.1 * n))
        fit_p, select_p = set(chosen[n_select:]), set(chosen[:n_select])
        fit = torch.tensor([p in fit_p for p in data.problem.tolist()], dtype=torch.bool)
        select = torch.tensor([p in select_p for p in data.problem.tolist()], dtype=torch.bool)
        shallow = fit_shallow_model(data.subset(fit | select), seed)
        scorer, _ = fit_feature_scorer(
            x, target, data.llm_best, fit, select, FeatureTrainConfig("", "", k), progress
        )
        with torch.no_grad():
            feature_picks = scorer(x[in_val]).argmax(-1)
        rows = [
            top1,
            {
                "name": "shallow (boosted trees, 22 features)",
                **ladder_metrics(torch.from_numpy(shallow.predict(shallow_features(val))), val),
            },
            {"name": "features", **ladder_metrics(feature_picks, val)},
        ]
        points.append({"train_problems": n, "train_groups": int((fit | select).sum()), "rows": rows})
    return {"k": k, "groups_at": groups_at, "validation_problem_ids": sorted(held_out), "points": points}


def format_learning_curve(curve: dict) -> str:
    """A markdown table: agreement (95% CI) of each rung at each training size."""
    names = [row["name"] for row in curve["points"][0]["rows"]]
    lines = ["| training problems | groups | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for point in curve["points"]:
        cells = [_cell(row["agreement"]) for row in point["rows"]]
        lines.append(f"| {point['train_problems']} | {point['train_groups']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(v: dict | None) -> str:
    return "–" if v is None else f"{v['value']:.1%} ({v['low']:.1%}–{v['high']:.1%})"


MIN_VERDICT_PROBLEMS = 10  # fewer held-out problems give bootstrap CIs (over problems) of no meaning


def verdict(ladder: dict) -> str:
    """Whether each trained rung beats the SLM's top-1 and the shallow model (by its CI or its point);
    with fewer than :data:`MIN_VERDICT_PROBLEMS` validation problems, that there are too few to tell."""
    n = len(ladder.get("validation_problem_ids", ()))
    if "validation_problem_ids" in ladder and n < MIN_VERDICT_PROBLEMS:
        return (
            f"only {n} validation problem(s): too few for a verdict (the CIs resample problems; "
            f"hold out at least {MIN_VERDICT_PROBLEMS})"
        )
    lines = []
    for row in ladder["rows"][2:]:
        parts = [_versus(row["agreement"], ladder["rows"][i]) for i in (0, 1)]
        lines.append(f"{row['name']}: {'; '.join(parts)}")
    return "\n".join(lines)


def _versus(a: dict, rung: dict) -> str:
    other = rung["agreement"]
    figures = f"{a['value']:.1%} vs {other['value']:.1%}"
    if a["low"] > other["high"]:
        return f"beats the {rung['name']} ({figures}, CIs apart)"
    if a["value"] > other["value"]:
        return f"above the {rung['name']} by its point estimate only ({figures}; CIs overlap)"
    return f"does NOT beat the {rung['name']} ({figures})"


def format_ladder(ladder: dict) -> str:
    """A markdown table of the ladder (values with 95% CIs)."""

    header = "| selector | agreement | on divergent groups | leaves the top-1 | right when it leaves | LLM prob. of pick |"
    lines = [header, "|---|---|---|---|---|---|"]
    for row in ladder["rows"]:
        lines.append("| " + " | ".join([row["name"], *(_cell(row[m]) for m in METRICS)]) + " |")
    return "\n".join(lines)
