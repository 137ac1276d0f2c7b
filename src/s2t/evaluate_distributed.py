"""Evaluation on Ray actors: the evaluation's shard work over the generic runner of :mod:`s2t.distributed`.

:func:`evaluate_distributed` (``s2t eval --workers N``) shards the problems into contiguous
shards; each actor builds an :class:`EvalShardWorker` (an evaluator with its own model pair and
no run directory) and returns, per shard, the records of every configured method on that
shard's unfinished problems. The trigger is calibrated once, on the driver, before the fan-out
(stored in the run's ``calibration.json`` as in a single-process run), and the workers get the
threshold; ``config.json`` is the same as a single-process run's, so a distributed run and a
single-process run can resume each other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from s2t.data import Problem
from s2t.distributed import import_ray
from s2t.evaluate import EvalConfig, EvalShard, Evaluator, unit_key

logger = logging.getLogger(__name__)


class EvalShardWorker:
    """What each evaluation actor builds once: an evaluator with its own model pair, writing nothing."""

    def __init__(self, config: EvalConfig, thresholds: dict[str, float] | None = None):
        import transformers

        transformers.utils.logging.disable_progress_bar()  # per-load bars from every actor are noise
        self.evaluator = Evaluator(config, None, progress=False, problems=[], thresholds=thresholds)
        _ = self.evaluator.generator  # load the SLM now (the LLM loads when a method first needs it)

    def run_shard(self, shard: EvalShard) -> list[dict]:
        """The records of every (method, problems) pair of the shard, graded, in order."""
        return list(self.evaluator.run_shard(shard))


def eval_shards(
    methods: Sequence[str], problems: Sequence[Problem], done: set[tuple[str, str]], shard_size: int
) -> list[EvalShard]:
    """Shards of up to ``shard_size`` unfinished problems, in order; each lists, per method, the
    problems not done yet. Finished problems take no room, so a resumed run's remaining work is
    spread over as many shards as a fresh run's would be."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1; got {shard_size}")
    todo = unfinished_problems(methods, problems, done)
    shards = []
    for start in range(0, len(todo), shard_size):
        chunk = todo[start : start + shard_size]
        shard = [(m, [p for p in chunk if (m, p.id) not in done]) for m in methods]
        shards.append([(m, left) for m, left in shard if left])
    return shards


def unfinished_problems(
    methods: Sequence[str], problems: Sequence[Problem], done: set[tuple[str, str]]
) -> list[Problem]:
    """The problems that some method has not finished yet, in order."""
    return [p for p in problems if any((m, p.id) not in done for m in methods)]


def evaluate_distributed(
    config: EvalConfig,
    out_dir: str | Path,
    *,
    workers: int = 2,
    ray_address: str | None = None,
    shard_size: int | None = None,
    max_retries: int = 2,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float | None = None,
    progress: bool = True,
    problems: Sequence[Problem] | None = None,
    worker_factory: Callable[[EvalConfig], Any] = EvalShardWorker,
) -> dict:
    """Run (or resume) an evaluation on ``workers`` Ray actors and write its report; returns the summary.

    The run directory, its ``config.json``, ``results.jsonl`` and report are exactly those of
    :func:`s2t.evaluate.evaluate`; only the wall times differ. ``shard_size`` (default: at most
    twice the batch size, and small enough that every worker gets a shard) is the unit of work
    and of retry. ``worker_factory(config, thresholds=...)`` builds each
    actor's worker (default :class:`EvalShardWorker`; tests wrap it to kill a worker).
    """
    from s2t.reporting.eval_report import write_report

    if workers > 1:
        import_ray()  # fail before any model is loaded
    evaluator = Evaluator(config, out_dir, progress=progress, problems=problems)
    prepare_builtin_models(config)
    try:
        thresholds = evaluator.prepare_methods()  # calibrates once, here; stored in calibration.json
    except BaseException:  # e.g. a --k above the vocabulary: the corrected command is not refused
        evaluator.run.discard_if_unused()
        raise
    for method in config.methods:
        if config.uses_selector(method):  # one trained selector per method name, as in a single process
            evaluator.check_same_selector(method)
    problems, driver, done = evaluator.problems, evaluator.driver, evaluator.finished()
    # at most two batches a shard, and enough shards that every worker gets some
    remaining = len(unfinished_problems(config.methods, problems, done))
    shard_size = shard_size or max(1, min(2 * config.batch_size, -(-remaining // max(workers, 1))))
    del evaluator  # the driver only writes from here on: free any models that calibration loaded

    def shards(_pending) -> list[EvalShard]:
        built = eval_shards(config.methods, problems, done, shard_size)
        logger.info("%d shards of up to %d problems on %d workers", len(built), shard_size, workers)
        return built

    pending = [m for m in config.methods if any((m, p.id) not in done for p in problems)]
    with driver.run.claim(pending):  # no other invocation decodes these methods into this run meanwhile
        driver.drive(
            [(method, p) for p in problems for method in config.methods],
            lambda unit: unit_key(*unit),
            partial(worker_factory, config, thresholds=thresholds),
            done=done,
            shards=shards,
            unit="result",
            desc=f"{len(config.methods)} methods on {workers} workers",
            progress=progress,
            workers=workers,
            ray_address=ray_address,
            max_retries=max_retries,
            cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker,
        )
    return write_report(driver.run.path)


def prepare_builtin_models(config: EvalConfig) -> None:
    """Fetch and convert the built-in models the workers will load, once, here.

    Otherwise every actor on this node would convert the same GGUF at the same time. On a
    multi-node cluster run ``s2t prepare`` on every node first (see ``docs/scaling.md``).
    """
    from s2t.builtin_models import BUILTIN_MODELS, prepare_builtin

    wanted = [config.slm] + ([config.llm] if any(config.needs_llm(m) for m in config.methods) else [])
    for name in wanted:
        if name in BUILTIN_MODELS:
            prepare_builtin(name)


__all__ = [
    "EvalShardWorker",
    "eval_shards",
    "evaluate_distributed",
    "prepare_builtin_models",
    "unfinished_problems",
]
