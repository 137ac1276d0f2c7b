"""The selector ladder on held-out training problems: the SLM's top-1, a shallow boosted-tree model,
and trained selectors of any kind (features, head, LoRA), each with 95% bootstrap CIs over problems.

    python bench/selector_agreement.py --groups results/collect-gsm8k-train-300 \\
        --selectors results/selector-features-gsm8k-train-300,results/selector-head-gsm8k-train-300,\\
results/selector-lora-gsm8k-train-300 --validation-from results/selector-head-gsm8k-train-300 \\
        --out results/bench/selector_ladder-300.json

With ``--learning-curve 30,60,120,270`` it instead fits the shallow model and a feature selector on
nested subsets of that many training problems and scores each on the same held-out groups
(:func:`s2t.training.ladder.learning_curve`).

With ``--per-position`` it asks the inference question on *every* position of the held-out problems
instead of on the collection's groups: where, and with which candidate, does an SLM-only model
override the top-1, and is its pick the LLM's more often than the top-1 was there
(:func:`s2t.training.override.override_ladder`; a collection that recorded per-position LLM ranks):

    python bench/selector_agreement.py --groups results/collect-gsm8k-train-1000 --per-position \
        --out results/bench/override_ladder-1000.json

With ``--per-position --learning-curve 50,100,150 --hold-out-first 100`` it fits the override rungs on
the first 50, 100 and 150 problems after the first 100 and scores each on the first 100, so a point
stays the same as the collection grows (:func:`s2t.training.override.override_learning_curve`).

The held-out problems are a selector's validation problems (``--validation-from``) or the seeded
split every trainer uses (``--val-fraction``, ``--seed``); every selector must have held them out.
"""

from __future__ import annotations

import argparse

import torch

from s2t.policies.learned_selector import load_selector
from s2t.runs import write_json_atomic
from s2t.training.collect import collected_records, collection_config
from s2t.training.ladder import format_ladder, format_learning_curve, learning_curve, selector_ladder, verdict
from s2t.training.objective import split_problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--groups", default="results/collect-gsm8k-train-300")
    parser.add_argument("--selectors", default="", help="comma-separated selector directories")
    parser.add_argument("--validation-from", default=None, help="a selector whose validation problems to use")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument(
        "--hold-out-first",
        type=int,
        default=None,
        help="hold out the collection's first N problems (stable as it grows) instead of a seeded split",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--groups-at", default=None, help="only groups where these trigger settings fire")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--learning-curve", default=None, help="comma-separated training-problem counts")
    parser.add_argument("--per-position", action="store_true", help="override figures on every position")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.k < 2:
        parser.error(f"--k must be >= 2 (a selection needs two candidates); got {args.k}")
    if args.validation_from and args.hold_out_first is not None:
        parser.error("--validation-from and --hold-out-first each choose the held-out problems: give one")
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must lie strictly between 0 and 1; got {args.val_fraction}")
    sizes = _sizes(parser, args.learning_curve) if args.learning_curve else None
    try:
        _run(args, sizes)
    except (ValueError, FileNotFoundError) as e:  # a bad collection or selector: one line, not a traceback
        parser.error(str(e))


def _run(args: argparse.Namespace, sizes: list[int] | None) -> None:
    """The ladder, learning curve or per-position figures the options ask for, printed and saved."""
    if args.validation_from:
        held_out = load_selector(args.validation_from).config.training.get("validation_problem_ids")
        if not held_out:
            raise ValueError(
                f"{args.validation_from} records no validation problems: give --hold-out-first or "
                "--val-fraction instead"
            )
    else:
        ids = [r["problem_id"] for r in collected_records(args.groups, need_features=False)]
        if args.hold_out_first is not None:
            if not 1 <= args.hold_out_first < len(ids):
                raise ValueError(f"--hold-out-first must lie in [1, {len(ids) - 1}] for {args.groups}")
            held_out = ids[: args.hold_out_first]
        else:
            _, val = split_problems(len(ids), args.val_fraction, args.seed)
            held_out = [ids[i] for i in sorted(val)]
    if args.per_position:
        from s2t.training import override

        if sizes:
            result = override.override_learning_curve(args.groups, held_out, sizes, args.k, seed=args.seed)
            print(override.format_override_learning_curve(result))
        else:
            result = override.override_ladder(args.groups, held_out, args.k, seed=args.seed)
            print(override.format_override_ladder(result))
        if args.out:
            write_json_atomic(args.out, result)
        return
    if sizes:
        curve = learning_curve(
            args.groups, held_out, sizes, args.k, args.groups_at, seed=args.seed, progress=False
        )
        curve["groups"] = args.groups
        print(format_learning_curve(curve))
        if args.out:
            write_json_atomic(args.out, curve)
        return
    selectors = [d for d in args.selectors.split(",") if d]
    slm = None
    if selectors:
        from s2t.models import load_model

        slm = load_model(collection_config(args.groups)["slm"], dtype=args.dtype)
    ladder = selector_ladder(
        args.groups, held_out, args.k, args.groups_at, selectors, slm=slm, seed=args.seed
    )
    ladder["groups"] = args.groups
    print(format_ladder(ladder))
    print(verdict(ladder))
    if args.out:
        write_json_atomic(args.out, ladder)


def _sizes(parser: argparse.ArgumentParser, text: str) -> list[int]:
    """``--learning-curve``'s training-problem counts: integers >= 2 (a fit and a selection problem),
    sorted, each once."""
    try:
        sizes = sorted({int(n) for n in text.split(",") if n.strip()})
    except ValueError:
        parser.error(
            f"--learning-curve takes comma-separated problem counts (e.g. 250,500,900); got {text!r}"
        )
    if not sizes or sizes[0] < 2:
        parser.error(f"--learning-curve counts must be >= 2; got {text!r}")
    return sizes


if __name__ == "__main__":
    main()
