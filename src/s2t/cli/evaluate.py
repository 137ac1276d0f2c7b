"""``s2t eval`` and ``s2t report``: benchmark evaluation with baselines, statistics and costs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from s2t.cli.app import (
    BackendOpt,
    CalibrationProblemsOpt,
    DecodeDtypeOpt,
    KOpt,
    LLMDeviceMapOpt,
    LLMDtypeOpt,
    LLMOpt,
    QuantileOpt,
    RatioOpt,
    RayAddressOpt,
    SLMOpt,
    ThresholdOpt,
    TriggerOpt,
    WorkersOpt,
    app,
    console,
    fail,
    fail_interrupted,
    fail_to_write,
    interrupted,
    limit_option,
    nonempty_path,
)
from s2t.method_names import METHODS
from s2t.models import DEFAULT_LLM, DEFAULT_SLM


def _default_out(dataset: str, split: str, limit: int | None, offset: int) -> str:
    span = f"{offset}-{offset + limit}" if limit else f"{offset}-all"
    return str(Path("runs") / f"eval-{dataset}-{split}-{span}")


@app.command("eval")
def eval_command(
    methods: Annotated[
        str,
        typer.Option(
            help=f"Comma-separated: {', '.join(METHODS)}, maj@K (METHOD:LABEL adds a second selector or "
            "learned trigger to a run: s2t-local:lora, s2t:hidden/learned; a trigger setting may follow a '/', "
            "e.g. s2t/entropy@0.8)."
        ),
    ] = "greedy,s2t",
    dataset: Annotated[
        str, typer.Option(help="Registered dataset (gsm8k, math500, aime25, olympiadbench).")
    ] = "gsm8k",
    split: Annotated[str, typer.Option(help="Dataset split to evaluate.")] = "test",
    limit: Annotated[int | None, limit_option("Evaluate the first N problems (after --offset)")] = 100,
    offset: Annotated[int, typer.Option(help="Skip this many problems first.")] = 0,
    data_file: Annotated[str | None, typer.Option(help="A local JSONL with question/answer fields.")] = None,
    out: Annotated[
        str | None, typer.Option(callback=nonempty_path, help="Run directory (resumed if it exists).")
    ] = None,
    slm: SLMOpt = DEFAULT_SLM,
    llm: LLMOpt = DEFAULT_LLM,
    trigger: TriggerOpt = "entropy",
    threshold: ThresholdOpt = None,
    quantile: QuantileOpt = 0.95,
    k: KOpt = 8,
    ratio: RatioOpt = None,
    min_step: Annotated[int, typer.Option(help="No trigger in the first N steps.")] = 3,
    max_new_tokens: Annotated[int, typer.Option(help="Stop after this many new tokens.")] = 512,
    calibration_problems: CalibrationProblemsOpt = 8,
    batch_size: Annotated[int, typer.Option(help="Problems decoded together.")] = 8,
    seed: Annotated[int, typer.Option(min=0, help="Seed for sampling (maj@k) and random controls.")] = 0,
    dtype: DecodeDtypeOpt = None,
    selector: Annotated[
        str | None, typer.Option(help="Trained S2T-Local selector directory (s2t-local).")
    ] = None,
    llm_dtype: LLMDtypeOpt = None,
    llm_device_map: LLMDeviceMapOpt = None,
    workers: WorkersOpt = 1,
    ray_address: RayAddressOpt = None,
    backend: BackendOpt = "auto",
) -> None:
    """Evaluate methods on a benchmark; results stream into a resumable run directory."""

    from s2t.data import DatasetUnavailableError
    from s2t.evaluate import EvalConfig, evaluate
    from s2t.reporting.eval_report import markdown_table
    from s2t.runs import ConfigMismatchError

    out = out or _default_out(dataset, split, limit, offset)
    announced = False  # whether "run directory: ..." was printed, so a failure says if it was kept
    try:
        config = EvalConfig(
            slm=slm,
            llm=llm,
            dataset=dataset,
            split=split,
            limit=limit,
            offset=offset,
            data_file=data_file,
            methods=[m.strip() for m in methods.split(",") if m.strip()],
            max_new_tokens=max_new_tokens,
            trigger=trigger,
            threshold=threshold,
            quantile=quantile,
            k=k,
            ratio=ratio,
            min_step=min_step,
            calibration_problems=calibration_problems,
            seed=seed,
            dtype=dtype,
            batch_size=batch_size,
            selector=selector,
            llm_dtype=llm_dtype,
            llm_device_map=llm_device_map,
            backend=backend,
        )
        console.print(f"run directory: {out}")
        announced = True
        if workers > 1:
            from s2t.evaluate_distributed import evaluate_distributed

            payload = evaluate_distributed(config, out, workers=workers, ray_address=ray_address)
        else:
            payload = evaluate(config, out)
    except (
        ValueError,
        RuntimeError,
        KeyError,
        FileNotFoundError,
        ConfigMismatchError,
        DatasetUnavailableError,
    ) as e:
        gone = announced and not Path(out).exists()  # a run that failed before its first result
        fail(str(e) + (f" (nothing was kept: no {out} is left)" if gone else ""))
    except OSError as e:  # e.g. an unwritable --out: one line naming the path, not a traceback
        fail_to_write(e, out)
    except KeyboardInterrupt:
        fail_interrupted(out)
    except ImportError as e:  # an interrupt inside an import (the report's plotting library)
        if not interrupted(e):
            raise
        fail_interrupted(out)
    console.print(markdown_table(payload["methods"]), markup=False, highlight=False, soft_wrap=True)
    written = ["summary.json", "report.md", "accuracy_vs_cost.png", "frontier.png"]
    console.print("wrote " + ", ".join(f"{out}/{name}" for name in written if (Path(out) / name).is_file()))


@app.command()
def report(run_dir: Annotated[str, typer.Argument(help="An eval run directory.")]) -> None:
    """Recompute an eval run's summary, table and plot from its results (also while it runs)."""
    from s2t.reporting.eval_report import markdown_table, write_report
    from s2t.runs import run_kind

    config_file = Path(run_dir) / "config.json"
    if not Path(run_dir).exists():
        fail(f"{run_dir} does not exist")
    if not config_file.is_file():
        fail(f"{run_dir} is not an eval run directory (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"{config_file} is unreadable: {e}")
    made_by = run_kind(config) if isinstance(config, dict) else "another command"
    if made_by != "s2t eval":  # nothing is written over another command's run
        fail(f"{run_dir} is not an eval run directory: it was made by {made_by}")
    try:
        payload = write_report(run_dir)
    except ValueError as e:  # a malformed results line or record
        fail(str(e))
    except (KeyboardInterrupt, ImportError) as e:
        if not interrupted(e):
            raise
        fail(f"interrupted: the report in {run_dir} may be incomplete; run `s2t report {run_dir}` again")
    console.print(markdown_table(payload["methods"]), markup=False, highlight=False, soft_wrap=True)
