"""S2T-Local's cost: scoring K candidates over the cached prefix, against one decoding step and the reference.

    python bench/scoring.py --out results/bench/scoring.json
    python bench/scoring.py --selector selectors/head --problems 5 --out results/bench/scoring.json

Part 1 (always): at prefix lengths 128/512/1024 of real GSM8K text, the median time of
- one decoding step of the SLM (1 token over the KV cache);
- our candidate scoring: all K candidates in one forward of K tokens over the cached prefix (a 4D
  mask; each candidate sees the prefix and itself), keeping the chosen candidate's cache;
- the reference implementation's approach: K rows of the last 511 prefix tokens + one candidate,
  run from scratch with no cache.

Part 2 (with ``--selector``): wall time of S2T-Local against SLM greedy on the first
``--problems`` GSM8K test problems, one problem at a time, each method run back to back.

Real models (the default SLM). A benchmark, not a test: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from transformers import DynamicCache

from s2t.api import S2TGenerator
from s2t.data import load_problems
from s2t.models import DEFAULT_SLM, load_model
from s2t.policies.scoring import candidate_hidden_states, keep_candidate

REFERENCE_WINDOW = 511  # the reference re-reads the last 511 prefix tokens for every candidate


def real_text_ids(tokenizer, length: int) -> list[int]:
    """``length`` token ids of GSM8K train questions and solutions, run together."""
    ids: list[int] = []
    for problem in load_problems("gsm8k", "train", limit=64):
        ids += tokenizer(problem.question + "\n" + (problem.solution or "") + "\n\n")["input_ids"]
        if len(ids) >= length:
            return ids[:length]
    raise RuntimeError(f"not enough text for a prefix of {length} tokens")


def median_seconds(fn, repeats: int, warm_up: bool = True) -> float:
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _decode_step(model, cache, token) -> None:
    model(input_ids=token, past_key_values=cache, use_cache=True)
    cache.crop(-1)  # back to the prefix


def _score_candidates(model, cache, prefix_mask, candidates, length) -> None:
    candidate_hidden_states(model, cache, prefix_mask, candidates)
    keep_candidate(cache, length, torch.zeros(1, dtype=torch.long))
    cache.crop(-1)  # back to the prefix


def _reference_rows(model, rows_ids) -> None:
    model.model(input_ids=rows_ids, use_cache=False)


@torch.inference_mode()
def scoring_rows(model, tokenizer, lengths: list[int], ks: list[int], repeats: int) -> list[dict]:
    rows = []
    for length in lengths:
        prefix = torch.tensor([real_text_ids(tokenizer, length)])
        cache = DynamicCache()
        out = model(input_ids=prefix, past_key_values=cache, use_cache=True)
        prefix_mask = torch.ones_like(prefix)
        next_token = out.logits[:, -1].argmax(-1, keepdim=True)
        step_ms = 1000 * median_seconds(partial(_decode_step, model, cache, next_token), repeats)
        row = {"prefix_length": length, "decode_step_ms": round(step_ms, 1)}
        for k in ks:
            candidates = out.logits[:, -1].topk(k, -1).indices
            ours_ms = 1000 * median_seconds(
                partial(_score_candidates, model, cache, prefix_mask, candidates, length), repeats
            )
            window = prefix[0, -REFERENCE_WINDOW:]
            rows_ids = torch.cat([window.expand(k, -1), candidates.T], dim=1)
            # compute-bound and long: no warm-up, fewer repeats
            reference_ms = 1000 * median_seconds(
                partial(_reference_rows, model, rows_ids), max(1, repeats // 3), warm_up=False
            )
            row[f"k{k}"] = {
                "ours_ms": round(ours_ms, 1),
                "reference_ms": round(reference_ms, 1),
                "ours_over_decode_step": round(ours_ms / step_ms, 2),
                "reference_over_ours": round(reference_ms / ours_ms, 1),
            }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def wall_time_rows(
    slm_name: str,
    selector_dir: str,
    trigger: str,
    threshold: float,
    k: int,
    problems: int,
    max_new_tokens: int,
) -> dict:
    gen = S2TGenerator(slm_name)
    # resolved as every entry point resolves it: a LoRA selector decodes with its adapter merged in
    methods = {
        "greedy": gen.resolve("greedy"),
        "s2t-local": gen.resolve(
            "s2t-local", selector=selector_dir, trigger=trigger, threshold=threshold, k=k
        ),
    }
    questions = [p.question for p in load_problems("gsm8k", "test", limit=problems)]
    gen.generate(questions[:1], methods["greedy"], max_new_tokens=4)  # warm-up
    totals = {name: {"seconds": 0.0, "tokens": 0, "triggers": 0} for name in methods}
    for question in questions:
        for name, method in methods.items():
            start = time.perf_counter()
            (out,) = gen.generate([question], method, max_new_tokens=max_new_tokens)
            totals[name]["seconds"] += time.perf_counter() - start
            totals[name]["tokens"] += len(out.token_ids)
            totals[name]["triggers"] += out.cost.triggers
    for t in totals.values():
        t["seconds_per_token"] = round(t["seconds"] / max(t["tokens"], 1), 4)
        t["seconds"] = round(t["seconds"], 2)
    result = {
        "problems": problems,
        "max_new_tokens": max_new_tokens,
        "trigger": trigger,
        "threshold": threshold,
        "k": k,
        "methods": totals,
        "wall_time_ratio": round(totals["s2t-local"]["seconds"] / totals["greedy"]["seconds"], 3),
        "selector_mode": methods["s2t-local"].method.selector.config.training.get("mode"),
        "per_token_ratio": round(
            totals["s2t-local"]["seconds_per_token"] / totals["greedy"]["seconds_per_token"], 3
        ),
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slm", default=DEFAULT_SLM)
    parser.add_argument("--lengths", default="128,512,1024")
    parser.add_argument("--ks", default="8,16")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--selector", default=None, help="a trained selector: also time S2T-Local vs greedy")
    parser.add_argument("--trigger", default="entropy")
    parser.add_argument("--threshold", type=float, default=None, help="trigger threshold (part 2)")
    parser.add_argument("--k", type=int, default=8, help="candidates per step (part 2)")
    parser.add_argument("--problems", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--skip-scoring", action="store_true", help="only part 2")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    report = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "slm": args.slm,
    }
    if not args.skip_scoring:
        slm = load_model(args.slm)
        report["scoring"] = scoring_rows(
            slm.model,
            slm.tokenizer,
            [int(x) for x in args.lengths.split(",")],
            [int(x) for x in args.ks.split(",")],
            args.repeats,
        )
        del slm
    if args.selector:
        if args.threshold is None:
            parser.error(
                "--selector needs --threshold (e.g. the calibrated one in the eval run's calibration.json)"
            )
        report["wall_time"] = wall_time_rows(
            args.slm, args.selector, args.trigger, args.threshold, args.k, args.problems, args.max_new_tokens
        )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_file():  # keep the other part of an earlier run
            report = json.loads(out.read_text()) | report
        out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
