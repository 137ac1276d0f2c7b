"""The ``s2t`` Typer application and the options its commands share."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from s2t.method_names import TRIGGER_NAMES

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Select to Think: SLMs that select among their own top-K.",
)
console = Console(emoji=False)  # a method named s2t:x:y is printed as typed, not as an emoji code

SLMOpt = Annotated[str, typer.Option(help="SLM: built-in name, local directory, .gguf file or Hub id.")]
LLMOpt = Annotated[str, typer.Option(help="LLM (same kinds as --slm); loaded only if a method needs it.")]
TriggerOpt = Annotated[
    str,
    typer.Option(
        help=f"Trigger: {', '.join(TRIGGER_NAMES)} (learned: the LLM-free trigger stored with --selector)."
    ),
]
ThresholdOpt = Annotated[
    float | None, typer.Option(help="Trigger threshold (else calibrated as --quantile).")
]
QuantileOpt = Annotated[
    float | None,
    typer.Option(help="Calibrate the threshold as this quantile on training problems (default 0.95)."),
]
KOpt = Annotated[int, typer.Option("--k", "-k", help="Candidate set size: the SLM's top-K.")]
RatioOpt = Annotated[float | None, typer.Option(help="Keep candidates with p > ratio * p_max.")]
DtypeOpt = Annotated[str | None, typer.Option(help="float32 (default), bfloat16 or float16.")]
DecodeDtypeOpt = Annotated[
    str | None,
    typer.Option(
        help="float32, bfloat16 or float16; default bfloat16 on hardware that computes in it "
        "(CUDA, CPUs with AVX512-BF16 or AMX), else float32. The torch backend only: llama.cpp runs the "
        "GGUF files' own weight types."
    ),
]
LLMDtypeOpt = Annotated[
    str | None, typer.Option(help="The LLM's dtype (default: --dtype): float32, bfloat16 or float16.")
]
LLMDeviceMapOpt = Annotated[
    str | None,
    typer.Option(help="Place the LLM with transformers' device_map, e.g. 'auto' to spread it over the GPUs."),
]
WorkersOpt = Annotated[
    int,
    typer.Option(min=1, help="Ray workers (one model pair each; one GPU each when the cluster has GPUs)."),
]
RayAddressOpt = Annotated[
    str | None, typer.Option(help="Ray cluster to join ('auto', host:port); default: start Ray locally.")
]
BackendOpt = Annotated[
    str,
    typer.Option(
        help="torch, llama.cpp, or auto: llama.cpp on a CPU when llama-cpp-python is installed (the "
        "'llamacpp' extra) and the models are GGUF files or built-in names, else torch."
    ),
]
MinStepOpt = Annotated[int, typer.Option(help="No trigger in the first N steps.")]
CalibrationProblemsOpt = Annotated[
    int, typer.Option(help="Training problems (the dataset's train split, else GSM8K's) used to calibrate.")
]
SelectorOpt = Annotated[
    str | None, typer.Option(help="Trained S2T-Local selector directory (for s2t-local; see `s2t train`).")
]
DataDirOpt = Annotated[
    str | None,
    typer.Option(help="Directory with <dataset>/<split>.jsonl files (else $S2T_DATA_DIR, else the Hub)."),
]


def fail(message: str) -> None:
    # escape: messages hold brackets (ids, "select-to-think[ray]") that rich would read as markup
    # soft_wrap: one line however narrow the terminal, so paths in it stay whole
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2)


def parse_limit(value: str | int | None) -> int | None:
    """``--limit``: a number of problems, or ``all`` (None: every problem)."""
    if value is None or isinstance(value, int):
        return value
    if value.strip().lower() == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"give a number of problems, or 'all'; got {value!r}") from None


def nonempty_path(value: str | None) -> str | None:
    """An option's callback: a path given as an empty string is refused (it used to fall back to a
    default directory, or to the current one)."""
    if value is not None and not value.strip():
        raise typer.BadParameter("is empty: give a directory")
    return value


def limit_option(help: str) -> typer.models.OptionInfo:
    """The ``--limit`` option of the commands that read a dataset (``N`` or ``all``)."""
    return typer.Option(parser=parse_limit, metavar="N|all", help=f"{help} ('all': every problem).")


def fail_interrupted(out) -> None:
    """:func:`fail` for Ctrl-C (or SIGTERM) during a resumable run: where the finished work is, and
    how to resume it."""
    if out is not None and Path(out).exists():
        fail(f"interrupted: what finished is in {out}; run the same command again to resume")
    fail("interrupted before anything finished: nothing was kept")


def interrupted(error: BaseException) -> bool:
    """Whether ``error`` came of an interrupt: SIGTERM or Ctrl-C inside an import (matplotlib's C
    extensions, when a report is drawn) surfaces as an ``ImportError`` with the ``KeyboardInterrupt``
    as its context."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def fail_to_write(error: OSError, out) -> None:
    """:func:`fail` for an ``--out`` that cannot be written (a file, under a file, not writable): one
    line naming the path, not a traceback."""
    fail(f"cannot write {error.filename or out}: {error.strerror or error}")


class _ProgressAwareHandler(logging.StreamHandler):
    """Log lines to stderr through ``tqdm.write``, so a warning printed while a progress bar runs (a
    diverged epoch) gets a line of its own instead of landing mid-bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # as StreamHandler does: logging never raises
            self.handleError(record)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="CPU threads for decoding and training, on either backend (default: torch's own choice, "
            "and for llama.cpp $OMP_NUM_THREADS or the cores up to 8).",
        ),
    ] = None,
) -> None:
    console.stderr = False  # a command may send its human text to stderr (generate --json)
    from s2t.runs import interrupt_on_sigterm

    interrupt_on_sigterm()  # `timeout` or a scheduler stops a run as Ctrl-C does: work kept, claims released
    if threads is not None:
        import os

        import torch

        from s2t.backends.base import THREADS_ENV

        torch.set_num_threads(threads)
        os.environ[THREADS_ENV] = str(threads)  # the llama.cpp backend's default
    if not verbose:
        # transformers' per-load "Loading weights" bars are noise next to our own progress output
        import transformers

        transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        handlers=[_ProgressAwareHandler()],
    )
    if not verbose and not sys.stderr.isatty():
        # Spinners and bars stay silent off a terminal: our own progress lines (model preparation,
        # calibration) keep a log file or a pipe informed instead of minutes of silence.
        logging.getLogger("s2t").setLevel(logging.INFO)
