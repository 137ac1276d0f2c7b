"""One way from a method name to a running method: every entry point builds a MethodSpec and resolves it.

Pinned here: the lm-eval adapter decodes a LoRA selector with its adapter merged in, as ``s2t
generate`` does; the learned trigger works in ``generate`` and ``serve``; all entry points take
their method names from one list; ``generate`` and ``eval`` calibrate alike; and a bad option or a
broken selector checkpoint is refused before any model loads, leaving no run directory behind.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from s2t.cli import app
from s2t.method_names import METHODS, TRIGGER_NAMES
from s2t.policies.learned_selector import LocalSelector, model_fingerprint
from s2t.policies.learned_trigger import LearnedTrigger, LearnedTriggerConfig
from s2t.policies.triggers import TRIGGERS
from s2t.prompts import build_prompt

QUESTION = "What is 2 + 2?"


@pytest.fixture(scope="module")
def lora_selector(tmp_path_factory, slm, tokenizer) -> Path:
    """A LoRA-mode selector whose (random, non-zero) adapter changes what the SLM decodes."""
    from peft import LoraConfig, get_peft_model

    from s2t.training.lora import LORA_TARGETS

    out = tmp_path_factory.mktemp("lora_selector")
    selector = LocalSelector.initial(slm.model, "tiny", len(tokenizer))
    selector.config.training = {"mode": "lora"}
    selector.save_pretrained(out)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=LORA_TARGETS, init_lora_weights=False)
    get_peft_model(copy.deepcopy(slm.model), config).save_pretrained(out / "adapter")
    return out


@pytest.fixture(scope="module")
def learned_trigger_dir(tmp_path_factory, slm) -> Path:
    """A learned trigger (random weights) stored as training stores it, beside no selector."""
    out = tmp_path_factory.mktemp("learned_trigger")
    size = slm.model.config.hidden_size + 18
    generator = torch.Generator().manual_seed(0)
    config = LearnedTriggerConfig("tiny", model_fingerprint(slm.model), threshold=0.5, target_rate=0.5)
    trigger = LearnedTrigger(
        torch.randn(size, generator=generator), torch.tensor(0.0), torch.zeros(size), torch.ones(size), config
    )
    trigger.save_pretrained(out)
    return out


def _generate_json(args: list[str]) -> dict:
    result = CliRunner().invoke(app, ["generate", *args, "--json", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{") :])


def test_lm_eval_s2t_local_with_a_lora_selector_produces_the_text_of_s2t_generate(
    lora_selector, tiny_pair_dir, slm, tokenizer
):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from s2t.api import S2TGenerator
    from s2t.lm_eval_adapter import S2TLM

    options = dict(trigger="entropy", threshold=0.0, k=4)
    generated = _generate_json(
        [
            QUESTION,
            "--method",
            "s2t-local",
            "--selector",
            str(lora_selector),
            "--slm",
            tiny_pair_dir["slm"],
            "--threshold",
            "0",
            "--k",
            "4",
            "--max-new-tokens",
            "10",
        ]
    )
    lm = S2TLM(
        slm=tiny_pair_dir["slm"],
        llm=None,
        method="s2t-local",
        selector=str(lora_selector),
        dtype="float32",
        max_new_tokens=10,
        **options,
    )
    context = tokenizer.decode(build_prompt(tokenizer, QUESTION))  # the chat prompt `generate` decodes
    request = Instance(request_type="generate_until", doc={}, arguments=(context, {"until": []}), idx=0)
    assert lm.generate_until([request]) == [generated["s2t-local"]["text"]]
    # the adapter matters: the base SLM with the same selector decodes something else
    base = S2TGenerator(slm)
    selector = LocalSelector.from_pretrained(lora_selector, model=slm.model)
    from s2t.methods import build_method

    unmerged = build_method("s2t-local", selector=selector, **options)
    assert base.generate([QUESTION], unmerged, max_new_tokens=10)[0].text != generated["s2t-local"]["text"]


def test_the_learned_trigger_works_in_generate_and_serve_and_is_listed_in_help(
    learned_trigger_dir, tiny_pair_dir, monkeypatch
):
    from s2t.serving import server

    args = [
        "--trigger",
        "learned",
        "--selector",
        str(learned_trigger_dir),
        "--slm",
        tiny_pair_dir["slm"],
        "--llm",
        tiny_pair_dir["llm"],
        "--k",
        "4",
    ]
    out = _generate_json([QUESTION, "--method", "s2t", "--max-new-tokens", "12", *args])
    assert out["s2t"]["method"]["trigger"]["name"] == "learned"
    assert out["s2t"]["method"]["trigger"]["threshold"] == 0.5  # the one stored with it
    assert out["s2t"]["cost"]["triggers"] > 0

    served = {}
    monkeypatch.setattr(server, "serve", lambda app, host, port: served.update(app=app))
    result = CliRunner().invoke(app, ["serve", "--method", "s2t", "--dtype", "float32", *args])
    assert result.exit_code == 0, result.output
    with server.running_server(served["app"]) as url:
        import httpx

        card = httpx.get(f"{url}/v1/models").json()["data"][0]
        assert card["s2t_method"]["trigger"]["name"] == "learned"

    for command in ("generate", "serve", "eval"):
        wide = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}  # whatever width an earlier test left behind
        result = CliRunner().invoke(app, [command, "--help"], terminal_width=400, env=wide)
        help_text = " ".join(result.output.split())
        assert "learned" in help_text


def test_every_entry_point_takes_its_method_names_from_one_list():
    from s2t.cli.serve import SERVED_METHODS
    from s2t.evaluate import canonical_method_name
    from s2t.methods import METHODS as SPEC_METHODS
    from s2t.methods import SETTING_TRIGGERS, MethodSpec

    assert SPEC_METHODS is METHODS
    assert set(SERVED_METHODS) == set(METHODS)  # the LLM alone too, as `s2t generate --method llm`
    assert set(TRIGGER_NAMES) == {*TRIGGERS, "learned"} and SETTING_TRIGGERS is TRIGGER_NAMES
    for name in METHODS:
        assert canonical_method_name(name) == name
        if name != "s2t-local":
            assert MethodSpec.parse(name, threshold=1.0).method == name
    listed = "choose from " + ", ".join(METHODS)
    with pytest.raises(ValueError, match=listed):
        MethodSpec.parse("beam")
    if importlib.util.find_spec("lm_eval"):
        from s2t.lm_eval_adapter import S2TLM

        with pytest.raises(ValueError, match=listed):  # refused before the (missing) model loads
            S2TLM(slm="no-such-model", llm=None, method="beam")
    for command in ("generate", "serve", "eval"):
        wide = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}  # whatever width an earlier test left behind
        result = CliRunner().invoke(app, [command, "--help"], terminal_width=400, env=wide)
        help_text = " ".join(result.output.split())
        assert all(name in help_text for name in (SERVED_METHODS if command == "serve" else METHODS)), command


def test_generate_and_eval_calibrate_the_same_default_method_to_the_same_threshold(
    tiny_pair_dir, data_file, calibration_data, tmp_path
):
    models = [
        "--slm",
        tiny_pair_dir["slm"],
        "--llm",
        tiny_pair_dir["llm"],
        "--calibration-problems",
        "2",
        "--max-new-tokens",
        "16",
    ]
    generated = _generate_json([QUESTION, "--method", "s2t", *models])
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--methods",
            "s2t",
            "--data-file",
            data_file,
            "--dataset",
            "tiny",
            "--limit",
            "1",
            "--dtype",
            "float32",
            "--out",
            str(tmp_path / "run"),
            *models,
        ],
    )
    assert result.exit_code == 0, result.output
    calibration = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert generated["s2t"]["method"]["trigger"]["threshold"] == calibration["entropy@0.95"]["threshold"]


def _corrupt_selector(directory: Path, slm, tokenizer, what: str) -> Path:
    selector = LocalSelector.initial(slm.model, "tiny", len(tokenizer))
    selector.save_pretrained(directory)
    weights = directory / "selector.safetensors"
    if what == "truncated":
        weights.write_bytes(weights.read_bytes()[:-40])
    else:
        (directory / "selector_config.json").write_text("{not json")
    return directory


@pytest.mark.parametrize(
    "options, message",
    [
        (["--methods", "greedy,s2t", "--quantile", "1.5"], "quantile must lie strictly between 0 and 1"),
        (["--methods", "greedy,s2t", "--k", "0"], "K must be an integer >= 1"),
        (["--methods", "greedy,s2t", "--k", "1"], "K must be >= 2, since s2t selects"),
        (["--methods", "greedy,random-select/always/k1"], "K must be >= 2, since random-select selects"),
        (["--methods", "greedy,s2t", "--threshold", "-1"], "threshold for the 'entropy' trigger"),
        (["--methods", "greedy,s2t", "--ratio", "2"], "candidate ratio"),
        (["--methods", "greedy,s2t", "--trigger", "sometimes"], "unknown trigger 'sometimes'"),
        (["--methods", "greedy,s2t-local", "--threshold", "1"], "needs a trained selector"),
        (
            ["--methods", "greedy,s2t-local", "--threshold", "1", "--selector", "truncated"],
            "corrupted selector",
        ),
        (
            ["--methods", "greedy,s2t-local", "--threshold", "1", "--selector", "malformed"],
            "not readable JSON",
        ),
    ],
)
def test_a_bad_configuration_fails_before_any_model_loads_and_leaves_no_run_directory(
    options, message, tmp_path, data_file, slm, tokenizer
):
    if "--selector" in options:
        at = options.index("--selector") + 1
        options[at] = str(_corrupt_selector(tmp_path / options[at], slm, tokenizer, options[at]))
    run = tmp_path / "run"
    common = ["--data-file", data_file, "--dataset", "tiny", "--limit", "1", "--out", str(run)]
    # a model that does not exist: had anything been loaded, the error would be about the model
    result = CliRunner().invoke(app, ["eval", *common, "--slm", "no-such-model", *options])
    assert result.exit_code == 2, result.output
    assert message in result.output and "no-such-model" not in result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1
    assert not run.exists()
    generate_options = [o.replace("--methods", "--method") for o in options]
    result = CliRunner().invoke(app, ["generate", QUESTION, "--slm", "no-such-model", *generate_options])
    assert result.exit_code == 2 and message in result.output, result.output


def test_a_refused_eval_leaves_nothing_and_the_corrected_command_then_runs(
    tmp_path, data_file, tiny_pair_dir
):
    run = tmp_path / "run"
    common = [
        "eval",
        "--data-file",
        data_file,
        "--dataset",
        "tiny",
        "--limit",
        "1",
        "--methods",
        "greedy,s2t",
        "--slm",
        tiny_pair_dir["slm"],
        "--llm",
        tiny_pair_dir["llm"],
        "--max-new-tokens",
        "4",
        "--dtype",
        "float32",
        "--out",
        str(run),
    ]
    refused = CliRunner().invoke(app, [*common, "--quantile", "1.5"])
    assert refused.exit_code == 2 and "quantile" in refused.output and not run.exists()
    corrected = CliRunner().invoke(app, [*common, "--threshold", "1.0"])
    assert corrected.exit_code == 0, corrected.output
    assert len((run / "results.jsonl").read_text().splitlines()) == 2


def test_a_truncated_lora_adapter_is_refused_before_any_model_loads(lora_selector, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(lora_selector, broken)
    adapter = broken / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    result = CliRunner().invoke(
        app,
        [
            "generate",
            QUESTION,
            "--method",
            "greedy,s2t-local",
            "--selector",
            str(broken),
            "--threshold",
            "1",
            "--slm",
            "no-such-model",
        ],
    )
    assert result.exit_code == 2 and "corrupted LoRA adapter" in result.output, result.output


def test_a_resolved_method_is_never_changed_afterwards(slm, llm, tmp_path, calibration_data):
    from s2t.api import S2TGenerator

    gen = S2TGenerator(slm, llm=llm)
    from s2t.methods import CalibrationSource, MethodSpec

    spec = MethodSpec.parse("s2t/entropy@0.8", calibration=CalibrationSource(problems=2, max_new_tokens=8))
    resolved = gen.resolve(spec)
    snapshot = copy.deepcopy(resolved.method.describe())
    gen.generate([QUESTION], resolved, max_new_tokens=4)
    again = gen.resolve(spec)  # the stored threshold, not a second calibration
    assert resolved.method.describe() == snapshot == again.method.describe()
    assert resolved.method.trigger.threshold is not None and resolved.method is not again.method
