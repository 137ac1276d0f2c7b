"""The one run loop: skip what a run directory holds, run the rest in shards, write each record as it arrives.

Evaluation (:mod:`s2t.evaluate`, :mod:`s2t.evaluate_distributed`), the hit@K analysis
(:mod:`s2t.analysis`) and collection (:mod:`s2t.training.collect`) all run the same way. Their
work is a list of *units* (a problem; a (method, problem) pair), each finished by one record
whose key names it. A :class:`RunDriver` finds the units whose records the run directory already
holds, cuts the pending ones into shards, hands the shards to a worker (in this process, or on
Ray actors through :func:`s2t.distributed.run_sharded`), and writes every record as soon as it
comes back: its side files first (atomically), then its line in the records file
(:meth:`s2t.runs.RunDirectory.append`), so a killed run loses at most the shards in flight and a
re-run resumes. One progress bar counts units.

What a unit, a shard and a record are stays with each command; this module knows only keys.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from tqdm.auto import tqdm

from s2t.distributed import run_sharded
from s2t.runs import RunDirectory


class RunDriver:
    """Drives one command's units of work into a records file of a run directory (or only in memory).

    Args:
        run: the run directory, or None to write nothing (records still reach ``on_record``).
        records_file: the JSONL file of finished records in ``run`` (e.g. ``results.jsonl``).
        key: what identifies a record, and so the unit it finishes (e.g. its problem id).
        side_files: for a record that points to files beside it, those files as
            ``{path relative to the run directory: bytes}``, taken out of the record (e.g. collection's
            feature tensors); they are written before the record, so a recorded unit never points to a
            missing file.
    """

    def __init__(
        self,
        run: RunDirectory | None,
        records_file: str,
        key: Callable[[dict], Hashable],
        side_files: Callable[[dict], dict[str, bytes]] | None = None,
    ):
        self.run = run
        self.records_file = records_file
        self.key = key
        self.side_files = side_files

    def records(self) -> list[dict]:
        """The records written so far, in file order ([] without a run directory)."""
        return self.run.records(self.records_file) if self.run is not None else []

    def done(self) -> set[Hashable]:
        """The keys of the records written so far."""
        return {self.key(record) for record in self.records()}

    def pending(
        self,
        units: Sequence[Any],
        unit_key: Callable[[Any], Hashable],
        done: Iterable[Hashable] | None = None,
    ) -> list[Any]:
        """The units, in order, whose key is not ``done`` (default: :meth:`done`)."""
        done = self.done() if done is None else set(done)
        return [u for u in units if unit_key(u) not in done]

    def write(self, record: dict) -> None:
        """Write one finished record: its side files (each atomically), then its line."""
        files = self.side_files(record) if self.side_files is not None else {}
        if self.run is None:
            return
        for name, data in files.items():
            self.run.write_bytes(name, data)
        self.run.append(record, self.records_file)

    def drive(
        self,
        units: Sequence[Any],
        unit_key: Callable[[Any], Hashable],
        make_worker: Callable[[], Any],
        *,
        work: str = "run_shard",
        done: Iterable[Hashable] | None = None,
        shard_size: int | None = None,
        shards: Callable[[list[Any]], list[Any]] | None = None,
        on_record: Callable[[dict], None] | None = None,
        postfix: Callable[[], dict[str, str]] | None = None,
        desc: str | None = None,
        unit: str = "problem",
        progress: bool = True,
        workers: int = 1,
        ray_address: str | None = None,
        **sharding: Any,
    ) -> int:
        """Run every pending unit of ``units`` and write its record; returns the number of records written.

        Args:
            units: all the run's units, finished or not (the bar counts them all).
            unit_key: a unit's key, equal to the key of the record that finishes it.
            make_worker, work: ``make_worker()`` builds the worker once per process (a picklable
                factory when ``workers > 1``); ``worker.<work>(shard)`` returns or yields the shard's records.
            done: the keys that count as finished (default: :meth:`done`); their records are never
                written again, even if a retried shard returns them.
            shard_size: units per shard (default: all pending units in one shard).
            shards: builds the shards from the pending units instead (e.g. one shard per method).
            on_record: called with each record after it is written.
            postfix: the progress bar's postfix after each record (e.g. a running accuracy).
            desc, unit, progress: the progress bar's label and unit, and whether to show it.
            workers, ray_address, sharding: Ray actors and the rest of
                :func:`s2t.distributed.run_sharded`'s options (``max_retries``, ``cpus_per_worker``, ...).

        Raises:
            ValueError: ``shard_size`` is below 1.
        """
        if shard_size is not None and shard_size < 1:
            raise ValueError(f"shard_size must be >= 1; got {shard_size}")
        done = self.done() if done is None else set(done)
        todo = self.pending(units, unit_key, done)
        if not todo:
            return 0
        if shards is not None:
            batches = shards(todo)
        else:
            size = shard_size or len(todo)
            batches = [todo[start : start + size] for start in range(0, len(todo), size)]
        bar = tqdm(
            total=len(units),
            initial=len(units) - len(todo),
            desc=desc,
            unit=unit,
            disable=not progress,
            dynamic_ncols=True,
        )

        def finished(record: dict) -> None:
            self.write(record)
            if on_record is not None:
                on_record(record)
            bar.update(1)
            if postfix is not None:
                bar.set_postfix(postfix())

        try:
            return run_sharded(
                make_worker,
                work,
                batches,
                on_record=finished,
                workers=workers,
                ray_address=ray_address,
                key=self.key,
                done=done,
                progress=False,
                log_to_driver=progress,
                **sharding,
            )
        finally:
            bar.close()


__all__ = ["RunDriver"]
