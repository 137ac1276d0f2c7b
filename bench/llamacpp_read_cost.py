"""What it costs each model in llama.cpp to read n tokens at once: S2T's catch-up cost on a CPU.

    python bench/llamacpp_read_cost.py --threads 2 --out results/bench/llamacpp_read_cost.json

S2T's LLM reads every token the SLM wrote, in one decode call per trigger (the catch-up), so its
overhead over greedy is bounded below by (tokens read) / (the LLM's read rate) against (tokens
written) / (the SLM's decode rate), whatever the trigger rate. For each built-in model (its GGUF file
in our llama.cpp backend, one sequence), after a 200-token context, one ``decode`` of ``n`` new tokens
is timed, median of ``--repeats``: n = 1 is a decoding step, larger n a catch-up or a prompt read.
Real models; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from s2t.backends.llama_cpp import LlamaCppModel, gguf_file
from s2t.models import DEFAULT_LLM, DEFAULT_SLM, cpu_description

CONTEXT = 200


def read_seconds(model: LlamaCppModel, n: int, repeats: int) -> float:
    """Median seconds to read ``n`` tokens after a ``CONTEXT``-token context (the context is untimed)."""
    times = []
    for _ in range(repeats):
        model.clear()
        model.decode([(0, [100] * CONTEXT, 0)])
        start = time.perf_counter()
        model.decode([(0, list(range(1000, 1000 + n)), CONTEXT)])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=f"{DEFAULT_SLM},{DEFAULT_LLM}")
    parser.add_argument("--sizes", default="1,4,8,16,32,64,150")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        model = LlamaCppModel(gguf_file(name), n_threads=args.threads)
        for n in (int(s) for s in args.sizes.split(",")):
            seconds = read_seconds(model, n, args.repeats)
            rows.append(
                {"model": name, "tokens": n, "seconds": round(seconds, 4), "tok_per_s": round(n / seconds, 1)}
            )
            print(json.dumps(rows[-1]), flush=True)
        model.close()
    report = {"cpu": cpu_description(), "threads": args.threads, "context": CONTEXT, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
