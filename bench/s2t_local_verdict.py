"""Issue 26's verdict on S2T-Local, from the committed artefacts, in one table and one sentence.

    python bench/s2t_local_verdict.py \\
        --run results/eval-gsm8k-test-300-llamacpp \\
        --ladder results/bench/selector_ladder-1000-e08.json \\
        --trigger results/selector-features-gsm8k-train-1000-e08 \\
        --cost results/s2t-local-cost-gsm8k-train-8-llamacpp-b1 \\
        --out results/bench/s2t_local_verdict.json

The goal: S2T-Local at least as accurate as maj@8 (point estimates, on the same problems) at no more
than 1.15x greedy's time per generated token, measured on a quiet machine (``--cost``: the verdict run
itself shares its machine with other lanes, so its times are contended), with no LLM loaded. Where it
is missed, the failing link is named in this order:

1. the ceiling: S2T at the same trigger, where the LLM chooses, is below maj@8: no selector can close it;
2. the selector: on the held-out training groups at the trigger's points (``--ladder``), no learned
   selector beats the SLM's top-1 (its agreement's 95% CI reaches the top-1's point estimate);
3. the trigger: the learned trigger's validation AUROC is not above entropy's (``--trigger``).

Rows that have not finished every problem are shown with their count, and no verdict is given until
greedy, maj@8, S2T at the trigger and an S2T-Local row have all finished the same problems.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from s2t.reporting.eval_report import summarize
from s2t.runs import read_jsonl, write_json_atomic
from s2t.stats import mcnemar_exact

TIME_GOAL = 1.15  # S2T-Local's time per generated token, relative to greedy's (quiet benchmark)
MAJORITY = "maj@8"
CEILING = "s2t/entropy@0.8"
LOCAL_PREFIX = "s2t-local"


def per_token_time_ratios(records: list[dict]) -> dict[str, float]:
    """Each method's wall time per generated token over greedy's, on the problems both finished
    (methods of one run; a method part-way through it is timed on its own problems)."""
    by_method: dict[str, dict[str, dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], {})[r["problem_id"]] = r["cost"]
    greedy = by_method.get("greedy", {})
    ratios = {}
    for method, costs in by_method.items():
        common = sorted(costs.keys() & greedy.keys())  # one summation order, one figure
        mine = [sum(costs[i][key] for i in common) for key in ("wall_time_s", "generated_tokens")]
        base = [sum(greedy[i][key] for i in common) for key in ("wall_time_s", "generated_tokens")]
        if all(mine) and all(base):
            ratios[method] = (mine[0] / mine[1]) / (base[0] / base[1])
    return ratios


def best_learned_selector(ladder: dict) -> tuple[dict, dict] | None:
    """The ladder's SLM top-1 row and its best trained selector's row (by agreement), or None."""
    rows = {r["name"]: r for r in ladder.get("rows", [])}
    top1 = rows.get("SLM top-1")
    learned = [r for name, r in rows.items() if name != "SLM top-1" and not name.startswith("shallow")]
    if top1 is None or not learned:
        return None
    return top1, max(learned, key=lambda r: r["agreement"]["value"])


def verdict(
    summary: dict,
    n_problems: int,
    ladder: dict | None = None,
    trigger_metrics: dict | None = None,
    cost_ratios: dict | None = None,
) -> dict:
    """The goal's two halves and, where it is missed, the failing link (see the module docstring).

    Args:
        summary: :func:`s2t.reporting.eval_report.summarize` of the verdict run.
        n_problems: how many problems every compared row must have finished.
        ladder: the selector ladder at the trigger's points (``selector_agreement.py``'s JSON).
        trigger_metrics: a learned trigger's ``metrics`` (``trigger_config.json``): AUROC per rung.
        cost_ratios: :func:`per_token_time_ratios` of the quiet cost benchmark.

    Returns:
        ``{"complete", "rows", "goal_met", "failing_link", "sentence"}``; ``goal_met`` and
        ``failing_link`` are None while the run is incomplete.
    """
    local = sorted(m for m in summary if m.split(":")[0].split("/")[0] == LOCAL_PREFIX)
    needed = ["greedy", MAJORITY, CEILING, *local]
    unfinished = [
        f"{m} ({summary[m]['n']}/{n_problems})"
        for m in needed
        if summary.get(m, {"n": 0})["n"] < n_problems and m in summary
    ]
    absent = [m for m in needed if m not in summary] + ([] if local else ["any s2t-local row"])
    complete = not unfinished and not absent
    result: dict = {"complete": complete, "n_problems": n_problems, "goal_met": None, "failing_link": None}
    if not complete:
        parts = ([f"unfinished: {', '.join(unfinished)}"] if unfinished else []) + (
            [f"absent from the run: {', '.join(absent)}"] if absent else []
        )
        result["sentence"] = (
            f"No verdict yet (every compared row needs {n_problems} problems): " + "; ".join(parts) + "."
        )
        return result
    maj = summary[MAJORITY]["accuracy"]
    best = max(local, key=lambda m: summary[m]["accuracy"])
    ratios = cost_ratios or {}
    quiet = {m: ratios[m] for m in ratios if m.startswith(LOCAL_PREFIX)}
    accuracy_met = summary[best]["accuracy"] >= maj
    cost_met = bool(quiet) and max(quiet.values()) <= TIME_GOAL
    result |= {
        "best_s2t_local": best,
        "accuracy_met": accuracy_met,
        "cost_met": cost_met,
        "quiet_time_per_token_vs_greedy": quiet,
    }
    result["goal_met"] = accuracy_met and cost_met
    if result["goal_met"]:
        result["sentence"] = (
            f"Goal met: {best} gets {summary[best]['accuracy']:.1%} against maj@8's {maj:.1%}, at "
            f"{max(quiet.values()):.2f}x greedy's time per token, with no LLM loaded."
        )
        return result
    links = []  # the accuracy's links, where it is missed, then the cost's
    if not accuracy_met and summary[CEILING]["accuracy"] < maj:
        links.append(
            f"the ceiling: S2T at the same trigger gets {summary[CEILING]['accuracy']:.1%}, below maj@8's {maj:.1%}"
        )
    pair = None if accuracy_met else best_learned_selector(ladder or {})
    if pair is not None:
        top1, learned = pair
        if learned["agreement"]["low"] <= top1["agreement"]["value"]:
            links.append(
                f"the selector's agreement at the trigger's points: {learned['name']} "
                f"{learned['agreement']['value']:.1%} ({learned['agreement']['low']:.1%}–"
                f"{learned['agreement']['high']:.1%}) against the SLM top-1's {top1['agreement']['value']:.1%}"
            )
    auroc = {name: (trigger_metrics or {}).get(name, {}).get("auroc") for name in ("learned", "entropy")}
    if not accuracy_met and None not in auroc.values() and auroc["learned"] <= auroc["entropy"]:
        links.append(
            f"the learned trigger's AUROC: {auroc['learned']:.3f}, not above entropy's {auroc['entropy']:.3f}"
        )
    if not cost_met:
        links.append(
            "the cost: "
            + (
                f"{max(quiet.values()):.2f}x greedy's time per token (goal {TIME_GOAL}x)"
                if quiet
                else "no quiet cost benchmark given"
            )
        )
    result["failing_link"] = (
        links[0] if links else "none of the measured links (the selector beats the top-1)"
    )
    result["all_failing_links"] = links
    result["sentence"] = (
        f"Goal missed: the best S2T-Local row, {best}, gets {summary[best]['accuracy']:.1%} against maj@8's "
        f"{maj:.1%}; the failing link is {result['failing_link']}."
    )
    return result


def p_values_vs(records: list[dict], other: str) -> dict[str, float]:
    """Each method's exact McNemar p against ``other`` on the problems both finished (the run's
    summary pairs with its *first* maj@k, which need not be maj@8)."""
    by_method: dict[str, dict[str, bool]] = {}
    for r in records:
        by_method.setdefault(r["method"], {})[r["problem_id"]] = bool(r["correct"])
    theirs = by_method.get(other, {})
    p_values = {}
    for method, mine in by_method.items():
        common = sorted(set(mine) & set(theirs))
        if method != other and common:
            p_values[method] = mcnemar_exact([mine[i] for i in common], [theirs[i] for i in common]).p_value
    return p_values


def markdown(
    summary: dict, result: dict, cost_ratios: dict, p_vs_majority: dict[str, float], ratios: dict[str, float]
) -> str:
    """The verdict run's rows (times from the run itself are contended; the quiet ones follow), then
    the verdict's sentence."""
    lines = [
        "| method | accuracy (95% CI) | n | p vs greedy | p vs maj@8 | trigger rate | time / token vs greedy (this run) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, e in summary.items():
        p_greedy = f"{e['vs_greedy']['p_value']:.2g}" if "vs_greedy" in e else "–"
        p_maj = f"{p_vs_majority[m]:.2g}" if m in p_vs_majority else "–"
        ratio = f"{ratios[m]:.2f}×" if m in ratios else "–"
        lines.append(
            f"| {m} | {e['accuracy']:.1%} ({e['ci_low']:.1%}–{e['ci_high']:.1%}) | {e['n']} | {p_greedy} | {p_maj}"
            f" | {e['trigger_rate']:.1%} | {ratio} |"
        )
    quiet = ", ".join(f"{m} {r:.2f}×" for m, r in cost_ratios.items() if m != "greedy")
    if quiet:
        lines += ["", f"Quiet benchmark, time per generated token against greedy's: {quiet}."]
    return "\n".join(lines) + "\n\n" + result["sentence"]


def _optional_json(path: Path | None, option: str, key: str):
    """A JSON input another lane writes: not there yet is said (the verdict goes without it); a file
    without ``key`` is the wrong kind of file (ValueError)."""
    if not path:
        return None
    if not path.is_file():
        print(f"note: {option}: {path} does not exist yet; the verdict goes without it", file=sys.stderr)
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or key not in data:
        raise ValueError(f"{option}: {path} holds no {key!r}: not the file this option takes")
    return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="the verdict's eval run directory")
    parser.add_argument("--problems", type=int, default=300, help="problems every compared row must finish")
    parser.add_argument("--ladder", help="the selector ladder JSON at the trigger's points")
    parser.add_argument(
        "--trigger", help="a selector directory holding the learned trigger (trigger_config.json)"
    )
    parser.add_argument("--cost", help="the quiet cost benchmark's eval run directory")
    parser.add_argument("--out", help="write the verdict as JSON here")
    args = parser.parse_args(argv)
    try:
        records = list(read_jsonl(Path(args.run) / "results.jsonl"))
        if not records:
            raise ValueError(f"{args.run} holds no results (no results.jsonl records)")
        summary = summarize(records)
        # the ladder and the trigger come from the other lane: not there yet is said, not fatal
        if args.problems < 1:
            raise ValueError(f"--problems must be >= 1; got {args.problems}")
        ladder = _optional_json(args.ladder and Path(args.ladder), "--ladder", "rows")
        trigger = _optional_json(
            args.trigger and Path(args.trigger) / "trigger_config.json", "--trigger", "metrics"
        )
        trigger = trigger["metrics"] if trigger else None
        cost = {}
        if args.cost:
            cost_records = list(read_jsonl(Path(args.cost) / "results.jsonl"))
            if not cost_records:
                raise ValueError(f"--cost {args.cost} holds no results (no results.jsonl records)")
            cost = per_token_time_ratios(cost_records)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = verdict(summary, args.problems, ladder, trigger, cost)
    print(markdown(summary, result, cost, p_values_vs(records, MAJORITY), per_token_time_ratios(records)))
    if args.out:
        write_json_atomic(args.out, result | {"methods": summary, "inputs": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
