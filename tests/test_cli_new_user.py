"""What a new user runs into (issue 23's trial): clean JSON on stdout, one-line errors for bad
paths and bad data files, and progress lines when stderr is not a terminal."""

from __future__ import annotations

import json
import logging
import os

import pytest
from typer.testing import CliRunner

from s2t.cli import app
from s2t.data import load_problems

PROBLEMS = [
    {"question": "Janet has 3 eggs and buys 15 more. How many eggs?", "answer": "3 + 15 = 18\n#### 18"},
    {"question": "What is 2 + 2?", "answer": "#### 4"},
]


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return tmp_path


def eval_args(tiny_pair_dir, data_file, out):
    return [
        "eval",
        "--data-file",
        str(data_file),
        "--dataset",
        "tiny",
        "--methods",
        "greedy",
        "--slm",
        tiny_pair_dir["slm"],
        "--max-new-tokens",
        "4",
        "--limit",
        "1",
        "--out",
        str(out),
    ]


def test_generate_json_prints_one_document_with_gold_and_correctness(tiny_pair_dir, data_dir):
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "--problem",
            "gsm8k/test/0",
            "--method",
            "greedy",
            "--slm",
            tiny_pair_dir["slm"],
            "--max-new-tokens",
            "4",
            "--data-dir",
            str(data_dir),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)  # the whole of stdout is one JSON document
    entry = payload["greedy"]
    assert (entry["problem_id"], entry["gold"]) == ("gsm8k/test/0", "18")
    assert entry["correct"] is False  # four tokens of a random tiny model
    assert "gsm8k/test/0" in result.stderr and "gold answer" in result.stderr
    # which engine decoded is said: auto picked torch for a transformers checkpoint (float32 in tests)
    assert entry["engine"] == "torch, float32" and "decoding on torch, float32" in result.stderr
    # A free question has no gold: no gold or correct keys.
    free = CliRunner().invoke(
        app,
        [
            "generate",
            "2 + 2?",
            "--method",
            "greedy",
            "--slm",
            tiny_pair_dir["slm"],
            "--max-new-tokens",
            "2",
            "--json",
        ],
    )
    assert free.exit_code == 0, free.output
    assert "gold" not in json.loads(free.stdout)["greedy"]
    # Human text goes back to stdout for the next command without --json.
    plain = CliRunner().invoke(
        app,
        ["generate", "2 + 2?", "--method", "greedy", "--slm", tiny_pair_dir["slm"], "--max-new-tokens", "2"],
    )
    assert "answer:" in plain.stdout


def test_generate_json_errors_go_to_stderr(tiny_pair_dir, data_dir):
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "--problem",
            "gsm8k/test/9",
            "--method",
            "greedy",
            "--slm",
            tiny_pair_dir["slm"],
            "--data-dir",
            str(data_dir),
            "--json",
        ],
    )
    assert result.exit_code == 2 and result.stdout == ""
    assert "no problem 'gsm8k/test/9'" in result.stderr


def test_eval_into_an_unwritable_directory_is_a_one_line_error(tiny_pair_dir, data_dir, tmp_path):
    data_file = data_dir / "gsm8k" / "test.jsonl"
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    outs = [in_the_way / "run"]
    try:  # /sys refuses new directories on Linux, even to root (the trial's case)
        os.mkdir("/sys/s2t-run-probe")
        os.rmdir("/sys/s2t-run-probe")
    except OSError:
        outs.append("/sys/s2t-run")
    for out in outs:
        result = CliRunner().invoke(app, eval_args(tiny_pair_dir, data_file, out))
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and str(out) in errors[0], result.output
        assert "Traceback" not in result.output


def test_an_empty_data_file_is_refused(tiny_pair_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = CliRunner().invoke(app, eval_args(tiny_pair_dir, empty, tmp_path / "run"))
    assert result.exit_code == 2
    assert f"no problems in {empty}" in result.output
    with pytest.raises(ValueError, match="no problems in"):
        load_problems("tiny", data_file=empty)


def test_a_non_utf8_data_file_error_names_the_file_and_line(tiny_pair_dir, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(
        json.dumps(PROBLEMS[0]).encode()
        + b"\n"
        + '{"question": "caf\xe9?", "answer": "1"}\n'.encode("latin-1")
    )
    with pytest.raises(ValueError, match=rf"{bad}:2: not UTF-8 text \(byte 0xe9"):
        load_problems("tiny", data_file=bad)
    result = CliRunner().invoke(app, eval_args(tiny_pair_dir, bad, tmp_path / "run"))
    assert result.exit_code == 2 and f"{bad}:2" in result.output


def test_progress_lines_are_logged_when_stderr_is_not_a_terminal(tiny_pair_dir, caplog):
    s2t_logger = logging.getLogger("s2t")
    try:
        result = CliRunner().invoke(
            app,
            [
                "generate",
                "2 + 2?",
                "--method",
                "greedy",
                "--slm",
                tiny_pair_dir["slm"],
                "--max-new-tokens",
                "1",
            ],
        )
        assert result.exit_code == 0, result.output
        assert s2t_logger.getEffectiveLevel() == logging.INFO  # CliRunner's stderr is no terminal
    finally:
        s2t_logger.setLevel(logging.NOTSET)


def test_calibration_logs_its_progress(slm, caplog):
    from s2t.api import CalibrationStore, Calibrator, S2TGenerator
    from s2t.methods import CalibrationSource, MethodSpec

    generator = S2TGenerator(slm)
    source = CalibrationSource.from_questions(["2 + 2?", "3 + 3?"], max_new_tokens=6)
    spec = MethodSpec.parse("takeover", trigger="entropy", quantile=0.9, k=4, calibration=source)
    with caplog.at_level(logging.INFO, logger="s2t"):
        Calibrator(generator, CalibrationStore(None)).threshold(spec)
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("calibrating the entropy trigger") for m in messages), messages
    assert any(m.startswith("calibrated entropy@0.9: threshold") for m in messages), messages


def test_eval_with_k_above_the_vocabulary_fails_before_any_method_and_leaves_no_run(
    tiny_pair_dir, data_dir, tmp_path
):
    """``--k 100000`` is refused before the first method decodes (greedy too: the run records K), and
    no run directory is left to refuse the corrected command."""
    out = tmp_path / "run"
    args = eval_args(tiny_pair_dir, data_dir / "gsm8k" / "test.jsonl", out)
    args[args.index("greedy")] = "greedy,s2t/entropy=0.5"  # a fixed threshold: no calibration
    args += ["--llm", tiny_pair_dir["llm"]]
    result = CliRunner().invoke(app, [*args, "--k", "100000"])
    assert result.exit_code != 0 and "K=100000 exceeds the tokenizer's vocabulary" in result.output, (
        result.output
    )
    assert not out.exists() and "nothing was kept" in " ".join(result.output.split()), result.output
    result = CliRunner().invoke(app, [*args, "--k", "4"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["k"] == 4


def test_a_run_is_bound_to_its_data_files_content_not_to_how_the_path_is_spelled(
    tiny_pair_dir, data_dir, tmp_path, monkeypatch
):
    """From another directory, ``../t.jsonl`` resumes the run ``t.jsonl`` started; another file under
    the same relative name, or the same file edited, is refused."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "t.jsonl").write_text((data_dir / "gsm8k" / "test.jsonl").read_text())
    (tmp_path / "sub" / "t.jsonl").write_text(json.dumps(PROBLEMS[1]) + "\n")
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(app, eval_args(tiny_pair_dir, "t.jsonl", out)).exit_code == 0
    stored = json.loads((out / "config.json").read_text())
    assert len(stored["data_file_sha256"]) == 64
    monkeypatch.chdir(tmp_path / "sub")
    args = eval_args(tiny_pair_dir, "../t.jsonl", out)
    args[args.index("--limit") + 1] = "2"
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output  # the same content: resumed, one more problem
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    result = CliRunner().invoke(app, eval_args(tiny_pair_dir, "t.jsonl", out))  # sub/t.jsonl: another file
    assert result.exit_code != 0 and "data_file_sha256" in result.output, result.output
    (tmp_path / "t.jsonl").write_text(json.dumps(PROBLEMS[1]) + "\n" + json.dumps(PROBLEMS[0]) + "\n")
    result = CliRunner().invoke(app, args)  # the first file, edited
    assert result.exit_code != 0 and "data_file_sha256" in result.output, result.output


def test_an_edited_data_file_is_refused_saying_so(tiny_pair_dir, data_dir, tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text((data_dir / "gsm8k" / "test.jsonl").read_text())
    assert CliRunner().invoke(app, eval_args(tiny_pair_dir, data, tmp_path / "run")).exit_code == 0
    data.write_text(json.dumps(PROBLEMS[1]) + "\n")
    result = CliRunner().invoke(app, eval_args(tiny_pair_dir, data, tmp_path / "run"))
    assert result.exit_code != 0 and "data file's content is not the run's" in " ".join(result.output.split())


@pytest.mark.parametrize(
    "options, message",
    [
        (["--limit", "0"], "--limit must be >= 1"),
        (["--offset", "5"], "no problems to evaluate: tiny test holds none from --offset 5"),
    ],
)
def test_eval_with_no_problem_to_run_is_refused_and_leaves_no_run(
    tiny_pair_dir, data_dir, tmp_path, options, message
):
    out = tmp_path / "run"
    args = eval_args(tiny_pair_dir, data_dir / "gsm8k" / "test.jsonl", out)
    args = [a for i, a in enumerate(args) if a != "--limit" and (i == 0 or args[i - 1] != "--limit")]
    result = CliRunner().invoke(app, [*args, *options])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not out.exists()


def test_generate_refuses_an_empty_question(tiny_pair_dir):
    result = CliRunner().invoke(app, ["generate", "  ", "--method", "greedy", "--slm", tiny_pair_dir["slm"]])
    assert result.exit_code == 2 and "the question is empty" in result.output, result.output


# --- issue 26's new-user round: runs bound to their problems, options checked before anything is written


def analyze_args(tiny_pair_dir, data_file, out, limit=2):
    return [
        "analyze",
        "--slm",
        tiny_pair_dir["slm"],
        "--llm",
        tiny_pair_dir["llm"],
        "--data-file",
        str(data_file),
        "--max-new-tokens",
        "4",
        "--limit",
        str(limit),
        "--ks",
        "1,2",
        "--out",
        str(out),
    ]


def test_a_run_never_mixes_problems_of_two_sources_under_one_id(tiny_pair_dir, data_dir, tmp_path):
    """``s2t analyze`` recorded no data file: another file into the same --out added its problems to the
    hit@K result. Every run now binds each problem id to its content (eval, analyze, collect)."""
    first = data_dir / "gsm8k" / "test.jsonl"
    other = tmp_path / "other.jsonl"
    other.write_text(
        "".join(json.dumps({**p, "question": "Other: " + p["question"]}) + "\n" for p in PROBLEMS)
    )
    out = tmp_path / "an"
    assert CliRunner().invoke(app, analyze_args(tiny_pair_dir, first, out, limit=1)).exit_code == 0
    before = (out / "problems.jsonl").read_text()
    result = CliRunner().invoke(app, analyze_args(tiny_pair_dir, other, out, limit=2))
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "holds problem 'gsm8k/test/0' with other content" in message, message
    assert (out / "problems.jsonl").read_text() == before
    # the same file, extended: resumes
    assert CliRunner().invoke(app, analyze_args(tiny_pair_dir, first, out, limit=2)).exit_code == 0
    assert len((out / "problems.jsonl").read_text().splitlines()) == 2
    # eval likewise, also where no --data-file names the source (the data directory changed)
    run = tmp_path / "run"
    args = ["eval", "--slm", tiny_pair_dir["slm"], "--methods", "greedy", "--max-new-tokens", "4"]
    args += ["--limit", "1", "--out", str(run)]
    assert CliRunner().invoke(app, [*args, "--data-file", str(first)]).exit_code == 0
    (run / "config.json").write_text(  # as a run recorded before the data file's digest
        json.dumps(json.loads((run / "config.json").read_text()) | {"data_file_sha256": None})
    )
    other.rename(first)  # the same path, other content
    result = CliRunner().invoke(app, [*args, "--data-file", str(first)])
    assert result.exit_code == 2 and "with other content" in " ".join(result.output.split()), result.output


def test_report_refuses_a_directory_another_command_made_and_writes_nothing(
    tiny_pair_dir, data_dir, tmp_path
):
    out = tmp_path / "an"
    assert (
        CliRunner()
        .invoke(app, analyze_args(tiny_pair_dir, data_dir / "gsm8k" / "test.jsonl", out, 1))
        .exit_code
        == 0
    )
    summary = (out / "summary.json").read_text()
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 2 and "it was made by s2t analyze" in result.output, result.output
    assert (out / "summary.json").read_text() == summary and not (out / "report.md").exists()
    # nor does eval take it for an older eval run
    result = CliRunner().invoke(app, eval_args(tiny_pair_dir, data_dir / "gsm8k" / "test.jsonl", out))
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "holds a run made by s2t analyze, not by s2t eval" in message, message


@pytest.mark.parametrize(
    "options, message",
    [
        (["--methods", "s2t", "--llm", "/nonexistent/llm"], "model path '/nonexistent/llm' does not exist"),
        (["--methods", "greedy", "--llm", "/nonexistent/llm"], "does not exist"),  # unused, but recorded
        (["--methods", "greedy", "--llm-dtype", "int8"], "dtype must be one of"),
        (["--methods", "greedy", "--llm-device-map", "bogus"], "--llm-device-map 'bogus' is neither"),
        (["--methods", "greedy", "--trigger", "bogus"], "unknown trigger 'bogus'"),
        (["--methods", "greedy", "--trigger", "margin", "--threshold", "5"], "threshold"),
        (
            ["--methods", "greedy", "--selector", "/nonexistent"],
            "no selector at /nonexistent: the directory does not exist",
        ),
        (
            ["--methods", "s2t", "--trigger", "always", "--threshold", "0.5"],
            "'always' trigger takes no threshold",
        ),
        (["--methods", "maj@1000000"], "maj@K takes 1 <= K <= 256"),
        (["--methods", "greedy", "--seed", "-5"], "greater than or equal to 0"),
        (["--methods", ","], "no methods given"),
        (["--methods", "greedy", "--llm-device-map", "cuda"], "this machine has 0 cuda device(s)"),
        (["--methods", "greedy", "--llm-device-map", "0"], "is neither a strategy"),
    ],
)
def test_eval_checks_every_option_before_anything_is_written(
    tiny_pair_dir, data_dir, tmp_path, options, message
):
    """A failed LLM load used to leave config.json and calibration.json behind, and the corrected
    command was refused; options no listed method reads went unchecked into config.json."""
    out = tmp_path / "run"
    args = eval_args(tiny_pair_dir, data_dir / "gsm8k" / "test.jsonl", out)
    args = args[: args.index("--methods")] + args[args.index("--methods") + 2 :]
    result = CliRunner().invoke(app, [*args, "--calibration-problems", "1", *options])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not out.exists()


def test_same_setting_is_refused_across_invocations_of_one_run(tiny_pair_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    args = eval_args(tiny_pair_dir, data_dir / "gsm8k" / "test.jsonl", out)
    i = args.index("greedy")
    args[i] = "random-select/random=0.5"
    assert CliRunner().invoke(app, args).exit_code == 0, "the first setting runs"
    args[i] = "random-select/random=0.5/k8"  # the run's --k is 8: the same setting, spelled otherwise
    result = CliRunner().invoke(app, args)
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "one setting under this run's options (the run holds it)" in message, (
        message
    )
    args[i] = "random-select/random=0.5/k4"  # another setting joins
    assert CliRunner().invoke(app, args).exit_code == 0


def test_out_that_is_a_file_is_one_line_before_any_model_loads(
    tiny_pair_dir, data_dir, tmp_path, monkeypatch
):
    import s2t.models

    monkeypatch.setattr(s2t.models.ModelSpec, "load", lambda self: pytest.fail("a model loaded"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for out, message in ((a_file, "is a file"), (a_file / "sub", f"lies under {a_file}, which is a file")):
        result = CliRunner().invoke(app, analyze_args(tiny_pair_dir, data_dir / "gsm8k" / "test.jsonl", out))
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output
    train = tmp_path / "train.jsonl"
    train.write_text((data_dir / "gsm8k" / "test.jsonl").read_text())
    result = CliRunner().invoke(
        app,
        ["collect", "--slm", tiny_pair_dir["slm"], "--llm", tiny_pair_dir["llm"], "--data-file", str(train)]
        + ["--limit", "1", "--out", str(a_file)],
    )
    assert result.exit_code == 2 and "is a file" in result.output, result.output


def test_limit_all_and_interrupts_and_bad_data_lines(tiny_pair_dir, data_dir, tmp_path, monkeypatch):
    import s2t.evaluate

    out = tmp_path / "run"
    args = eval_args(tiny_pair_dir, data_dir / "gsm8k" / "test.jsonl", out)
    args[args.index("--limit") + 1] = "all"
    assert CliRunner().invoke(app, args).exit_code == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == len(PROBLEMS)
    args[args.index("--limit") + 1] = "some"
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "give a number of problems, or 'all'" in " ".join(result.output.split())

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(s2t.evaluate.Evaluator, "run_all", interrupted)
    args[args.index("--limit") + 1] = "1"
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and f"what finished is in {out}; run the same command again" in " ".join(
        result.output.split()
    )
    for line, message in (
        ({"question": "Q?", "answer": None}, "field 'answer' is null"),
        ({"question": "  ", "answer": "#### 4"}, "field 'question' is empty"),
        ({"question": "Q?", "answer": "####"}, "field 'answer' holds no gold answer"),
    ):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(PROBLEMS[0]) + "\n" + json.dumps(line) + "\n")
        with pytest.raises(ValueError, match=f"bad.jsonl:2: {message}"):
            load_problems("gsm8k", "test", data_file=bad)


def test_eval_refuses_a_method_another_invocation_is_decoding_into_the_same_run(
    tiny_pair_dir, data_dir, tmp_path
):
    from s2t.runs import RunDirectory

    out = tmp_path / "run"
    args = eval_args(tiny_pair_dir, data_dir / "gsm8k" / "test.jsonl", out)
    assert CliRunner().invoke(app, args).exit_code == 0  # greedy on problem 0
    args[args.index("--limit") + 1] = "2"
    config = json.loads((out / "config.json").read_text())
    with RunDirectory(out, config).claim(["greedy"]):  # as if another lane were decoding greedy now
        result = CliRunner().invoke(app, args)
        message = " ".join(result.output.split())
        assert result.exit_code == 2 and "greedy is being run in" in message, message
        args[args.index("greedy")] = "random-select/random=0.5"  # another method joins meanwhile
        assert CliRunner().invoke(app, args).exit_code == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["method"] for line in lines] == ["greedy", *["random-select/random=0.5"] * 2]


def test_generate_and_eval_refuse_what_eval_refuses_and_a_selector_directory_as_a_run(
    tiny_pair_dir, data_dir, tmp_path
):
    base = [
        "generate",
        "2 + 2?",
        "--slm",
        tiny_pair_dir["slm"],
        "--method",
        "greedy",
        "--max-new-tokens",
        "2",
    ]
    for options, message in (
        (["--trigger", "bogus"], "unknown trigger 'bogus'"),
        (["--selector", str(tmp_path / "none")], "the directory does not exist"),
        (["--selector", str(tmp_path)], "is not a selector checkpoint"),
        (["--llm", "/nonexistent/llm"], "does not exist"),
        (["--llm-dtype", "float64"], "dtype must be one of"),
    ):
        result = CliRunner().invoke(app, [*base, *options])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), (options, result.output)
    selector = tmp_path / "sel"
    selector.mkdir()
    (selector / "selector_config.json").write_text("{}")
    result = CliRunner().invoke(app, eval_args(tiny_pair_dir, data_dir / "gsm8k" / "test.jsonl", selector))
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "holds a trained selector (selector_config.json)" in message, message
    assert sorted(p.name for p in selector.iterdir()) == ["selector_config.json"]


def test_sigterm_stops_an_eval_as_ctrl_c_does_keeping_its_work_and_releasing_its_claims(
    tiny_pair_dir, tmp_path
):
    """`timeout` or a scheduler sends SIGTERM: the run says where its work is and how to resume, like
    Ctrl-C, and leaves no claim behind (it used to die silently with its claim files in place)."""
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "many.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"What is {i} + 2?", "answer": f"#### {i + 2}"}) + "\n"
            for i in range(400)
        )
    )
    out = tmp_path / "run"
    command = [sys.executable, "-m", "s2t.cli", "eval", "--data-file", str(data), "--dataset", "tiny"]
    command += ["--methods", "greedy", "--slm", tiny_pair_dir["slm"], "--llm", tiny_pair_dir["llm"]]
    command += ["--max-new-tokens", "48", "--batch-size", "1", "--dtype", "float32", "--out", str(out)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stderr=subprocess.STDOUT, stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while (
        not ((out / "results.jsonl").is_file() and (out / "results.jsonl").read_text())
        and time.monotonic() < deadline
    ):
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.1)
    assert list(out.glob(".claim-*.lock"))  # decoding, under its claim
    process.send_signal(signal.SIGTERM)
    output = " ".join(process.communicate(timeout=60)[0].split())  # the console wraps long lines
    assert process.returncode != 0
    assert f"interrupted: what finished is in {out}; run the same command again to resume" in output
    assert "Traceback" not in output
    assert not list(out.glob(".claim-*.lock"))
    finished = (out / "results.jsonl").read_text().splitlines()
    assert 0 < len(finished) < 400 and all(json.loads(line)["method"] == "greedy" for line in finished)


@pytest.mark.parametrize(
    "command",
    [["eval"], ["analyze"], ["collect"], ["train", "--groups", "somewhere"], ["train", "--out", "x"]],
)
def test_an_empty_path_option_is_refused_not_replaced_by_a_default(command):
    """`--out ''` used to write to the default run directory (analyze: to the current directory)."""
    option = "--groups" if command[-2:] == ["--out", "x"] else "--out"
    result = CliRunner().invoke(app, [*command, option, ""])
    assert result.exit_code == 2
    assert f"Invalid value for '{option}': is empty: give a directory" in " ".join(result.output.split())


def test_report_names_a_record_it_cannot_read_and_a_directory_that_does_not_exist(
    tiny_pair_dir, data_dir, tmp_path
):
    """A hand-edited results line used to end `s2t report` in a traceback (KeyError: 'correct')."""
    out = tmp_path / "run"
    assert (
        CliRunner().invoke(app, eval_args(tiny_pair_dir, data_dir / "gsm8k" / "test.jsonl", out)).exit_code
        == 0
    )
    with open(out / "results.jsonl", "a") as results:
        results.write(json.dumps({"method": "greedy", "problem_id": "gsm8k/test/0"}) + "\n")
    result = CliRunner().invoke(app, ["report", str(out)])
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in message, message
    finished = len((out / "results.jsonl").read_text().splitlines()) - 1
    assert (
        f"{out / 'results.jsonl'}: record {finished + 1} lacks correct, cost: not a record of `s2t eval`"
        in message
    )
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and f"{tmp_path / 'nowhere'} does not exist" in " ".join(
        result.output.split()
    )


def test_an_interrupt_inside_the_reports_plotting_import_is_an_interrupt(
    tiny_pair_dir, data_dir, tmp_path, monkeypatch
):
    """SIGTERM while matplotlib's C extension was importing ended eval in an ImportError traceback."""
    import s2t.reporting.eval_report

    def interrupted_import(*args, **kwargs):
        try:
            raise KeyboardInterrupt("signal 15")
        except KeyboardInterrupt:
            raise ImportError("initialization failed")  # noqa: B904 - as the C extension raises it

    monkeypatch.setattr(s2t.reporting.eval_report, "plot_accuracy_vs_cost", interrupted_import)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, eval_args(tiny_pair_dir, data_dir / "gsm8k" / "test.jsonl", out))
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in message, message
    assert f"interrupted: what finished is in {out}; run the same command again to resume" in message
    # a method asked for that has no result yet is named in the report, not left out without a word
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"methods": [*config["methods"], "maj@2"]}))
    result = CliRunner().invoke(app, ["report", str(out)])  # its plot is interrupted again
    assert result.exit_code == 2 and "interrupted: the report in" in " ".join(result.output.split())
    assert "Asked for, without a result yet: maj@2." in (out / "report.md").read_text()
    monkeypatch.undo()
    with pytest.raises(ImportError):  # an ImportError of its own is not taken for an interrupt
        monkeypatch.setattr(
            s2t.reporting.eval_report,
            "plot_accuracy_vs_cost",
            lambda *a: (_ for _ in ()).throw(ImportError("no")),
        )
        CliRunner().invoke(
            app, eval_args(tiny_pair_dir, data_dir / "gsm8k" / "test.jsonl", out), catch_exceptions=False
        )
