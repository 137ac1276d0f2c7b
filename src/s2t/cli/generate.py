"""``s2t generate`` and ``s2t prepare``: answer one question with several methods."""

from __future__ import annotations

import json
import sys
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
from s2t.method_names import LLM_ALONE, METHODS
from s2t.models import DEFAULT_LLM, DEFAULT_SLM, check_model_options


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
        str, typer.Option(help=f"Comma-separated: {', '.join(METHODS)} (a trigger setting may follow a '/').")
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
    """Answer one question with each method and print the answers and their costs.

    With ``--json`` stdout holds exactly one JSON document; everything meant for people (the
    problem, progress, errors) goes to stderr.
    """
    if as_json:
        console.stderr = True  # stdout holds the JSON document only (the app callback resets this)
    from s2t.backends import make_generator, resolve_backend
    from s2t.grading import extract_answer, is_correct

    gold = None
    try:
        if (question is None) == (problem is None):
            raise ValueError("give either a QUESTION or --problem ID")
        if question is not None and not question.strip():
            raise ValueError("the question is empty")
        options = dict(
            trigger=trigger,
            threshold=threshold,
            quantile=quantile,
            k=k,
            ratio=ratio,
            min_step=min_step,
            selector=selector,
            slm=slm,
        )
        dataset = problem.split("/")[0] if problem else None
        specs = method_specs(method, options, calibration_problems, max_new_tokens, data_dir, dataset)
        check_model_options(slm, llm, llm_dtype, llm_device_map)  # also where no method loads the LLM
        if problem is not None:
            found = _problem_by_id(problem, data_dir)
            question, gold = found.question, found.answer
            console.print(f"[bold]{found.id}:[/] {question}\n[dim]gold answer: {gold}[/]")
            _warn_if_trained_on(found, specs, selector)
        chosen = resolve_backend(backend, [slm, llm], specs)
        gen = make_generator(
            chosen, slm, llm, dtype=dtype, llm_dtype=llm_dtype, llm_device_map=llm_device_map
        )
        engine = gen.engine_description()
        console.print(f"[dim]decoding on {engine}[/]")
        results = {}
        for spec in specs:
            resolved = resolve_with_status(gen, spec)
            with console.status(f"decoding with {spec.name}"):
                out = gen.generate([question], resolved, max_new_tokens=max_new_tokens)[0]
            results[spec.name] = (out, resolved)
    except (ValueError, RuntimeError, KeyError, FileNotFoundError) as e:
        fail(str(e))

    if as_json:
        payload = {}
        for name, (out, r) in results.items():
            entry = {
                "text": out.text,
                "answer": extract_answer(out.text),
                "finish_reason": out.finish_reason,
                "cost": out.cost.to_dict(),
                "method": LLM_ALONE if r.llm_alone else r.method.describe(),
                "engine": engine,
            }
            if gold is not None:
                entry.update(problem_id=problem, gold=gold, correct=is_correct(gold, out.text))
            payload[name] = entry
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    for name, (out, r) in results.items():
        desc = "LLM alone" if r.llm_alone else _describe(r.method)
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


def _warn_if_trained_on(problem, specs, selector: str | None) -> None:
    """Say so when the graded problem is one the selector (or its learned trigger) was trained on:
    ``s2t eval`` refuses such problems; here one answer is shown, and its grade is no evidence."""
    if selector is None or not any(s.selector for s in specs):
        return
    from s2t.methods import selector_training_overlap

    for what, seen in selector_training_overlap(
        selector, [s for s in specs if s.selector], [problem]
    ).items():
        if seen:
            console.print(
                f"[yellow]note:[/] {what} in {selector} was trained on {problem.id}: its grade here says "
                "nothing about held-out accuracy (`s2t eval` refuses such problems)"
            )


def method_specs(
    methods: str,
    options: dict,
    calibration_problems: int,
    max_new_tokens: int,
    data_dir: str | None,
    dataset: str | None = None,
) -> list:
    """The checked :class:`~s2t.methods.MethodSpec` of each comma-separated method (before any model
    loads); triggers without a threshold calibrate on the training split of ``dataset`` (else GSM8K
    train) with the run's token budget."""
    from s2t.methods import CalibrationSource, MethodSpec, check_unread_options

    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not names:
        raise ValueError("give at least one method")
    calibration = CalibrationSource.for_dataset(
        dataset, problems=calibration_problems, max_new_tokens=max_new_tokens, data_dir=data_dir
    )
    specs = [MethodSpec.parse(name, **options, calibration=calibration) for name in names]
    check_unread_options(specs, options, calibration)  # a typo in an option no method reads fails too
    return specs


def resolve_with_status(gen, spec):
    """``gen.resolve(spec)``, saying on the console when the trigger is being calibrated."""
    if not spec.needs_calibration:
        return gen.resolve(spec)
    with console.status(f"calibrating the {spec.trigger} trigger on {spec.calibration.describe()}"):
        return gen.resolve(spec)


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
