"""The accuracy–cost frontier of a sweep: how accuracy grows with the share of steps at which the LLM is consulted.

Every method with a trigger (``s2t``, ``takeover``, ``random-select``, ``s2t-local``, with or
without a setting in its name, see :mod:`s2t.methods`) is a point; the SLM alone (greedy), the
LLM alone and maj@k are the reference points. Per setting: the trigger rate, accuracy with its
CI, McNemar p-values against greedy and against the LLM, and the share of the greedy→LLM gap it
recovers with a paired bootstrap CI. Everything is computed from the run's records, so it can be
redrawn at any time (also while a sweep is still running).

Gap recovered is defined only when the LLM alone beats greedy on the problems both finished; with a
gap of zero or less the rows carry no gap figures and no setting is named the cheapest. Controls
(``takeover``, ``random-select``) are points on the plot and rows in the table, never the cheapest
setting: they measure what the LLM's choice among the candidates is worth, not a way to deploy.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from s2t.methods import (
    DEFAULT_K,
    UNCALIBRATED_TRIGGERS,
    TriggerSetting,
    split_label,
    split_method_name,
)
from s2t.stats import gap_recovered_ci, mcnemar_exact

REFERENCE_METHODS = ("greedy", "llm")
GAP_TARGETS = (0.5, 0.8)
# Selectors that are controls (README: "The method in one screen"), not candidates for deployment.
CONTROL_SELECTORS = ("takeover", "random-select")


def greedy_to_llm_gap(summary: dict) -> float | None:
    """The LLM alone's accuracy minus greedy's, on the problems both finished (None without both)."""
    paired = summary.get("llm", {}).get("vs_greedy")
    return paired["accuracy_diff"] if paired else None


def is_control(selector: str) -> bool:
    """Whether a frontier row's selector family (``takeover``, ``takeover:L``, ...) is a control."""
    return split_label(selector)[0] in CONTROL_SELECTORS


def _setting_label(method: str, config: dict) -> tuple[str, str] | None:
    """(selector family, trigger setting) of a method that consults a trigger, else None.

    A plain name (``s2t``) uses the run's own trigger configuration (``entropy@0.95``); the label is
    the canonical spelling of the setting the method ran at, so that ``s2t`` under ``--trigger
    learned`` and ``s2t/learned`` read alike, and K (when not the default) is named either way.
    """
    base, setting = split_method_name(method)
    if base in ("greedy", "llm") or base.startswith("maj@"):
        return None
    if setting is None:
        trigger = config.get("trigger") or "entropy"
        threshold = config.get("threshold")
        untuned = threshold is not None or trigger in UNCALIBRATED_TRIGGERS
        setting = TriggerSetting(
            trigger, threshold=threshold, quantile=None if untuned else config.get("quantile")
        )
    k = setting.k if setting.k is not None else config.get("k")
    return base, replace(setting, k=k if k not in (None, DEFAULT_K) else None).label


def frontier_rows(
    records: list[dict], summary: dict, config: dict, calibration: dict | None = None, seed: int = 0
) -> list[dict]:
    """One row per trigger setting that has records, cheapest (fewest LLM tokens) first.

    ``calibration`` (the run's ``calibration.json``) gives the threshold of plain-named methods,
    whose records predate per-record settings.

    Needs greedy and the LLM alone in the run; without them there is no gap to measure and the
    result is empty. Paired statistics use the problems all of (method, greedy, LLM) finished. Gap
    recovered is given only when the LLM alone beats greedy (:func:`greedy_to_llm_gap` > 0) overall
    and on the row's own paired problems.
    """
    by_method: dict[str, dict[str, bool]] = {}
    thresholds: dict[str, float] = {}
    for r in records:
        by_method.setdefault(r["method"], {})[r["problem_id"]] = bool(r["correct"])
        if r.get("setting", {}).get("threshold") is not None:
            thresholds[r["method"]] = r["setting"]["threshold"]
    if not all(m in by_method for m in REFERENCE_METHODS):
        return []
    gap_positive = (greedy_to_llm_gap(summary) or 0.0) > 0
    rows = []
    for method, entry in summary.items():
        label = _setting_label(method, config)
        if label is None:
            continue
        common = sorted(set(by_method[method]) & set(by_method["greedy"]) & set(by_method["llm"]))
        if not common:
            continue
        this = [by_method[method][p] for p in common]
        greedy = [by_method["greedy"][p] for p in common]
        llm = [by_method["llm"][p] for p in common]
        row = {
            "method": method,
            "selector": label[0],
            "setting": label[1],
            "threshold": thresholds.get(method, _calibrated(label[1], calibration)),
            "n": entry["n"],
            "n_paired": len(common),
            "trigger_rate": entry["trigger_rate"],
            "accuracy": entry["accuracy"],
            "ci_low": entry["ci_low"],
            "ci_high": entry["ci_high"],
            "mean_llm_forward_tokens": entry["mean_llm_forward_tokens"],
            "mean_llm_forward_calls": entry["mean_llm_forward_calls"],
            "mean_wall_time_s": entry["mean_wall_time_s"],
            "p_vs_greedy": mcnemar_exact(this, greedy).p_value,
            "p_vs_llm": mcnemar_exact(this, llm).p_value,
        }
        if gap_positive and sum(llm) > sum(greedy):
            gap = gap_recovered_ci(this, greedy, llm, seed=seed)
            row |= {"gap_recovered": gap.estimate, "gap_ci_low": gap.low, "gap_ci_high": gap.high}
        rows.append(row)
    rows.sort(key=lambda r: (r["mean_llm_forward_tokens"], r["method"]))
    _pair_selectors(rows, by_method)
    return rows


def _calibrated(setting: str, calibration: dict | None) -> float | None:
    if "=" in setting:
        return float(setting.split("=")[1].split("/")[0])
    entry = (calibration or {}).get(setting.split("/")[0])
    return entry["threshold"] if entry else None


def _pair_selectors(rows: list[dict], by_method: dict[str, dict[str, bool]]) -> None:
    """S2T against Takeover at the same trigger setting: McNemar p on the problems both finished."""
    by_setting = {(r["selector"], r["setting"]): r for r in rows}
    for (selector, setting), row in by_setting.items():
        method, label = split_label(selector)  # s2t:hidden is paired with takeover:hidden
        takeover = "takeover" + (f":{label}" if label else "")
        other = by_setting.get((takeover, setting)) if method == "s2t" else None
        if other is None:
            continue
        common = sorted(set(by_method[row["method"]]) & set(by_method[other["method"]]))
        if common:
            test = mcnemar_exact(
                [by_method[row["method"]][p] for p in common], [by_method[other["method"]][p] for p in common]
            )
            row["vs_takeover"] = {
                "method": other["method"],
                "n_paired": len(common),
                "only_s2t": test.n10,
                "only_takeover": test.n01,
                "p_value": test.p_value,
            }


def cheapest_reaching(rows: list[dict], target: float) -> dict:
    """The cheapest complete setting whose gap recovered reaches ``target``: by its point estimate,
    and (stricter) by its CI's lower bound. Only settings on every paired problem count, and never a
    control (:data:`CONTROL_SELECTORS`); rows without gap figures (no positive gap) never count."""
    most = max((x["n_paired"] for x in rows), default=0)
    full = [
        r for r in rows if "gap_recovered" in r and r["n_paired"] == most and not is_control(r["selector"])
    ]
    estimate = next((r["method"] for r in full if r["gap_recovered"] >= target), None)
    lower_bound = next((r["method"] for r in full if r["gap_ci_low"] >= target), None)
    return {"target": target, "by_estimate": estimate, "by_ci_low": lower_bound}


def frontier_markdown(rows: list[dict], summary: dict) -> str:
    """The frontier table and the cheapest settings reaching each gap target, as Markdown."""
    if not rows:
        return ""
    g, llm = summary["greedy"], summary["llm"]
    gap = greedy_to_llm_gap(summary)
    positive = gap is not None and gap > 0
    if positive:
        definition = "Gap recovered: (accuracy − greedy) / (LLM − greedy), with a paired bootstrap 95% CI over problems."
    else:
        paired = f" ({100 * gap:+.1f} points on the problems both finished)" if gap is not None else ""
        definition = (
            f"The greedy→LLM gap is not positive{paired}: the LLM alone does not beat greedy here, so no "
            "gap recovered is given and no setting is named the cheapest."
        )
    lines = [
        "## Accuracy–cost frontier",
        "",
        f"Reference points: greedy {g['accuracy']:.1%}, LLM alone {llm['accuracy']:.1%} "
        f"({llm['mean_llm_forward_tokens']:.0f} LLM tokens read per problem). {definition}",
        "",
        "| method | trigger setting (threshold) | trigger rate | accuracy (95% CI) | n | gap recovered (95% CI) "
        "| p vs greedy | p vs LLM | LLM tokens / problem | LLM calls | time / problem (s) | S2T vs Takeover |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = (
            f"{r['gap_recovered']:.0%} ({r['gap_ci_low']:.0%} to {r['gap_ci_high']:.0%})"
            if "gap_recovered" in r
            else "–"
        )
        pair = r.get("vs_takeover")
        versus = f"{pair['only_s2t']}:{pair['only_takeover']}, p={pair['p_value']:.2g}" if pair else "–"
        threshold = f" ({r['threshold']:.4g})" if r.get("threshold") is not None else ""
        lines.append(
            f"| {r['method']} | {r['setting']}{threshold} | {r['trigger_rate']:.1%} | {r['accuracy']:.1%} ({r['ci_low']:.1%}–{r['ci_high']:.1%})"
            f" | {r['n']} | {gap} | {r['p_vs_greedy']:.2g} | {r['p_vs_llm']:.2g} | {r['mean_llm_forward_tokens']:.0f}"
            f" | {r['mean_llm_forward_calls']:.1f} | {r['mean_wall_time_s']:.1f} | {versus} |"
        )
    lines.append("")
    for target in GAP_TARGETS if positive else ():
        found = cheapest_reaching(rows, target)
        estimate = found["by_estimate"] or "none"
        strict = found["by_ci_low"] or "none"
        lines.append(
            f"- Cheapest setting recovering ≥ {target:.0%} of the gap: {estimate} (point estimate); "
            f"{strict} (whole 95% CI at or above {target:.0%}); controls ({', '.join(CONTROL_SELECTORS)}) "
            "are not candidates."
        )
    lines.append(
        "- S2T vs Takeover: problems only S2T / only Takeover solved at the same setting, exact McNemar p."
    )
    return "\n".join(lines) + "\n"


def plot_frontier(rows: list[dict], summary: dict, path: Path) -> Path:
    """Accuracy (95% CI) against LLM forward calls, LLM tokens read and wall time, per problem.

    The LLM catches up on every token since its last call, so the tokens it reads grow only with the
    position of its last call; its forward calls grow with the trigger rate.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.8), sharey=True)
    families = sorted({(r["selector"], r["setting"].split("@")[0].split("=")[0].split("/")[0]) for r in rows})
    markers = {"s2t": "o", "takeover": "s", "random-select": "^"}
    for ax, key, label in (
        (axes[0], "mean_llm_forward_calls", "LLM forward calls per problem"),
        (axes[1], "mean_llm_forward_tokens", "LLM tokens read per problem"),
        (axes[2], "mean_wall_time_s", "wall time per problem (s)"),
    ):
        for selector, trigger in families:
            points = [r for r in rows if r["selector"] == selector and r["setting"].startswith(trigger)]
            points.sort(key=lambda r: r[key])
            ax.errorbar(
                [r[key] for r in points],
                [100 * r["accuracy"] for r in points],
                yerr=[
                    [100 * (r["accuracy"] - r["ci_low"]) for r in points],
                    [100 * (r["ci_high"] - r["accuracy"]) for r in points],
                ],
                fmt=f"{markers.get(split_label(selector)[0], 'D')}-",
                capsize=3,
                alpha=0.85,
                label=f"{selector}, {trigger} trigger",
            )
            for r in points:
                ax.annotate(
                    f"{r['trigger_rate']:.0%}",
                    (r[key], 100 * r["accuracy"]),
                    fontsize=7,
                    xytext=(4, -10),
                    textcoords="offset points",
                )
        for name, color in (("greedy", "k"), ("llm", "g")):
            entry = summary[name]
            ax.axhline(100 * entry["accuracy"], color=color, ls="--", lw=1)
            ax.plot(entry[key], 100 * entry["accuracy"], "*", color=color, ms=11, label=f"{name} alone")
        maj = next((m for m in summary if m.startswith("maj@")), None)
        if maj:
            ax.axhline(100 * summary[maj]["accuracy"], color="tab:purple", ls=":", lw=1, label=maj)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[2].set_xscale("log")
    axes[0].set_ylabel("accuracy (%)  [95% bootstrap CI]")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(len(labels), 5), frameon=False)
    fig.suptitle("S2T accuracy–cost frontier (point labels: trigger rate)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
