"""``s2t analyze``: local sufficiency (hit@K at divergence points) for an SLM/LLM pair."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from s2t.cli.app import (
    DataDirOpt,
    DtypeOpt,
    LLMDeviceMapOpt,
    LLMDtypeOpt,
    RayAddressOpt,
    SLMOpt,
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
from s2t.models import DEFAULT_LLM, DEFAULT_SLM


def _short(name: str) -> str:
    """A model or dataset name as a directory-name fragment."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name.rstrip("/")).name or name).strip("_")


def default_out_dir(
    slm: str,
    llm: str,
    dataset: str,
    split: str,
    offset: int,
    limit: int | None,
    trajectory: str,
    divergence: str,
) -> Path:
    """``runs/analyze-<slm>-vs-<llm>-<dataset>-<split>-<offset>-<limit>-<trajectory>-<divergence>``."""
    span = f"{offset}+{limit if limit is not None else 'all'}"
    name = (
        f"analyze-{_short(slm)}-vs-{_short(llm)}-{_short(dataset)}-{split}-{span}-{trajectory}-{divergence}"
    )
    return Path("runs") / name


@app.command()
def analyze(
    slm: SLMOpt = DEFAULT_SLM,
    llm: Annotated[
        str, typer.Option(help="LLM (same kinds as --slm); must share the SLM's tokenizer.")
    ] = DEFAULT_LLM,
    dataset: Annotated[str, typer.Option(help="Dataset name (gsm8k, math500, ...).")] = "gsm8k",
    split: Annotated[str, typer.Option(help="Dataset split.")] = "test",
    limit: Annotated[int | None, limit_option("Analyse at most this many problems")] = 50,
    offset: Annotated[int, typer.Option(help="Skip this many problems first.")] = 0,
    trajectory: Annotated[
        str, typer.Option(help="Text to teacher-force: slm or llm (greedy answers) or reference (solutions).")
    ] = "slm",
    divergence: Annotated[
        str,
        typer.Option(help="Divergence points: top1 (top-1 tokens differ) or kl (KL above --kl-quantile)."),
    ] = "top1",
    kl_quantile: Annotated[
        float, typer.Option(help="For --divergence kl: the KL quantile over all positions.")
    ] = 0.95,
    ks: Annotated[str, typer.Option(help="Comma-separated K values of hit@K.")] = "1,2,4,8,16,32,64",
    max_new_tokens: Annotated[int, typer.Option(help="Stop trajectories after this many new tokens.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Problems per batch.")] = 8,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the bootstrap.")] = 0,
    out: Annotated[
        str | None,
        typer.Option(
            callback=nonempty_path, help="Run directory (default: derived under runs/); re-run to resume."
        ),
    ] = None,
    data_dir: DataDirOpt = None,
    data_file: Annotated[
        Path | None, typer.Option(help="A JSONL file of problems (used instead of --data-dir/the Hub).")
    ] = None,
    dtype: DtypeOpt = None,
    llm_dtype: LLMDtypeOpt = None,
    llm_device_map: LLMDeviceMapOpt = None,
    workers: WorkersOpt = 1,
    ray_address: RayAddressOpt = None,
) -> None:
    """Teacher-force one trajectory per problem through both models; report hit@K at divergence points."""
    from s2t.analysis import PLOT_FILE, POINTS_FILE, PROBLEMS_FILE, SUMMARY_FILE
    from s2t.analysis import analyze as run_analysis
    from s2t.data import load_problems
    from s2t.models import ModelSpec
    from s2t.reporting.hitk import hitk_table
    from s2t.runs import check_run_path

    try:
        k_values = [int(k) for k in ks.split(",") if k.strip()]
    except ValueError:
        fail(f"--ks must be comma-separated integers, e.g. 1,2,4,8; got {ks!r}")
    out_dir = (
        Path(out) if out else default_out_dir(slm, llm, dataset, split, offset, limit, trajectory, divergence)
    )
    try:
        problems = load_problems(
            dataset, split, limit=limit, offset=offset, data_file=data_file, data_dir=data_dir
        )
        if not problems:
            source = data_file or f"{dataset}/{split}"
            raise ValueError(f"no problems selected from {source} (offset {offset}, limit {limit})")
        check_run_path(out_dir)  # before the models load
        slm_spec = ModelSpec(slm, dtype)
        llm_spec = ModelSpec(llm, llm_dtype or dtype, llm_device_map)
        if workers <= 1:
            with console.status(f"loading {slm} and {llm}"):
                slm_spec, llm_spec = slm_spec.load(), llm_spec.load()
        summary = run_analysis(
            slm_spec,
            llm_spec,
            problems,
            trajectory=trajectory,
            divergence=divergence,
            kl_quantile=kl_quantile,
            ks=k_values,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            out_dir=out_dir,
            seed=seed,
            workers=workers,
            ray_address=ray_address,
        )
    except (ValueError, RuntimeError, KeyError, FileNotFoundError) as e:
        fail(str(e))
    except OSError as e:  # e.g. an --out that is a file
        fail_to_write(e, out_dir)
    except KeyboardInterrupt:
        fail_interrupted(out_dir)
    except ImportError as e:  # an interrupt inside an import (the report's plotting library)
        if not interrupted(e):
            raise
        fail_interrupted(out_dir)

    console.print(hitk_table(summary))
    console.print(
        f"[bold]results in {out_dir}[/]: {SUMMARY_FILE} (hit@K with CIs), {PLOT_FILE} (curve), "
        f"{PROBLEMS_FILE} (per problem), {POINTS_FILE} (per divergence point)"
    )
