"""Sweeps: methods that carry their own trigger setting in their name, in one resumable run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from s2t.api import S2TGenerator
from s2t.cli import app
from s2t.evaluate import EvalConfig, Evaluator, canonical_method_name, evaluate
from s2t.methods import TriggerSetting, split_method_name
from tests.conftest import QUESTIONS


@pytest.fixture()
def generator(slm, llm):
    return S2TGenerator(slm, llm=llm)


def config(data_file, **overrides) -> EvalConfig:
    base = dict(
        dataset="tiny",
        split="test",
        data_file=data_file,
        limit=None,
        max_new_tokens=8,
        methods=["greedy"],
        trigger="entropy",
        threshold=None,
        quantile=0.95,
        calibration_problems=2,
        batch_size=2,
    )
    base.update(overrides)
    return EvalConfig(**base)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "name, canonical",
    [
        ("s2t/entropy@0.80", "s2t/entropy@0.8"),
        ("s2t/entropy", "s2t/entropy@0.95"),
        ("takeover/kl@0.95/k4", "takeover/kl@0.95/k4"),
        ("s2t/margin=0.30", "s2t/margin=0.3"),
        ("s2t/always", "s2t/always"),
        ("s2t-local:lora/margin@0.8", "s2t-local:lora/margin@0.8"),
        ("s2t", "s2t"),
        ("maj@8", "maj@8"),
    ],
)
def test_a_setting_has_one_canonical_name(name, canonical):
    assert canonical_method_name(name) == canonical


def test_a_setting_parses_into_its_parts():
    assert split_method_name("s2t/entropy@0.8/k4") == ("s2t", TriggerSetting("entropy", quantile=0.8, k=4))
    assert split_method_name("takeover/margin=0.25") == ("takeover", TriggerSetting("margin", threshold=0.25))
    assert split_method_name("s2t") == ("s2t", None)


@pytest.mark.parametrize(
    "name, message",
    [
        ("s2t/entropy@1.2", "quantile must lie strictly between 0 and 1"),
        ("s2t/entropy@0", "quantile must lie strictly between 0 and 1"),
        ("s2t/entropy@nan", "NaN"),
        ("s2t/entropy@x", "not a number"),
        ("s2t/margin=1.5", r"must lie in \[0.0, 1.0\]"),
        ("s2t/sometimes@0.8", "unknown trigger 'sometimes'"),
        ("s2t/always@0.9", "takes no quantile or threshold"),
        ("s2t/entropy@0.8/k0", "K must be an integer >= 1"),
        ("s2t/entropy@0.8/k4/k8", "only one /kK"),
        ("greedy/entropy@0.8", "greedy consults no trigger"),
        ("maj@8/entropy@0.8", "consults no trigger"),
        ("s2t-local/kl@0.95", "needs one"),
        ("s2x/entropy@0.8", "unknown method"),
    ],
)
def test_a_setting_that_cannot_be_calibrated_is_refused(name, message):
    with pytest.raises(ValueError, match=message):
        canonical_method_name(name)


def test_two_settings_sharing_a_name_are_refused(data_file):
    with pytest.raises(ValueError, match="are one setting"):
        config(data_file, methods=["s2t/entropy@0.8", "s2t/entropy@0.80"])
    with pytest.raises(ValueError, match="listed twice"):
        config(data_file, methods=["greedy", "greedy"])
    # a plain name runs at the run's options, so it may be another name's setting
    with pytest.raises(ValueError, match="'s2t' and 's2t/entropy@0.95' are one setting"):
        config(data_file, methods=["s2t", "s2t/entropy@0.95"])  # config(): --trigger entropy --quantile 0.95
    config(data_file, methods=["s2t", "s2t/entropy@0.9", "takeover/entropy@0.95"])
    with pytest.raises(ValueError, match="--selector"):
        config(data_file, methods=["s2t-local/learned@0.9"])


def test_bad_settings_are_refused_before_any_model_loads(tmp_path, data_file):
    for methods, message in (
        ("greedy,s2t/entropy@1.5", "quantile"),
        ("s2t/margin@0.8,s2t/margin@.8", "one setting"),
    ):
        result = CliRunner().invoke(
            app,
            [
                "eval",
                "--data-file",
                data_file,
                "--dataset",
                "tiny",
                "--methods",
                methods,
                "--slm",
                "no-such-model",
                "--out",
                str(tmp_path / "run"),
            ],
        )
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert not (tmp_path / "run").exists()


def test_a_sweep_calibrates_each_setting_and_can_be_extended(
    tmp_path, data_file, calibration_data, generator
):
    sweep = ["greedy", "s2t/entropy@0.5", "s2t/margin=0.9", "s2t/always", "takeover/entropy@0.5/k2"]
    payload = evaluate(
        config(data_file, methods=sweep), tmp_path / "run", progress=False, generator=generator
    )
    first = records(tmp_path / "run")
    assert sorted({r["method"] for r in first}) == sorted(sweep)
    assert len(first) == len(sweep) * len(QUESTIONS)

    calibration = payload["calibration"]
    assert set(calibration) == {"entropy@0.5"}  # one entry per calibrated setting, shared by S2T and Takeover
    assert calibration["entropy@0.5"]["problems"] == ["gsm8k/train/0", "gsm8k/train/1"]
    settings = {r["method"]: r["setting"] for r in first if r["method"] != "greedy"}
    assert settings["s2t/entropy@0.5"]["threshold"] == calibration["entropy@0.5"]["threshold"]
    assert settings["s2t/margin=0.9"] == {"trigger": "margin", "threshold": 0.9, "quantile": None, "k": 8}
    assert settings["takeover/entropy@0.5/k2"]["k"] == 2
    always = [r for r in first if r["method"] == "s2t/always"]
    assert all(
        r["cost"]["triggers"] == r["cost"]["generated_tokens"] - 3
        for r in always
        if r["finish_reason"] == "length"
    )

    # Extending the sweep runs only the new setting; the finished records stay exactly as they were.
    more = config(data_file, methods=[*sweep, "s2t/entropy@0.7"])
    evaluate(more, tmp_path / "run", progress=False, generator=generator)
    second = records(tmp_path / "run")
    assert second[: len(first)] == first
    assert [r["method"] for r in second[len(first) :]] == ["s2t/entropy@0.7"] * len(QUESTIONS)
    assert set(json.loads((tmp_path / "run" / "calibration.json").read_text())) == {
        "entropy@0.5",
        "entropy@0.7",
    }


def test_a_named_setting_equals_the_same_run_level_trigger(tmp_path, data_file, calibration_data, generator):
    named = evaluate(
        config(data_file, methods=["s2t/margin@0.6"]), tmp_path / "named", progress=False, generator=generator
    )
    plain = evaluate(
        config(data_file, methods=["s2t"], trigger="margin", quantile=0.6),
        tmp_path / "plain",
        progress=False,
        generator=generator,
    )
    assert named["calibration"]["margin@0.6"]["threshold"] == plain["calibration"]["margin@0.6"]["threshold"]
    strip = lambda recs: [(r["problem_id"], r["text"], r["trigger_steps"]) for r in recs]  # noqa: E731
    assert strip(records(tmp_path / "named")) == strip(records(tmp_path / "plain"))


def test_a_worker_without_a_run_directory_uses_the_drivers_thresholds(
    tmp_path, data_file, calibration_data, generator
):
    cfg = config(data_file, methods=["s2t/entropy@0.5"])
    thresholds = Evaluator(cfg, tmp_path / "run", progress=False, generator=generator).prepare_methods()
    assert set(thresholds) == {"entropy@0.5"}
    worker = Evaluator(cfg, None, progress=False, generator=generator, problems=[], thresholds=thresholds)
    assert worker._method("s2t/entropy@0.5").trigger.threshold == thresholds["entropy@0.5"]
    with pytest.raises(RuntimeError, match="entropy@0.7"):
        Evaluator(
            config(data_file, methods=["s2t/entropy@0.7"]),
            None,
            generator=generator,
            problems=[],
            thresholds=thresholds,
        )._method("s2t/entropy@0.7")


def _record(method, pid, correct, llm_calls=0.0, setting=None):
    cost = dict(
        generated_tokens=100,
        slm_forward_tokens=100,
        llm_forward_tokens=10 * llm_calls,
        llm_forward_calls=llm_calls,
        triggers=llm_calls,
        overrides=0,
        wall_time_s=1.0 + llm_calls,
    )
    return {"method": method, "problem_id": pid, "correct": correct, "cost": cost} | (
        {"setting": setting} if setting else {}
    )


def test_the_frontier_reports_gap_recovered_tests_and_the_cheapest_setting(tmp_path):
    from s2t.reporting.eval_report import write_report

    n = 10
    greedy = [i < 2 for i in range(n)]  # 20%
    llm = [i < 6 for i in range(n)]  # 60%
    low_rate = [i < 3 for i in range(n)]  # 30%: a quarter of the gap
    high_rate = [i < 5 for i in range(n)]  # 50%: three quarters of the gap
    takeover = [i < 4 for i in range(n)]
    recs = [_record("greedy", i, c) for i, c in enumerate(greedy)]
    recs += [_record("llm", i, c, llm_calls=100) for i, c in enumerate(llm)]
    recs += [_record("s2t/entropy@0.9", i, c, 10, {"threshold": 0.7}) for i, c in enumerate(low_rate)]
    recs += [_record("s2t/entropy@0.6", i, c, 40, {"threshold": 0.3}) for i, c in enumerate(high_rate)]
    recs += [_record("takeover/entropy@0.6", i, c, 40) for i, c in enumerate(takeover)]
    (tmp_path / "config.json").write_text(json.dumps({"trigger": "entropy", "quantile": 0.95, "seed": 0}))
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")

    payload = write_report(tmp_path)
    rows = {r["method"]: r for r in payload["frontier"]["rows"]}
    assert [r["method"] for r in payload["frontier"]["rows"]][0] == "s2t/entropy@0.9"  # cheapest first
    assert rows["s2t/entropy@0.9"]["gap_recovered"] == pytest.approx(0.25)
    assert rows["s2t/entropy@0.6"]["gap_recovered"] == pytest.approx(0.75)
    assert rows["s2t/entropy@0.6"]["threshold"] == 0.3
    assert rows["s2t/entropy@0.6"]["p_vs_greedy"] == pytest.approx(
        0.5**3 * 2
    )  # 3 discordant pairs, all one way
    assert rows["s2t/entropy@0.6"]["vs_takeover"]["only_s2t"] == 1
    assert payload["methods"]["s2t/entropy@0.6"]["vs_llm"]["only_other_correct"] == 1
    cheapest = {c["target"]: c for c in payload["frontier"]["cheapest"]}
    assert cheapest[0.5]["by_estimate"] == "s2t/entropy@0.6" and cheapest[0.8]["by_estimate"] is None
    report = (tmp_path / "report.md").read_text()
    assert "Accuracy–cost frontier" in report and "≥ 50% of the gap: s2t/entropy@0.6" in report
    assert (tmp_path / "frontier.png").stat().st_size > 0


def _write_run(tmp_path, recs):
    (tmp_path / "config.json").write_text(json.dumps({"trigger": "entropy", "quantile": 0.95, "seed": 0}))
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")


@pytest.mark.parametrize("llm_correct", [3, 4], ids=["llm-below-greedy", "llm-equals-greedy"])
def test_the_frontier_gives_no_gap_figures_or_cheapest_setting_without_a_positive_gap(tmp_path, llm_correct):
    """The new user's run: the LLM alone at or below greedy made a random-select control at 0% read
    as "200% gap recovered" and the cheapest setting recovering half the gap."""
    from s2t.reporting.eval_report import write_report

    n = 10
    recs = [_record("greedy", i, i < 4) for i in range(n)]
    recs += [_record("llm", i, i < llm_correct, llm_calls=100) for i in range(n)]
    recs += [_record("random-select/random=0.3", i, False, 30) for i in range(n)]
    recs += [_record("s2t/entropy@0.8", i, i < 5, 20) for i in range(n)]
    _write_run(tmp_path, recs)

    payload = write_report(tmp_path)
    assert payload["frontier"]["greedy_to_llm_gap"] == pytest.approx((llm_correct - 4) / n)
    assert payload["frontier"]["cheapest"] == []
    assert all("gap_recovered" not in r for r in payload["frontier"]["rows"])
    report = (tmp_path / "report.md").read_text()
    assert "gap is not positive" in report
    assert "Cheapest setting" not in report and "random=0.3" in report  # the row stays, its conclusion goes
    assert "%" not in report.split("| random-select/random=0.3 |")[1].split("|")[4]  # gap column: "–"
    assert (tmp_path / "frontier.png").stat().st_size > 0


def test_controls_are_never_the_cheapest_setting(tmp_path):
    """Takeover and random-select are controls (README): cheaper and past the target, they still
    leave the conclusion to the cheapest S2T setting."""
    from s2t.reporting.eval_report import write_report

    n = 10
    recs = [_record("greedy", i, i < 2) for i in range(n)] + [_record("llm", i, i < 6, 100) for i in range(n)]
    recs += [_record("takeover/entropy@0.9", i, i < 6, 5) for i in range(n)]  # 100% of the gap, cheapest
    recs += [_record("random-select:x/random=0.1", i, i < 6, 8) for i in range(n)]
    recs += [_record("s2t/entropy@0.6", i, i < 6, 40) for i in range(n)]
    _write_run(tmp_path, recs)

    payload = write_report(tmp_path)
    rows = payload["frontier"]["rows"]
    assert [r["method"] for r in rows][:2] == ["takeover/entropy@0.9", "random-select:x/random=0.1"]
    assert rows[0]["gap_recovered"] == pytest.approx(1.0)  # still measured, only not concluded on
    cheapest = {c["target"]: c for c in payload["frontier"]["cheapest"]}
    assert cheapest[0.5]["by_estimate"] == cheapest[0.8]["by_estimate"] == "s2t/entropy@0.6"
    report = (tmp_path / "report.md").read_text()
    assert "≥ 50% of the gap: s2t/entropy@0.6" in report


def test_a_sweep_decodes_the_calibration_questions_once_per_trigger(
    tmp_path, data_file, calibration_data, generator, monkeypatch
):
    import s2t.api

    calls = []
    real = s2t.api.trigger_statistics
    monkeypatch.setattr(
        s2t.api, "trigger_statistics", lambda *a, **k: calls.append(a[0].name) or real(*a, **k)
    )
    methods = ["s2t/entropy@0.5", "s2t/entropy@0.7", "takeover/entropy@0.7", "s2t/margin@0.5"]
    payload = evaluate(
        config(data_file, methods=methods), tmp_path / "run", progress=False, generator=generator
    )
    assert sorted(calls) == ["entropy", "margin"]
    calibration = payload["calibration"]
    assert calibration["entropy@0.5"]["threshold"] <= calibration["entropy@0.7"]["threshold"]


def test_the_frontier_spells_a_setting_one_way_and_pairs_labelled_rows(tmp_path):
    """``s2t`` under ``--trigger learned`` is the ``learned`` setting (no quantile), K is named alike
    for plain and set names, and ``s2t:L`` meets ``takeover:L`` at the same setting."""
    from s2t.reporting.eval_report import write_report

    n = 6
    recs = [_record("greedy", i, i < 1) for i in range(n)] + [_record("llm", i, i < 4, 50) for i in range(n)]
    for method, correct in (("s2t", 3), ("takeover", 2), ("s2t:b/learned", 4), ("takeover:b/learned", 1)):
        recs += [_record(method, i, i < correct, 5) for i in range(n)]
    recs += [_record("s2t/entropy@0.8", i, i < 2, 9) for i in range(n)]
    config = {"trigger": "learned", "quantile": 0.95, "k": 4, "seed": 0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")

    rows = {r["method"]: r for r in write_report(tmp_path)["frontier"]["rows"]}
    assert rows["s2t"]["setting"] == rows["s2t:b/learned"]["setting"] == "learned/k4"
    assert rows["s2t/entropy@0.8"]["setting"] == "entropy@0.8/k4"
    assert rows["s2t"]["vs_takeover"]["method"] == "takeover"
    assert rows["s2t:b/learned"]["vs_takeover"]["method"] == "takeover:b/learned"
    assert rows["s2t:b/learned"]["vs_takeover"]["only_s2t"] == 3
