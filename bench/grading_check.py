"""Does the grader still accept every gold solution, and what does majority voting cost? (issue 23)

    S2T_DATA_DIR=../shared/data python bench/grading_check.py --out results/bench/grading_check.json

Part one grades every gold *solution* of GSM8K test (the text with its ``#### N`` line) and of
MATH-500 (the worked solution with its ``\\boxed{}``) against that problem's gold answer: each must
grade correct. It also counts the gold answers and extracted solution answers that
:func:`s2t.grading.clean_answer` rewrites, and lists them, so a change to the cleaning shows up here.

Part two re-votes the committed maj@8 records (``--votes``), timing :func:`s2t.grading.majority_vote`
over each record's eight extracted sample answers, and counts the records whose vote changed from
the stored one by value (stored votes came from the older string-keyed vote).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from s2t.data import gsm8k_final_answer
from s2t.grading import clean_answer, extract_answer, grade, majority_vote, same_answer
from s2t.runs import read_jsonl


def check_gold_set(name: str, pairs: list[tuple[str, str]]) -> dict:
    started = time.perf_counter()
    wrong, rewritten = [], []
    for index, (gold, solution) in enumerate(pairs):
        if not grade(gold, solution).correct:
            wrong.append({"index": index, "gold": gold})
        extracted = extract_answer(solution) or ""
        for spelling in (gold, extracted):
            if clean_answer(spelling) != spelling.strip():
                rewritten.append({"index": index, "before": spelling, "after": clean_answer(spelling)})
    seconds = time.perf_counter() - started
    print(
        f"{name}: {len(pairs) - len(wrong)}/{len(pairs)} gold solutions graded correct "
        f"({len(rewritten)} spellings rewritten by clean_answer), {seconds:.1f} s"
    )
    return {
        "problems": len(pairs),
        "correct": len(pairs) - len(wrong),
        "wrong": wrong,
        "rewritten": rewritten,
        "seconds": round(seconds, 2),
    }


def time_votes(path: Path, method: str) -> dict:
    records = [r for r in read_jsonl(path) if r["method"] == method]
    if not records:
        raise SystemExit(f"{path} has no records of method {method!r}")
    per_record, changed = [], []
    for record in records:
        started = time.perf_counter()
        voted = majority_vote(record["sample_answers"])
        per_record.append(time.perf_counter() - started)
        stored = record["extracted"]
        if (voted is None) != (stored is None) or (voted is not None and not same_answer(stored, voted)):
            changed.append({"problem_id": record["problem_id"], "stored": stored, "now": voted})
    per_record.sort()
    total = sum(per_record)
    print(
        f"{method} votes over {len(records)} records: {total:.2f} s in all, "
        f"median {1000 * per_record[len(per_record) // 2]:.1f} ms, max {1000 * per_record[-1]:.1f} ms; "
        f"{len(changed)} votes changed"
    )
    return {
        "records": len(records),
        "total_s": round(total, 3),
        "median_ms": round(1000 * per_record[len(per_record) // 2], 2),
        "max_ms": round(1000 * per_record[-1], 2),
        "changed": changed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("S2T_DATA_DIR", "../shared/data"))
    parser.add_argument("--votes", default="results/eval-gsm8k-test-100/results.jsonl")
    parser.add_argument("--vote-method", default="maj@8")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    data = Path(args.data_dir)

    gsm8k = [json.loads(line) for line in (data / "gsm8k" / "test.jsonl").read_text().splitlines() if line]
    math500 = [
        json.loads(line) for line in (data / "math500" / "test.jsonl").read_text().splitlines() if line
    ]
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "gsm8k_test": check_gold_set(
            "gsm8k/test", [(gsm8k_final_answer(r["answer"]), r["answer"]) for r in gsm8k]
        ),
        "math500_test": check_gold_set("math500/test", [(r["answer"], r["solution"]) for r in math500]),
        "votes": time_votes(Path(args.votes), args.vote_method),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
