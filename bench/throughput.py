"""Decoding throughput of the SLM alone, the LLM alone and S2T (trigger `always`) on this machine.

    python bench/throughput.py --tokens 64 --out results/bench/throughput.json

Batch 1 and batch 8 GSM8K *train* questions; real models (the default pair). Not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from s2t.api import S2TGenerator
from s2t.data import load_problems
from s2t.methods import build_method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    questions = [p.question for p in load_problems("gsm8k", "train", limit=8)]
    gen = S2TGenerator("qwen2.5-coder-0.5b-instruct", llm="qwen2.5-coder-1.5b-instruct")
    methods = {
        "slm-greedy": "greedy",
        "llm-greedy": "llm",
        "s2t-always-k8": build_method("s2t", trigger="always", k=8),
    }
    rows = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        for label, method in methods.items():
            gen.generate(questions[:1], method, max_new_tokens=4)  # warm-up
            start = time.perf_counter()
            outs = gen.generate(questions[:bs], method, max_new_tokens=args.tokens, batch_size=bs)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.token_ids) for o in outs)
            rows.append({"method": label, "batch_size": bs, "tokens": tokens, "seconds": round(seconds, 2),
                         "tokens_per_second": round(tokens / seconds, 2)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    report = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "dtype": "float32", "results": rows}  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
