"""Local-sufficiency report: the hit@K table (rich) and the hit@K curve with its CI band (PNG).

Both read the JSON form of :class:`s2t.analysis.AnalysisSummary` (``summary.json``), so a report
can be redrawn from a run directory without the models.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.table import Table


def _as_dict(summary) -> dict:
    return summary if isinstance(summary, dict) else summary.to_dict()


def _model_label(name: str) -> str:
    """A local path's last component; built-in names and Hub ids as they are."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return Path(name.rstrip("/")).name or name
    return name


def _percent(entry: dict) -> str:
    if entry.get("estimate") is None:
        return "-"
    return f"{entry['estimate']:.1%}"


def _interval(entry: dict) -> str:
    if entry.get("estimate") is None:
        return "-"
    return f"[{entry['low']:.1%}, {entry['high']:.1%}]"


def hitk_table(summary) -> Table:
    """hit@K with 95% CIs, the miss share, and hit@K by third of the answer."""
    s = _as_dict(summary)
    share = s["divergence_share"]
    threshold = f", KL > {s['kl_threshold']:.4g}" if s.get("kl_threshold") is not None else ""
    table = Table(
        title=(
            f"hit@K: {_model_label(s['pair']['llm'])}'s top-1 in {_model_label(s['pair']['slm'])}'s top-K\n"
            f"{s['dataset']}/{s['split']}, {s['trajectory']} trajectories, {s['n_problems']} problems, "
            f"{s['n_divergence_points']} {s['divergence']} divergence points{threshold} "
            f"({_percent(share)} of {s['n_positions']} positions, 95% CI {_interval(share)})"
        ),
        caption="95% CIs: bootstrap over problems",
    )
    table.add_column("K", justify="right")
    table.add_column("hit@K", justify="right")
    table.add_column("95% CI", justify="right")
    segments = list(s["by_position"])
    for segment in segments:
        table.add_column(f"{segment} third (n={s['by_position'][segment]['n_points']})", justify="right")
    for i, entry in enumerate(s["hit_at_k"]):
        by_segment = [_percent(s["by_position"][seg]["hit_at_k"][i]) for seg in segments]
        table.add_row(str(entry["k"]), _percent(entry), _interval(entry), *by_segment)
    miss = s["miss"]
    table.add_row(f"miss (>{miss['k_max']})", _percent(miss), _interval(miss), *([""] * len(segments)))
    return table


def plot_hitk(summary, path: str | os.PathLike) -> Path:
    """Draw hit@K (%) against K (log2 axis) with the CI band; hit@8 is annotated. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = _as_dict(summary)
    path = Path(path)
    entries = [e for e in s["hit_at_k"] if e["estimate"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    if entries:
        ks = [e["k"] for e in entries]
        ax.plot(ks, [100 * e["estimate"] for e in entries], marker="o", label="hit@K")
        ax.fill_between(
            ks,
            [100 * e["low"] for e in entries],
            [100 * e["high"] for e in entries],
            alpha=0.25,
            label="95% CI (bootstrap over problems)",
        )
        at8 = next((e for e in entries if e["k"] == 8), None)
        if at8 is not None:
            ax.annotate(
                f"hit@8 = {at8['estimate']:.1%}",
                xy=(8, 100 * at8["estimate"]),
                xytext=(12, -28) if at8["estimate"] > 0.5 else (-20, 28),
                textcoords="offset points",
                arrowprops={"arrowstyle": "->"},
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no divergence points", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(0, 102)
    ax.set_xlabel("K (SLM's top-K)")
    ax.set_ylabel("LLM's top-1 in SLM's top-K (%)")
    ax.set_title(
        f"{_model_label(s['pair']['slm'])} vs {_model_label(s['pair']['llm'])}\n{s['dataset']}/{s['split']}, {s['trajectory']} "
        f"trajectories, {s['n_divergence_points']} {s['divergence']} divergence points",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
