"""Evaluation report: per-method accuracy with CIs, paired tests, costs; JSON, Markdown and a plot.

Everything is computed from a run directory's ``config.json`` and ``results.jsonl``, so a
report can be regenerated at any time, also while a run is still going.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from s2t.methods import method_needs_llm
from s2t.models import LEGACY_DECODING, batch_invariant
from s2t.reporting.frontier import (
    GAP_TARGETS,
    cheapest_reaching,
    frontier_markdown,
    frontier_rows,
    greedy_to_llm_gap,
    plot_frontier,
)
from s2t.runs import read_jsonl, write_json_atomic
from s2t.stats import bootstrap_ci, mcnemar_exact

MAJ = re.compile(r"^maj@\d+$")


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


# Table order: the baselines, then the methods they are compared with (a run may gain methods
# over several invocations, so the configured list is not a reliable order).
METHOD_ORDER = ("greedy", "maj@", "llm", "s2t", "takeover", "random-select", "s2t-local")


def method_rank(name: str) -> tuple[int, str]:
    for i, prefix in enumerate(METHOD_ORDER):
        if (
            name == prefix
            or (prefix.endswith("@") and name.startswith(prefix))
            or name.startswith((f"{prefix}:", f"{prefix}/"))
        ):
            return i, name
    return len(METHOD_ORDER), name


def summarize(records: list[dict], methods: list[str] | None = None, seed: int = 0) -> dict:
    """Per-method accuracy (95% bootstrap CI), McNemar p-values vs greedy and vs maj@k, and costs.

    ``methods`` is accepted for compatibility; every method with records is summarised, in
    :data:`METHOD_ORDER`."""
    by_method: dict[str, dict[str, dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], {})[r["problem_id"]] = r
    order = sorted(by_method, key=method_rank)
    maj = next((m for m in order if MAJ.match(m)), None)
    greedy = by_method.get("greedy", {})

    summary = {}
    for m in order:
        recs = by_method[m]
        correct = [bool(r["correct"]) for r in recs.values()]
        ci = bootstrap_ci(correct, seed=seed)
        costs = [r["cost"] for r in recs.values()]
        tokens = sum(c["generated_tokens"] for c in costs)
        entry = {
            "n": len(recs),
            "correct": sum(correct),
            "accuracy": ci.estimate,
            "ci_low": ci.low,
            "ci_high": ci.high,
            "mean_generated_tokens": _mean(c["generated_tokens"] for c in costs),
            "mean_slm_forward_tokens": _mean(c["slm_forward_tokens"] for c in costs),
            "mean_llm_forward_tokens": _mean(c["llm_forward_tokens"] for c in costs),
            "mean_llm_forward_calls": _mean(c["llm_forward_calls"] for c in costs),
            "trigger_rate": sum(c["triggers"] for c in costs) / tokens if tokens else 0.0,
            "override_rate": sum(c["overrides"] for c in costs) / tokens if tokens else 0.0,
            "mean_wall_time_s": _mean(c["wall_time_s"] for c in costs),
            # generations that hit --max-new-tokens: graded on what they hold (as lm-eval does)
            "cut_off_rate": _mean(f == "length" for r in recs.values() for f in _finish_reasons(r)),
            # records name the process that decoded them (older versions' records name none)
            "invocations": len({r.get("invocation") for r in recs.values()}),
            "batch_sizes": sorted({r["batch_size"] for r in recs.values() if "batch_size" in r}),
        }
        # on the problems both finished: a method part-way through a run is timed on its own problems
        timed = sorted(set(recs) & set(greedy))  # sorted: a sum in one order, the same figure on every run
        greedy_time = sum(greedy[i]["cost"]["wall_time_s"] for i in timed)
        own_time = sum(recs[i]["cost"]["wall_time_s"] for i in timed)
        entry["time_ratio_vs_greedy"] = own_time / greedy_time if greedy_time else None
        entry["n_timed_vs_greedy"] = len(timed)
        if MAJ.match(m):
            passed = [bool(r["pass_at_k"]) for r in recs.values()]
            p_ci = bootstrap_ci(passed, seed=seed)
            entry["pass_at_k"] = {"accuracy": p_ci.estimate, "ci_low": p_ci.low, "ci_high": p_ci.high}
        for label, other in (("greedy", "greedy"), ("maj", maj), ("llm", "llm")):
            if other is None or other == m or other not in by_method:
                continue
            common = sorted(set(recs) & set(by_method[other]))
            if not common:
                continue
            test = mcnemar_exact(
                [recs[i]["correct"] for i in common], [by_method[other][i]["correct"] for i in common]
            )
            entry[f"vs_{label}"] = {
                "method": other,
                "n_paired": len(common),
                "accuracy_diff": _mean(recs[i]["correct"] for i in common)
                - _mean(by_method[other][i]["correct"] for i in common),
                "only_this_correct": test.n10,
                "only_other_correct": test.n01,
                "p_value": test.p_value,
            }
        summary[m] = entry
    return summary


def _fmt_p(entry: dict, key: str) -> str:
    return f"{entry[key]['p_value']:.3g}" if key in entry else "–"


def _finish_reasons(record: dict) -> list[str]:
    """A record's finish reasons: one per generation (maj@k records list their k samples')."""
    reasons = record.get("finish_reason")
    return list(reasons) if isinstance(reasons, list) else [reasons]


def markdown_table(summary: dict) -> str:
    lines = [
        "| method | accuracy (95% CI) | n | p vs greedy | p vs maj@k | gen. tokens | LLM tokens | LLM calls"
        " | trigger rate | overrides | cut off | time / problem (s) | time vs greedy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, e in summary.items():
        ratio = e.get("time_ratio_vs_greedy")
        ratio = f"{ratio:.2f}×" if ratio and ratio == ratio else "–"  # none (or NaN) without a greedy row
        lines.append(
            f"| {m} | {e['accuracy']:.1%} ({e['ci_low']:.1%}–{e['ci_high']:.1%}) | {e['n']} | {_fmt_p(e, 'vs_greedy')}"
            f" | {_fmt_p(e, 'vs_maj')} | {e['mean_generated_tokens']:.0f} | {e['mean_llm_forward_tokens']:.0f}"
            f" | {e['mean_llm_forward_calls']:.1f} | {e['trigger_rate']:.1%} | {e.get('override_rate', 0.0):.1%}"
            f" | {e.get('cut_off_rate', 0.0):.0%} | {e['mean_wall_time_s']:.3g} | {ratio} |"
        )
    extra = [
        f"- {m}: pass@k (any of k samples correct; *not* comparable to accuracy) = "
        f"{e['pass_at_k']['accuracy']:.1%} ({e['pass_at_k']['ci_low']:.1%}–{e['pass_at_k']['ci_high']:.1%})"
        for m, e in summary.items()
        if "pass_at_k" in e
    ]
    notes = [
        "",
        "p-values: exact McNemar test on the problems both methods finished. Costs are per problem, as if "
        "decoded alone; maj@k costs add up its k samples. LLM tokens: tokens the LLM had to read. "
        "Trigger rate and overrides: shares of generated tokens where the trigger fired, and where the "
        "selector then chose another token than the SLM's top-1. Cut off: generations (maj@k: samples) "
        "that reached the token budget; their answers are graded on what they hold. Time vs greedy: "
        "wall time summed over the problems both finished, against greedy's.",
    ]
    finished = {m: e["n"] for m, e in summary.items()}
    if len(set(finished.values())) > 1:
        notes.append(
            "\n**Not every method has finished the same problems** ("
            + ", ".join(f"{m} {n}" for m, n in finished.items())
            + "): each accuracy is over its method's own problems, so rows with fewer are not yet "
            "comparable; p-values and time vs greedy pair the problems both finished."
        )
    return "\n".join(lines + ([""] + extra if extra else []) + notes) + "\n"


def plot_accuracy_vs_cost(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for m, e in summary.items():
        x = e["mean_wall_time_s"]
        ax.errorbar(
            x,
            e["accuracy"] * 100,
            yerr=[[100 * (e["accuracy"] - e["ci_low"])], [100 * (e["ci_high"] - e["accuracy"])]],
            fmt="o",
            capsize=4,
            label=m,
        )
    ax.set_xscale("log")
    ax.set_xlabel("wall time per problem (s, log scale)")
    ax.set_ylabel("accuracy (%)  [95% bootstrap CI]")
    ax.grid(alpha=0.3)
    # A legend, not labels beside the points: methods of similar cost (greedy, s2t-local) sit on top of each other.
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def precision_line(config: dict) -> str:
    """The backend and the weights' precision a run decoded with, as ``config.json`` records them."""
    backend = config.get("backend") or LEGACY_DECODING["backend"]
    if backend == "llama.cpp":
        return "Backend: llama.cpp, on the GGUF files' own weight types (Q4_K_M for the built-in models)."
    dtype = config.get("dtype") or LEGACY_DECODING["dtype"]
    llm_dtype = config.get("llm_dtype")
    llm = f" (LLM {llm_dtype})" if llm_dtype and llm_dtype != dtype else ""
    return f"Backend: {backend}, {dtype}{llm}."


def resumption_note(summary: dict, config: dict) -> str | None:
    """A line naming the methods whose records come from more than one invocation (resumed or
    sharded), with what that means for this run's dtype and backend (None if there are none)."""
    resumed = {m: e["invocations"] for m, e in summary.items() if e.get("invocations", 1) > 1}
    if not resumed:
        return None
    listed = ", ".join(f"{m} ({n})" for m, n in resumed.items())
    meaning = (
        "float32 on torch is batch-invariant, so the records are those of one uninterrupted run"
        if batch_invariant(config.get("backend"), config.get("dtype"), config.get("llm_dtype"))
        else f"in {config.get('dtype')} on {config.get('backend')} a problem's tokens depend on its batch, "
        "so these records may differ from one uninterrupted run's (README: Reproducibility)"
    )
    return f"Resumed or sharded (invocations): {listed}; {meaning}."


def selector_note(records: list[dict], config: dict) -> str | None:
    """A line naming what of a trained selector made each row that read one (S2T-Local's weights
    digest, ``trigger:`` a learned trigger's, as each record stores them, and the directory
    ``config.json`` names), None without such records."""
    digests: dict[str, set] = {}
    for r in records:
        if r.get("selector") is not None:
            digests.setdefault(r["method"], set()).add(r["selector"])
    if not digests:
        return None
    directories = config.get("selectors") or {}  # per method (runs before it name one, the latest)

    def row(method: str, found: set) -> str:
        where = f" ({directories[method]})" if method in directories else ""
        return f"{method}: {', '.join(sorted(found))}{where}"

    rows = "; ".join(row(m, d) for m, d in sorted(digests.items()))
    one = len(set().union(*digests.values())) == 1
    where = f" ({config.get('selector')})" if one and config.get("selector") and not directories else ""
    return f"Selector digests (S2T-Local weights; trigger: the learned trigger's){where}: {rows}."


RECORD_KEYS = ("method", "problem_id", "correct", "cost")  # what every eval record holds


def check_records(records: list, path: Path) -> None:
    """Refuse records a report cannot read (a results file edited by hand, or another tool's).

    Raises:
        ValueError: naming the first such record (its place among the file's records) and what it lacks.
    """
    for number, record in enumerate(records, 1):
        missing = (
            [k for k in RECORD_KEYS if k not in record] if isinstance(record, dict) else list(RECORD_KEYS)
        )
        if not missing and not isinstance(record["cost"], dict):
            missing = ["cost (an object)"]
        if missing:
            raise ValueError(
                f"{path}: record {number} lacks {', '.join(missing)}: not a record of `s2t eval` "
                "(edited by hand?); remove or repair it, then run `s2t report` again"
            )


def write_report(run_dir: str | Path) -> dict:
    """Recompute ``summary.json``, ``report.md`` and ``accuracy_vs_cost.png`` from a run directory.

    Raises:
        ValueError: a results record the report cannot read (:func:`check_records`).
    """
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    records = list(read_jsonl(run_dir / "results.jsonl"))
    check_records(records, run_dir / "results.jsonl")
    summary = summarize(records, config.get("methods"), seed=config.get("seed", 0))
    calibration = run_dir / "calibration.json"
    calibrated = json.loads(calibration.read_text()) if calibration.is_file() else None
    frontier = frontier_rows(records, summary, config, calibrated, seed=config.get("seed", 0))
    gap = greedy_to_llm_gap(summary)
    payload = {
        "config": config,
        "calibration": calibrated,
        "methods": summary,
        # no cheapest setting when the LLM alone does not beat greedy: there is no gap to recover
        "frontier": {
            "rows": frontier,
            "greedy_to_llm_gap": gap,
            "cheapest": [cheapest_reaching(frontier, t) for t in GAP_TARGETS] if gap and gap > 0 else [],
        }
        if frontier
        else None,
    }
    trigger = config.get("trigger") or "entropy"
    llm_loaded = any(method_needs_llm(m, trigger) for m in summary)
    llm = f", {config.get('llm')} (LLM)" if llm_loaded else " (no method of this run loads the LLM)"
    header = (
        f"# {config.get('dataset')} {config.get('split')}: {config.get('slm')} (SLM){llm}\n\n"
        f"{precision_line(config)}\n\n"
    )
    frontier_text = "\n" + frontier_markdown(frontier, summary) if frontier else ""
    note = resumption_note(summary, config)
    payload["resumed"] = note
    payload["selector"] = selector_note(records, config)
    payload["not_started"] = [m for m in config.get("methods") or [] if m not in summary]
    started = "Asked for, without a result yet: " + ", ".join(payload["not_started"]) + "."
    write_json_atomic(run_dir / "summary.json", payload)
    lines = (note, payload["selector"], started if payload["not_started"] else None)
    resumed_text = "".join(f"\n{line}\n" for line in lines if line)
    (run_dir / "report.md").write_text(header + markdown_table(summary) + resumed_text + frontier_text)
    if summary:
        plot_accuracy_vs_cost(summary, run_dir / "accuracy_vs_cost.png")
    if frontier:
        plot_frontier(frontier, summary, run_dir / "frontier.png")
    return payload
