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

This module knows nothing of what the work is, nor of run directories. Commands reach it through
:class:`s2t.run_driver.RunDriver` (the one run loop: done set, shards, progress, writing), each
with its own shard work: evaluation in :mod:`s2t.evaluate_distributed` (``EvalShardWorker``), the
hit@K analysis in :mod:`s2t.analysis` (``AnalyzeShardWorker``), collection in
:mod:`s2t.training.collect` (``CollectWorker``). A caller needs three things:

- a picklable factory building the worker inside an actor, e.g.
  ``functools.partial(MyWorker, config)``, where ``MyWorker`` is importable on the workers;
- a method on that worker taking one shard and returning a list of JSON-able records;
- an ``on_record`` that writes each record, and a ``key``/``done`` pair so that resumed or
  retried work is never written twice::

      run_sharded(partial(CollectWorker, config), "run_shard", shards,
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
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

RAY_INSTALL_HINT = 'pip install "select-to-think[ray]"'


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
    log_to_driver: bool | None = None,
) -> int:
    """Run ``make_worker().<work_fn_name>(shard)`` for every shard on ``workers`` Ray actors.

    Every record a shard returns is passed to ``on_record`` on this process, shard by shard as
    they complete, except records whose ``key`` is in ``done`` or was already passed on (so a
    retried shard never writes twice). A shard whose actor died or whose task raised is retried
    up to ``max_retries`` times (a dead actor is replaced by a fresh one, which rebuilds its
    worker); after that, the shards in flight are allowed to finish and a ``RuntimeError`` is
    raised: everything finished is already written, and re-running resumes from there.

    ``gpus_per_worker=None`` asks for one GPU per actor when the Ray cluster has GPUs, else
    for none (``cpus_per_worker`` CPUs). ``progress`` shows a bar of finished shards;
    ``log_to_driver`` (default: ``progress``) forwards the actors' output to this process when this
    call starts Ray. Returns the number of records passed to ``on_record``.
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
        ray.init(
            address=ray_address,
            include_dashboard=False,
            log_to_driver=progress if log_to_driver is None else log_to_driver,
        )
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


__all__ = [
    "RayUnavailableError",
    "WorkerSetupError",
    "import_ray",
    "run_sharded",
]
