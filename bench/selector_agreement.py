"""Selectors side by side on the same held-out training problems: agreement with the LLM at top-K.

    python bench/selector_agreement.py --groups results/collect-gsm8k-train-300 \
        --selectors results/selector-head-gsm8k-train-300,results/selector-lora-gsm8k-train-300 \
        --dtype bfloat16 --out results/bench/selector_agreement.json

Every selector must hold out the same validation problems (the default split of the same
collection does); the SLM's own top-1 is reported beside them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from s2t.models import load_model
from s2t.policies.learned_selector import LocalSelector
from s2t.training.agreement import selector_agreement
from s2t.training.collect import collection_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default="results/collect-gsm8k-train-300")
    parser.add_argument("--selectors", required=True, help="comma-separated selector directories")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dirs = args.selectors.split(",")
    held_out = [
        sorted(LocalSelector.from_pretrained(d).config.training["validation_problem_ids"]) for d in dirs
    ]
    if any(h != held_out[0] for h in held_out):
        raise SystemExit("the selectors hold out different validation problems: they cannot be compared")
    slm = load_model(collection_config(args.groups)["slm"], dtype=args.dtype)
    rows = [selector_agreement(d, args.groups, args.k, dtype=args.dtype, slm=slm) for d in dirs]
    for row in rows:
        a, d = row["all"], row["divergent"]
        print(
            f"{row['selector']} ({row['mode']}): all {a['agreement_with_llm']:.1%} of {a['n_groups']} "
            f"(SLM top-1 {a['slm_top1_agreement_with_llm']:.1%}); divergent {d['agreement_with_llm']:.1%} "
            f"of {d['n_groups']} (SLM top-1 {d['slm_top1_agreement_with_llm']:.1%})"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"validation_problem_ids": held_out[0], "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
