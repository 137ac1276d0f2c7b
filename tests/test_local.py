"""S2T-Local: one-pass candidate scoring, collection without leakage, training, checkpoints."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from s2t.analysis import score_trajectories
from s2t.data import Problem
from s2t.engine import Method, ModelStream, decode, left_pad
from s2t.policies import EntropyTrigger, TopK
from s2t.policies.learned_selector import LocalSelector, SelectorCheckpointError, load_selector
from s2t.policies.scoring import candidate_hidden_states
from s2t.prompts import build_prompt
from s2t.training.collect import CollectConfig, Collector, LeakageError
from s2t.training.train import TrainConfig, train
from tests.conftest import make_model, tiny_eval_config

QUESTIONS = [
    "How many eggs are left?",
    "Natalia sold clips to 48 of her friends.",
    "What is 2 + 2?",
    "Double 21.",
]


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [build_prompt(tokenizer, q) for q in QUESTIONS[:3]]


def test_one_pass_masked_scoring_equals_scoring_each_candidate_alone(slm, prompts, tokenizer):
    model = slm.model
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    stream = ModelStream(model, len(tokenizer))
    stream.advance(ids, mask)
    candidates = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
    hidden = candidate_hidden_states(model, stream.cache, mask, candidates)
    logits = model.lm_head(hidden)
    for b, prompt in enumerate(prompts):
        for j in range(4):
            alone = model(input_ids=torch.tensor([prompt + [int(candidates[b, j])]])).logits[0, -1]
            torch.testing.assert_close(logits[b, j], alone, atol=1e-4, rtol=1e-4)


def test_local_selector_decoding_is_batch_independent_and_degenerates_to_greedy(slm, prompts, tokenizer):
    kw = dict(
        vocab_size=len(tokenizer),
        stop_ids=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id,
        max_new_tokens=16,
    )
    selector = LocalSelector.initial(slm.model, "tiny", len(tokenizer))
    torch.manual_seed(0)
    selector.bins = torch.randn_like(selector.bins)
    method = Method(EntropyTrigger(0.0), TopK(4), selector)
    batched = decode(slm.model, prompts, method, **kw)
    single = [decode(slm.model, [p], method, **kw)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert sum(g.cost.overrides for g in batched) > 0
    assert all(g.cost.llm_forward_calls == 0 for g in batched)
    # equal scores everywhere: argmax is the first candidate, i.e. the SLM's greedy token
    selector.bins = torch.zeros_like(selector.bins)
    assert [g.token_ids for g in decode(slm.model, prompts, method, **kw)] == [
        g.token_ids for g in decode(slm.model, prompts, **kw)
    ]


def _problems(split="train"):
    return [Problem(f"tiny/{split}/{i}", q, "4", "tiny", split) for i, q in enumerate(QUESTIONS)]


def _collect_by_path(tiny_pair_dir, slm, llm, out, max_new_tokens: int):
    """A K=4 collection of the tiny problems whose config names the tiny models by path, so that a
    command line (`s2t train`) can load them."""
    cfg = CollectConfig(
        slm=tiny_pair_dir["slm"],
        llm=tiny_pair_dir["llm"],
        dataset="tiny",
        k=4,
        max_new_tokens=max_new_tokens,
        batch_size=2,
    )
    Collector(cfg, out, slm=slm, llm=llm, problems=_problems(), progress=False).run_all()
    return out


def test_collection_refuses_evaluation_splits(slm, llm):
    with pytest.raises(LeakageError, match="evaluation split"):
        CollectConfig(dataset="gsm8k", split="test")
    with pytest.raises(LeakageError, match="evaluation split"):
        Collector(
            CollectConfig(slm="s", llm="l", limit=None),
            "unused",
            slm=slm,
            llm=llm,
            problems=_problems("test"),
        )


@pytest.mark.parametrize(
    "options, message",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1; got 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1; got 0"),
        (["--k", "1"], "K must be >= 2"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["--offset", "5"], "no problems to collect: tiny train holds none from --offset 5"),
    ],
)
def test_collect_refuses_bad_options_before_anything_is_written(tmp_path, monkeypatch, options, message):
    from typer.testing import CliRunner

    import s2t.models
    from s2t.cli import app

    monkeypatch.setattr(s2t.models, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "#### 4"}) + "\n" for q in QUESTIONS[:2]))
    out = tmp_path / "groups"
    args = ["collect", "--dataset", "tiny", "--split", "train", "--data-file", str(data), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, *options])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()  # a corrected command starts afresh, not against a poisoned config.json


def test_collect_refuses_k_above_the_vocabulary_and_zero_workers_before_anything_is_written(
    tmp_path, tiny_pair_dir
):
    """K is checked against the models' vocabulary once they load, before ``config.json`` exists."""
    from typer.testing import CliRunner

    from s2t.cli import app

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "#### 4"}) + "\n" for q in QUESTIONS[:2]))
    out = tmp_path / "groups"
    args = ["collect", "--dataset", "tiny", "--data-file", str(data), "--out", str(out)]
    args += ["--slm", tiny_pair_dir["slm"], "--llm", tiny_pair_dir["llm"], "--dtype", "float32"]
    result = CliRunner().invoke(app, [*args, "--k", "100000"])
    assert result.exit_code == 2 and "K=100000 exceeds the tokenizer's vocabulary" in result.output, (
        result.output
    )
    assert not out.exists()
    result = CliRunner().invoke(app, [*args, "--workers", "0"])
    assert result.exit_code == 2 and "--workers" in result.output, result.output
    assert not out.exists()


def test_a_run_that_fails_before_any_work_gives_its_directory_back_and_no_other(tmp_path):
    """``discard_if_unused`` undoes only what this invocation made, and only while nothing else was
    written: a second command started meanwhile is refused as before, and others' work stays."""
    from s2t.runs import ConfigMismatchError, RunDirectory

    first = RunDirectory(tmp_path / "run", {"k": 100000})
    with pytest.raises(ConfigMismatchError, match="k: 100000 -> 8"):  # a concurrent other command
        RunDirectory(tmp_path / "run", {"k": 8})
    (tmp_path / "run" / "sub").mkdir()
    first.discard_if_unused()  # its K failed: nothing was written
    assert not (tmp_path / "run").exists()
    RunDirectory(tmp_path / "run", {"k": 8})  # the corrected command
    resumed = RunDirectory(tmp_path / "run", {"k": 8})
    resumed.discard_if_unused()  # it did not write config.json: nothing of it to undo
    assert (tmp_path / "run" / "config.json").is_file()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    other = RunDirectory(tmp_path / "kept", {"k": 8})
    other.discard_if_unused()  # a user's own files stay; the config.json it made goes
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["notes.txt"]
    late = RunDirectory(tmp_path / "late", {"k": 8})
    (tmp_path / "late" / "calibration.json").write_text("{}")  # work done since
    late.discard_if_unused()
    assert (tmp_path / "late" / "config.json").is_file()
    (tmp_path / "late" / "config.json").write_text("{not json")
    with pytest.raises(ConfigMismatchError, match="late/config.json is unreadable"):
        RunDirectory(tmp_path / "late", {"k": 8})


def test_a_data_file_spelled_another_way_resumes_the_same_run(tmp_path, monkeypatch):
    """A relative and an absolute spelling of one data file are one configuration; another file is not."""
    from s2t.runs import ConfigMismatchError, RunDirectory

    monkeypatch.chdir(tmp_path)
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text("{}\n")
    RunDirectory(tmp_path / "run", {"data_file": "a.jsonl", "k": 8})
    (tmp_path / "run" / "problems.jsonl").write_text("{}\n")  # work done under it
    RunDirectory(tmp_path / "run", {"data_file": str(tmp_path / "a.jsonl"), "k": 8})
    with pytest.raises(ConfigMismatchError, match="data_file"):
        RunDirectory(tmp_path / "run", {"data_file": "b.jsonl", "k": 8})
    with pytest.raises(ConfigMismatchError, match="data_file"):  # a file that is gone matches nothing
        RunDirectory(tmp_path / "run", {"data_file": "gone.jsonl", "k": 8})


@pytest.fixture(scope="module")
def collected(tmp_path_factory, slm, llm):
    out = tmp_path_factory.mktemp("groups")
    cfg = CollectConfig(slm="tiny-slm", llm="tiny-llm", dataset="tiny", k=4, max_new_tokens=14, batch_size=2)
    collector = Collector(cfg, out, slm=slm, llm=llm, problems=_problems(), progress=False)
    assert collector.run_all() == 4
    return out


def test_analysis_and_collection_see_the_same_statistics_at_every_position(collected, slm, llm):
    from safetensors.torch import load_file

    records = [json.loads(line) for line in (collected / "problems.jsonl").read_text().splitlines()]
    # one padded batch in the analysis, one sequence at a time in the collection
    analysed = score_trajectories(
        slm, llm, [r["prompt_ids"] for r in records], [r["trajectory_ids"] for r in records]
    )
    for record, stats in zip(records, analysed):
        features = load_file(collected / record["features"])
        assert stats.rank == features["position_llm_top1_rank"].tolist()
        assert [a != b for a, b in zip(stats.slm_top1, stats.llm_top1)] == features[
            "position_divergent"
        ].tolist()
        torch.testing.assert_close(
            torch.tensor(stats.kl), features["position_kl"].clamp(min=0), atol=1e-6, rtol=1e-6
        )
        torch.testing.assert_close(
            torch.tensor(stats.entropy), features["position_entropy"], atol=1e-4, rtol=0
        )


def test_collected_groups_match_the_llm_and_resume_without_recomputing(collected, slm, llm):
    records = [json.loads(line) for line in (collected / "problems.jsonl").read_text().splitlines()]
    assert [r["problem_id"] for r in records] == [f"tiny/train/{i}" for i in range(4)]
    assert all(r["split"] == "train" for r in records)
    groups = [g for r in records for g in r["groups"]]
    assert groups and all(len(g["candidate_ids"]) == 4 for g in groups)
    # a divergence group's LLM probabilities are the LLM's real next-token probabilities there
    rec = next(r for r in records if r["groups"])
    g = rec["groups"][0]
    context = rec["prompt_ids"] + rec["trajectory_ids"][: g["position"]]
    probs = torch.softmax(
        llm.model(input_ids=torch.tensor([context])).logits[0, -1, : len(slm.tokenizer)], -1
    )
    torch.testing.assert_close(probs[g["candidate_ids"]], torch.tensor(g["llm_probs"]), atol=1e-4, rtol=1e-3)
    cfg = CollectConfig(slm="tiny-slm", llm="tiny-llm", dataset="tiny", k=4, max_new_tokens=14, batch_size=2)
    assert Collector(cfg, collected, slm=slm, llm=llm, problems=_problems(), progress=False).run_all() == 0


def test_on_policy_collection_records_triggered_steps(tmp_path, slm, llm):
    cfg = CollectConfig(
        slm="s",
        llm="l",
        dataset="tiny",
        mode="on-policy",
        on_policy_threshold=0.0,
        k=4,
        max_new_tokens=8,
        batch_size=2,
    )
    Collector(cfg, tmp_path, slm=slm, llm=llm, problems=_problems()[:2], progress=False).run_all()
    records = [json.loads(line) for line in (tmp_path / "problems.jsonl").read_text().splitlines()]
    for r in records:
        assert [g["position"] for g in r["groups"]] == list(range(3, len(r["trajectory_ids"])))
        # on-policy: the LLM's best candidate is the token S2T actually took
        for g in r["groups"]:
            assert r["trajectory_ids"][g["position"]] == g["candidate_ids"][g["llm_best"]]


def test_head_training_saves_a_selector_that_reloads_to_identical_scores(collected, slm, tmp_path):
    cfg = TrainConfig(groups=str(collected), out=str(tmp_path / "sel"), epochs=3, val_fraction=0.25)
    trained = train(cfg, slm=slm, progress=False)
    assert trained.config.training["train_problem_ids"]
    reloaded = LocalSelector.from_pretrained(tmp_path / "sel", model=slm.model)
    hidden = torch.randn(5, 4, slm.model.config.hidden_size)
    torch.testing.assert_close(reloaded.scores(hidden), trained.scores(hidden))


def test_head_training_at_trigger_points_and_its_ladder_rung_from_stored_hidden_states(
    collected, slm, tmp_path
):
    from s2t.training.feature_training import load_group_arrays
    from s2t.training.ladder import selector_ladder

    everything = load_group_arrays(collected, 4)
    threshold = float(everything.entropy.median())
    at = f"entropy={threshold}"
    cfg = TrainConfig(
        groups=str(collected), out=str(tmp_path / "sel"), epochs=3, val_fraction=0.25, groups_at=at
    )
    trained = train(cfg, slm=slm, progress=False)
    assert trained.config.training["collection"]["trained_at_thresholds"] == {at: threshold}
    recorded = trained.config.training["metrics"]["validation"]
    kept = load_group_arrays(collected, 4, at)
    val_ids = set(trained.config.training["validation_problem_ids"])
    in_val = [kept.problem_ids[p] in val_ids for p in kept.problem.tolist()]
    assert 0 < recorded["n_groups"] == sum(in_val) < len(everything.problem)
    # the ladder scores the head from the collection's stored hidden states, as training measured it
    ladder = selector_ladder(
        collected, sorted(val_ids), k=4, groups_at=at, selectors=[tmp_path / "sel"], slm=slm
    )
    row = ladder["rows"][-1]
    assert row["name"].startswith("head") and row["n_groups"] == recorded["n_groups"]
    assert row["agreement"]["value"] == pytest.approx(recorded["agreement_with_llm"])
    with pytest.raises(ValueError, match="no groups in .* where entropy=1000 fires"):
        train(TrainConfig(groups=str(collected), out=str(tmp_path / "z"), groups_at="entropy=1000"), slm=slm)
    with pytest.raises(ValueError, match="--groups-at 'nonsense'"):
        TrainConfig(groups=str(collected), out=str(tmp_path / "x"), mode="lora", groups_at="nonsense")
    # the collection kept entropy@0.8 or kl@0.9 points: `always` would train on a biased share of the rest
    with pytest.raises(ValueError, match="--groups-at 'always' fires on positions .* did not keep"):
        train(TrainConfig(groups=str(collected), out=str(tmp_path / "w"), groups_at="always"), slm=slm)
    with pytest.raises(ValueError, match=r"k=9 must lie in \[2, 4\]"):
        train(TrainConfig(groups=str(collected), out=str(tmp_path / "y"), k=9), slm=slm, progress=False)


def test_selector_refuses_another_base_model_and_corrupted_files(collected, slm, tokenizer, tmp_path):
    cfg = TrainConfig(groups=str(collected), out=str(tmp_path / "sel"), epochs=1, val_fraction=0.0)
    train(cfg, slm=slm, progress=False)
    other = make_model(tokenizer, seed=5)
    with pytest.raises(SelectorCheckpointError, match="trained on base model"):
        LocalSelector.from_pretrained(tmp_path / "sel", model=other)
    (tmp_path / "sel" / "selector.safetensors").write_bytes(b"garbage")
    with pytest.raises(SelectorCheckpointError, match="corrupted"):
        LocalSelector.from_pretrained(tmp_path / "sel")
    with pytest.raises(SelectorCheckpointError, match="not a selector checkpoint"):
        LocalSelector.from_pretrained(tmp_path / "nothing-here")
    config_file = tmp_path / "sel" / "selector_config.json"
    config_file.write_text(json.dumps({"base_model": "tiny", "bins": 3}))  # a hand-edited config
    with pytest.raises(
        SelectorCheckpointError, match=r"selector_config.json is malformed \(missing base_fingerprint"
    ):
        LocalSelector.from_pretrained(tmp_path / "sel")
    with pytest.raises(SelectorCheckpointError, match="unknown bins"):
        LocalSelector.from_pretrained(tmp_path / "sel")
    config_file.write_text("{not json")
    with pytest.raises(SelectorCheckpointError, match="selector_config.json is not readable JSON"):
        LocalSelector.from_pretrained(tmp_path / "sel")


def test_s2t_local_evaluation_needs_no_llm_and_refuses_leaky_problems(collected, slm, tmp_path):
    from s2t.api import S2TGenerator
    from s2t.evaluate import EvalConfig, evaluate

    train(
        TrainConfig(groups=str(collected), out=str(tmp_path / "sel"), epochs=2, val_fraction=0.0),
        slm=slm,
        progress=False,
    )
    gen = S2TGenerator(slm, llm="/nonexistent/llm/never/loaded")
    cfg = tiny_eval_config(
        tmp_path,
        QUESTIONS[:2],
        methods=["greedy", "s2t-local"],
        threshold=0.5,
        max_new_tokens=8,
        selector=str(tmp_path / "sel"),
    )
    payload = evaluate(cfg, tmp_path / "run", progress=False, generator=gen)
    assert not gen.llm_loaded
    assert payload["methods"]["s2t-local"]["n"] == 2
    assert payload["methods"]["s2t-local"]["mean_llm_forward_tokens"] == 0
    # evaluating on the selector's own training problems is refused
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("\n".join(json.dumps({"question": q, "answer": "#### 4"}) for q in QUESTIONS))
    leaky = EvalConfig(
        **{**cfg.__dict__, "split": "train", "data_file": str(train_file), "methods": ["s2t-local"]}
    )
    with pytest.raises(ValueError, match="refusing a leaky evaluation"):
        evaluate(leaky, tmp_path / "run2", progress=False, generator=gen)
    # ... also relabelled: the training problems in a file evaluated as another dataset's test split
    # (the selector records its collection's problem digests)
    assert len(load_selector(tmp_path / "sel").config.training["collection"]["problem_digests"]) == 4
    relabelled = EvalConfig(
        **{**cfg.__dict__, "dataset": "renamed", "data_file": str(train_file), "methods": ["s2t-local"]}
    )
    with pytest.raises(ValueError, match=r"trained on 4 of the evaluated problems \(e.g. renamed/test/0\)"):
        evaluate(relabelled, tmp_path / "run3", progress=False, generator=gen)
    # ... while other problems under the training problems' ids are not refused: an id is a label
    same_ids = EvalConfig(**{**cfg.__dict__, "dataset": "tiny", "split": "train", "methods": ["s2t-local"]})
    assert (
        evaluate(same_ids, tmp_path / "run4", progress=False, generator=gen)["methods"]["s2t-local"]["n"] == 2
    )


def test_a_run_gains_s2t_local_later_but_never_mixes_two_selectors(collected, slm, tmp_path):
    from dataclasses import replace

    from s2t.api import S2TGenerator
    from s2t.evaluate import EvalConfig, evaluate

    for name, epochs in (("sel", 2), ("other", 1)):
        train(
            TrainConfig(
                groups=str(collected), out=str(tmp_path / name), epochs=epochs, val_fraction=0.0, seed=epochs
            ),
            slm=slm,
            progress=False,
        )
    gen = S2TGenerator(slm, llm="/nonexistent/llm/never/loaded")
    base = tiny_eval_config(tmp_path, QUESTIONS[:2], methods=["greedy"], threshold=0.5)
    evaluate(base, tmp_path / "run", progress=False, generator=gen)
    with_local = replace(base, methods=["greedy", "s2t-local"], selector=str(tmp_path / "sel"))
    payload = evaluate(with_local, tmp_path / "run", progress=False, generator=gen)
    assert payload["methods"]["s2t-local"]["n"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    digests = {r.get("selector") for r in records if r["method"] == "s2t-local"}
    assert len(digests) == 1 and None not in digests
    # another selector for the same run directory: refused before anything is decoded
    evaluate(replace(with_local, limit=1), tmp_path / "run1", progress=False, generator=gen)
    other = replace(with_local, limit=None, selector=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="s2t-local results of another selector"):
        evaluate(other, tmp_path / "run1", progress=False, generator=gen)
    # ... also where nothing is left to run, and a refused invocation leaves config.json as it was
    with pytest.raises(ValueError, match="s2t-local results of another selector"):
        evaluate(replace(other, limit=1), tmp_path / "run1", progress=False, generator=gen)
    stored = json.loads((tmp_path / "run1" / "config.json").read_text())
    assert stored["selector"] == str(tmp_path / "sel")
    # a later invocation without --selector (another lane's methods) keeps the selector and methods named
    evaluate(replace(base, limit=1), tmp_path / "run1", progress=False, generator=gen)
    stored = json.loads((tmp_path / "run1" / "config.json").read_text())
    assert stored["selector"] == str(tmp_path / "sel") and stored["methods"] == ["greedy", "s2t-local"]
    assert stored["selectors"] == {"s2t-local": str(tmp_path / "sel")}
    report = (tmp_path / "run1" / "report.md").read_text()
    assert "Selector digests (S2T-Local weights; trigger: the learned trigger's): s2t-local: " in report
    assert f"({tmp_path / 'sel'})." in report
    # a --selector that no method of the invocation reads is not recorded as the run's
    evaluate(
        replace(base, limit=1, selector=str(tmp_path / "other")),
        tmp_path / "run3",
        progress=False,
        generator=gen,
    )
    stored = json.loads((tmp_path / "run3" / "config.json").read_text())
    assert stored["selector"] is None and stored["selectors"] == {}
    from s2t.evaluate_distributed import evaluate_distributed

    by_path = replace(with_local, slm=str(slm.model.name_or_path), limit=1)
    evaluate(by_path, tmp_path / "run2", progress=False, generator=gen)
    with pytest.raises(ValueError, match="s2t-local results of another selector"):  # the Ray path too
        evaluate_distributed(
            replace(by_path, limit=None, selector=str(tmp_path / "other")),
            tmp_path / "run2",
            workers=1,
            progress=False,
        )
    # ... but under a labelled name it joins the run beside the first, each method with its own selector
    labelled = evaluate(
        replace(other, methods=["s2t-local:other"]), tmp_path / "run1", progress=False, generator=gen
    )
    assert labelled["methods"]["s2t-local:other"]["n"] == 2 and labelled["methods"]["s2t-local"]["n"] == 1
    records = [json.loads(line) for line in (tmp_path / "run1" / "results.jsonl").read_text().splitlines()]
    by_method = {r["method"]: r["selector"] for r in records if r["method"].startswith("s2t-local")}
    assert by_method["s2t-local"] != by_method["s2t-local:other"]
    stored = json.loads((tmp_path / "run1" / "config.json").read_text())  # each method with its directory
    assert stored["selectors"] == {
        "s2t-local": str(tmp_path / "sel"),
        "s2t-local:other": str(tmp_path / "other"),
    }
    report = (tmp_path / "run1" / "report.md").read_text()
    assert f"s2t-local:other: {by_method['s2t-local:other']} ({tmp_path / 'other'})" in report
    # a label names one selector for every setting: another setting of a label is no way around it
    for method, selector in (("s2t-local/entropy@0.4", "other"), ("s2t-local:other/entropy@0.4", "sel")):
        with pytest.raises(
            ValueError, match=r"s2t-local(:other)? results of another selector under .*:LABEL/entropy@0.4"
        ):
            evaluate(
                replace(other, methods=[method], selector=str(tmp_path / selector)),
                tmp_path / "run1",
                progress=False,
                generator=gen,
            )
    with pytest.raises(ValueError, match="unknown method"):
        EvalConfig(methods=["s2t-local:Bad Label"])


def test_learned_trigger_trains_reloads_and_drives_llm_free_decoding(
    collected, slm, prompts, tokenizer, tmp_path
):
    from s2t.policies.learned_trigger import LearnedTrigger
    from s2t.training.trigger import train_trigger

    trigger = train_trigger(collected, slm, "tiny", target_rate=0.3, val_fraction=0.25, epochs=20)
    assert 0.0 <= trigger.threshold <= 1.0
    assert {"learned", "entropy", "margin"} <= set(trigger.config.metrics)
    trigger.save_pretrained(tmp_path)
    reloaded = LearnedTrigger.from_pretrained(tmp_path, model=slm.model)
    x = torch.randn(3, slm.model.config.hidden_size + 18)
    torch.testing.assert_close(reloaded.predict(x), trigger.predict(x))
    selector = LocalSelector.initial(slm.model, "tiny", len(tokenizer))
    kw = dict(
        vocab_size=len(tokenizer),
        stop_ids=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id,
        max_new_tokens=12,
    )
    batched = decode(slm.model, prompts, Method(reloaded, TopK(4), selector), **kw)
    single = [decode(slm.model, [p], Method(reloaded, TopK(4), selector), **kw)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert [g.trigger_steps for g in batched] == [g.trigger_steps for g in single]


def test_a_run_never_mixes_two_learned_triggers_however_the_trigger_is_named(collected, slm, tmp_path):
    from dataclasses import replace

    from s2t.api import S2TGenerator
    from s2t.evaluate import evaluate
    from s2t.policies.learned_trigger import LearnedTrigger
    from s2t.training.trigger import train_trigger

    trigger = train_trigger(collected, slm, "tiny", target_rate=0.3, val_fraction=0.25, epochs=20)
    trigger.save_pretrained(tmp_path / "a")
    LearnedTrigger(
        trigger.weight + 0.5, trigger.bias, trigger.mean, trigger.std, trigger.config
    ).save_pretrained(tmp_path / "b")
    gen = S2TGenerator(slm, llm="/nonexistent/llm/never/loaded")
    base = tiny_eval_config(
        tmp_path, QUESTIONS[:2], limit=1, methods=["random-select/learned"], selector=str(tmp_path / "a")
    )
    evaluate(base, tmp_path / "run", progress=False, generator=gen)
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert records[0]["selector"].startswith("trigger:")
    with pytest.raises(
        ValueError,
        match="random-select/learned results of another learned trigger.*random-select:LABEL/learned",
    ):
        evaluate(
            replace(base, limit=None, selector=str(tmp_path / "b")),
            tmp_path / "run",
            progress=False,
            generator=gen,
        )
    # a later invocation that uses no selector keeps naming the one behind the run's results
    evaluate(
        replace(base, methods=["greedy"], selector=str(tmp_path / "b")),
        tmp_path / "run",
        progress=False,
        generator=gen,
    )
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["selector"] == str(tmp_path / "a")
    assert stored["methods"] == ["random-select/learned", "greedy"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "(no method of this run loads the LLM)" in report and "nan" not in report
    # the trigger records its collection problems: evaluating on them is refused, as for a selector
    assert trigger.config.problem_ids == [f"tiny/train/{i}" for i in range(len(QUESTIONS))]
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps({"question": q, "answer": "#### 4"}) + "\n" for q in QUESTIONS))
    leaky = replace(base, split="train", data_file=str(train_file), limit=None)
    with pytest.raises(ValueError, match="the learned trigger was trained on 4 of the evaluated problems"):
        evaluate(leaky, tmp_path / "leaky", progress=False, generator=gen)
    assert not (tmp_path / "leaky").exists()
    # ... under a labelled name the second trigger joins the run, paired with the first on its problems
    labelled = evaluate(
        replace(base, methods=["random-select:b/learned"], selector=str(tmp_path / "b")),
        tmp_path / "run",
        progress=False,
        generator=gen,
    )
    assert labelled["methods"]["random-select:b/learned"]["n"] == 1
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    by_method = {r["method"]: r.get("selector") for r in records}
    assert by_method["random-select:b/learned"] != by_method["random-select/learned"]
    # a label says which selector made a method's results: where none is read, it is refused
    with pytest.raises(ValueError, match="reads none; drop ':b'"):
        replace(base, methods=["random-select:b/entropy@0.5"])
    with pytest.raises(ValueError, match="unknown method"):
        replace(base, methods=["greedy:b"])


def test_a_learned_trigger_that_records_no_problems_is_evaluated_with_a_leakage_warning(
    collected, slm, tmp_path, caplog
):
    from dataclasses import replace

    from s2t.api import S2TGenerator
    from s2t.evaluate import evaluate
    from s2t.training.trigger import train_trigger

    trigger = train_trigger(collected, slm, "tiny", target_rate=0.3, val_fraction=0.25, epochs=5)
    trigger.config.problem_ids = []  # as saved before session 34
    trigger.save_pretrained(tmp_path / "old")
    config = tiny_eval_config(
        tmp_path, QUESTIONS[:2], limit=1, methods=["random-select/learned"], selector=str(tmp_path / "old")
    )
    gen = S2TGenerator(slm, llm="/nonexistent/llm/never/loaded")
    with caplog.at_level("WARNING", logger="s2t.evaluate"):
        evaluate(replace(config, split="train"), tmp_path / "run", progress=False, generator=gen)
    assert "records no problems" in caplog.text and "cannot be checked for leakage" in caplog.text


def test_lora_training_saves_an_adapter_that_s2t_local_evaluation_uses(collected, tiny_pair_dir, tmp_path):
    from s2t.api import S2TGenerator
    from s2t.evaluate import evaluate
    from s2t.models import load_model

    slm = load_model(tiny_pair_dir["slm"], device="cpu")  # a private copy: training must leave it unchanged
    before = {k: v.clone() for k, v in slm.model.state_dict().items()}
    cfg = TrainConfig(
        groups=str(collected),
        out=str(tmp_path / "sel"),
        mode="lora",
        epochs=1,
        lr=1e-3,
        batch_size=4,
        val_fraction=0.0,
        prefix_kl_tokens=8,
    )
    selector = train(cfg, slm=slm, progress=False)
    assert (tmp_path / "sel" / "adapter" / "adapter_model.safetensors").is_file()
    assert selector.config.training["mode"] == "lora"
    after = slm.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    gen = S2TGenerator(slm)
    cfg = tiny_eval_config(
        tmp_path, QUESTIONS[:1], methods=["s2t-local"], threshold=0.0, selector=str(tmp_path / "sel")
    )
    payload = evaluate(cfg, tmp_path / "run", progress=False, generator=gen)
    assert payload["methods"]["s2t-local"]["n"] == 1
    record = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[0])
    assert f"+adapter:{selector.config.adapter_sha256[:16]}" in record["selector"]
    # a damaged adapter that safetensors still parses is refused, before and at loading
    from s2t.policies.learned_selector import check_selector_checkpoint, load_adapted_slm

    adapter = tmp_path / "sel" / "adapter" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-5] ^= 0x7F
    adapter.write_bytes(bytes(data))
    with pytest.raises(SelectorCheckpointError, match="corrupted LoRA adapter checkpoint"):
        check_selector_checkpoint(tmp_path / "sel")
    with pytest.raises(SelectorCheckpointError, match="corrupted LoRA adapter checkpoint"):
        load_adapted_slm(slm.model, tmp_path / "sel")


def test_lora_training_at_trigger_points_trains_and_validates_only_where_the_trigger_fires(
    collected, tiny_pair_dir, tmp_path
):
    from s2t.models import load_model
    from s2t.training.feature_training import load_group_arrays

    everything = load_group_arrays(collected, 4)
    at = f"entropy={float(everything.entropy.median())}"
    kept = load_group_arrays(collected, 4, at)
    slm = load_model(tiny_pair_dir["slm"], device="cpu")
    common = dict(
        groups=str(collected), mode="lora", epochs=1, lr=1e-3, val_fraction=0.25, prefix_kl_tokens=8
    )
    selector = train(TrainConfig(out=str(tmp_path / "at"), groups_at=at, **common), slm=slm, progress=False)
    training = selector.config.training
    ids = [kept.problem_ids[p] for p in kept.problem.tolist()]
    assert training["metrics"]["train"]["n_groups"] == sum(i in training["train_problem_ids"] for i in ids)
    assert training["metrics"]["validation"]["all"]["n_groups"] == sum(
        i in training["validation_problem_ids"] for i in ids
    )
    assert training["config"]["groups_at"] == at
    every = train(TrainConfig(out=str(tmp_path / "all"), **common), slm=slm, progress=False)
    assert (
        0 < training["metrics"]["train"]["n_groups"] < every.config.training["metrics"]["train"]["n_groups"]
    )


def test_lora_training_under_accelerate_launch_on_two_processes_takes_the_single_process_steps(
    tiny_pair_dir, slm, llm, tmp_path
):
    """`accelerate launch` (two CPU processes, gloo) splits each batch and averages the gradients."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from s2t.cli import app

    pytest.importorskip("peft")
    groups = _collect_by_path(tiny_pair_dir, slm, llm, tmp_path / "groups", max_new_tokens=10)
    args = [
        "train",
        "--mode",
        "lora",
        "--groups",
        str(groups),
        "--epochs",
        "1",
        "--lr",
        "1e-3",
        "--batch-size",
        "4",
        "--val-fraction",
        "0",
        "--trigger-rate",
        "0",
        "--lora-dropout",
        "0",
    ]
    single = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = Path(sys.executable).parent / "accelerate"
    launched = subprocess.run(
        [
            str(launcher),
            "launch",
            "--cpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(port),
            "-m",
            "s2t.cli",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    for name in ("selector.safetensors", "adapter/adapter_model.safetensors"):
        one, two = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert one.keys() == two.keys()
        for key in one:
            torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4)
    # LoRA's B matrices start at zero: they moved, so the two runs agree on real training steps
    adapter = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)


def test_cli_generate_decodes_with_a_trained_selector_and_never_loads_the_llm(
    collected, slm, tiny_pair_dir, tmp_path
):
    from typer.testing import CliRunner

    from s2t.cli import app

    train(
        TrainConfig(groups=str(collected), out=str(tmp_path / "sel"), epochs=1, val_fraction=0.0),
        slm=slm,
        progress=False,
    )
    never_loaded = tmp_path / "llm"  # a model directory in name only: loading it would fail
    never_loaded.mkdir()
    (never_loaded / "config.json").write_text("{}")
    args = [
        "generate",
        QUESTIONS[0],
        "--slm",
        tiny_pair_dir["slm"],
        "--llm",
        str(never_loaded),
        "--method",
        "greedy,s2t-local",
        "--threshold",
        "0.0",
        "--k",
        "4",
        "--max-new-tokens",
        "5",
        "--json",
    ]
    result = CliRunner().invoke(app, [*args, "--selector", str(tmp_path / "sel")])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["s2t-local"]["cost"]["triggers"] > 0
    assert payload["s2t-local"]["cost"]["llm_forward_tokens"] == 0
    missing = CliRunner().invoke(app, args)
    assert missing.exit_code == 2 and "--selector" in missing.stderr  # --json: human text on stderr
    unloadable = [a if a != tiny_pair_dir["slm"] else "/nonexistent/slm" for a in args]
    early = CliRunner().invoke(app, unloadable)  # the missing selector is reported before the SLM loads
    assert early.exit_code == 2 and "needs a trained selector" in early.stderr
    # a problem the selector was trained on is answered and graded, with a note that says so
    data = tmp_path / "data" / "tiny"
    data.mkdir(parents=True)
    for split, prefix in (("train", ""), ("test", "Test: ")):
        (data / f"{split}.jsonl").write_text(
            "".join(json.dumps({"question": prefix + q, "answer": "#### 4"}) + "\n" for q in QUESTIONS)
        )
    by_problem = [a for a in args if a != QUESTIONS[0] and a != "--json"] + [
        "--selector",
        str(tmp_path / "sel"),
    ]
    by_problem += ["--data-dir", str(tmp_path / "data"), "--problem"]
    seen = CliRunner().invoke(app, [*by_problem, "tiny/train/0"])
    assert seen.exit_code == 0, seen.output
    assert f"note: the selector in {tmp_path / 'sel'} was trained on tiny/train/0" in " ".join(
        seen.output.split()
    )
    unseen = CliRunner().invoke(app, [*by_problem, "tiny/test/0"])
    assert unseen.exit_code == 0 and "note:" not in unseen.output, unseen.output


def test_a_collection_without_its_features_says_how_to_recompute_them_and_resumes(
    collected, slm, llm, tmp_path
):
    import shutil

    from safetensors.torch import load_file

    copy = tmp_path / "groups"
    shutil.copytree(collected, copy, ignore=shutil.ignore_patterns("features"))  # as committed to git
    with pytest.raises(FileNotFoundError, match="re-run the `s2t collect` command .* --recompute-features"):
        train(TrainConfig(groups=str(copy), out=str(tmp_path / "sel"), epochs=1), slm=slm, progress=False)
    cfg = CollectConfig(slm="tiny-slm", llm="tiny-llm", dataset="tiny", k=4, max_new_tokens=14, batch_size=2)
    # a plain resume goes on with new problems only: the recorded ones are done
    assert Collector(cfg, copy, slm=slm, llm=llm, problems=_problems(), progress=False).run_all() == 0
    again = Collector(
        cfg, copy, slm=slm, llm=llm, problems=_problems(), progress=False, recompute_features=True
    )
    again._worker._decode = lambda *args: pytest.fail("a recorded trajectory was decoded again")
    assert again.run_all() == 4  # from the stored trajectories: the same records and tensors
    original = {
        r["problem_id"]: r for r in map(json.loads, (collected / "problems.jsonl").read_text().splitlines())
    }
    redone = [json.loads(line) for line in (copy / "problems.jsonl").read_text().splitlines()[4:]]
    assert [r["problem_id"] for r in redone] == list(original) and all(
        r == original[r["problem_id"]] for r in redone
    )
    for record in redone:
        a, b = load_file(str(collected / record["features"])), load_file(str(copy / record["features"]))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a truncated feature file: a clear error naming it and the fix, which redoes exactly that problem
    first = json.loads((copy / "problems.jsonl").read_text().splitlines()[-1])
    damaged = copy / first["features"]
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{damaged.name} is unreadable.*--recompute-features"):
        train(TrainConfig(groups=str(copy), out=str(tmp_path / "sel"), epochs=1), slm=slm, progress=False)
    again = Collector(
        cfg, copy, slm=slm, llm=llm, problems=_problems(), progress=False, recompute_features=True
    )
    assert again.run_all() == 1
    train(TrainConfig(groups=str(copy), out=str(tmp_path / "sel"), epochs=1), slm=slm, progress=False)
    lines = (copy / "problems.jsonl").read_text().splitlines()
    assert len(lines) == 9  # the recomputed records were appended; readers keep the last per problem
    # a damaged file that still parses is refused too, by its record's digest (records made before
    # digests, by its non-finite values), and redone
    from safetensors.torch import save_file

    from s2t.training.collect import read_features

    tensors = load_file(str(damaged))
    tensors["candidate_hidden"][0, 0, 0] = float("nan")
    save_file(tensors, str(damaged))
    with pytest.raises(ValueError, match=f"{damaged.name} does not match the SHA-256.*--recompute"):
        train(TrainConfig(groups=str(copy), out=str(tmp_path / "sel2"), epochs=1), slm=slm, progress=False)
    undigested = {k: v for k, v in first.items() if k != "features_sha256"}
    with pytest.raises(
        ValueError, match=f"{damaged.name} holds non-finite values in candidate_hidden.*--recompute"
    ):
        read_features(copy, undigested)
    again = Collector(
        cfg, copy, slm=slm, llm=llm, problems=_problems(), progress=False, recompute_features=True
    )
    assert again.run_all() == 1
    # and a selector whose training diverged is not saved: it would decode as greedy, silently
    from s2t.policies.learned_selector import LocalSelector

    diverged = LocalSelector.initial(slm.model, "tiny", len(slm.tokenizer))
    diverged.bins = torch.full_like(diverged.bins, float("nan"))
    with pytest.raises(ValueError, match="'bins' weights are not finite"):
        diverged.save_pretrained(tmp_path / "diverged")
    assert not (tmp_path / "diverged" / "selector.safetensors").exists()


def test_position_features_are_rebuilt_from_the_records_with_the_slm_alone(collected, slm, tmp_path):
    import copy as copy_module
    import shutil
    import types

    from s2t.training.trigger import load_position_features

    copy = tmp_path / "groups"
    shutil.copytree(collected, copy, ignore=shutil.ignore_patterns("features"))  # as committed to git
    with pytest.raises(FileNotFoundError, match="4 feature files .* --recompute-features"):
        load_position_features(copy, min_step=0)
    kwargs = {"min_step": 0, "with_kl": True, "with_llm_rank": True}
    stored = load_position_features(collected, **kwargs)
    with pytest.raises(ValueError, match="collected in float32 and the SLM is loaded in bfloat16"):
        bf16 = types.SimpleNamespace(model=copy_module.deepcopy(slm.model).to(torch.bfloat16))
        load_position_features(copy, slm=bf16, **kwargs)
    rebuilt = load_position_features(copy, slm=slm, progress=False, **kwargs)
    assert len(stored) == len(rebuilt) == 8
    for a, b in zip(stored, rebuilt):
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.allclose(a.float(), b.float(), atol=1e-3, rtol=1e-3)
        else:
            assert a == b
    # a record written before the per-position LLM values cannot be rebuilt without the LLM
    lines = [json.loads(line) for line in (copy / "problems.jsonl").read_text().splitlines()]
    for record in lines:
        del record["position_kl"]
    (copy / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(FileNotFoundError, match="--recompute-features"):
        load_position_features(copy, slm=slm, progress=False, **kwargs)


def test_the_learned_trigger_sees_at_inference_the_features_it_was_trained_on(collected, slm, tokenizer):
    from s2t.policies.features import features_from_logits
    from s2t.training.collect import trajectory_forward
    from s2t.training.trigger import load_position_features

    features, _, problem, *_ = load_position_features(collected, min_step=0)
    record = json.loads((collected / "problems.jsonl").read_text().splitlines()[0])
    hidden, logits = trajectory_forward(
        slm.model, record["prompt_ids"], record["trajectory_ids"], len(tokenizer)
    )
    # what decoding computes at each step (the stored hidden states are float16)
    at_inference = features_from_logits(logits, hidden.half().float())
    torch.testing.assert_close(features[problem == 0], at_inference, atol=1e-4, rtol=1e-4)


def test_collection_records_its_resolved_dtype_and_resumes_a_legacy_null_as_float32(tmp_path, monkeypatch):
    from s2t.runs import ConfigMismatchError, RunDirectory
    from s2t.training.collect import LEGACY_CONFIG, CollectConfig

    monkeypatch.setenv("S2T_DEFAULT_DTYPE", "bfloat16")
    assert CollectConfig(dataset="tiny").dtype == "bfloat16"
    assert CollectConfig(dataset="tiny", dtype="float32").dtype == "float32"
    legacy = asdict(CollectConfig(dataset="tiny", dtype="float32")) | {"dtype": None}
    (tmp_path / "problems.jsonl").write_text("{}\n")  # work done under it
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    RunDirectory(tmp_path, asdict(CollectConfig(dataset="tiny", dtype="float32")), legacy=LEGACY_CONFIG)
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    with pytest.raises(ConfigMismatchError, match="--dtype float32 resumes it"):
        RunDirectory(tmp_path, asdict(CollectConfig(dataset="tiny")), legacy=LEGACY_CONFIG)


def test_a_missing_or_hand_edited_checkpoint_config_is_refused_by_name(tmp_path):
    from s2t.policies.checkpoint import read_config
    from s2t.policies.learned_trigger import LearnedTriggerConfig

    path = tmp_path / "trigger_config.json"
    with pytest.raises(SelectorCheckpointError, match="trigger_config.json is missing"):
        read_config(path, LearnedTriggerConfig)
    good = {"base_model": "tiny", "base_fingerprint": "ab", "threshold": 1, "target_rate": 0.05}
    path.write_text(json.dumps(good))
    assert read_config(path, LearnedTriggerConfig).threshold == 1  # a JSON integer is a number
    for field, value in (("threshold", "high"), ("threshold", True), ("metrics", []), ("problem_ids", "x")):
        path.write_text(json.dumps(good | {field: value}))
        with pytest.raises(SelectorCheckpointError, match=f"{field} = .* is not a"):
            read_config(path, LearnedTriggerConfig)
    path.write_text(json.dumps(good | {"problem_ids": [1, 2]}))  # a list of another element type
    with pytest.raises(SelectorCheckpointError, match="problem_ids = .* is not a list"):
        read_config(path, LearnedTriggerConfig)


@pytest.mark.parametrize(
    "config_class, field, value, message",
    [
        ("LearnedTriggerConfig", "threshold", 1.5, r"threshold = 1.5 lies outside \[0, 1\]"),
        ("LearnedTriggerConfig", "target_rate", 0, r"target_rate = 0 lies outside \(0, 1\]"),
        ("LocalSelectorConfig", "prior", "foo", "prior = 'foo' is none of none, slm-logprob"),
        ("LocalSelectorConfig", "score_temperature", -1, r"score_temperature = -1 lies outside \(0, inf\]"),
        ("LocalSelectorConfig", "num_bins", 0, "num_bins = 0 lies outside"),
        ("LocalSelectorConfig", "score_temperature", float("nan"), "score_temperature = nan is not a finite"),
        ("LearnedTriggerConfig", "target_rate", float("inf"), "target_rate = inf is not a finite number"),
        ("FeatureSelectorConfig", "k", 1, r"k = 1 lies outside \[2, inf\]"),
        (
            "FeatureSelectorConfig",
            "training",
            {"train_problem_ids": "tiny/test/0"},
            "training.train_problem_ids = ",
        ),
        (
            "LocalSelectorConfig",
            "training",
            {"validation_problem_ids": [0, 1]},
            "training.validation_problem_ids",
        ),
        ("LocalSelectorConfig", "training", {"train_problem_ids": None}, "training.train_problem_ids = None"),
    ],
)
def test_a_hand_edited_checkpoint_value_out_of_range_is_refused_by_name(
    tmp_path, config_class, field, value, message
):
    from s2t.policies.checkpoint import read_config
    from s2t.policies.feature_selector import FeatureSelectorConfig
    from s2t.policies.learned_selector import LocalSelectorConfig
    from s2t.policies.learned_trigger import LearnedTriggerConfig

    good = {
        "LearnedTriggerConfig": {"threshold": 0.5, "target_rate": 0.05},
        "LocalSelectorConfig": {"vocab_size": 10, "hidden_size": 4, "reserved_ids": [10]},
        "FeatureSelectorConfig": {"k": 8},
    }[config_class] | {"base_model": "tiny", "base_fingerprint": "ab"}
    cls = {c.__name__: c for c in (LearnedTriggerConfig, LocalSelectorConfig, FeatureSelectorConfig)}[
        config_class
    ]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(good))
    read_config(path, cls)  # the unedited config loads
    path.write_text(json.dumps(good | {field: value}))
    with pytest.raises(SelectorCheckpointError, match=f"config.json is malformed \\({message}"):
        read_config(path, cls)


def test_a_collection_resumed_with_other_weights_is_refused_before_they_mix(
    collected, slm, llm, tokenizer, tmp_path
):
    import shutil

    from s2t.models import LoadedModel
    from s2t.training.collect import collected_records

    copy = tmp_path / "groups"
    shutil.copytree(collected, copy)
    lines = (copy / "problems.jsonl").read_text().splitlines()
    assert all(json.loads(line)["model_fingerprints"] for line in lines)
    (copy / "problems.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # the last problem is still to do
    other = LoadedModel("tiny-slm", make_model(tokenizer, seed=7).eval(), slm.tokenizer)  # other weights
    cfg = CollectConfig(slm="tiny-slm", llm="tiny-llm", dataset="tiny", k=4, max_new_tokens=14, batch_size=2)
    with pytest.raises(ValueError, match="would mix models.*collect into a new --out"):
        Collector(cfg, copy, slm=other, llm=llm, problems=_problems(), progress=False).run_all()
    assert (copy / "problems.jsonl").read_text().splitlines() == lines[:-1]  # nothing mixed was written
    # a collection that mixed them anyway (hand-joined files) is refused by every reader
    mixed = json.loads(lines[-1]) | {"model_fingerprints": {"slm": "other", "llm": "x"}}
    (copy / "problems.jsonl").write_text("\n".join([*lines[:-1], json.dumps(mixed)]) + "\n")
    with pytest.raises(ValueError, match="would mix models"):
        collected_records(copy, need_features=False)


def test_a_selector_config_whose_training_record_is_not_an_object_is_refused_by_name(tmp_path):
    from s2t.policies.learned_selector import selector_kind

    (tmp_path / "selector_config.json").write_text(json.dumps({"base_model": "tiny", "training": 5}))
    with pytest.raises(SelectorCheckpointError, match="malformed \\(training = 5 is not an object\\)"):
        selector_kind(tmp_path)


@pytest.mark.parametrize(
    "kind, field, value", [("features", "hidden", 32), ("features", "k", 8), ("head", "num_bins", 17)]
)
def test_a_config_edited_to_another_valid_size_is_refused_naming_the_field(slm, tmp_path, kind, field, value):
    from s2t.policies.feature_selector import FeatureSelector
    from s2t.policies.learned_selector import LocalSelector, load_selector

    selector = (
        FeatureSelector.initial(slm.model, "tiny", k=4, hidden=16)
        if kind == "features"
        else LocalSelector.initial(slm.model, "tiny", len(slm.tokenizer))
    )
    selector.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "selector_config.json").read_text())
    (tmp_path / "selector_config.json").write_text(json.dumps(config | {field: value}))
    with pytest.raises(
        SelectorCheckpointError, match=f"does not fit selector_config.json \\(.*{field}={value}"
    ):
        load_selector(tmp_path)


def test_a_collection_grown_by_a_larger_limit_keeps_the_calibration_of_its_full_size(tmp_path, slm, llm):
    """Quantile settings are calibrated on the split's first N problems whatever --limit is: a
    collection started with --limit 2 and grown to 4 holds what one collected at 4 at once holds (it
    used to calibrate on its first 2, and keep them)."""
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"question": p.question, "answer": "#### 4"}) + "\n" for p in _problems())
    )

    def collect(out, limit):
        cfg = CollectConfig(
            slm="tiny-slm", llm="tiny-llm", dataset="tiny", split="train", data_file=str(data), limit=limit,
            k=4, max_new_tokens=8, batch_size=2, groups_at="entropy@0.7", calibration_problems=3,
        )  # fmt: skip
        Collector(cfg, out, slm=slm, llm=llm, progress=False).run_all()
        return json.loads((out / "calibration.json").read_text())["entropy@0.7"]

    grown = collect(tmp_path / "grown", 2)
    assert grown["problems"] == ["tiny/train/0", "tiny/train/1", "tiny/train/2"]
    assert collect(tmp_path / "grown", 4) == grown == collect(tmp_path / "whole", 4)
    assert (tmp_path / "grown" / "problems.jsonl").read_text() == (
        tmp_path / "whole" / "problems.jsonl"
    ).read_text()


def test_train_says_when_its_trigger_comparison_rests_on_too_few_validation_problems(
    tiny_pair_dir, slm, llm, tmp_path
):
    """An AUROC from one held-out problem was printed like any other; the ladder already said so."""
    from typer.testing import CliRunner

    from s2t.cli import app
    from s2t.training.ladder import MIN_VERDICT_PROBLEMS

    groups = _collect_by_path(tiny_pair_dir, slm, llm, tmp_path / "groups", max_new_tokens=12)
    args = ["train", "--mode", "features", "--groups", str(groups), "--out", str(tmp_path / "sel")]
    result = CliRunner().invoke(
        app, [*args, "--k", "4", "--epochs", "1", "--val-fraction", "0.25", "--trigger-rate", "0.2"]
    )
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "learned validation AUROC" in output
    assert (
        f"(on 1 validation problem(s): too few to compare the triggers; hold out at least {MIN_VERDICT_PROBLEMS}"
        in output
    )


def test_an_interrupt_while_train_reports_keeps_the_finished_training(
    tiny_pair_dir, slm, llm, tmp_path, monkeypatch
):
    """SIGTERM during the ladder used to exit silently and, with --overwrite, put the earlier training
    back in place of the one that had just finished."""
    from typer.testing import CliRunner

    import s2t.cli.local
    from s2t.cli import app

    groups = _collect_by_path(tiny_pair_dir, slm, llm, tmp_path / "groups", max_new_tokens=12)
    args = [
        "train",
        "--mode",
        "features",
        "--groups",
        str(groups),
        "--out",
        str(tmp_path / "sel"),
        "--k",
        "4",
    ]
    args += ["--epochs", "1", "--val-fraction", "0.25", "--trigger-rate", "0"]
    assert CliRunner().invoke(app, [*args, "--seed", "1"]).exit_code == 0
    earlier = (tmp_path / "sel" / "selector.safetensors").read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("signal 15")

    monkeypatch.setattr(s2t.cli.local, "_report", interrupted)
    result = CliRunner().invoke(app, [*args, "--seed", "2", "--overwrite"])
    message = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert f"interrupted while reporting: the trained selector is saved in {tmp_path / 'sel'}" in message
    assert (tmp_path / "sel" / "selector.safetensors").read_bytes() != earlier  # the new training stays
    assert not (tmp_path / "sel" / ".replaced").exists()
