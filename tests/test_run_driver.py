"""The one run loop: pending units in shards, side files before their record, resumption."""

from __future__ import annotations

import json
import os

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


def test_a_run_binds_problem_ids_to_their_content(tmp_path):
    from s2t.runs import PROBLEM_DIGESTS, ConfigMismatchError, RunDirectory

    run = RunDirectory(tmp_path / "run", {"a": 1})
    run.bind_problems([("p/0", "x"), ("p/1", "y")])
    run.bind_problems([("p/1", "y"), ("p/2", "z")])  # a longer run resumes and adds its problems
    assert json.loads((run.path / PROBLEM_DIGESTS).read_text()) == {"p/0": "x", "p/1": "y", "p/2": "z"}
    with pytest.raises(ConfigMismatchError, match=r"holds problem 'p/1' with other content \(1 of the 2"):
        run.bind_problems([("p/0", "x"), ("p/1", "other")])
    (run.path / PROBLEM_DIGESTS).write_text("[1, 2")
    with pytest.raises(ConfigMismatchError, match="is unreadable"):
        run.bind_problems([("p/0", "x")])
    # a run that failed before its first result gives back what it made, the binding included
    fresh = RunDirectory(tmp_path / "fresh", {"a": 1})
    fresh.bind_problems([("p/0", "x")])
    fresh.discard_if_unused()
    assert not fresh.path.exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    held = RunDirectory(tmp_path / "mine", {"a": 1})
    held.bind_problems([("p/0", "x")])
    held.discard_if_unused()
    assert sorted(p.name for p in held.path.iterdir()) == ["notes.txt"]


def test_a_claim_keeps_two_invocations_from_decoding_the_same_work(tmp_path):
    """Lanes may add different methods to one run side by side; the same method twice is refused."""
    from s2t.runs import RunBusyError, RunDirectory

    run = RunDirectory(tmp_path / "run", {"a": 1})
    other = RunDirectory(tmp_path / "run", {"a": 1})  # a second invocation on the same directory
    with run.claim(["greedy", "s2t/entropy@0.8"]):
        with pytest.raises(RunBusyError, match=r"s2t/entropy@0.8 is being run in .* \(process \d+\)"):
            with other.claim(["maj@8", "s2t/entropy@0.8"]):
                pass
        with other.claim(["maj@8"]):  # another method runs beside it
            pass
        with other.claim(["maj@8"]):  # and its claim ended with its block
            pass
    with other.claim(["greedy", "s2t/entropy@0.8"]):  # released with the first invocation's block
        assert len(list(run.path.glob(".claim-*.lock"))) == 2
    assert not list(run.path.glob(".claim-*.lock"))  # a released claim leaves no file behind
    # a file left by a killed holder holds no lock: it is taken over (and removed after)
    stale = run.path / ".claim-greedy-stale.lock"
    with run.claim(["greedy"]):
        (held,) = run.path.glob(".claim-*.lock")
        held.rename(stale)  # as if the holder had been killed: the file stays, its lock is gone with it
    stale.rename(held)
    with other.claim(["greedy"]):
        assert held.read_text() == f"process {os.getpid()}"
    assert not held.exists()
    # a claim is no work: a run that failed before its first result still gives its directory back
    fresh = RunDirectory(tmp_path / "fresh", {"a": 1})
    with fresh.claim(["greedy"]):
        pass
    fresh.discard_if_unused()
    assert not fresh.path.exists()


def test_atomic_writes_get_the_permissions_a_plain_open_gives(tmp_path):
    """``mkstemp`` makes owner-only files: a run directory on a shared server was unreadable to others."""
    import torch

    from s2t.policies.checkpoint import save_tensors
    from s2t.runs import write_json_atomic

    write_json_atomic(tmp_path / "config.json", {"a": 1})
    save_tensors({"w": torch.zeros(2)}, tmp_path / "weights.safetensors")  # safetensors' own: owner-only
    (tmp_path / "plain.json").write_text("{}")
    names = ("config.json", "weights.safetensors", "plain.json")
    mode = {name: (tmp_path / name).stat().st_mode & 0o777 for name in names}
    assert len(set(mode.values())) == 1, mode


def test_a_waiter_on_a_lock_file_its_holder_removed_ends_up_holding_the_current_file(tmp_path):
    """Lock files are removed on release; whoever was waiting on the removed one must not believe it
    holds the lock (a third process could then lock a new file under the same name)."""
    import threading
    import time

    from s2t.runs import lock_file, release_lock_file

    path = tmp_path / ".results.jsonl.lock"
    first = lock_file(path, blocking=True)
    got = {}
    waiter = threading.Thread(target=lambda: got.setdefault("handle", lock_file(path, blocking=True)))
    waiter.start()
    time.sleep(0.3)  # the waiter has opened the file and waits for its lock
    assert "handle" not in got
    release_lock_file(path, first)  # removes the file it waited on
    waiter.join(timeout=10)
    assert path.exists() and os.fstat(got["handle"].fileno()).st_ino == os.stat(path).st_ino
    with pytest.raises(BlockingIOError):  # and it holds that file's lock
        lock_file(path, blocking=False)
    release_lock_file(path, got["handle"])
    assert not path.exists()
