"""Evaluation harness: grading records, majority vote, resumption, config safety, report."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from s2t.api import S2TGenerator
from s2t.cli import app
from s2t.data import DatasetUnavailableError
from s2t.evaluate import EvalConfig, Evaluator, evaluate
from s2t.grading import grade
from s2t.reporting.eval_report import markdown_table, summarize
from s2t.runs import ConfigMismatchError


@pytest.fixture()
def generator(slm, llm):
    return S2TGenerator(slm, llm=llm)


def config(data_file, **overrides):
    base = dict(
        dataset="tiny",
        split="test",
        data_file=data_file,
        limit=None,
        max_new_tokens=10,
        methods=["greedy", "s2t", "takeover", "llm", "maj@3"],
        trigger="margin",
        threshold=0.9,
        batch_size=2,
        backend="torch",  # the tiny generator given to the evaluator is a torch one
    )
    base.update(overrides)
    return EvalConfig(**base)


def test_every_method_problem_pair_is_recorded_and_graded(tmp_path, data_file, generator):
    payload = evaluate(config(data_file), tmp_path / "run", progress=False, generator=generator)
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 5 * 5
    assert {r["method"] for r in records} == {"greedy", "s2t", "takeover", "llm", "maj@3"}
    maj = [r for r in records if r["method"] == "maj@3"]
    assert all(len(r["sample_answers"]) == 3 and "pass_at_k" in r for r in maj)
    for r in maj:  # each sample's text is kept, and its graded answer is the one recorded
        assert [grade(r["gold"], text).extracted for text in r["sample_texts"]] == r["sample_answers"]
    greedy = payload["methods"]["greedy"]
    assert greedy["n"] == 5 and greedy["mean_llm_forward_tokens"] == 0
    assert payload["methods"]["llm"]["mean_slm_forward_tokens"] == 0
    assert payload["methods"]["s2t"]["vs_greedy"]["n_paired"] == 5
    assert "pass_at_k" in payload["methods"]["maj@3"]
    for name in ("summary.json", "report.md", "accuracy_vs_cost.png"):
        assert (tmp_path / "run" / name).is_file()
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    expected = f"Backend: torch, {stored['dtype']}."
    assert expected in (tmp_path / "run" / "report.md").read_text().splitlines()


def test_resumed_run_gives_the_same_summary_as_an_uninterrupted_one(tmp_path, data_file, generator):
    full = evaluate(
        config(data_file, methods=["greedy", "s2t"]), tmp_path / "a", progress=False, generator=generator
    )

    # an interrupted run: stop after 3 records, with a torn half-written line at the end
    ev = Evaluator(
        config(data_file, methods=["greedy", "s2t"]), tmp_path / "b", progress=False, generator=generator
    )
    seen = []

    class Interrupt(Exception):
        pass

    def stop_after_three(record):
        seen.append(record)
        if len(seen) == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        ev.run_all(on_record=stop_after_three)
    with open(tmp_path / "b" / "results.jsonl", "a") as f:
        f.write('{"method": "greedy", "probl')
    resumed = Evaluator(
        config(data_file, methods=["greedy", "s2t"]), tmp_path / "b", progress=False, generator=generator
    )
    new = []
    resumed.run_all(on_record=new.append)
    assert len(new) == 10 - 3, "finished work must not be redone"
    from s2t.reporting.eval_report import write_report

    again = write_report(tmp_path / "b")

    def strip(payload):
        return {
            m: {k: v for k, v in e.items() if "wall" not in k and "time" not in k and k != "invocations"}
            for m, e in payload["methods"].items()
        }

    assert strip(again) == strip(full)
    # each record names the batch size and the evaluator that made it; the report names the
    # resumed method, and float32 on torch is batch-invariant, so it says the records are unchanged
    records = [json.loads(line) for line in (tmp_path / "b" / "results.jsonl").read_text().splitlines()[:-1]]
    assert {r["batch_size"] for r in records} == {2}
    assert again["methods"]["greedy"]["invocations"] == 2 and again["methods"]["s2t"]["invocations"] == 1
    assert full["resumed"] is None
    assert again["resumed"].startswith("Resumed or sharded (invocations): greedy (2); float32 on torch")
    assert again["resumed"] in (tmp_path / "b" / "report.md").read_text()


def test_a_batch_dependent_run_resumes_only_with_its_batch_size(tmp_path, data_file, generator):
    """bfloat16 answers depend on the batch (README: Reproducibility), so a bfloat16 run refuses
    another --batch-size, before any model loads and naming the one that resumes it; float32 on
    torch is batch-invariant and may change it."""
    from s2t.models import batch_invariant

    assert batch_invariant("torch", "float32") and batch_invariant(None, None)
    assert not batch_invariant("torch", "bfloat16") and not batch_invariant("torch", "float32", "bfloat16")
    assert not batch_invariant("llama.cpp", "float32")
    run = tmp_path / "run"
    Evaluator(config(data_file, methods=["greedy"], dtype="bfloat16"), run, generator=generator)
    written = (run / "config.json").read_text()
    with pytest.raises(
        ConfigMismatchError, match="--batch-size 2 in bfloat16 on torch.*resume it with --batch-size 2"
    ):
        Evaluator(
            config(data_file, methods=["greedy"], dtype="bfloat16", batch_size=3), run, generator=generator
        )
    assert (run / "config.json").read_text() == written
    Evaluator(config(data_file, methods=["greedy"], dtype="bfloat16", batch_size=2), run, generator=generator)
    # a float32 run resumed in bfloat16 is refused for its dtype, not sent to another batch size
    Evaluator(
        config(data_file, methods=["greedy"], dtype="float32", batch_size=3),
        tmp_path / "g",
        generator=generator,
    )
    with pytest.raises(ConfigMismatchError, match=r"dtype: 'float32' -> 'bfloat16'"):
        Evaluator(
            config(data_file, methods=["greedy"], dtype="bfloat16"), tmp_path / "g", generator=generator
        )
    Evaluator(config(data_file, methods=["greedy"], dtype="float32"), tmp_path / "f", generator=generator)
    Evaluator(
        config(data_file, methods=["greedy"], dtype="float32", batch_size=3),
        tmp_path / "f",
        generator=generator,
    )


def test_the_report_warns_that_a_resumed_bfloat16_run_may_differ_from_an_uninterrupted_one():
    from s2t.reporting.eval_report import resumption_note

    def record(problem, invocation):
        cost = dict.fromkeys(
            (
                "generated_tokens",
                "slm_forward_tokens",
                "llm_forward_tokens",
                "llm_forward_calls",
                "triggers",
                "overrides",
            ),
            1,
        )
        return {
            "method": "greedy",
            "problem_id": problem,
            "correct": True,
            "cost": cost | {"wall_time_s": 1.0},
            "batch_size": 16,
            "invocation": invocation,
        }

    summary = summarize([record("a", "x"), record("b", "y")])
    assert summary["greedy"]["invocations"] == 2 and summary["greedy"]["batch_sizes"] == [16]
    note = resumption_note(summary, {"dtype": "bfloat16", "backend": "torch"})
    assert "greedy (2)" in note and "depend on its batch" in note
    assert resumption_note(summarize([record("a", "x"), record("b", "x")]), {"dtype": "bfloat16"}) is None


def test_a_run_recorded_before_dtypes_were_resolved_resumes_as_float32(tmp_path, monkeypatch):
    """Old runs stored ``"dtype": null`` (then float32); the dtype is now resolved and recorded."""
    from s2t.evaluate import LEGACY_CONFIG
    from s2t.runs import ConfigMismatchError, RunDirectory

    monkeypatch.setenv("S2T_DEFAULT_DTYPE", "bfloat16")
    assert EvalConfig(methods=["greedy"], backend="torch").dtype == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"dtype": None, "k": 8}))
    (tmp_path / "results.jsonl").write_text("{}\n")  # work done under it
    with pytest.raises(
        ConfigMismatchError, match="dtype: .float32. -> .bfloat16.*--dtype float32 resumes it"
    ):
        RunDirectory(tmp_path, {"dtype": "bfloat16", "k": 8}, legacy=LEGACY_CONFIG)
    RunDirectory(tmp_path, {"dtype": "float32", "k": 8}, legacy=LEGACY_CONFIG)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float32"


def test_a_run_recorded_before_backends_resumes_on_torch(tmp_path):
    """Runs made before the llama.cpp backend stored no ``backend``: they were made by the torch engine."""
    from s2t.evaluate import LEGACY_CONFIG
    from s2t.runs import ConfigMismatchError, RunDirectory

    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32", "k": 8}))
    (tmp_path / "results.jsonl").write_text("{}\n")
    with pytest.raises(
        ConfigMismatchError, match="backend: .torch. -> .llama.cpp.*--backend torch resumes it"
    ):
        RunDirectory(tmp_path, {"dtype": "float32", "k": 8, "backend": "llama.cpp"}, legacy=LEGACY_CONFIG)
    RunDirectory(tmp_path, {"dtype": "float32", "k": 8, "backend": "torch"}, legacy=LEGACY_CONFIG)


def test_a_changed_config_for_the_same_run_directory_is_refused(tmp_path, data_file, generator):
    evaluate(config(data_file, methods=["greedy"]), tmp_path / "run", progress=False, generator=generator)
    with pytest.raises(ConfigMismatchError, match="max_new_tokens"):
        Evaluator(
            config(data_file, methods=["greedy"], max_new_tokens=11), tmp_path / "run", generator=generator
        )
    # adding methods or raising the limit is a resumption, not a different experiment
    Evaluator(config(data_file, methods=["greedy", "s2t"]), tmp_path / "run", generator=generator)


def test_calibration_uses_training_problems_and_refuses_overlap(tmp_path, data_file, generator, monkeypatch):
    """The overlap is judged by the questions, not by the ids: training problems relabelled as a test
    split are refused, other problems that happen to carry the training ids are not."""
    data_dir = tmp_path / "data"
    (data_dir / "gsm8k").mkdir(parents=True)
    train = [json.loads(line) for line in open(data_file) if line.strip()]
    train = [{**r, "question": "Training: " + r["question"]} for r in train]
    (data_dir / "gsm8k" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    monkeypatch.setenv("S2T_DATA_DIR", str(data_dir))
    cfg = config(
        data_file, methods=["s2t"], trigger="entropy", threshold=None, quantile=0.8, calibration_problems=3
    )
    payload = evaluate(cfg, tmp_path / "run", progress=False, generator=generator)
    assert payload["calibration"]["entropy@0.8"]["problems"] == [f"gsm8k/train/{i}" for i in range(3)]
    relabelled = tmp_path / "relabelled.jsonl"  # the training file, evaluated as a "test" split
    relabelled.write_text((data_dir / "gsm8k" / "train.jsonl").read_text())
    calibrated = dict(methods=["s2t"], trigger="entropy", threshold=None, calibration_problems=3)
    for n, (source, options) in enumerate(
        (
            (None, dict(dataset="gsm8k", split="train", limit=2)),  # the very calibration problems
            (str(relabelled), {}),
            (data_file, dict(dataset="gsm8k", split="train")),  # other problems under the training ids
        )
    ):
        run = tmp_path / f"run{n + 2}"
        if n < 2:
            with pytest.raises(
                ValueError, match="calibration problems are among the evaluated.*gsm8k/train/0"
            ):
                evaluate(config(source, **calibrated, **options), run, progress=False, generator=generator)
        else:
            evaluate(config(source, **calibrated, **options), run, progress=False, generator=generator)


def test_a_dataset_that_cannot_be_loaded_leaves_no_run_directory(tmp_path, generator, monkeypatch):
    monkeypatch.setenv("S2T_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetUnavailableError, match="math500"):
        Evaluator(config(None, dataset="math500", methods=["greedy"]), tmp_path / "run", generator=generator)
    assert not (tmp_path / "run").exists()


def test_unknown_method_is_refused(data_file):
    with pytest.raises(ValueError, match="unknown method"):
        config(data_file, methods=["greedy", "maj@x"])
    for k in ("0", "257", "1000000"):  # maj@K decodes K samples per problem in one batch: K is bounded
        with pytest.raises(ValueError, match=r"maj@K takes 1 <= K <= 256"):
            config(data_file, methods=["greedy", f"maj@{k}"])
    assert config(data_file, methods=["maj@02"]).methods == ["maj@2"]  # one spelling, one setting
    with pytest.raises(ValueError, match="one setting"):
        config(data_file, methods=["maj@2", "maj@02"])


def test_summary_statistics_match_hand_computed_values():
    def rec(method, pid, correct, finish="stop"):
        cost = dict(
            generated_tokens=10,
            slm_forward_tokens=20,
            llm_forward_tokens=0,
            llm_forward_calls=0,
            triggers=1,
            overrides=0,
            wall_time_s=1.0 if method == "greedy" else 2.0,
        )
        return {
            "method": method,
            "problem_id": pid,
            "correct": correct,
            "cost": cost,
            "finish_reason": finish,
        }

    greedy = [True, False, False, False, False, True]
    s2t = [True, True, True, True, True, True]
    records = [rec("greedy", i, c) for i, c in enumerate(greedy)] + [
        rec("s2t", i, c) for i, c in enumerate(s2t)
    ]
    summary = summarize(records, ["greedy", "s2t"])
    assert summary["greedy"]["accuracy"] == pytest.approx(2 / 6)
    assert summary["s2t"]["vs_greedy"]["only_this_correct"] == 4
    assert summary["s2t"]["vs_greedy"]["p_value"] == pytest.approx(2 * 0.5**4)
    assert summary["s2t"]["time_ratio_vs_greedy"] == pytest.approx(2.0)
    assert summary["s2t"]["trigger_rate"] == pytest.approx(0.1)
    # a method part-way through the run is timed against greedy on the problems both finished
    slow = [r | {"cost": r["cost"] | {"wall_time_s": 1.0 + i}} for i, r in enumerate(records[:6])]
    partial = summarize(slow + records[6:8], ["greedy", "s2t"])
    assert partial["s2t"]["time_ratio_vs_greedy"] == pytest.approx(4.0 / 3.0)  # 2 + 2 against 1 + 2
    assert partial["s2t"]["n_timed_vs_greedy"] == 2
    table = markdown_table(partial)
    assert "Not every method has finished the same problems** (greedy 6, s2t 2)" in table
    assert "not every method" not in markdown_table(summary).lower()
    # the share of generations cut at the token budget: maj@k counts each of its samples
    cut = summarize(
        [rec("greedy", 0, True, "length"), rec("greedy", 1, True)]
        + [
            rec("maj@2", i, True, f) | {"pass_at_k": True}
            for i, f in enumerate([["length", "stop"], ["stop"] * 2])
        ]
    )
    assert cut["greedy"]["cut_off_rate"] == pytest.approx(0.5)
    assert cut["maj@2"]["cut_off_rate"] == pytest.approx(0.25)
    assert "| cut off |" in markdown_table(cut) and "| 50% |" in markdown_table(cut)


def test_cli_eval_runs_and_resumes(tmp_path, data_file, tiny_pair_dir):
    args = [
        "eval",
        "--data-file",
        data_file,
        "--dataset",
        "tiny",
        "--methods",
        "greedy,s2t",
        "--slm",
        tiny_pair_dir["slm"],
        "--llm",
        tiny_pair_dir["llm"],
        "--trigger",
        "margin",
        "--threshold",
        "0.9",
        "--max-new-tokens",
        "6",
        "--limit",
        "3",
        "--out",
        str(tmp_path / "run"),
    ]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "| greedy |" in first.stdout
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0
    lines = (tmp_path / "run" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 6
    changed = CliRunner().invoke(
        app, [*args[:-4], "--limit", "3", "--k", "4", "--out", str(tmp_path / "run")]
    )
    assert changed.exit_code == 2 and "different configuration" in changed.stdout


def _append_many(path: str, writer: int, count: int) -> None:
    from s2t.runs import RunDirectory

    run = RunDirectory(path, {"kind": "concurrency"})
    for i in range(count):  # records larger than a pipe buffer, so an unlocked append could interleave
        run.append({"writer": writer, "i": i, "payload": "x" * 20000})


def test_two_processes_appending_to_one_run_directory_never_interleave_lines(tmp_path):
    import multiprocessing

    from s2t.runs import RunDirectory

    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_append_many, args=(str(tmp_path), w, 30)) for w in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    records = RunDirectory(tmp_path, {"kind": "concurrency"}).records()
    assert sorted((r["writer"], r["i"]) for r in records) == [(w, i) for w in (0, 1) for i in range(30)]


def test_llm_dtype_and_device_map_reach_the_generator(data_file, tiny_pair_dir):
    config = EvalConfig(
        slm=tiny_pair_dir["slm"],
        llm=tiny_pair_dir["llm"],
        dataset="tiny",
        data_file=data_file,
        limit=None,
        llm_dtype="bfloat16",
        llm_device_map="auto",
    )
    evaluator = Evaluator(config, None, progress=False)
    kwargs = evaluator.generator._llm_kwargs
    assert kwargs["dtype"] == "bfloat16" and kwargs["device_map"] == "auto"
