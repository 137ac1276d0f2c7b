"""The one run loop: pending units in shards, side files before their record, resumption."""

from __future__ import annotations

import json

import pytest

from s2t.run_driver import RunDriver
from s2t.runs import RunDirectory


class SquareWorker:
    """Records ``{"id": n, "square": n*n}`` for a shard of numbers, with a side file each."""

    def __init__(self):
        self.shards: list[list[int]] = []

    def run_shard(self, shard: list[int]):
        self.shards.append(list(shard))
        for n in shard:
            yield {"id": n, "square": n * n, "file": f"side/{n}.bin", "data": bytes([n])}


class CheckedRunDirectory(RunDirectory):
    """Refuses to append a record before the side file it points to exists."""

    def append(self, record: dict, name: str = "results.jsonl") -> None:
        assert (self.path / record["file"]).is_file(), "a record was written before its side file"
        super().append(record, name)


def driver_for(path) -> RunDriver:
    return RunDriver(
        CheckedRunDirectory(path, {"kind": "squares"}),
        "squares.jsonl",
        key=lambda r: r["id"],
        side_files=lambda r: {r["file"]: r.pop("data")},
    )


def test_a_drive_runs_pending_units_in_shards_and_a_resumed_one_runs_only_the_rest(tmp_path):
    worker = SquareWorker()
    seen = []
    assert (
        driver_for(tmp_path).drive([1, 2, 3], lambda n: n, lambda: worker, shard_size=2, progress=False) == 3
    )
    assert worker.shards == [[1, 2], [3]]

    resumed = driver_for(tmp_path)
    assert resumed.done() == {1, 2, 3}
    written = resumed.drive(
        [1, 2, 3, 4, 5], lambda n: n, lambda: worker, shard_size=2, on_record=seen.append, progress=False
    )
    assert written == 2 and worker.shards[-1] == [4, 5]
    assert [r["id"] for r in seen] == [4, 5]
    lines = [json.loads(line) for line in (tmp_path / "squares.jsonl").read_text().splitlines()]
    assert [r["square"] for r in lines] == [1, 4, 9, 16, 25]
    assert all("data" not in r for r in lines)
    assert (tmp_path / "side" / "5.bin").read_bytes() == bytes([5])
    assert resumed.drive([1, 2, 3, 4, 5], lambda n: n, lambda: worker, progress=False) == 0


def test_without_a_run_directory_records_reach_on_record_only(tmp_path):
    seen = []
    driver = RunDriver(None, "squares.jsonl", lambda r: r["id"])
    assert driver.records() == [] and driver.done() == set()
    driver.drive([1, 2], lambda n: n, SquareWorker, on_record=seen.append, progress=False)
    assert [r["square"] for r in seen] == [1, 4]
    with pytest.raises(ValueError, match="shard_size must be >= 1"):
        driver.drive([3], lambda n: n, SquareWorker, shard_size=0, progress=False)


def test_json_files_are_strict_json_with_non_finite_numbers_as_null(tmp_path):
    from s2t.runs import write_json_atomic

    write_json_atomic(
        tmp_path / "a.json", {"auroc": float("nan"), "losses": [1.5, float("inf")], "n": (1, 2)}
    )
    text = (tmp_path / "a.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"auroc": None, "losses": [1.5, None], "n": [1, 2]}
