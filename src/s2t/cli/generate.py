"""``s2t generate`` and ``s2t prepare``: answer one question with several methods."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from s2t.cli.app import (
    BackendOpt,
    CalibrationProblemsOpt,
    DataDirOpt,
    DecodeDtypeOpt,
    KOpt,
    LLMDeviceMapOpt,
    LLMDtypeOpt,
    LLMOpt,
    MinStepOpt,
    QuantileOpt,
    RatioOpt,
    SelectorOpt,
    SLMOpt,
    ThresholdOpt,
    TriggerOpt,
    app,
    console,
    fail,
)
from s2t.models import DEFAULT_LLM, DEFAULT_SLM


@app.command()
def prepare(
    models: Annotated[
        list[str] | None, typer.Argument(help="Built-in model names (default: the default pair).")
    ] = None,
) -> None:
    """Fetch and convert built-in offline models into the cache (done automatically on first use)."""
    import time

    from s2t.builtin_models import BUILTIN_MODELS, prepare_builtin

    for name in models or [DEFAULT_SLM, DEFAULT_LLM]:
        if name not in BUILTIN_MODELS:
            fail(f"unknown built-in model {name!r}; built-in models are: {', '.join(BUILTIN_MODELS)}")
        start = time.perf_counter()
        path = prepare_builtin(name)
        console.print(f"{name}: {path} ({time.perf_counter() - start:.0f} s)")


@app.command()
def generate(
    question: Annotated[str | None, typer.Argument(help="The question to answer.")] = None,
    problem: Annotated[
        str | None, typer.Option(help="Answer a dataset problem by id instead, e.g. gsm8k/test/0.")
    ] = None,
    method: Annotated[
        str, typer.Option(help="Comma-separated: greedy, s2t, takeover, random-select, llm, s2t-local.")
    ] = "greedy,s2t",
    selector: SelectorOpt = None,
    slm: SLMOpt = DEFAULT_SLM,
    llm: LLMOpt = DEFAULT_LLM,
    trigger: TriggerOpt = "entropy",
    threshold: ThresholdOpt = None,
    quantile: QuantileOpt = None,
    k: KOpt = 8,
    ratio: RatioOpt = None,
    min_step: MinStepOpt = 3,
    max_new_tokens: Annotated[int, typer.Option(help="Stop after this many new tokens.")] = 512,
    calibration_problems: CalibrationProblemsOpt = 8,
    data_dir: DataDirOpt = None,
    dtype: DecodeDtypeOpt = None,
    llm_dtype: LLMDtypeOpt = None,
    llm_device_map: LLMDeviceMapOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    backend: BackendOpt = "auto",
) -> None:
    """Answer one question with each method and print the answers and their costs."""
    from s2t.backends import make_generator, resolve_backend
    from s2t.grading import extract_answer, is_correct
    from s2t.local.selector import selector_directory

    methods = [m.strip() for m in method.split(",") if m.strip()]
    gold = None
    try:
        if (question is None) == (problem is None):
            raise ValueError("give either a QUESTION or --problem ID")
        if problem is not None:
            found = _problem_by_id(problem, data_dir)
            question, gold = found.question, found.answer
            console.print(f"[bold]{found.id}:[/] {question}\n[dim]gold answer: {gold}[/]")
        if "s2t-local" in methods:
            selector_directory(selector)  # a missing --selector fails before the SLM is loaded
        chosen = resolve_backend(backend, [slm, llm], methods, trigger)
        gen = make_generator(
            chosen, slm, llm, dtype=dtype, llm_dtype=llm_dtype, llm_device_map=llm_device_map
        )
        results = {}
        local_gen, local_selector = gen.local_selector(selector) if "s2t-local" in methods else (gen, None)
        for name in methods:
            m = cli_method(
                gen, name, local_selector, trigger=trigger, threshold=threshold, quantile=quantile, k=k,
                ratio=ratio, min_step=min_step, calibration_problems=calibration_problems, data_dir=data_dir,
            )  # fmt: skip
            with console.status(f"decoding with {name}"):
                decoder = local_gen if name == "s2t-local" else gen
                out = decoder.generate([question], m, max_new_tokens=max_new_tokens)[0]
            results[name] = (out, m)
    except (ValueError, RuntimeError, KeyError, FileNotFoundError) as e:
        fail(str(e))

    if as_json:
        payload = {
            name: {
                "text": out.text,
                "answer": extract_answer(out.text),
                "finish_reason": out.finish_reason,
                "cost": out.cost.to_dict(),
                "method": m if isinstance(m, str) else m.describe(),
            }
            for name, (out, m) in results.items()
        }
        print(json.dumps(payload, indent=2))
        return
    for name, (out, m) in results.items():
        desc = "LLM alone" if isinstance(m, str) else _describe(m)
        console.rule(f"[bold]{name}[/] ({desc})")
        console.print(out.text.strip(), markup=False, highlight=False)
        verdict = (
            ""
            if gold is None
            else ("  [green]correct[/]" if is_correct(gold, out.text) else "  [red]wrong[/]")
        )
        console.print(
            f"[bold]answer:[/] {extract_answer(out.text)}{verdict}   [dim]finish: {out.finish_reason}[/]"
        )
    console.print(cost_table({name: out.cost for name, (out, _) in results.items()}))


def cli_method(
    gen,
    name: str,
    local_selector,
    *,
    trigger: str,
    threshold: float | None,
    quantile: float | None,
    k: int,
    ratio: float | None,
    min_step: int,
    calibration_problems: int,
    data_dir: str | None,
):
    """The named method built from the command line's options (``"llm"`` stays a name), its trigger
    calibrated on GSM8K train problems when it has no threshold."""
    from s2t.methods import needs_calibration

    if name == "llm":
        return name
    kwargs = {}
    if name != "greedy":
        kwargs = dict(
            trigger=trigger, threshold=threshold, quantile=quantile, k=k, ratio=ratio, min_step=min_step
        )
    if name == "s2t-local":
        kwargs["selector"] = local_selector
    method = gen.make_method(name, **kwargs)
    if needs_calibration(method):
        calib = _calibration_questions(calibration_problems, data_dir)
        with console.status(f"calibrating the {trigger} trigger on {len(calib)} GSM8K train problems"):
            gen.calibrate(method, calib)
    return method


def _describe(method) -> str:
    if method.name == "greedy":
        return "SLM greedy"
    t = method.trigger
    return (
        f"trigger {t.name}"
        + (f" ≥ {t.threshold:.4g}" if t.threshold is not None else "")
        + (f" (q={method.quantile})" if method.quantile else "")
        + f", K={method.candidates.k}, selector {method.selector.name}"
    )


def cost_table(costs: dict) -> Table:
    """Costs per sequence, one column per method (fits a narrow terminal)."""
    table = Table(title="cost per sequence")
    table.add_column("")
    for name in costs:
        table.add_column(name, justify="right")
    rows = {
        "generated tokens": lambda c: str(c.generated_tokens),
        "SLM forward calls": lambda c: str(c.slm_forward_calls),
        "SLM forward tokens": lambda c: str(c.slm_forward_tokens),
        "LLM forward calls": lambda c: str(c.llm_forward_calls),
        "LLM forward tokens": lambda c: str(c.llm_forward_tokens),
        "triggers": lambda c: str(c.triggers),
        "overrides (≠ SLM top-1)": lambda c: str(c.overrides),
        "trigger rate": lambda c: f"{c.trigger_rate:.1%}",
        "wall time (s)": lambda c: f"{c.wall_time_s:.1f}",
        "tokens / s": lambda c: f"{c.generated_tokens / c.wall_time_s:.2f}" if c.wall_time_s else "-",
    }
    for label, cell in rows.items():
        table.add_row(label, *(cell(c) for c in costs.values()))
    return table


def _problem_by_id(problem_id: str, data_dir: str | None):
    from s2t.data import load_problems

    parts = problem_id.split("/")
    if len(parts) != 3 or not parts[2].isdigit():
        raise ValueError(
            f"problem id must look like DATASET/SPLIT/INDEX (e.g. gsm8k/test/0); got {problem_id!r}"
        )
    found = load_problems(parts[0], parts[1], limit=1, offset=int(parts[2]), data_dir=data_dir)
    if not found:
        raise ValueError(f"no problem {problem_id!r}: index out of range")
    return found[0]


def _calibration_questions(n: int, data_dir: str | None) -> list[str]:
    from s2t.data import load_problems

    if n < 1:
        raise ValueError("--calibration-problems must be >= 1 (or give --threshold)")
    return [p.question for p in load_problems("gsm8k", "train", limit=n, data_dir=data_dir)]
