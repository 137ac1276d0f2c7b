"""Our engine side by side with transformers ``generate`` (and llama.cpp), same prompts, budget and threads.

    python bench/compare.py --out results/bench/compare.json                # the full grid (long)
    python bench/compare.py --models qwen2.5-coder-0.5b-instruct --batch-sizes 1,8 --dtypes bfloat16 --repeats 1

For each model, dtype and batch size: greedy decoding of the first GSM8K *train* questions (chat
prompt, left-padded), exactly ``--tokens`` new tokens per sequence (stop tokens are ignored by both,
so both do the same work), timed as the median over ``--repeats`` runs after a 4-token warm-up. Then S2T
(SLM + LLM) at the evaluation trigger (entropy, the threshold calibrated at its 95% train quantile
in results/eval-gsm8k-test-100) and at ``always``, and llama.cpp on the same GGUF weights at batch 1
when ``llama-cpp-python`` is installed (``pip install "select-to-think[llamacpp]"``), beside our llama.cpp
backend (``s2t.backends.llama_cpp``) on the same files: greedy at every batch size, and S2T at the
evaluation trigger and at ``always``.
Real models; not a test. Run it on a quiet machine: the figures are only as clean as the machine.

Rows are written to ``--out`` as they finish, and a rerun with the same settings skips the rows that
are there (a long grid survives an interruption). ``--table results/bench/compare.json`` prints the
README's markdown table from such a file.

``--random-weights`` times models built from each model's config with random weights, for machines the
weights cannot reach (the GPU bench: the cost of a forward pass depends on the shapes alone). Models
may then be given as directories holding config.json and the tokenizer; S2T's ~5% row uses the
``random`` trigger at rate 0.05, since a calibrated entropy threshold means nothing for random weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from s2t.api import S2TGenerator
from s2t.backends import llama_cpp_installed
from s2t.data import load_problems
from s2t.engine import decode
from s2t.methods import build_method
from s2t.models import (
    DEFAULT_LLM,
    DEFAULT_SLM,
    LoadedModel,
    contiguous_output_head,
    cpu_model_name,
    load_model,
    load_tokenizer,
    parse_dtype,
    resolve_model_path,
)
from s2t.prompts import build_prompt

EVAL_CALIBRATION = Path("results/eval-gsm8k-test-100/calibration.json")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


GGUF_FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    32: "BF16",
}  # llama.cpp's LLAMA_FTYPE_*
WARMUP_TOKENS = 4  # the warm-up run: enough to allocate the caches and pick the kernels


def timed(run: Callable[[int], int], tokens: int, repeats: int) -> dict:
    """Median seconds over ``repeats`` runs of ``tokens`` new tokens (after a short warm-up run), and
    the tokens each run produced."""
    run(min(tokens, WARMUP_TOKENS))
    seconds = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        produced = run(tokens)
        synchronize()
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    row = {
        "tokens": produced,
        "seconds": round(median, 3),
        "tokens_per_second": round(produced / median, 2),
        "all_seconds": [round(s, 3) for s in seconds],
    }
    return row | getattr(run, "extra", {})


def hf_generate(gen: S2TGenerator, prompts: list[list[int]]) -> Callable[[int], int]:
    """transformers ``generate``: greedy, exactly the given number of new tokens, left-padded batch."""
    pad = gen.tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    device = gen.slm.device
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)

    def run(tokens: int) -> int:
        with torch.inference_mode():
            out = gen.slm.model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                pad_token_id=pad,
            )
        return (out.shape[1] - width) * len(prompts)

    return run


def exact_tokens(
    decode_call: Callable[..., list], gen, prompts: list[list[int]], method, llm=None
) -> Callable[[int], int]:
    """One of our decoding loops (``decode_call``: :func:`s2t.engine.decode` or a backend's ``decode``),
    exactly the given number of new tokens (no stop tokens), all prompts in one batch."""

    def run(tokens: int) -> int:
        kwargs = gen.decode_kwargs(tokens) | {"stop_ids": []}
        out = decode_call(gen.slm.model, prompts, method, llm=llm, max_batch_size=len(prompts), **kwargs)
        produced = sum(len(g.token_ids) for g in out)
        run.extra = {
            "trigger_rate": round(sum(g.cost.triggers for g in out) / produced, 4),
            "llm_forward_calls": sum(g.cost.llm_forward_calls for g in out),
        }
        return produced

    return run


def llama_cpp_backend_rows(models, questions, batch_sizes, args, wanted, record) -> None:
    """Our llama.cpp backend (GGUF as shipped): greedy per model, then S2T at the eval trigger."""
    from s2t.backends.llama_cpp import LlamaCppGenerator
    from s2t.backends.llama_cpp import decode as backend_decode

    engine, dtype = "s2t llama.cpp backend", "gguf (as shipped)"
    for name in models:
        gen = LlamaCppGenerator(name, n_threads=args.threads)
        for bs in batch_sizes:
            if wanted(engine, name, dtype, bs, "greedy"):
                run = exact_tokens(backend_decode, gen, gen.encode(questions[:bs]), build_method("greedy"))
                record(
                    {
                        "engine": engine,
                        "model": name,
                        "dtype": dtype,
                        "batch_size": bs,
                        "method": "greedy",
                        "repack": gen.slm.model.repack,
                        **timed(run, args.tokens, args.repeats),
                    }
                )
    if args.no_s2t:
        return
    pair = f"{models[0]} + {models[-1]}"
    gen = LlamaCppGenerator(models[0], llm=models[-1], n_threads=args.threads)
    threshold = json.loads(EVAL_CALIBRATION.read_text())["entropy@0.95"]["threshold"]
    methods = {
        "s2t/entropy@0.95": build_method("s2t", trigger="entropy", threshold=threshold),
        "s2t/always": build_method("s2t", trigger="always"),
    }
    for bs in batch_sizes:
        for label, method in methods.items():
            if wanted(engine, pair, dtype, bs, label):
                run = exact_tokens(backend_decode, gen, gen.encode(questions[:bs]), method, llm=gen.llm.model)
                record(
                    {
                        "engine": engine,
                        "model": pair,
                        "dtype": dtype,
                        "batch_size": bs,
                        "method": label,
                        **timed(run, args.tokens, args.repeats),
                    }
                )


def llama_cpp_row(name: str, prompt_text: str, tokens: int, threads: int, repeats: int) -> dict:
    """llama.cpp on the built-in model's own GGUF file (joined from its wheels), batch 1."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return {
            "engine": "llama.cpp",
            "model": name,
            "dtype": "gguf (as shipped)",
            "batch_size": 1,
            "skipped": "llama-cpp-python is not installed",
        }
    from s2t.builtin_models import BUILTIN_MODELS, assemble_gguf

    with tempfile.TemporaryDirectory() as tmp:
        gguf = assemble_gguf(BUILTIN_MODELS[name], Path(tmp) / f"{name}.gguf", progress=False)
        llm = Llama(
            model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=2048, verbose=False
        )
        eos = llm.token_eos()
        weights = GGUF_FILE_TYPES.get(int(llm.metadata.get("general.file_type", -1)), "gguf (as shipped)")

        def run(tokens: int) -> int:
            llm.reset()  # read the prompt again each run, as our engine and generate do
            out = llm.create_completion(
                prompt_text, max_tokens=tokens, temperature=0.0, logit_bias={eos: float("-inf")}
            )
            return out["usage"]["completion_tokens"]

        return {
            "engine": "llama.cpp",
            "model": name,
            "dtype": "gguf (as shipped)",
            "weights": weights,
            "batch_size": 1,
            **timed(run, tokens, repeats),
        }


def machine() -> dict:
    """Which machine the figures came from: CPU model, and the GPU when one is used."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model_name(), "gpu": gpu, "device": "cuda" if gpu else "cpu"}


def load(name: str, dtype: str, random_weights: bool) -> LoadedModel:
    """A model for timing: its real weights, or random ones of the same shapes (``--random-weights``)."""
    if not random_weights:
        return load_model(name, dtype=dtype)
    path = resolve_model_path(name)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialise where it runs
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=parse_dtype(dtype))
    model.eval().requires_grad_(False)
    tokenizer = load_tokenizer(name).tokenizer
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(name, contiguous_output_head(model), tokenizer)


def row_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("engine", "model", "dtype", "batch_size", "method"))


def short(model: str) -> str:
    """A model (or "SLM + LLM" pair) as a table shows it: directories by their last part."""
    return " + ".join(Path(part).name for part in model.split(" + "))


def markdown_table(report: dict) -> str:
    """The README's table: tokens/s of ``generate`` and of our engine side by side, then the S2T rows."""
    rows = report["results"]
    by_key = {row_key(r): r for r in rows if "tokens_per_second" in r}
    m = report["machine"]
    lines = [
        f"Machine: {m['gpu'] or m['cpu']} ({m['device']}), {report['threads']} thread(s), "
        f"{report['tokens_per_sequence']} new tokens per sequence, median of {report['repeats']}, "
        f"torch {report['torch']}" + (", random weights" if report.get("random_weights") else "") + ".",
        "",
        "| model | dtype | batch | `generate` tok/s | engine tok/s | engine / generate |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r.get("engine") != "transformers.generate" or "tokens_per_second" not in r:
            continue
        ours = by_key.get(("s2t engine", r["model"], r["dtype"], r["batch_size"], "greedy"))
        if ours is None:
            continue
        ratio = ours["tokens_per_second"] / r["tokens_per_second"]
        lines.append(
            f"| {short(r['model'])} | {r['dtype']} | {r['batch_size']} | {r['tokens_per_second']:.1f} | "
            f"{ours['tokens_per_second']:.1f} | {ratio:.2f}× |"
        )
    s2t_rows = [r for r in rows if r.get("method", "").startswith("s2t/") and "seconds" in r]
    if s2t_rows:
        lines += [
            "",
            "| S2T (SLM + LLM) | dtype | batch | trigger rate | seconds | tok/s | × our greedy SLM time |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in s2t_rows:
            slm = r["model"].split(" + ")[0]
            base = by_key.get((r["engine"], slm, r["dtype"], r["batch_size"], "greedy"))
            times = f"{r['seconds'] / base['seconds']:.2f}×" if base else "–"
            rate = f"{r['trigger_rate']:.1%}" if "trigger_rate" in r else "–"
            lines.append(
                f"| {r['method']} | {r['dtype']} | {r['batch_size']} | {rate} | {r['seconds']:.2f} | "
                f"{r['tokens_per_second']:.1f} | {times} |"
            )
    for r in rows:
        if r.get("engine") == "llama.cpp":
            detail = (
                r.get("skipped")
                or f"{r['tokens_per_second']:.1f} tok/s at batch 1 ({r.get('weights', 'gguf')} weights)"
            )
            lines.append(f"\nllama.cpp, {short(r['model'])}: {detail}")
    backend = [r for r in rows if r.get("engine") == "s2t llama.cpp backend" and r.get("method") == "greedy"]
    if backend:
        lines += [
            "",
            "| our llama.cpp backend, greedy | batch | tok/s | × raw llama.cpp (batch 1) |",
            "| --- | ---: | ---: | ---: |",
        ]
        for r in backend:
            raw = by_key.get(("llama.cpp", r["model"], r["dtype"], 1, None))
            ratio = f"{r['tokens_per_second'] / raw['tokens_per_second']:.2f}×" if raw else "–"
            lines.append(
                f"| {short(r['model'])} | {r['batch_size']} | {r['tokens_per_second']:.1f} | {ratio} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default=f"{DEFAULT_SLM},{DEFAULT_LLM}",
        help="comma-separated; the S2T rows pair the first (SLM) with the last (LLM)",
    )
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--random-weights", action="store_true", help="random weights of each config's shapes"
    )
    parser.add_argument("--no-s2t", action="store_true", help="skip the S2T rows (they load both models)")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument(
        "--no-llama-cpp-backend", action="store_true", help="skip the rows of our llama.cpp backend"
    )
    parser.add_argument("--only-llama-cpp", action="store_true", help="add only the llama.cpp rows to --out")
    parser.add_argument("--out", default=None, help="JSON written row by row; a rerun resumes it")
    parser.add_argument(
        "--table", metavar="JSON", default=None, help="print the markdown table of a result file"
    )
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())))
        return
    torch.set_num_threads(args.threads)
    models = [m.rstrip("/") for m in args.models.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    questions = [p.question for p in load_problems("gsm8k", "train", limit=max(batch_sizes))]
    report = {
        "machine": machine(),
        "threads": args.threads,
        "tokens_per_sequence": args.tokens,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "random_weights": args.random_weights,
        "results": [],
    }
    out = Path(args.out) if args.out else None
    if out and out.is_file():
        previous = json.loads(out.read_text())
        if all(previous.get(k) == v for k, v in report.items() if k != "results"):
            report["results"] = previous["results"]
            print(f"resuming {out}: {len(report['results'])} rows done", flush=True)
        else:
            raise SystemExit(f"{out} holds a run with other settings; pass another --out or remove it")
    done = {row_key(r) for r in report["results"]}

    def wanted(*key) -> bool:
        return key not in done

    def record(row: dict) -> None:
        report["results"].append(row)
        print(json.dumps(row), flush=True)
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")

    for dtype in [] if args.only_llama_cpp else args.dtypes.split(","):
        greedy = build_method("greedy")
        for name in models:
            if not any(
                wanted(e, name, dtype, bs, "greedy")
                for bs in batch_sizes
                for e in ("transformers.generate", "s2t engine")
            ):
                continue
            gen = S2TGenerator(load(name, dtype, args.random_weights))
            for bs in batch_sizes:
                prompts = gen.encode(questions[:bs])
                for engine, run in (
                    ("transformers.generate", hf_generate(gen, prompts)),
                    ("s2t engine", exact_tokens(decode, gen, prompts, greedy)),
                ):
                    if wanted(engine, name, dtype, bs, "greedy"):
                        record(
                            {
                                "engine": engine,
                                "model": name,
                                "dtype": dtype,
                                "batch_size": bs,
                                "method": "greedy",
                                **timed(run, args.tokens, args.repeats),
                            }
                        )
            del gen
        pair = f"{models[0]} + {models[-1]}"
        if args.no_s2t or not any(
            wanted("s2t engine", pair, dtype, bs, m)
            for bs in batch_sizes
            for m in ("s2t/entropy@0.95", "s2t/random@0.05", "s2t/always")
        ):
            continue
        gen = S2TGenerator(
            load(models[0], dtype, args.random_weights), llm=load(models[-1], dtype, args.random_weights)
        )
        if args.random_weights:
            sparse = {"s2t/random@0.05": build_method("s2t", trigger="random", threshold=0.05)}
        else:
            threshold = json.loads(EVAL_CALIBRATION.read_text())["entropy@0.95"]["threshold"]
            sparse = {"s2t/entropy@0.95": build_method("s2t", trigger="entropy", threshold=threshold)}
        methods = sparse | {"s2t/always": build_method("s2t", trigger="always")}
        for bs in batch_sizes:
            prompts = gen.encode(questions[:bs])
            for label, method in methods.items():
                if wanted("s2t engine", pair, dtype, bs, label):
                    run = exact_tokens(decode, gen, prompts, method, llm=gen.llm.model)
                    record(
                        {
                            "engine": "s2t engine",
                            "model": pair,
                            "dtype": dtype,
                            "batch_size": bs,
                            "method": label,
                            **timed(run, args.tokens, args.repeats),
                        }
                    )
        del gen
    if not args.no_llama_cpp_backend and not args.random_weights and llama_cpp_installed():
        llama_cpp_backend_rows(models, questions, batch_sizes, args, wanted, record)
    if not args.no_llama_cpp and not args.random_weights:
        tokenizer = load_tokenizer(models[0]).tokenizer  # the prompt as text; no model needed
        text = tokenizer.decode(build_prompt(tokenizer, questions[0]))
        for name in models:
            if wanted("llama.cpp", name, "gguf (as shipped)", 1, None):
                record(llama_cpp_row(name, text, args.tokens, args.threads, args.repeats))
    if out is None:
        print(markdown_table(report))


if __name__ == "__main__":
    main()
