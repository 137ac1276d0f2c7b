"""Data-parallel evaluation on Ray: same results as one process, retried shards, no lost or doubled work."""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path

import pytest
from typer.testing import CliRunner

from s2t.cli import app
from s2t.distributed import EvalShardWorker, RayUnavailableError, evaluate_distributed, run_sharded
from s2t.evaluate import EvalConfig, evaluate

QUESTIONS = [("How many eggs are left? 16 - 3 - 4", "9"), ("What is 2 + 2?", "4"), ("Double 21.", "42"),
             ("Half of 48?", "24"), ("5 times 3?", "15")]  # fmt: skip
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


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text("\n".join(json.dumps({"question": q, "answer": f"work\n#### {a}"}) for q, a in QUESTIONS))
    return str(path)


@pytest.fixture()
def calibration_data(tmp_path, data_file, monkeypatch):
    """GSM8K 'train' problems for calibrating the trigger (read on the driver only)."""
    (tmp_path / "data" / "gsm8k").mkdir(parents=True)
    (tmp_path / "data" / "gsm8k" / "train.jsonl").write_text(Path(data_file).read_text())
    monkeypatch.setenv("S2T_DATA_DIR", str(tmp_path / "data"))


def make_config(data_file, tiny_pair_dir, **overrides) -> EvalConfig:
    # models by path, so that every Ray actor can load its own copy
    base = dict(slm=tiny_pair_dir["slm"], llm=tiny_pair_dir["llm"], dataset="tiny", split="test",
                data_file=data_file, limit=None, max_new_tokens=8, methods=METHODS, trigger="entropy",
                threshold=None, quantile=0.8, calibration_problems=2, batch_size=2)  # fmt: skip
    base.update(overrides)
    return EvalConfig(**base)


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def without_times(record: dict) -> dict:
    return {k: ({c: v for c, v in val.items() if c != "wall_time_s"} if k == "cost" else val)
            for k, val in record.items()}  # fmt: skip


def by_key(recs: list[dict]) -> dict:
    return {(r["method"], r["problem_id"]): without_times(r) for r in recs}


def strip_summary(payload: dict) -> dict:
    return {m: {k: v for k, v in e.items() if "wall" not in k and "time" not in k}
            for m, e in payload["methods"].items()}  # fmt: skip


class CrashOnceWorker(EvalShardWorker):
    """Kills its own process on the first attempt of the shard holding ``crash_on`` (test only)."""

    def __init__(self, config: EvalConfig, marker: str, crash_on: str):
        super().__init__(config)
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
        config, run_dir, workers=2, shard_size=2, max_retries=2, progress=False,
        worker_factory=partial(CrashOnceWorker, marker=str(marker), crash_on="tiny/test/2"),
    )  # fmt: skip

    assert marker.exists(), "the worker was never killed"
    recs = records(run_dir)
    keys = [(r["method"], r["problem_id"]) for r in recs]
    assert len(keys) == len(set(keys)), "a record was written twice"
    assert set(keys) == {(m, f"tiny/test/{i}") for m in ("greedy", "s2t") for i in range(len(QUESTIONS))}
    assert recs[: len(greedy_before)] == greedy_before, "finished work was rewritten"


def test_a_shard_that_keeps_failing_raises_after_max_retries_and_keeps_finished_work(ray_cluster):
    written = []
    with pytest.raises(RuntimeError, match="shard 1 failed 2 times"):
        run_sharded(FlakyWorker, "run", [1, 2, 3], on_record=written.append, workers=2, max_retries=1,
                    progress=False)  # fmt: skip
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

    count = run_sharded(Worker, "work", [[0, 1], [2, 3], [3, 4]], on_record=written.append, workers=1,
                        key=lambda r: r["id"], done={1}, progress=False)  # fmt: skip
    assert [r["id"] for r in written] == [0, 2, 3, 4] and count == 4


def cli_args(data_file, tiny_pair_dir) -> list[str]:
    return ["eval", "--data-file", data_file, "--dataset", "tiny", "--slm", tiny_pair_dir["slm"],
            "--llm", tiny_pair_dir["llm"], "--threshold", "0.9"]  # fmt: skip


def test_more_than_one_worker_without_ray_names_the_install_command(
    tmp_path, data_file, tiny_pair_dir, monkeypatch
):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    config = make_config(data_file, tiny_pair_dir, threshold=0.9)
    with pytest.raises(RayUnavailableError, match=r'pip install "select-to-think\[ray\]"'):
        evaluate_distributed(config, tmp_path / "run", workers=2, progress=False)
    result = CliRunner().invoke(app, [*cli_args(data_file, tiny_pair_dir), "--workers", "2", "--out",
                                      str(tmp_path / "cli")])  # fmt: skip
    assert result.exit_code == 2
    assert "select-to-think[ray]" in result.stdout


def test_cli_eval_with_workers_uses_the_distributed_runner(tmp_path, data_file, tiny_pair_dir, monkeypatch):
    import s2t.distributed

    calls = {}

    def fake(config, out, workers, ray_address):
        calls.update(config=config, out=out, workers=workers, ray_address=ray_address)
        return evaluate(config, out, progress=False)

    monkeypatch.setattr(s2t.distributed, "evaluate_distributed", fake)
    result = CliRunner().invoke(app, [*cli_args(data_file, tiny_pair_dir), "--methods", "greedy",
                                      "--max-new-tokens", "4", "--workers", "3", "--ray-address", "auto",
                                      "--out", str(tmp_path / "cli")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert calls["workers"] == 3 and calls["ray_address"] == "auto"
    assert "| greedy |" in result.stdout
