"""Does a cheaper dtype, or the other backend, change the answers? One method's records in two run
directories, paired by problem.

    python bench/dtype_check.py results/eval-gsm8k-test-100 results/eval-gsm8k-test-100-bf16 \
        --method greedy --out results/bench/dtype_check.json

Both runs must cover the same problems with the same prompts and budget (they differ only in
``dtype`` or ``backend``, e.g. torch float32 against llama.cpp on the Q4_K_M files; the script
refuses other differences). Reports each run's accuracy with its bootstrap CI,
the exact McNemar test between them, how many final answers and whole texts are identical, and the
paired difference in wall time per problem (wall times are only as clean as the machine was).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from s2t.runs import read_jsonl
from s2t.stats import bootstrap_ci, mcnemar_exact, paired_bootstrap

# Config entries that may differ between the two runs (the dtype and backend themselves, and bookkeeping).
MAY_DIFFER = {"dtype", "llm_dtype", "backend", "methods", "batch_size", "limit", "selector"}


def load_run(path: Path, method: str) -> tuple[dict, dict[str, dict]]:
    config = json.loads((path / "config.json").read_text())
    records = {r["problem_id"]: r for r in read_jsonl(path / "results.jsonl") if r["method"] == method}
    if not records:
        raise SystemExit(f"{path} has no records of method {method!r}")
    return config, records


def compare(a_dir: Path, b_dir: Path, method: str) -> dict:
    a_config, a = load_run(a_dir, method)
    b_config, b = load_run(b_dir, method)
    differ = sorted(
        k for k in (a_config.keys() | b_config.keys()) - MAY_DIFFER if a_config.get(k) != b_config.get(k)
    )
    if differ:
        raise SystemExit(f"the runs differ in more than the dtype and backend: {', '.join(differ)}")
    ids = sorted(a.keys() & b.keys(), key=lambda pid: (len(pid), pid))
    a_ok, b_ok = [a[i]["correct"] for i in ids], [b[i]["correct"] for i in ids]
    a_time, b_time = [a[i]["cost"]["wall_time_s"] for i in ids], [b[i]["cost"]["wall_time_s"] for i in ids]
    test = mcnemar_exact(a_ok, b_ok)
    time_diff = paired_bootstrap(b_time, a_time)

    def run_summary(directory: Path, config: dict, ok: list[bool], times: list[float]) -> dict:
        ci = bootstrap_ci(ok)
        return {
            "run": str(directory),
            "dtype": config.get("dtype") or "float32 (recorded as null)",
            "backend": config.get("backend") or "torch (recorded before backends existed)",
            "accuracy": ci.estimate,
            "accuracy_ci": [ci.low, ci.high],
            "wall_time_s_per_problem": sum(times) / len(times),
        }

    return {
        "method": method,
        "problems": len(ids),
        "a": run_summary(a_dir, a_config, a_ok, a_time),
        "b": run_summary(b_dir, b_config, b_ok, b_time),
        "mcnemar": {"only_a_right": test.n10, "only_b_right": test.n01, "p_value": test.p_value},
        "same_final_answer": sum(a[i]["extracted"] == b[i]["extracted"] for i in ids),
        "same_text": sum(a[i]["text"] == b[i]["text"] for i in ids),
        "generated_tokens": {
            "a": sum(a[i]["cost"]["generated_tokens"] for i in ids),
            "b": sum(b[i]["cost"]["generated_tokens"] for i in ids),
        },
        "wall_time_b_minus_a_s": {"mean": time_diff.mean_diff, "ci": [time_diff.low, time_diff.high]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="run directory A (e.g. float32)")
    parser.add_argument("b", type=Path, help="run directory B (e.g. bfloat16)")
    parser.add_argument("--method", default="greedy")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = compare(args.a, args.b, args.method)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
