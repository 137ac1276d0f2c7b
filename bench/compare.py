"""Our engine side by side with transformers ``generate`` (and llama.cpp), same prompts, budget and threads.

    python bench/compare.py --out results/bench/compare.json                # the full grid (long)
    python bench/compare.py --models qwen2.5-coder-0.5b-instruct --batch-sizes 1,8 --dtypes bfloat16 --repeats 1

For each model, dtype and batch size: greedy decoding of the first GSM8K *train* questions (chat
prompt, left-padded), exactly ``--tokens`` new tokens per sequence (stop tokens are ignored by both,
so both do the same work), timed as the median over ``--repeats`` runs after one warm-up. Then S2T
(SLM + LLM) at the evaluation trigger (entropy, the threshold calibrated at its 95% train quantile
in results/eval-gsm8k-test-100) and at ``always``, and llama.cpp on the same GGUF weights at batch 1
when ``llama-cpp-python`` is installed (a bench-only extra: ``pip install llama-cpp-python``).
Real models; not a test. Run it on a quiet machine: the figures are only as clean as the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from s2t.api import S2TGenerator
from s2t.data import load_problems
from s2t.engine import decode
from s2t.methods import build_method
from s2t.models import DEFAULT_LLM, DEFAULT_SLM

EVAL_CALIBRATION = Path("results/eval-gsm8k-test-100/calibration.json")


def timed(run: Callable[[], int], repeats: int) -> dict:
    """Median seconds over ``repeats`` runs (after one warm-up) and the tokens each produced."""
    run()
    seconds, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run()
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {"tokens": tokens, "seconds": round(median, 3), "tokens_per_second": round(tokens / median, 2),
            "all_seconds": [round(s, 3) for s in seconds]}  # fmt: skip


def hf_generate(gen: S2TGenerator, prompts: list[list[int]], tokens: int) -> Callable[[], int]:
    """transformers ``generate``: greedy, exactly ``tokens`` new tokens, left-padded batch."""
    pad = gen.tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run() -> int:
        with torch.inference_mode():
            out = gen.slm.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=tokens,
                                         min_new_tokens=tokens, pad_token_id=pad)  # fmt: skip
        return (out.shape[1] - width) * len(prompts)

    return run


def our_engine(
    gen: S2TGenerator, prompts: list[list[int]], tokens: int, method, llm=None
) -> Callable[[], int]:
    """Our engine's one decoding loop, exactly ``tokens`` new tokens (no stop tokens), one batch."""
    kwargs = gen._decode_kwargs(tokens) | {"stop_ids": []}

    def run() -> int:
        return sum(len(g.token_ids) for g in decode(gen.slm.model, prompts, method, llm=llm, **kwargs))

    return run


def llama_cpp_row(name: str, prompt_text: str, tokens: int, threads: int, repeats: int) -> dict:
    """llama.cpp on the built-in model's own GGUF file (joined from its wheels), batch 1."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"engine": "llama.cpp", "model": name, "skipped": "llama-cpp-python is not installed"}
    from s2t.builtin_models import BUILTIN_MODELS, assemble_gguf

    with tempfile.TemporaryDirectory() as tmp:
        gguf = assemble_gguf(BUILTIN_MODELS[name], Path(tmp) / f"{name}.gguf", progress=False)
        llm = Llama(model_path=str(gguf), n_threads=threads, n_ctx=2048, verbose=False)
        eos = llm.token_eos()

        def run() -> int:
            out = llm.create_completion(prompt_text, max_tokens=tokens, temperature=0.0,
                                        logit_bias={eos: float("-inf")})  # fmt: skip
            return out["usage"]["completion_tokens"]

        return {"engine": "llama.cpp", "model": name, "dtype": "gguf (as shipped)", "batch_size": 1,
                **timed(run, repeats)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=f"{DEFAULT_SLM},{DEFAULT_LLM}")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-s2t", action="store_true", help="skip the S2T rows (they load both models)")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    questions = [p.question for p in load_problems("gsm8k", "train", limit=max(batch_sizes))]
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    for dtype in args.dtypes.split(","):
        for name in args.models.split(","):
            gen = S2TGenerator(name, dtype=dtype)
            greedy = build_method("greedy")
            for bs in batch_sizes:
                prompts = gen.encode(questions[:bs])
                for engine, run in (("transformers.generate", hf_generate(gen, prompts, args.tokens)),
                                    ("s2t engine", our_engine(gen, prompts, args.tokens, greedy))):  # fmt: skip
                    record({"engine": engine, "model": name, "dtype": dtype, "batch_size": bs, "method": "greedy",
                            **timed(run, args.repeats)})  # fmt: skip
            del gen
        if not args.no_s2t:
            gen = S2TGenerator(DEFAULT_SLM, llm=DEFAULT_LLM, dtype=dtype)
            threshold = json.loads(EVAL_CALIBRATION.read_text())["entropy@0.95"]["threshold"]
            methods = {"s2t/entropy@0.95": build_method("s2t", trigger="entropy", threshold=threshold),
                       "s2t/always": build_method("s2t", trigger="always")}  # fmt: skip
            for bs in batch_sizes:
                prompts = gen.encode(questions[:bs])
                for label, method in methods.items():
                    run = our_engine(gen, prompts, args.tokens, method, llm=gen.llm.model)
                    record({"engine": "s2t engine", "model": f"{DEFAULT_SLM} + {DEFAULT_LLM}", "dtype": dtype,
                            "batch_size": bs, "method": label, **timed(run, args.repeats)})  # fmt: skip
            del gen
    if not args.no_llama_cpp:
        gen = S2TGenerator(DEFAULT_SLM)
        text = gen.tokenizer.decode(gen.encode(questions[:1])[0])
        for name in args.models.split(","):
            record(llama_cpp_row(name, text, args.tokens, args.threads, args.repeats))
    report = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
              "tokens_per_sequence": args.tokens, "repeats": args.repeats, "torch": torch.__version__,
              "results": rows}  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
