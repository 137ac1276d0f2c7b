"""S2T-Local's feature selector: it learns a planted preference the SLM's top-1 cannot express,
decodes like greedy until trained, and saves/loads like the other selector kinds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from s2t.engine import Method, decode
from s2t.policies import EntropyTrigger, TopK
from s2t.policies.feature_selector import FeatureSelector
from s2t.policies.learned_selector import SelectorCheckpointError, load_selector, selector_kind
from s2t.prompts import build_prompt
from s2t.training.feature_training import FeatureTrainConfig, load_group_arrays, train_feature_selector
from tests.conftest import make_model, make_tokenizer, tiny_eval_config

K = 8
MARGIN_CUTOFF = 0.15


def _planted_collection(path, n_problems=120, groups_per_problem=24, seed=0, with_kl=True):
    """A collection whose LLM prefers the SLM's rank-2 candidate exactly where the SLM's margin is
    below MARGIN_CUTOFF, and its rank-1 elsewhere: a rule the top-1 cannot express."""
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "slm": "tiny-slm",
        "llm": "tiny-llm",
        "dataset": "tiny",
        "split": "train",
        "k": 16,
        "mode": "teacher-forced",
        "kind": "s2t-local-groups",
        "groups_at": "always,entropy@0.5",  # every position: any setting's groups are all there
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "calibration.json").write_text(json.dumps({"entropy@0.5": {"threshold": 0.5}}))
    lines = []
    for p in range(n_problems):
        groups = []
        for position in range(groups_per_problem):
            logits = torch.randn(16, generator=g) * 2.0
            probs = torch.softmax(logits, -1).sort(descending=True).values * 0.9
            margin = float(probs[0] - probs[1])
            llm = torch.full((16,), 0.01)
            llm[1 if margin < MARGIN_CUTOFF else 0] = 0.8
            entropy = float(-(probs * probs.log()).sum())
            group = {
                "position": position,
                "candidate_ids": list(range(16)),
                "slm_probs": probs.tolist(),
                "llm_probs": llm.tolist(),
                "llm_best": int(llm.argmax()),
                "entropy": entropy,
                "margin": margin,
                "divergent": margin < MARGIN_CUTOFF,
            }
            if with_kl:
                group["kl"] = 1.0 if margin < MARGIN_CUTOFF else 0.0
            groups.append(group)
        lines.append(
            json.dumps(
                {
                    "problem_id": f"tiny/train/{p}",
                    "split": "train",
                    "groups": groups,
                    "features": f"features/train-{p}.safetensors",
                }
            )
        )
    (path / "problems.jsonl").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return _planted_collection(tmp_path_factory.mktemp("planted") / "groups")


@pytest.fixture(scope="module")
def trained(planted, slm, tmp_path_factory):
    out = tmp_path_factory.mktemp("feature_selector")
    cfg = FeatureTrainConfig(groups=str(planted), out=str(out), k=K, epochs=20, val_fraction=0.2)
    return train_feature_selector(cfg, slm=slm, progress=False), out


def test_feature_selector_learns_a_planted_rule_the_top1_cannot_express(trained):
    selector, _ = trained
    validation = selector.config.training["metrics"]["validation"]["all"]
    # the SLM's top-1 is right only where the margin is large
    assert validation["slm_top1_agreement_with_llm"] < 0.8
    assert validation["agreement_with_llm"] >= 0.9, validation
    divergent = selector.config.training["metrics"]["validation"]["divergent"]
    assert divergent["agreement_with_llm"] >= 0.85, divergent


def test_untrained_feature_selector_decodes_exactly_like_greedy(slm, tokenizer):
    prompts = [build_prompt(tokenizer, q) for q in ("What is 2 + 2?", "Double 21.")]
    kw = dict(
        vocab_size=len(tokenizer),
        stop_ids=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id,
        max_new_tokens=12,
    )
    selector = FeatureSelector.initial(slm.model, "tiny", K)
    method = Method(EntropyTrigger(0.0), TopK(K), selector)
    local = decode(slm.model, prompts, method, **kw)
    assert [g.token_ids for g in local] == [g.token_ids for g in decode(slm.model, prompts, **kw)]
    assert all(g.cost.triggers > 0 and g.cost.llm_forward_calls == 0 for g in local)


def test_trained_feature_selector_leaves_the_top1_and_is_batch_independent(trained, slm, tokenizer):
    selector, out = trained
    prompts = [build_prompt(tokenizer, q) for q in ("What is 2 + 2?", "Double 21.", "How many eggs?")]
    kw = dict(
        vocab_size=len(tokenizer),
        stop_ids=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id,
        max_new_tokens=12,
    )
    loaded = load_selector(out, model=slm.model)
    assert isinstance(loaded, FeatureSelector) and selector_kind(out) == "features"
    # push the learned part hard so that the random tiny model's steps leave the top-1
    torch.nn.init.normal_(loaded.scorer.net[-1].weight, std=5.0)
    method = Method(EntropyTrigger(0.0), TopK(K), loaded)
    batched = decode(slm.model, prompts, method, **kw)
    single = [decode(slm.model, [p], method, **kw)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert sum(g.cost.overrides for g in batched) > 0


def test_feature_selector_round_trips_and_refuses_other_models_kinds_and_k(trained, slm, tokenizer, tmp_path):
    selector, out = trained
    loaded = load_selector(out, model=slm.model)
    probs = torch.softmax(torch.randn(5, K), -1).sort(descending=True).values
    entropy, margin = torch.rand(5), probs[:, 0] - probs[:, 1]
    torch.testing.assert_close(
        loaded.group_scores(probs, entropy, margin), selector.group_scores(probs, entropy, margin)
    )
    with pytest.raises(ValueError, match="K=8"):
        loaded.group_scores(probs[:, :4], entropy, margin)
    other = make_model(tokenizer, seed=7, hidden=48, layers=1)
    with pytest.raises(SelectorCheckpointError, match="trained on base model"):
        load_selector(out, model=other)
    config = json.loads((out / "selector_config.json").read_text())
    (tmp_path / "selector_config.json").write_text(json.dumps({**config, "kind": "forest"}))
    with pytest.raises(SelectorCheckpointError, match="kind 'forest'.*known kinds: head, lora, features"):
        load_selector(tmp_path)
    (tmp_path / "selector_config.json").write_text(json.dumps(config))
    (tmp_path / "selector.safetensors").write_bytes((out / "selector.safetensors").read_bytes()[:100])
    with pytest.raises(SelectorCheckpointError, match="corrupted"):
        load_selector(tmp_path)


def test_a_damaged_weights_file_that_still_parses_is_refused(trained, tmp_path):
    """safetensors reads a file whose tensor bytes were flipped; the SHA-256 recorded at save catches it."""
    import shutil

    from s2t.policies.learned_trigger import LearnedTrigger, LearnedTriggerConfig

    _, out = trained
    copy = tmp_path / "sel"
    shutil.copytree(out, copy)
    n = 20
    trigger_config = LearnedTriggerConfig("tiny", "f" * 16, threshold=0.5, target_rate=0.05)
    LearnedTrigger(
        torch.randn(n), torch.tensor(0.1), torch.zeros(n), torch.ones(n), trigger_config
    ).save_pretrained(copy)
    load_selector(copy), LearnedTrigger.from_pretrained(copy)  # intact
    for name in ("selector.safetensors", "trigger.safetensors"):
        data = bytearray((copy / name).read_bytes())
        data[-3] ^= 0x40  # a weight's bytes, not the header: safetensors still parses the file
        (copy / name).write_bytes(bytes(data))
    with pytest.raises(SelectorCheckpointError, match="does not match the SHA-256 recorded"):
        load_selector(copy)
    with pytest.raises(SelectorCheckpointError, match="corrupted trigger checkpoint"):
        LearnedTrigger.from_pretrained(copy)


def test_a_method_with_another_k_or_another_builtin_slm_is_refused_before_any_model_loads(trained, tmp_path):
    from s2t.methods import MethodSpec

    _, out = trained
    with pytest.raises(SelectorCheckpointError, match="trained on K=8 candidates; got K=4"):
        MethodSpec.parse("s2t-local/entropy=0.5/k4", selector=str(out))
    MethodSpec.parse("s2t-local/entropy=0.5/k8", selector=str(out))
    config = json.loads((out / "selector_config.json").read_text())
    elsewhere = tmp_path / "other-slm"
    elsewhere.mkdir()
    (elsewhere / "selector.safetensors").write_bytes((out / "selector.safetensors").read_bytes())
    (elsewhere / "selector_config.json").write_text(
        json.dumps({**config, "base_model": "qwen2.5-coder-1.5b-instruct"})
    )
    with pytest.raises(SelectorCheckpointError, match="'qwen2.5-coder-1.5b-instruct'; this run's SLM is"):
        MethodSpec.parse(
            "s2t-local/entropy=0.5/k8", selector=str(elsewhere), slm="qwen2.5-coder-0.5b-instruct"
        )
    # a path or an unlisted name is left to the fingerprint check when the model loads
    MethodSpec.parse("s2t-local/entropy=0.5/k8", selector=str(elsewhere), slm="/models/my-slm")


def test_learning_curve_rises_with_data_and_never_fits_on_held_out_problems(planted):
    from s2t.training.ladder import format_learning_curve, learning_curve

    held_out = [f"tiny/train/{p}" for p in range(100, 120)]
    curve = learning_curve(planted, held_out, [4, 60], k=K, progress=False)
    small, large = curve["points"]
    assert small["train_groups"] == 4 * 24 and large["train_groups"] == 60 * 24
    top1, shallow, features = (row["agreement"]["value"] for row in large["rows"])
    assert top1 < 0.8 and shallow >= 0.9 and features >= 0.9
    assert features >= small["rows"][2]["agreement"]["value"]
    assert small["rows"][0] == large["rows"][0]  # the same held-out groups at every size
    assert "| 60 | 1440 |" in format_learning_curve(curve)
    with pytest.raises(ValueError, match="sizes must lie in"):
        learning_curve(planted, held_out, [101], k=K)


def test_groups_at_keeps_only_the_trigger_points_and_kl_needs_recorded_kl(planted, tmp_path):
    everything = load_group_arrays(planted, K)
    high_entropy = load_group_arrays(planted, K, "entropy@0.5")
    assert 0 < len(high_entropy.problem) < len(everything.problem)
    assert bool((high_entropy.entropy >= 0.5).all())
    assert len(load_group_arrays(planted, K, "kl=0.5").problem) == int(everything.divergent.sum())
    with pytest.raises(ValueError, match="no calibrated threshold for 'entropy@0.8'"):
        load_group_arrays(planted, K, "entropy@0.8")
    with pytest.raises(ValueError, match="exceeds the collection's K=16"):
        load_group_arrays(planted, 32)
    old = _planted_collection(tmp_path / "old", n_problems=2, groups_per_problem=3, with_kl=False)
    with pytest.raises(ValueError, match="records no per-group KL"):
        load_group_arrays(old, K, "kl=0.5")


def test_s2t_local_evaluation_with_a_feature_selector_never_loads_the_llm(trained, slm, tmp_path):
    from s2t.api import S2TGenerator
    from s2t.evaluate import evaluate

    _, out = trained
    gen = S2TGenerator(slm, llm="/nonexistent/llm/never/loaded")
    cfg = tiny_eval_config(
        tmp_path, ["What is 2 + 2?"], methods=["greedy", "s2t-local"], threshold=0.0, k=K, selector=str(out)
    )
    payload = evaluate(cfg, tmp_path / "run", progress=False, generator=gen)
    assert payload["methods"]["s2t-local"]["n"] == 1
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    local = next(r for r in records if r["method"] == "s2t-local")
    assert local["cost"]["llm_forward_calls"] == 0 and local["cost"]["triggers"] > 0
    assert not gen.llm_loaded
    report = (tmp_path / "run" / "report.md").read_text()
    assert report.startswith("# tiny test: tiny (SLM) (no method of this run loads the LLM)")
    assert "| trigger rate | overrides |" in report
    overrides = local["cost"]["overrides"] / local["cost"]["generated_tokens"]
    assert f"| {payload['methods']['s2t-local']['trigger_rate']:.1%} | {overrides:.1%} |" in report


@pytest.fixture(scope="module")
def tiny_collection(tmp_path_factory, slm, llm):
    from s2t.data import Problem
    from s2t.training.collect import CollectConfig, Collector

    questions = ["How many eggs are left?", "Natalia sold clips.", "What is 2 + 2?", "Double 21.", "Halve 8."]
    problems = [Problem(f"tiny/train/{i}", q, "4", "tiny", "train") for i, q in enumerate(questions)]
    out = tmp_path_factory.mktemp("kl_groups")
    cfg = CollectConfig(
        slm="tiny-slm",
        llm="tiny-llm",
        dataset="tiny",
        k=4,
        max_new_tokens=16,
        batch_size=3,
        groups_at="entropy@0.7,kl@0.9",
        calibration_problems=2,
    )
    Collector(cfg, out, slm=slm, llm=llm, problems=problems, progress=False).run_all()
    return out


def test_collection_calibrates_its_group_settings_and_records_kl(tiny_collection, slm, llm):
    from safetensors.torch import load_file

    from s2t.policies.triggers import KLTrigger

    calibration = json.loads((tiny_collection / "calibration.json").read_text())
    assert set(calibration) == {"entropy@0.7", "kl@0.9"}
    assert calibration["kl@0.9"]["problems"] == ["tiny/train/0", "tiny/train/1"]
    records = [json.loads(line) for line in (tiny_collection / "problems.jsonl").read_text().splitlines()]
    thresholds = {k: v["threshold"] for k, v in calibration.items()}
    for record in records:
        tensors = load_file(str(tiny_collection / record["features"]))
        kl = tensors["position_kl"]
        assert len(kl) == record["n_positions"]
        for g in record["groups"]:  # every group is where one of the settings fires, and no other
            assert g["entropy"] >= thresholds["entropy@0.7"] - 1e-4 or g["kl"] >= thresholds["kl@0.9"] - 1e-4
        fired = (tensors["position_entropy"] >= thresholds["entropy@0.7"]) | (kl >= thresholds["kl@0.9"])
        fired[:3] = False  # min_step
        assert [g["position"] for g in record["groups"]] == fired.nonzero().flatten().tolist()
    # the recorded KL is the KL trigger's statistic on the LLM's real logits
    record = next(r for r in records if r["groups"])
    g = record["groups"][0]
    context = torch.tensor([record["prompt_ids"] + record["trajectory_ids"][: g["position"]]])
    vocab = len(slm.tokenizer)
    expected = KLTrigger().statistic(
        slm.model(input_ids=context).logits[:, -1, :vocab], llm.model(input_ids=context).logits[:, -1, :vocab]
    )
    assert g["kl"] == pytest.approx(float(expected), abs=1e-3)


def test_groups_at_below_what_the_collection_kept_completely_is_refused(tiny_collection, tmp_path):
    """The collection kept entropy >= T or kl >= T': below T it holds only the high-KL groups."""
    import shutil

    from s2t.training.collect import check_complete_groups_at

    calibration = json.loads((tiny_collection / "calibration.json").read_text())
    entropy_at, kl_at = calibration["entropy@0.7"]["threshold"], calibration["kl@0.9"]["threshold"]
    for complete in (
        "entropy@0.7",
        "kl@0.9",
        f"entropy={entropy_at!r}",
        f"kl={kl_at * 2}",
        "entropy@0.7,kl@0.9",
    ):
        check_complete_groups_at(tiny_collection, complete)
    assert len(load_group_arrays(tiny_collection, 4, f"entropy={entropy_at!r}").problem) > 0
    with pytest.raises(ValueError, match=r"--groups-at 'entropy=.*' fires on positions .* did not keep") as e:
        load_group_arrays(tiny_collection, 4, f"entropy={entropy_at / 2}")
    message = str(e.value)  # the collection's own settings, their thresholds and the loosest complete one
    assert "groups_at 'entropy@0.7,kl@0.9'" in message and f"entropy@0.7 at {entropy_at!r}" in message
    assert f"kl@0.9 at {kl_at!r}" in message and f"entropy@0.7 = entropy={entropy_at!r}" in message
    # a trigger it never kept at is refused as such, quantile or threshold (the hint to give a threshold
    # for an uncalibrated quantile would only lead here)
    for incomplete, reason in (
        ("always", "no always setting"),
        ("margin=0.1", "no margin setting"),
        ("margin@0.8", "no margin setting"),
        ("entropy@0.7,margin@0.8", "no margin setting"),
    ):
        with pytest.raises(ValueError, match=reason):
            load_group_arrays(tiny_collection, 4, incomplete)
    # an on-policy collection kept the steps where its entropy trigger fired
    on_policy = tmp_path / "on_policy"
    shutil.copytree(tiny_collection, on_policy)
    config = json.loads((on_policy / "config.json").read_text())
    (on_policy / "config.json").write_text(
        json.dumps({**config, "mode": "on-policy", "on_policy_threshold": 0.5})
    )
    check_complete_groups_at(on_policy, "entropy=0.6")
    with pytest.raises(ValueError, match="on_policy_threshold 0.5.*entropy=0.5"):
        check_complete_groups_at(on_policy, "entropy=0.4")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--k", "0"], "k must be >= 2 (a selection needs two candidates); got 0"),
        (["--trigger-rate", "-0.1"], "--trigger-rate must lie in [0, 1) (0 trains no trigger); got -0.1"),
        (["--trigger-rate", "1"], "--trigger-rate must lie in [0, 1)"),
        (["--trigger-rate", "1.5"], "--trigger-rate must lie in [0, 1)"),
        (
            ["--epochs", "0"],
            "epochs, batch_size and hidden must be >= 1 and lr a finite number > 0; got epochs=0,",
        ),
        (["--mode", "head", "--batch-size", "0"], "got epochs=30, batch_size=0, lr=0.01"),
        (
            ["--groups-at", "nonsense"],
            "--groups-at 'nonsense': choose triggers from entropy, margin, kl, always",
        ),
        (["--groups-at", "always"], "--groups-at 'always' fires on positions"),
        (["--lr", "nan"], "lr=nan"),
        (["--lr", "inf"], "lr=inf"),
        (["--groups-subset", "bogus"], "--groups-subset must be all or divergent; got 'bogus'"),
        (["--groups-subset", "divergent"], "features mode trains on all groups"),
        (["--mode", "head", "--lr", "inf"], "lr=inf"),
        (["--mode", "lora", "--lora-r", "0"], "lora_r and lora_alpha must be >= 1"),
        (["--mode", "lora", "--lora-dropout", "1.5"], "lora_dropout must lie in [0, 1); got 1.5"),
        (["--mode", "lora", "--prefix-kl-weight", "-1"], "prefix_kl_weight must be a finite number >= 0"),
        (["--mode", "lora", "--bins-lr", "-1"], "bins_lr must be a finite number > 0; got -1.0"),
        (["--trigger-features", "hidden"], "--trigger-features must be one of auto, logits; got 'hidden'"),
        (["--k", "32"], "--k 32 exceeds the collection's K=4"),
    ],
)
def test_train_refuses_a_bad_option_before_any_model_loads(
    tiny_collection, tmp_path, monkeypatch, options, message
):
    from typer.testing import CliRunner

    import s2t.models
    from s2t.cli import app

    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded before the options were checked")

    monkeypatch.setattr(s2t.models, "load_model", no_model)
    out = tmp_path / "selector"
    args = ["train", "--mode", "features", "--groups", str(tiny_collection), "--out", str(out), *options]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert "s2t/" not in result.output and "learned" not in result.output  # nothing the user never typed
    assert not out.exists()


def test_learned_trigger_learns_the_kl_label_and_an_old_collection_is_refused(tiny_collection, slm, tmp_path):

    from s2t.training.trigger import parse_label, train_trigger

    trigger = train_trigger(
        tiny_collection, slm, "tiny", target_rate=0.2, val_fraction=0.4, epochs=20, label="kl@0.8"
    )
    metrics = trigger.config.metrics
    assert metrics["label"] == "kl@0.8" and metrics["kl_cutoff"] is not None
    assert 0.1 <= metrics["label_share"] <= 0.3
    assert {"learned", "shallow", "entropy", "margin"} <= set(metrics)
    divergent = train_trigger(
        tiny_collection, slm, "tiny", target_rate=0.2, val_fraction=0.4, epochs=20, label="divergent"
    )
    assert divergent.config.metrics["kl_cutoff"] is None
    # a trigger restricted to the logit features never reads the hidden state: it runs on llama.cpp too
    from s2t.policies.learned_trigger import trigger_reads_hidden

    logits_only = train_trigger(
        tiny_collection,
        slm,
        "tiny",
        target_rate=0.2,
        val_fraction=0.4,
        epochs=20,
        label="kl@0.8",
        features="logits",
    )
    assert logits_only.config.metrics["model_choice"]["features"] == "no-hidden"
    logits_only.save_pretrained(tmp_path / "logits")
    assert not trigger_reads_hidden(tmp_path / "logits")
    with pytest.raises(ValueError, match="trigger features must be one of auto, logits"):
        train_trigger(tiny_collection, slm, "tiny", target_rate=0.2, features="hidden")
    for bad in ("kl@1.5", "kl", "entropy@0.9"):
        with pytest.raises(ValueError):
            parse_label(bad)
    old = _copy_without_position_kl(tiny_collection, tmp_path / "old")
    with pytest.raises(ValueError, match="no per-position KL.*s2t collect"):
        train_trigger(old, slm, "tiny", target_rate=0.2, label="kl@0.95")


def _copy_without_position_kl(collection: Path, to: Path) -> Path:
    """A copy of ``collection`` whose feature files lack the per-position KL (as before it was recorded,
    when records carried no digest of their feature file either)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(collection, to)
    for path in (to / "features").glob("*.safetensors"):
        tensors = load_file(str(path))
        tensors.pop("position_kl")
        save_file(tensors, str(path))
    records = [json.loads(line) for line in (to / "problems.jsonl").read_text().splitlines()]
    (to / "problems.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "features_sha256"}) + "\n" for r in records)
    )
    return to


def test_train_refuses_trigger_data_it_cannot_use_before_any_model_loads(
    tiny_collection, tmp_path, monkeypatch
):
    """A collection without per-position KL, or missing feature files whose records cannot rebuild
    them, is refused before the selector is trained, not after."""
    import shutil

    from typer.testing import CliRunner

    import s2t.models
    from s2t.cli import app

    asked = []

    def no_model(*args, **kwargs):
        asked.append(kwargs.get("dtype"))
        raise AssertionError("a model loaded before the trigger's data was checked")

    monkeypatch.setattr(s2t.models, "load_model", no_model)
    no_kl = _copy_without_position_kl(tiny_collection, tmp_path / "no_kl")
    bare = tmp_path / "bare"  # a clone of an old collection: no features/, records without the LLM values
    shutil.copytree(tiny_collection, bare)
    shutil.rmtree(bare / "features")
    records = [json.loads(line) for line in (bare / "problems.jsonl").read_text().splitlines()]
    (bare / "problems.jsonl").write_text(
        "".join(
            json.dumps({k: v for k, v in r.items() if not k.startswith("position_")}) + "\n" for r in records
        )
    )
    for groups, message in (
        (no_kl, "records no per-position KL"),
        (bare, "predate the per-position LLM values"),
    ):
        out = tmp_path / f"selector-{groups.name}"
        args = [
            "train",
            "--mode",
            "features",
            "--groups",
            str(groups),
            "--out",
            str(out),
            "--trigger-rate",
            "0.1",
        ]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and message in result.output, result.output
        assert not out.exists()
    # the divergent label needs no KL
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--mode",
            "features",
            "--groups",
            str(no_kl),
            "--out",
            str(tmp_path / "d"),
            "--trigger-label",
            "divergent",
        ],
    )
    assert "a model loaded before" in repr(result.exception)  # got past the checks, to loading the SLM
    # ... in the collection's dtype, which rebuilt trigger features must match
    from s2t.training.collect import collection_config, collection_dtype

    assert asked == [collection_dtype(collection_config(no_kl))]


def test_trigger_model_choice_keeps_the_hidden_state_only_where_it_carries_the_label():
    from s2t.training.trigger import _choose_model

    g = torch.Generator().manual_seed(0)
    n_problems, per_problem, hidden = 40, 50, 64
    problem = torch.arange(n_problems).repeat_interleave(per_problem)
    x = torch.randn(len(problem), hidden + 2 + 16, generator=g)
    train_p = set(range(32))
    train = problem < 32
    in_hidden = _choose_model(x, x[:, 0] > 1.0, problem, train_p, train, seed=0, epochs=50)
    assert in_hidden["features"] == "all" and in_hidden["inner_auroc"] > 0.95
    logits_only = _choose_model(x, x[:, 0] > 1.0, problem, train_p, train, 0, 50, candidates=("no-hidden",))
    assert logits_only["features"] == "no-hidden" and logits_only["inner_auroc"] < 0.7
    in_entropy = _choose_model(x, x[:, hidden] > 1.0, problem, train_p, train, seed=0, epochs=50)
    assert in_entropy["inner_auroc"] > 0.95
    no_label = torch.zeros(len(problem), dtype=torch.bool)
    single_class = _choose_model(x, no_label, problem, train_p, train, 0, 50)
    assert single_class["inner_auroc"] != single_class["inner_auroc"]  # nan: nothing to choose on


def test_ladder_verdict_compares_each_trained_rung_with_the_top1_and_the_shallow_model():
    from s2t.training.ladder import verdict

    def row(name, value, low, high):
        return {"name": name, "agreement": {"value": value, "low": low, "high": high}}

    ladder = {
        "rows": [
            row("SLM top-1", 0.695, 0.65, 0.75),
            row("shallow", 0.673, 0.63, 0.72),
            row("features", 0.688, 0.64, 0.75),
            row("head", 0.90, 0.86, 0.93),
        ]
    }
    features, head = verdict(ladder).splitlines()
    assert "does NOT beat the SLM top-1 (68.8% vs 69.5%)" in features
    assert "above the shallow by its point estimate only" in features
    assert "beats the SLM top-1" in head and "beats the shallow" in head and "CIs apart" in head
    few = verdict(ladder | {"validation_problem_ids": ["a", "b"]})
    assert few.startswith("only 2 validation problem(s): too few for a verdict")
    assert verdict(ladder | {"validation_problem_ids": [str(i) for i in range(10)]}) == verdict(ladder)


def _planted_positions(path, n_problems=60, positions=80, seed=0):
    """A collection with per-position features only, whose LLM prefers the SLM's rank-2 candidate
    exactly where the hidden state's first coordinate exceeds 1 (about 16% of positions): a rule
    no logit feature carries."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    (path / "features").mkdir(parents=True, exist_ok=True)
    config = {"slm": "tiny-slm", "llm": "tiny-llm", "dataset": "tiny", "split": "train", "k": 16}
    (path / "config.json").write_text(
        json.dumps(config | {"mode": "teacher-forced", "kind": "s2t-local-groups"})
    )
    lines = []
    for p in range(n_problems):
        hidden = torch.randn(positions, 8, generator=g)
        probs = (
            torch.softmax(torch.randn(positions, 16, generator=g) * 2.0, -1).sort(-1, descending=True).values
        )
        rank = torch.where(hidden[:, 0] > 1.0, 2, 1)
        save_file(
            {
                "position_hidden": hidden.half(),
                "position_slm_topk_probs": probs,
                "position_entropy": -(probs * probs.log()).sum(-1),
                "position_margin": probs[:, 0] - probs[:, 1],
                "position_divergent": rank != 1,
                "position_llm_top1_rank": rank,
            },
            str(path / "features" / f"train-{p}.safetensors"),
        )
        record = {"problem_id": f"tiny/train/{p}", "split": "train", "groups": [], "n_positions": positions}
        lines.append(json.dumps(record | {"features": f"features/train-{p}.safetensors"}))
    (path / "problems.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_override_ladder_finds_a_planted_per_position_rule_only_where_the_features_carry_it(tmp_path):
    from s2t.training.override import format_override_ladder, override_ladder

    path = _planted_positions(tmp_path / "positions")
    held_out = [f"tiny/train/{p}" for p in range(48, 60)]
    result = override_ladder(path, held_out, k=8, rates=(0.1,))
    assert result["held_out_problems"] == 12 and result["train_problems"] == 48
    rows = {row["name"].split(" (")[0].split(",")[0]: row["rates"]["0.1"] for row in result["rows"]}
    probe, trees, entropy = rows["probe"], rows["trees"], rows["entropy"]
    # the probe reads the hidden state: its overrides are the LLM's pick, the top-1 never was
    assert probe["pick_is_llm_top1"]["value"] >= 0.9 and probe["top1_is_llm_top1"]["value"] <= 0.1
    assert probe["net_per_1000"]["low"] > 50
    # the logit features carry no trace of the rule: neither trees nor entropy gain anything
    assert trees["net_per_1000"]["high"] < probe["net_per_1000"]["low"]
    assert entropy["net_per_1000"]["value"] < 40
    assert "net per 1,000 positions" in format_override_ladder(result)
    with pytest.raises(ValueError, match="k must lie in 2..16"):
        override_ladder(path, held_out, k=1)
    with pytest.raises(ValueError, match="not in"):
        override_ladder(path, ["tiny/train/999"], k=8)


def test_override_learning_curve_fits_on_nested_prefixes_and_scores_the_same_positions(tmp_path):
    from s2t.training.override import format_override_learning_curve, override_learning_curve

    path = _planted_positions(tmp_path / "positions")
    held_out = [f"tiny/train/{p}" for p in range(12)]  # the first 12: stable as a collection grows
    curve = override_learning_curve(path, held_out, [4, 48], k=8, rates=(0.1,), progress=False)
    small, large = curve["points"]
    assert (small["train_problems"], large["train_problems"]) == (4, 48)
    assert large["train_positions"] == 12 * small["train_positions"]
    assert curve["held_out_problem_ids"] == held_out
    probe = [row for row in large["rows"] if row["name"].startswith("probe")][0]["rates"]["0.1"]
    assert probe["net_per_1000"]["low"] > 50  # the planted rule is learned from 48 problems
    assert "net per 1,000 at 10%" in format_override_learning_curve(curve, rates=("0.1",))
    with pytest.raises(ValueError, match="sizes must lie in"):
        override_learning_curve(path, held_out, [49], k=8, progress=False)


def test_train_refuses_an_out_it_would_overwrite_and_overwrite_clears_only_its_own_files(
    tiny_collection, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    import s2t.models
    from s2t.cli import app
    from s2t.training.train import (
        OUTPUT_DIRS,
        OUTPUT_FILES,
        check_output_dir,
        replacing_output,
    )

    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded before the options were checked")

    monkeypatch.setattr(s2t.models, "load_model", no_model)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    trained = tmp_path / "trained"
    trained.mkdir()
    for name in OUTPUT_FILES:
        (trained / name).write_text("{}")
    (trained / "checkpoint").mkdir()
    (trained / "notes.txt").write_text("mine")

    def train(out, *options):
        args = ["train", "--mode", "features", "--groups", str(tiny_collection), "--out", str(out), *options]
        return CliRunner().invoke(app, args)

    for out, options, message in (
        (a_file, [], "is a file"),
        (a_file / "sub", [], f"lies under {a_file}, which is a file"),
        (tiny_collection, [], "is a collection directory"),
        (trained, [], "holds a trained selector (selector_config.json): pass --overwrite"),
        (trained, ["--resume"], "--resume applies to lora mode"),
        (trained, ["--overwrite", "--epochs", "0"], "epochs"),  # a bad option keeps the earlier training
    ):
        result = train(out, *options)
        assert result.exit_code == 2 and message in result.output, result.output
        assert all((trained / name).is_file() for name in OUTPUT_FILES)
    # --overwrite gets past the checks (to loading the SLM), with the earlier training set aside; a
    # training that fails there (here: the model) puts it back, one that succeeds drops it
    result = train(trained, "--overwrite", "--trigger-rate", "0")
    assert "a model loaded before" in repr(result.exception)
    assert all((trained / name).is_file() for name in OUTPUT_FILES) and (trained / "checkpoint").is_dir()
    assert not (trained / ".replaced").exists()
    with replacing_output(trained, overwrite=True):
        assert sorted(p.name for p in trained.iterdir()) == [".replaced", "notes.txt"]
        (trained / "selector_config.json").write_text('{"new": 1}')
    assert sorted(p.name for p in trained.iterdir()) == ["notes.txt", "selector_config.json"]
    inside = train(tiny_collection / "features" / "sel")
    assert inside.exit_code == 2 and "lies in" in inside.output and "a collection directory" in inside.output
    with pytest.raises(ValueError, match="give one"):
        check_output_dir(trained, overwrite=True, resume=True)
    # a training that fails after writing puts back exactly the earlier one: what it added goes
    with pytest.raises(KeyboardInterrupt), replacing_output(trained, overwrite=True):
        (trained / "selector_config.json").write_text('{"newer": 1}')
        (trained / "trigger_config.json").write_text("{}")
        (trained / OUTPUT_DIRS[0]).mkdir()
        raise KeyboardInterrupt
    assert sorted(p.name for p in trained.iterdir()) == ["notes.txt", "selector_config.json"]
    assert (trained / "selector_config.json").read_text() == '{"new": 1}'


@pytest.mark.parametrize(
    "options, message",
    [
        (["--learning-curve", "1,50"], "counts must be >= 2"),
        (["--learning-curve", "50,abc"], "comma-separated problem counts"),
        (["--val-fraction", "1.5"], "--val-fraction must lie strictly between 0 and 1"),
        (["--k", "1"], "--k must be >= 2"),
        (["--hold-out-first", "4", "--validation-from", "x"], "give one"),
        ([], "/nonexistent is not a collection directory"),
        (["--validation-from", "/nonexistent"], "no selector at /nonexistent: the directory does not exist"),
    ],
)
def test_the_ladder_script_refuses_bad_options_with_one_line(monkeypatch, capsys, options, message):
    from tests.conftest import load_script

    script = load_script("bench/selector_agreement.py")
    monkeypatch.setattr("sys.argv", ["selector_agreement.py", "--groups", "/nonexistent", *options])
    with pytest.raises(SystemExit) as e:
        script.main()
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_diverged_epoch_is_never_kept_and_a_first_epoch_divergence_is_refused(caplog):
    from s2t.training.objective import DIVERGENCE_FACTOR, diverged

    assert not diverged(1, False, end_loss=1.2, start_loss=1.7)
    assert not diverged(1, False, end_loss=DIVERGENCE_FACTOR * 1.7, start_loss=1.7)
    with caplog.at_level("WARNING"):
        assert diverged(3, True, end_loss=float("nan"), start_loss=1.7)
        assert diverged(3, True, end_loss=1e21, start_loss=1.7)
    assert "keeping an earlier state" in caplog.text
    with pytest.raises(ValueError, match="diverged in epoch 1 .*1.7 to inf.*lower --lr"):
        diverged(1, False, end_loss=float("inf"), start_loss=1.7)
    small, huge = torch.full((2, 2), 6e4), torch.tensor([1.0, -1e5])
    assert not diverged(2, True, end_loss=1.2, start_loss=1.7, weights=[small])
    with pytest.raises(ValueError, match="largest weight is 1e\\+05"):  # a bounded loss hid it
        diverged(1, False, end_loss=1.2, start_loss=1.7, weights=[small, huge])
    with caplog.at_level("WARNING"):  # a step's weights alone (LoRA): a NaN one has diverged
        assert diverged(1, True, weights=[torch.ones(2), torch.tensor([float("nan")])])


@pytest.mark.parametrize("mode", ["features", "head", "lora"])
def test_training_that_blows_up_its_weights_saves_nothing_and_says_lower_lr(
    tiny_collection, tmp_path, monkeypatch, tiny_pair_dir, mode
):
    """A too-high --lr blows up the weights (huge but finite, or NaN); that training is refused, not
    saved as a selector that decodes garbage or greedy. (The head's loss stays bounded at any learning
    rate: its weights tell.)"""
    from typer.testing import CliRunner

    import s2t.models
    from s2t.cli import app
    from s2t.models import load_model

    # the collection's SLM (a private copy: LoRA training wraps the model it is given)
    slm = load_model(tiny_pair_dir["slm"], device="cpu")
    monkeypatch.setattr(s2t.models, "load_model", lambda *args, **kwargs: slm)

    out = tmp_path / "sel"
    args = ["train", "--mode", mode, "--groups", str(tiny_collection), "--out", str(out), "--k", "4"]
    result = CliRunner().invoke(app, [*args, "--lr", "1e30", "--epochs", "2", "--trigger-rate", "0"])
    assert result.exit_code == 2 and "diverged in epoch 1" in result.output, result.output
    assert not (out / "selector.safetensors").exists()


def test_an_overwrite_killed_by_sigterm_or_sigkill_loses_no_earlier_training(tmp_path):
    import os
    import signal

    from s2t.training.train import OUTPUT_FILES, check_output_dir, replacing_output

    trained = tmp_path / "trained"
    trained.mkdir()
    for name in OUTPUT_FILES:
        (trained / name).write_text(name)
    # SIGTERM (a scheduler) mid-training: the earlier training is put back at once
    with pytest.raises(KeyboardInterrupt), replacing_output(trained, overwrite=True):
        (trained / OUTPUT_FILES[0]).write_text("half-written new training")
        os.kill(os.getpid(), signal.SIGTERM)
    assert all((trained / name).read_text() == name for name in OUTPUT_FILES)
    assert not (trained / ".replaced").exists()
    # SIGKILL cannot be caught: the set-aside training is put back by the next command that looks
    (trained / ".replaced").mkdir()
    for name in OUTPUT_FILES:
        (trained / name).rename(trained / ".replaced" / name)
    with pytest.raises(ValueError, match="holds a trained selector"):
        check_output_dir(trained)
    assert all((trained / name).read_text() == name for name in OUTPUT_FILES)
    # ... and the next --overwrite sets it aside again rather than deleting it
    (trained / ".replaced").mkdir()
    (trained / OUTPUT_FILES[0]).rename(trained / ".replaced" / OUTPUT_FILES[0])
    with pytest.raises(ValueError, match="interrupted --overwrite set aside"):  # both: the user decides
        check_output_dir(trained, overwrite=True)
    with pytest.raises(ValueError, match="interrupted --overwrite set aside"):
        with replacing_output(trained, overwrite=True):
            pass
    assert (trained / ".replaced" / OUTPUT_FILES[0]).read_text() == OUTPUT_FILES[0]


def test_an_overwrite_interrupted_at_any_point_puts_back_exactly_the_earlier_training(tmp_path):
    from s2t.training.train import OUTPUT_FILES, _put_back, restore_set_aside

    out, aside = tmp_path / "sel", tmp_path / "sel" / ".replaced"
    aside.mkdir(parents=True)
    first, second, added = OUTPUT_FILES[0], OUTPUT_FILES[1], OUTPUT_FILES[2]
    (aside / first).write_text("earlier")  # moved before the interrupt
    (out / first).write_text("half-written")  # the new training's
    (out / second).write_text("earlier too")  # not yet moved
    (out / added).write_text("new")  # only the new training wrote it
    _put_back(out, aside, [first, second])
    assert {p.name: p.read_text() for p in out.iterdir()} == {first: "earlier", second: "earlier too"}
    aside.mkdir()  # a SIGTERM between making .replaced and moving anything: empty, simply removed
    restore_set_aside(out)
    assert not aside.exists() and (out / first).read_text() == "earlier"


def test_a_ladder_without_validation_groups_or_without_training_groups_is_refused(tiny_collection):
    from s2t.training.collect import collected_records
    from s2t.training.ladder import selector_ladder

    ids = [r["problem_id"] for r in collected_records(tiny_collection, need_features=False)]
    with pytest.raises(ValueError, match="no validation problem holds a group"):
        selector_ladder(tiny_collection, [], k=4)
    with pytest.raises(ValueError, match="nothing is left to fit the shallow model on"):
        selector_ladder(tiny_collection, ids, k=4)


def test_the_verdict_script_names_the_failing_link_and_waits_for_complete_rows():
    from tests.conftest import load_script

    script = load_script("bench/s2t_local_verdict.py")

    summary = {
        "greedy": {"accuracy": 0.28, "n": 300},
        "maj@8": {"accuracy": 0.37, "n": 300},
        "s2t/entropy@0.8": {"accuracy": 0.50, "n": 300},
        "s2t-local/entropy@0.8": {"accuracy": 0.29, "n": 300},
    }
    ladder = {
        "rows": [
            {"name": "SLM top-1", "agreement": {"value": 0.67, "low": 0.64, "high": 0.70}},
            {"name": "shallow (boosted trees)", "agreement": {"value": 0.68, "low": 0.65, "high": 0.71}},
            {"name": "features (sel)", "agreement": {"value": 0.675, "low": 0.645, "high": 0.705}},
        ]
    }
    trigger = {"learned": {"auroc": 0.917}, "entropy": {"auroc": 0.917}}
    quiet = {"greedy": 1.0, "s2t-local": 1.04}
    result = script.verdict(summary, 300, ladder, trigger, quiet)
    assert result["goal_met"] is False and result["cost_met"] and not result["accuracy_met"]
    assert result["failing_link"].startswith(
        "the selector's agreement at the trigger's points: features (sel) 67.5%"
    )
    assert any(link.startswith("the learned trigger's AUROC") for link in result["all_failing_links"])
    # the ceiling comes first: no selector closes a gap the LLM's own choice does not
    low_ceiling = summary | {"s2t/entropy@0.8": {"accuracy": 0.36, "n": 300}}
    assert script.verdict(low_ceiling, 300, ladder, trigger, quiet)["failing_link"].startswith("the ceiling")
    # a selector above the top-1 and accurate enough meets the goal, if the quiet cost allows
    good = summary | {"s2t-local/entropy@0.8": {"accuracy": 0.40, "n": 300}}
    assert script.verdict(good, 300, ladder, trigger, quiet)["goal_met"] is True
    assert script.verdict(good, 300, ladder, trigger, {"s2t-local": 1.3})["failing_link"].startswith(
        "the cost"
    )
    # no verdict before every compared row has finished the same problems
    partial = summary | {"maj@8": {"accuracy": 0.37, "n": 140}}
    result = script.verdict(partial, 300, ladder, trigger, quiet)
    assert result["goal_met"] is None and "unfinished: maj@8 (140/300)" in result["sentence"]
    assert (
        "absent from the run: maj@8, s2t/entropy@0.8, any s2t-local row"
        in script.verdict({"greedy": summary["greedy"]}, 300)["sentence"]
    )

    # time per token against greedy's pairs the problems both finished (greedy's later problems ran slower)
    def record(method, problem, seconds, tokens=10):
        return {
            "method": method,
            "problem_id": problem,
            "cost": {"wall_time_s": seconds, "generated_tokens": tokens},
        }

    records = [record("greedy", i, 1.0 + i) for i in range(4)] + [
        record("maj@8", i, 8.0, 80) for i in range(2)
    ]
    ratios = script.per_token_time_ratios(records)
    assert ratios["greedy"] == 1.0 and ratios["maj@8"] == pytest.approx((16 / 160) / (3 / 20))


def test_a_selector_of_another_slm_is_refused_before_any_method_decodes(trained, tmp_path):
    """A selector's SLM can only be checked once a model has loaded; it used to be checked when its
    method's turn came, after greedy had been decoded into the run, so the corrected command (the right
    --slm) was refused as another configuration."""
    from s2t.api import S2TGenerator
    from s2t.evaluate import evaluate
    from s2t.models import LoadedModel

    _, out = trained
    tokenizer = make_tokenizer()
    other = LoadedModel("other", make_model(tokenizer, seed=7), tokenizer)
    gen = S2TGenerator(other, llm="/nonexistent/llm/never/loaded")
    cfg = tiny_eval_config(
        tmp_path, ["What is 2 + 2?"], methods=["greedy", "s2t-local"], threshold=0.0, k=K, selector=str(out)
    )
    with pytest.raises(SelectorCheckpointError, match="Use the same SLM"):
        evaluate(cfg, tmp_path / "run", progress=False, generator=gen)
    assert not (tmp_path / "run").exists()  # nothing decoded, nothing left to refuse the corrected command
