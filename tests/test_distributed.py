"""Data-parallel evaluation on Ray: same results as one process, retried shards, no lost or doubled work."""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from s2t.analysis import PROBLEMS_FILE, analyze
from s2t.cli import app
from s2t.data import Problem
from s2t.distributed import RayUnavailableError, run_sharded
from s2t.evaluate import EvalConfig, evaluate
from s2t.evaluate_distributed import EvalShardWorker, eval_shards, evaluate_distributed
from s2t.models import ModelSpec
from s2t.training.collect import CollectConfig, Collector
from tests.conftest import QUESTIONS

METHODS = ["greedy", "s2t", "maj@2"]


@pytest.fixture(scope="module")
def ray_cluster():
    """One small local Ray instance for the whole module (its start-up dominates the run time)."""
    ray = pytest.importorskip("ray")
    # The test-only worker below lives in this module: ship it to the actors by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


def make_config(data_file, tiny_pair_dir, **overrides) -> EvalConfig:
    # models by path, so that every Ray actor can load its own copy
    base = dict(
        slm=tiny_pair_dir["slm"],
        llm=tiny_pair_dir["llm"],
        dataset="tiny",
        split="test",
        data_file=data_file,
        limit=None,
        max_new_tokens=8,
        methods=METHODS,
        trigger="entropy",
        threshold=None,
        quantile=0.8,
        calibration_problems=2,
        batch_size=2,
    )
    base.update(overrides)
    return EvalConfig(**base)


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def without_times(record: dict) -> dict:
    """A record without its timings and the name of the process that made it."""
    return {
        k: ({c: v for c, v in val.items() if c != "wall_time_s"} if k == "cost" else val)
        for k, val in record.items()
        if k != "invocation"
    }


def by_key(recs: list[dict]) -> dict:
    return {(r["method"], r["problem_id"]): without_times(r) for r in recs}


def strip_summary(payload: dict) -> dict:
    return {
        m: {k: v for k, v in e.items() if "wall" not in k and "time" not in k and k != "invocations"}
        for m, e in payload["methods"].items()
    }


class CrashOnceWorker(EvalShardWorker):
    """Kills its own process on the first attempt of the shard holding ``crash_on`` (test only)."""

    def __init__(self, config: EvalConfig, marker: str, crash_on: str, thresholds=None):
        super().__init__(config, thresholds)
        self.marker, self.crash_on = Path(marker), crash_on

    def run_shard(self, shard):
        if any(p.id == self.crash_on for _, problems in shard for p in problems) and not self.marker.exists():
            self.marker.write_text("crashed once")
            os._exit(1)
        return super().run_shard(shard)


def test_two_ray_workers_give_the_single_process_results(
    ray_cluster, tmp_path, data_file, tiny_pair_dir, calibration_data
):
    config = make_config(data_file, tiny_pair_dir)
    single = evaluate(config, tmp_path / "single", progress=False)
    spread = evaluate_distributed(config, tmp_path / "ray", workers=2, shard_size=2, progress=False)

    assert by_key(records(tmp_path / "ray")) == by_key(records(tmp_path / "single"))
    assert len(records(tmp_path / "ray")) == len(METHODS) * len(QUESTIONS)
    assert strip_summary(spread) == strip_summary(single)
    # calibrated once on the driver, and the stored config is the single-process one (no threshold)
    calibration = json.loads((tmp_path / "ray" / "calibration.json").read_text())
    assert calibration == json.loads((tmp_path / "single" / "calibration.json").read_text())
    config_file = json.loads((tmp_path / "ray" / "config.json").read_text())
    assert config_file == json.loads((tmp_path / "single" / "config.json").read_text())
    assert config_file["threshold"] is None


def test_a_worker_killed_mid_shard_is_retried_and_nothing_is_lost(
    ray_cluster, tmp_path, data_file, tiny_pair_dir
):
    run_dir = tmp_path / "run"
    # a run that already finished greedy on every problem, then resumed with two workers
    evaluate(
        make_config(data_file, tiny_pair_dir, methods=["greedy"], threshold=0.9), run_dir, progress=False
    )
    greedy_before = records(run_dir)
    marker = tmp_path / "crashed"
    config = make_config(data_file, tiny_pair_dir, methods=["greedy", "s2t"], threshold=0.9)
    evaluate_distributed(
        config,
        run_dir,
        workers=2,
        shard_size=2,
        max_retries=2,
        progress=False,
        worker_factory=partial(CrashOnceWorker, marker=str(marker), crash_on="tiny/test/2"),
    )

    assert marker.exists(), "the worker was never killed"
    recs = records(run_dir)
    keys = [(r["method"], r["problem_id"]) for r in recs]
    assert len(keys) == len(set(keys)), "a record was written twice"
    assert set(keys) == {(m, f"tiny/test/{i}") for m in ("greedy", "s2t") for i in range(len(QUESTIONS))}
    assert recs[: len(greedy_before)] == greedy_before, "finished work was rewritten"


def test_a_shard_that_keeps_failing_raises_after_max_retries_and_keeps_finished_work(ray_cluster):
    written = []
    with pytest.raises(RuntimeError, match="shard 1 failed 2 times"):
        run_sharded(
            FlakyWorker, "run", [1, 2, 3], on_record=written.append, workers=2, max_retries=1, progress=False
        )
    finished = [r["shard"] for r in written]
    assert 1 in finished and 2 not in finished and len(finished) == len(set(finished))


class FlakyWorker:
    def run(self, shard: int) -> list[dict]:
        if shard == 2:
            raise ValueError("always fails")
        return [{"shard": shard}]


def test_run_sharded_in_process_skips_records_already_done():
    written = []

    class Worker:
        def work(self, shard):
            return [{"id": i} for i in shard]

    count = run_sharded(
        Worker,
        "work",
        [[0, 1], [2, 3], [3, 4]],
        on_record=written.append,
        workers=1,
        key=lambda r: r["id"],
        done={1},
        progress=False,
    )
    assert [r["id"] for r in written] == [0, 2, 3, 4] and count == 4


def cli_args(data_file, tiny_pair_dir) -> list[str]:
    return [
        "eval",
        "--data-file",
        data_file,
        "--dataset",
        "tiny",
        "--slm",
        tiny_pair_dir["slm"],
        "--llm",
        tiny_pair_dir["llm"],
        "--threshold",
        "0.9",
    ]


def test_more_than_one_worker_without_ray_names_the_install_command(
    tmp_path, data_file, tiny_pair_dir, monkeypatch
):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    config = make_config(data_file, tiny_pair_dir, threshold=0.9)
    with pytest.raises(RayUnavailableError, match=r'pip install "select-to-think\[ray\]"'):
        evaluate_distributed(config, tmp_path / "run", workers=2, progress=False)
    result = CliRunner().invoke(
        app, [*cli_args(data_file, tiny_pair_dir), "--workers", "2", "--out", str(tmp_path / "cli")]
    )
    assert result.exit_code == 2
    assert "select-to-think[ray]" in result.stdout


def test_cli_eval_with_workers_uses_the_distributed_runner(tmp_path, data_file, tiny_pair_dir, monkeypatch):
    import s2t.evaluate_distributed

    calls = {}

    def fake(config, out, workers, ray_address):
        calls.update(config=config, out=out, workers=workers, ray_address=ray_address)
        return evaluate(config, out, progress=False)

    monkeypatch.setattr(s2t.evaluate_distributed, "evaluate_distributed", fake)
    result = CliRunner().invoke(
        app,
        [
            *cli_args(data_file, tiny_pair_dir),
            "--methods",
            "greedy",
            "--max-new-tokens",
            "4",
            "--workers",
            "3",
            "--ray-address",
            "auto",
            "--out",
            str(tmp_path / "cli"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert calls["workers"] == 3 and calls["ray_address"] == "auto"
    assert "| greedy |" in result.stdout


def problem_set(split: str) -> list[Problem]:
    return [Problem(f"tiny/{split}/{i}", q, a, "tiny", split) for i, (q, a) in enumerate(QUESTIONS)]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_records(got, expected, path="record"):
    """Equal, except floats within 1e-4: actors and this process may use other thread counts."""
    if isinstance(expected, float) or isinstance(got, float):
        assert got == pytest.approx(expected, abs=1e-4), path
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), path
        for key in expected:
            assert_same_records(got[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), path
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_same_records(g, e, f"{path}[{i}]")
    else:
        assert got == expected, path


def test_analyze_on_two_ray_workers_gives_the_single_process_records(ray_cluster, tmp_path, tiny_pair_dir):
    problems = problem_set("test")
    slm, llm = ModelSpec(tiny_pair_dir["slm"]), ModelSpec(tiny_pair_dir["llm"])
    kw = dict(max_new_tokens=6, batch_size=2, progress=False, n_resamples=200)
    single = analyze(slm, llm, problems, out_dir=tmp_path / "single", **kw)
    spread = analyze(slm, llm, problems, out_dir=tmp_path / "ray", workers=2, **kw)
    by_id = {r["id"]: r for r in jsonl(tmp_path / "ray" / PROBLEMS_FILE)}
    assert sorted(by_id) == [p.id for p in problems]
    assert_same_records([by_id[p.id] for p in problems], jsonl(tmp_path / "single" / PROBLEMS_FILE))
    assert_same_records(spread.to_dict() | {"config": None}, single.to_dict() | {"config": None})
    # the two runs resume each other: the config does not record how many workers made it
    assert json.loads((tmp_path / "ray" / "config.json").read_text()) == json.loads(
        (tmp_path / "single" / "config.json").read_text()
    )


def test_collect_on_two_ray_workers_gives_the_single_process_groups(ray_cluster, tmp_path, tiny_pair_dir):
    problems = problem_set("train")
    config = CollectConfig(
        slm=tiny_pair_dir["slm"],
        llm=tiny_pair_dir["llm"],
        dataset="tiny",
        k=4,
        max_new_tokens=8,
        batch_size=2,
    )
    Collector(config, tmp_path / "single", problems=problems, progress=False).run_all()
    assert Collector(config, tmp_path / "ray", problems=problems, progress=False, workers=2).run_all() == 5
    single = {r["problem_id"]: r for r in jsonl(tmp_path / "single" / "problems.jsonl")}
    spread = {r["problem_id"]: r for r in jsonl(tmp_path / "ray" / "problems.jsonl")}
    assert_same_records(spread, single)
    for record in single.values():  # the driver wrote the workers' feature files
        ours, theirs = (load_file(tmp_path / run / record["features"]) for run in ("single", "ray"))
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(theirs[key], ours[key], atol=2e-3, rtol=1e-2)
    # resuming with one worker finds nothing left to do
    assert Collector(config, tmp_path / "ray", problems=problems, progress=False).run_all() == 0


def test_distributed_collection_takes_model_names_not_loaded_models(slm, llm, tiny_pair_dir, tmp_path):
    config = CollectConfig(slm=tiny_pair_dir["slm"], llm=tiny_pair_dir["llm"], dataset="tiny")
    with pytest.raises(ValueError, match="each worker loads its own models"):
        Collector(config, tmp_path, slm=slm, llm=llm, problems=problem_set("train"), workers=2)


@pytest.mark.parametrize("command", ["analyze", "collect"])
def test_analyze_and_collect_with_workers_but_without_ray_name_the_install_command(
    command, tmp_path, data_file, tiny_pair_dir, monkeypatch
):
    monkeypatch.setitem(sys.modules, "ray", None)
    split = "test" if command == "analyze" else "train"
    result = CliRunner().invoke(
        app,
        [
            command,
            "--data-file",
            data_file,
            "--dataset",
            "tiny",
            "--split",
            split,
            "--slm",
            tiny_pair_dir["slm"],
            "--llm",
            tiny_pair_dir["llm"],
            "--workers",
            "2",
            "--out",
            str(tmp_path / command),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "select-to-think[ray]" in result.stdout
    assert not (tmp_path / command / "problems.jsonl").exists()


def test_a_resumed_run_spreads_its_remaining_problems_over_full_shards():
    problems = [Problem(f"tiny/test/{i}", f"q{i}", "1", "tiny", "test") for i in range(10)]
    done = {("greedy", f"tiny/test/{i}") for i in range(7)} | {("s2t", f"tiny/test/{i}") for i in range(5)}
    shards = eval_shards(["greedy", "s2t"], problems, done, shard_size=2)
    # problems 5..9 are unfinished (5 and 6 for s2t only); finished ones take no room in a shard
    assert [[(m, [p.id[-1] for p in todo]) for m, todo in shard] for shard in shards] == [
        [("s2t", ["5", "6"])],
        [("greedy", ["7", "8"]), ("s2t", ["7", "8"])],
        [("greedy", ["9"]), ("s2t", ["9"])],
    ]
    assert eval_shards(["greedy"], problems, {("greedy", p.id) for p in problems}, shard_size=4) == []
