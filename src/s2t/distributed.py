"""Data-parallel work over Ray actors, with one process (the driver) writing the results.

The generic piece is :func:`run_sharded`: it starts ``workers`` Ray actors, each of which
builds its worker object once (``make_worker()``: load the models), hands them shards of work
one at a time, and streams every returned record to ``on_record`` on the driver as soon as
its shard completes (``ray.wait``). The driver is the only writer, so a run directory's
append-only ``results.jsonl`` (:class:`s2t.runs.RunDirectory`) stays the single source of
truth; finished shards are never lost. A shard whose actor died (``os._exit``, OOM, a lost
node) or whose task raised is resubmitted, on a fresh actor if the old one died, up to
``max_retries`` times; records already written (by ``key``) are skipped if a retry returns
them again. With ``workers <= 1`` the same code runs in-process and Ray is not needed.

Evaluation (:func:`evaluate_distributed`, ``s2t eval --workers N``) shards the problems into
contiguous shards; each actor builds an :class:`EvalShardWorker` (an evaluator with its own
model pair and no run directory) and returns, per shard, the records of every configured
method on that shard's unfinished problems. The trigger is calibrated once, on the driver,
before the fan-out (stored in the run's ``calibration.json`` as in a single-process run), and
the workers get the threshold; ``config.json`` is the same as a single-process run's, so a
distributed run and a single-process run can resume each other.

Reusing it for another command (``s2t collect``, ``s2t analyze``) needs three things:

- a picklable factory building the worker inside an actor, e.g.
  ``functools.partial(MyWorker, config)``, where ``MyWorker`` is importable on the workers;
- a method on that worker taking one shard and returning a list of JSON-able records;
- an ``on_record`` that appends to the run directory, and a ``key``/``done`` pair so that
  resumed or retried work is never written twice::

      run_sharded(partial(CollectWorker, config), "collect_shard", shards,
                  on_record=run.append, workers=4, ray_address="auto",
                  key=lambda r: r["problem_id"], done={r["problem_id"] for r in run.records()})

Ray is optional (``pip install "select-to-think[ray]"``) and imported only when
``workers > 1``. ``ray_address=None`` starts a local Ray instance (and shuts it down when the
work is done); ``"auto"`` or ``"ray://host:10001"``/``"host:6379"`` joins a running cluster
(see ``docs/scaling.md``). Each actor asks Ray for one GPU when the cluster has GPUs, else for
``cpus_per_worker`` CPUs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from s2t.data import Problem
from s2t.evaluate import EvalConfig, Evaluator, is_local_method

logger = logging.getLogger(__name__)

RAY_INSTALL_HINT = 'pip install "select-to-think[ray]"'

# An eval shard: the (method, problems) pairs still to do for one contiguous slice of problems.
EvalShard = list[tuple[str, list[Problem]]]


class RayUnavailableError(RuntimeError):
    """More than one worker was asked for but Ray is not installed."""


def import_ray():
    """Import Ray, or fail with the install command."""
    try:
        import ray
    except ImportError as e:
        raise RayUnavailableError(
            f"running with more than one worker needs Ray, which is not installed: {RAY_INSTALL_HINT} "
            "(or run with --workers 1)"
        ) from e
    return ray


class WorkerSetupError(RuntimeError):
    """A worker could not be built inside its actor (e.g. a model failed to load)."""


class ShardActor:
    """The body of every Ray actor: builds one worker and runs its ``work_fn_name`` on shards."""

    def __init__(self, make_worker: Callable[[], Any], cpu_threads: int | None = None):
        if cpu_threads:
            import torch

            torch.set_num_threads(cpu_threads)
        # A failure here is reported by the first call (and the driver replaces this actor), rather
        # than by Ray's generic "actor died in its creation task".
        self.worker, self.setup_error = None, None
        try:
            self.worker = make_worker()
        except Exception as e:
            self.setup_error = e

    def run(self, work_fn_name: str, shard: Any) -> list[dict]:
        if self.setup_error is not None:
            raise WorkerSetupError(
                f"the worker could not be built: {type(self.setup_error).__name__}: {self.setup_error}"
            ) from self.setup_error
        return list(getattr(self.worker, work_fn_name)(shard))


def _describe(err: BaseException) -> str:
    """The original error behind a Ray error, in one line where possible."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    return str(err)


def run_sharded(
    make_worker: Callable[[], Any],
    work_fn_name: str,
    shards: Sequence[Any],
    on_record: Callable[[dict], None],
    workers: int = 1,
    ray_address: str | None = None,
    max_retries: int = 2,
    *,
    key: Callable[[dict], Hashable] | None = None,
    done: Iterable[Hashable] = (),
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float | None = None,
    progress: bool = True,
) -> int:
    """Run ``make_worker().<work_fn_name>(shard)`` for every shard on ``workers`` Ray actors.

    Every record a shard returns is passed to ``on_record`` on this process, shard by shard as
    they complete, except records whose ``key`` is in ``done`` or was already passed on (so a
    retried shard never writes twice). A shard whose actor died or whose task raised is retried
    up to ``max_retries`` times (a dead actor is replaced by a fresh one, which rebuilds its
    worker); after that, the shards in flight are allowed to finish and a ``RuntimeError`` is
    raised: everything finished is already written, and re-running resumes from there.

    ``gpus_per_worker=None`` asks for one GPU per actor when the Ray cluster has GPUs, else
    for none (``cpus_per_worker`` CPUs). Returns the number of records passed to ``on_record``.
    """
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0; got {max_retries}")
    seen = set(done)
    emitted = 0
    bar = tqdm(total=len(shards), desc="shards", unit="shard", disable=not progress, dynamic_ncols=True)

    def emit(records: Iterable[dict]) -> None:
        nonlocal emitted
        for record in records:
            if key is not None:
                k = key(record)
                if k in seen:
                    continue
                seen.add(k)
            on_record(record)
            emitted += 1
        bar.update(1)

    if workers <= 1:
        worker = make_worker()
        for shard in shards:
            emit(getattr(worker, work_fn_name)(shard))
        bar.close()
        return emitted

    ray = import_ray()
    started_here = False
    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=progress)
        started_here = True
    actors: list[Any] = []  # one per slot; None after a death, until the slot gets new work
    try:
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        cpu_threads = None if gpus_per_worker else max(1, int(cpus_per_worker))
        actor_class = ray.remote(ShardActor).options(
            num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0
        )
        actors = [None] * min(workers, len(shards))
        queue = list(range(len(shards)))  # shard indices still to submit (retries go first)
        attempts = [0] * len(shards)
        pending: dict[Any, tuple[int, int]] = {}  # object ref -> (actor slot, shard index)
        failure: tuple[int, BaseException] | None = None

        def submit(slot: int) -> None:
            if not queue or failure is not None:
                return
            if actors[slot] is None:  # started lazily: a dead worker is replaced only if work remains
                actors[slot] = actor_class.remote(make_worker, cpu_threads)
            index = queue.pop(0)
            attempts[index] += 1
            pending[actors[slot].run.remote(work_fn_name, shards[index])] = (slot, index)

        for slot in range(len(actors)):
            submit(slot)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            slot, index = pending.pop(ready[0])
            try:
                records = ray.get(ready[0])
            except ray.exceptions.RayError as err:
                logger.warning("shard %d failed (attempt %d): %s", index, attempts[index], _describe(err))
                dead = isinstance(err, ray.exceptions.RayActorError)
                if dead or isinstance(getattr(err, "cause", None), WorkerSetupError):
                    ray.kill(actors[slot], no_restart=True)  # a fresh process for the next try
                    actors[slot] = None
                if attempts[index] <= max_retries:
                    queue.insert(0, index)
                elif failure is None:
                    failure = (index, err)
            else:
                emit(records)
            submit(slot)
    finally:
        bar.close()
        for actor in actors:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        if started_here:
            ray.shutdown()
    if failure is not None:
        index, err = failure
        raise RuntimeError(
            f"shard {index} failed {attempts[index]} times (max_retries={max_retries}); every finished "
            f"shard is written, so re-running resumes from there. Last error: {_describe(err)}"
        ) from err
    return emitted


class EvalShardWorker:
    """What each evaluation actor builds once: an evaluator with its own model pair, writing nothing."""

    def __init__(self, config: EvalConfig, thresholds: dict[str, float] | None = None):
        import transformers

        transformers.utils.logging.disable_progress_bar()  # per-load bars from every actor are noise
        self.evaluator = Evaluator(config, None, progress=False, problems=[], thresholds=thresholds)
        _ = self.evaluator.generator  # load the SLM now (the LLM loads when a method first needs it)

    def run_shard(self, shard: EvalShard) -> list[dict]:
        """The records of every (method, problems) pair of the shard, graded, in order."""
        records: list[dict] = []
        for method, problems in shard:
            records.extend(self.evaluator.run_method(method, problems))
        return records


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
    thresholds = evaluator.prepare_methods()  # calibrates once, here; stored in calibration.json
    for method in config.methods:
        if is_local_method(method):  # one trained selector per method name, as in a single process
            evaluator.check_same_selector(method)
    run, done = evaluator.run, evaluator.finished()
    # at most two batches a shard, and enough shards that every worker gets some
    remaining = len(unfinished_problems(config.methods, evaluator.problems, done))
    shard_size = shard_size or max(1, min(2 * config.batch_size, -(-remaining // max(workers, 1))))
    shards = eval_shards(config.methods, evaluator.problems, done, shard_size)
    del evaluator  # the driver only writes from here on: free any models that calibration loaded
    if shards:
        logger.info("%d shards of up to %d problems on %d workers", len(shards), shard_size, workers)
        run_sharded(
            partial(worker_factory, config, thresholds=thresholds),
            "run_shard",
            shards,
            on_record=run.append,
            workers=workers,
            ray_address=ray_address,
            max_retries=max_retries,
            key=record_key,
            done=done,
            cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker,
            progress=progress,
        )
    return write_report(run.path)


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


def record_key(record: dict) -> tuple[str, str]:
    """What identifies an evaluation record: its (method, problem)."""
    return record["method"], record["problem_id"]


__all__ = [
    "EvalShardWorker",
    "RayUnavailableError",
    "WorkerSetupError",
    "eval_shards",
    "evaluate_distributed",
    "import_ray",
    "prepare_builtin_models",
    "record_key",
    "run_sharded",
]
