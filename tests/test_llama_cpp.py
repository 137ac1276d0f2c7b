"""The llama.cpp backend: the same tokens and the same S2T decisions as the torch engine, on the same weights.

The tiny random Qwen2 pair of ``conftest`` is written to float32 GGUF files here (``write_gguf`` of
``.ci/tiny_gguf.py``: the ``gguf`` package's writer, the tokenizer's vocabulary and merges included),
so both backends run identical weights. Tests that decode need llama-cpp-python (the ``llamacpp``
extra) and are skipped without it; the refusals are tested everywhere.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from s2t.backends import BackendUnavailableError, refuse_on_llama_cpp, resolve_backend
from s2t.engine import decode
from s2t.methods import build_method
from s2t.models import ModelLoadError, TokenizerMismatchError
from tests.conftest import ci_tiny_gguf, make_model, make_tokenizer

PROMPTS = [[5, 17, 42, 9, 100], [7, 8], [250, 3, 3, 3, 60, 61, 62, 63], [11]]


# the tiny Qwen2 GGUF writer, shared with the CI's bare-install check
write_gguf = ci_tiny_gguf().write_gguf


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory, slm, llm):
    """The conftest pair as GGUF files, loaded into llama.cpp with a float32 KV cache."""
    pytest.importorskip("llama_cpp")
    from s2t.backends.llama_cpp import LlamaCppModel

    directory = tmp_path_factory.mktemp("gguf")
    paths = [
        write_gguf(m.model, slm.tokenizer, directory / f"{name}.gguf")
        for name, m in (("slm", slm), ("llm", llm))
    ]
    models = [LlamaCppModel(p, kv_type="f32", n_threads=1, repack=False) for p in paths]
    return paths, models


def engine_kwargs(loaded) -> dict:
    tok = loaded.tokenizer
    return {"vocab_size": len(tok), "stop_ids": [tok.eos_token_id], "pad_id": tok.pad_token_id}


# --- refusals (no llama-cpp-python needed) ----------------------------------------------------------


def test_missing_llama_cpp_is_refused_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    from s2t.backends.llama_cpp import import_llama_cpp

    with pytest.raises(BackendUnavailableError, match=r"select-to-think\[llamacpp\]"):
        import_llama_cpp()
    monkeypatch.setattr("s2t.backends.llama_cpp_installed", lambda: False)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'select-to-think\[llamacpp\]'"):
        resolve_backend("llama.cpp", ["model.gguf"])
    assert resolve_backend("auto", ["model.gguf"], device="cpu") == "torch"


def test_non_gguf_model_with_the_llama_cpp_backend_is_refused(tiny_pair_dir):
    with pytest.raises(BackendUnavailableError, match="not one .*--backend torch"):
        resolve_backend("llama.cpp", [tiny_pair_dir["slm"]])


def test_methods_only_torch_runs_are_refused_naming_torch():
    for methods, trigger in (
        (["greedy", "s2t-local"], "entropy"),
        (["s2t/learned"], "entropy"),
        (["s2t"], "learned"),
    ):
        with pytest.raises(BackendUnavailableError, match="--backend torch"):
            refuse_on_llama_cpp(methods, trigger)
    refuse_on_llama_cpp(["greedy", "llm", "s2t/kl@0.95", "takeover/entropy@0.8", "maj@4"], "learned")


def test_auto_chooses_llama_cpp_for_gguf_models_on_a_cpu(monkeypatch, tiny_pair_dir):
    monkeypatch.setattr("s2t.backends.llama_cpp_installed", lambda: True)
    builtin = ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]
    assert resolve_backend("auto", builtin, ["greedy", "s2t"], device="cpu") == "llama.cpp"
    assert resolve_backend("auto", builtin, ["greedy", "s2t"], device="cuda") == "torch"
    assert resolve_backend("auto", builtin, ["s2t-local"], device="cpu") == "torch"
    assert resolve_backend("auto", [tiny_pair_dir["slm"]], device="cpu") == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("vllm", builtin)


# --- decoding on llama.cpp ---------------------------------------------------------------------------


def test_greedy_tokens_equal_the_torch_engines_on_the_same_weights(slm, llama_pair):
    from s2t.backends import llama_cpp

    _, (slm_cpp, _) = llama_pair
    kwargs = engine_kwargs(slm) | {"max_new_tokens": 12}
    expected = decode(slm.model, PROMPTS, build_method("greedy"), **kwargs)
    # two sequences at a time: finished ones leave, waiting ones take their KV sequence
    got = llama_cpp.decode(slm_cpp, PROMPTS, build_method("greedy"), max_batch_size=2, **kwargs)
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]
    assert [g.finish_reason for g in got] == [g.finish_reason for g in expected]
    assert [g.cost.slm_forward_tokens for g in got] == [g.cost.slm_forward_tokens for g in expected]


def test_cancel_and_abort_on_llama_cpp_answer_as_on_the_torch_engine(slm, llama_pair):
    from s2t.backends.llama_cpp import LlamaCppScheduler
    from s2t.engine import Request, Scheduler

    _, (slm_cpp, _) = llama_pair

    def script(scheduler):
        """Two requests run and one waits; the first running and the waiting one are cancelled."""
        ids = [scheduler.add(Request(p, 30)) for p in PROMPTS[:3]]
        outputs = scheduler.step()
        scheduler.cancel(ids[0])
        scheduler.cancel(ids[2])
        while scheduler.has_work():
            outputs += scheduler.step()
        late = scheduler.add(Request(PROMPTS[0], 5))
        seen = [(o.request_id, o.token, o.generation and o.generation.finish_reason) for o in outputs]
        return seen, [o.generation.token_ids for o in outputs if o.generation], late, scheduler.abort()

    torch_run = script(Scheduler(slm.model, max_batch_size=2, **engine_kwargs(slm)))
    cancelled = [(i, reason) for i, token, reason in torch_run[0] if token is None]
    assert cancelled == [(2, "cancelled"), (0, "cancelled")]  # the waiting one leaves first
    assert torch_run[2:] == (3, [3])
    assert script(LlamaCppScheduler(slm_cpp, max_batch_size=2, **engine_kwargs(slm))) == torch_run


def _threshold_in_a_gap(statistics: torch.Tensor) -> float:
    """A threshold in the widest gap between the observed statistics (between their 30% and 90% points).

    llama.cpp's float32 logits agree with torch's to ~1e-3 relative on these tiny random models, and the KL
    over a random LLM's flat top-64 amplifies that to ~0.1 at a few steps: a threshold in a near-tie would
    test the arithmetic, not the method.
    """
    values = statistics.sort().values
    low, high = int(0.3 * len(values)), int(0.9 * len(values))
    gaps = values[low + 1 : high + 1] - values[low:high]
    i = low + int(gaps.argmax())
    return float((values[i] + values[i + 1]) / 2)


@pytest.mark.parametrize("name, trigger", [("s2t", "entropy"), ("takeover", "entropy"), ("s2t", "kl")])
def test_s2t_trigger_decisions_and_selections_match_the_torch_engine(slm, llm, llama_pair, name, trigger):
    from s2t.backends import llama_cpp
    from s2t.methods import trigger_statistics

    _, (slm_cpp, llm_cpp) = llama_pair
    kwargs = engine_kwargs(slm) | {"max_new_tokens": 16}
    method = build_method(name, trigger=trigger, threshold=0.0)
    statistics = trigger_statistics(method.trigger, slm.model, PROMPTS, llm=llm.model, **kwargs)
    method.trigger.threshold = _threshold_in_a_gap(statistics)
    expected = decode(slm.model, PROMPTS, method, llm=llm.model, **kwargs)
    got = llama_cpp.decode(slm_cpp, PROMPTS, method, llm=llm_cpp, max_batch_size=3, **kwargs)
    assert sum(len(g.trigger_steps) for g in expected) > 0
    for ours, theirs in zip(got, expected):
        assert ours.trigger_steps == theirs.trigger_steps
        assert ours.token_ids == theirs.token_ids
        assert ours.cost.triggers == theirs.cost.triggers and ours.cost.overrides == theirs.cost.overrides
        assert ours.cost.llm_forward_calls == theirs.cost.llm_forward_calls
        assert ours.cost.llm_forward_tokens == theirs.cost.llm_forward_tokens


def test_calibration_statistics_match_the_torch_engine(slm, llm, llama_pair):
    from s2t.backends import llama_cpp
    from s2t.methods import trigger_statistics

    _, (slm_cpp, llm_cpp) = llama_pair
    kwargs = engine_kwargs(slm) | {"max_new_tokens": 10}
    for trigger, tolerance in (("entropy", 1e-2), ("kl", 0.15)):  # see _threshold_in_a_gap
        method = build_method("s2t", trigger=trigger, threshold=0.0)
        expected = trigger_statistics(method.trigger, slm.model, PROMPTS, llm=llm.model, **kwargs)
        got = trigger_statistics(
            method.trigger, slm_cpp, PROMPTS, llm=llm_cpp, decode_stream=llama_cpp.decode_stream, **kwargs
        )
        torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)


def test_running_out_of_context_ends_the_sequence_with_length(slm, llama_pair):
    from s2t.backends import llama_cpp

    paths, _ = llama_pair
    small = llama_cpp.LlamaCppModel(paths[0], n_ctx=8, kv_type="f32", n_threads=1, repack=False)
    got = llama_cpp.decode(
        small, PROMPTS, build_method("greedy"), **engine_kwargs(slm) | {"max_new_tokens": 50}
    )
    for prompt, g in zip(PROMPTS, got):
        assert g.finish_reason in ("length", "stop")
        assert len(prompt) + len(g.token_ids) - 1 <= 8  # the KV cache holds all but the last token
    assert got[2].finish_reason == "length" and len(got[2].token_ids) == 1  # the 8-token prompt fills it


def test_a_gguf_architecture_llama_cpp_cannot_load_is_refused(tmp_path, slm):
    pytest.importorskip("llama_cpp")
    from s2t.backends.llama_cpp import LlamaCppModel

    path = write_gguf(slm.model, slm.tokenizer, tmp_path / "odd.gguf", architecture="nosucharch")
    with pytest.raises(ModelLoadError, match="nosucharch"):
        LlamaCppModel(path, repack=False)
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        LlamaCppModel(tmp_path / "fake.gguf", repack=False)


def test_generator_answers_like_the_torch_generator_and_refuses_a_vocabulary_mismatch(
    tmp_path, slm, llama_pair, monkeypatch
):
    monkeypatch.setenv("S2T_CACHE_DIR", str(tmp_path / "cache"))  # the GGUF tokenizers are cached there
    from s2t.api import S2TGenerator
    from s2t.backends.llama_cpp import LlamaCppGenerator

    paths, _ = llama_pair
    options = {"kv_type": "f32", "n_threads": 1, "repack": False}
    cpp = LlamaCppGenerator(paths[0], llm=paths[1], **options)
    reference = S2TGenerator(slm.model, tokenizer=slm.tokenizer)
    question = "How many eggs does she sell?"
    ours = cpp.generate([question], "greedy", max_new_tokens=10)[0]
    theirs = reference.generate([question], "greedy", max_new_tokens=10)[0]
    assert ours.token_ids == theirs.token_ids and ours.text == theirs.text
    assert cpp.engine_description() == f"llama.cpp, {Path(paths[0]).name}"
    assert reference.engine_description() == "torch, float32"
    assert cpp.generate([question], "s2t", threshold=0.5, max_new_tokens=6)[0].finish_reason in (
        "stop",
        "length",
    )

    # the serving path: the generator's scheduler is llama.cpp's continuous batch, answering alike
    from s2t.backends.llama_cpp import LlamaCppScheduler
    from s2t.engine import Request

    scheduler = cpp.scheduler("greedy", max_batch_size=2)
    assert isinstance(scheduler, LlamaCppScheduler)
    request = scheduler.add(Request(cpp.encode([question])[0], 10, 0.0, 1.0, 0))
    served = None
    while scheduler.has_work():
        for out in scheduler.step():
            if out.request_id == request and out.generation is not None:
                served = out.generation
    assert served.token_ids == theirs.token_ids
    # thresholds calibrated on llama.cpp are stored apart from torch's
    from s2t.methods import MethodSpec

    spec = MethodSpec("s2t/entropy@0.9", "s2t", "entropy", quantile=0.9)
    assert cpp.calibrator.key(spec) != S2TGenerator(slm.model, tokenizer=slm.tokenizer).calibrator.key(spec)

    other_tokenizer = make_tokenizer(vocab_size=300)
    other = write_gguf(make_model(other_tokenizer, seed=3), other_tokenizer, tmp_path / "other.gguf")
    mismatched = LlamaCppGenerator(paths[0], llm=other, **options)
    with pytest.raises(TokenizerMismatchError):
        mismatched.llm  # noqa: B018 (loading the LLM checks the pair)


def test_eval_runs_on_the_llama_cpp_backend_and_records_it(
    tmp_path, data_file, calibration_data, llama_pair, caplog
):
    from s2t.evaluate import EvalConfig, evaluate

    paths, _ = llama_pair
    config = EvalConfig(
        slm=paths[0],
        llm=paths[1],
        dataset="tiny",
        data_file=data_file,
        limit=None,
        max_new_tokens=6,
        methods=["greedy", "llm", "s2t/entropy@0.5", "maj@2"],
        calibration_problems=2,
        batch_size=2,
        backend="llama.cpp",
    )
    payload = evaluate(config, tmp_path / "run", progress=False)
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["backend"] == "llama.cpp"
    assert {m for m in payload["methods"]} >= {"greedy", "llm", "s2t/entropy@0.5", "maj@2"}
    # the torch dtype does not apply to GGUF files: the run records the files' own types, not a dtype
    assert stored["dtype"] == stored["llm_dtype"] == "gguf"
    assert (
        "Backend: llama.cpp, on the GGUF files' own weight types"
        in (tmp_path / "run" / "report.md").read_text()
    )
    # a --dtype given anyway is ignored with a warning, and a run recorded with a torch dtype (as runs
    # before this one were) resumes
    stored["dtype"] = "float32"
    (tmp_path / "run" / "config.json").write_text(json.dumps(stored))
    with caplog.at_level(logging.WARNING, logger="s2t.evaluate"):
        again = evaluate(replace(config, dtype="bfloat16"), tmp_path / "run", progress=False)
    assert "apply to the torch backend" in caplog.text
    with pytest.raises(ValueError, match="dtype must be one of"):  # a typo is refused, not ignored
        replace(config, dtype="bfloat61")
    assert set(again["methods"]) == set(payload["methods"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dtype"] == "gguf"
    with pytest.raises(BackendUnavailableError, match="--backend torch"):
        EvalConfig(slm=paths[0], llm=paths[1], methods=["s2t-local"], selector="x", backend="llama.cpp")


# --- S2T-Local with a feature selector (it reads only the logits) ----------------------------------


def _feature_selector(slm, directory, k=4):
    """A feature selector planted to take the SLM's rank-2 candidate wherever the trigger fires."""
    from s2t.policies.feature_selector import FeatureSelector

    selector = FeatureSelector.initial(slm.model, "tiny-slm", k)
    first, middle, last = (selector.scorer.net[i] for i in (0, 2, 4))
    with torch.no_grad():
        for layer in (first, middle, last):
            layer.weight.zero_()
            layer.bias.zero_()
        first.weight[0, 3 + 1] = 1.0  # the rank one-hot starts at feature 3; rank 2 is its second entry
        middle.weight[0, 0] = 1.0
        last.weight[0, 0] = 100.0
    selector.save_pretrained(directory)
    return selector


def test_gguf_fingerprint_is_the_torch_models_and_pins_a_feature_selector_to_its_slm(slm, llm, tmp_path):
    from s2t.policies.checkpoint import SelectorCheckpointError, gguf_fingerprint, model_fingerprint
    from s2t.policies.feature_selector import FeatureSelector

    slm_file = write_gguf(slm.model, slm.tokenizer, tmp_path / "slm.gguf")
    llm_file = write_gguf(llm.model, slm.tokenizer, tmp_path / "llm.gguf")
    assert gguf_fingerprint(slm_file) == model_fingerprint(slm.model)
    assert gguf_fingerprint(llm_file) == model_fingerprint(llm.model) != model_fingerprint(slm.model)
    _feature_selector(slm, tmp_path / "features")
    selector = FeatureSelector.from_pretrained(tmp_path / "features")
    selector.check_base(slm_file)
    with pytest.raises(SelectorCheckpointError, match="trained on base model 'tiny-slm'"):
        selector.check_base(llm_file)


def test_only_a_feature_selector_runs_s2t_local_on_llama_cpp(slm, tmp_path, monkeypatch):

    _feature_selector(slm, tmp_path / "features")
    refuse_on_llama_cpp(["greedy", "s2t-local"], "entropy", selector=tmp_path / "features")
    with pytest.raises(BackendUnavailableError, match="--mode features selector reads only the logits"):
        refuse_on_llama_cpp(["s2t-local"], "entropy", selector=tmp_path / "missing")
    with pytest.raises(BackendUnavailableError, match="learned trigger"):
        refuse_on_llama_cpp(["s2t-local/learned"], "entropy", selector=tmp_path / "features")
    monkeypatch.setattr("s2t.backends.llama_cpp_installed", lambda: True)
    builtin = ["qwen2.5-coder-0.5b-instruct"]
    assert (
        resolve_backend("auto", builtin, ["s2t-local"], device="cpu", selector=tmp_path / "features")
        == "llama.cpp"
    )


def test_s2t_local_with_a_feature_selector_matches_the_torch_engine(slm, llama_pair, tmp_path):
    from s2t.backends import llama_cpp
    from s2t.methods import trigger_statistics

    _, (slm_cpp, _) = llama_pair
    selector = _feature_selector(slm, tmp_path / "features")
    kwargs = engine_kwargs(slm) | {"max_new_tokens": 16}
    method = build_method("s2t-local", trigger="entropy", threshold=0.0, k=4, selector=selector)
    statistics = trigger_statistics(method.trigger, slm.model, PROMPTS, **kwargs)
    method.trigger.threshold = _threshold_in_a_gap(statistics)
    expected = decode(slm.model, PROMPTS, method, **kwargs)
    got = llama_cpp.decode(slm_cpp, PROMPTS, method, max_batch_size=3, **kwargs)
    assert all(g.cost.overrides == g.cost.triggers > 0 for g in expected[:2])  # rank 2 at every trigger
    for ours, theirs in zip(got, expected):
        assert ours.trigger_steps == theirs.trigger_steps and ours.token_ids == theirs.token_ids
        assert ours.cost.overrides == theirs.cost.overrides and ours.cost.llm_forward_calls == 0


def test_threads_option_sets_torch_and_llama_cpp_threads(monkeypatch):
    from typer.testing import CliRunner

    from s2t.backends.base import THREADS_ENV
    from s2t.backends.llama_cpp import default_threads
    from s2t.cli import app

    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert 1 <= default_threads() <= 8
    before = torch.get_num_threads()
    try:
        result = CliRunner().invoke(app, ["--threads", "1", "eval", "--help"])
        assert result.exit_code == 0 and torch.get_num_threads() == 1
        assert default_threads() == 1
    finally:
        torch.set_num_threads(before)
        monkeypatch.delenv(THREADS_ENV, raising=False)
    assert CliRunner().invoke(app, ["--threads", "0", "eval", "--help"]).exit_code != 0


# --- the learned trigger: on llama.cpp only when its training chose the logit features alone ----------


def _learned_trigger(slm, directory, reads_hidden: bool):
    """A learned trigger stored as training stores it; without ``reads_hidden`` its hidden-state
    weights are zero (training's "no-hidden" choice), so it fires on the logit features alone."""
    from s2t.policies.checkpoint import model_fingerprint
    from s2t.policies.features import LOGIT_FEATURES
    from s2t.policies.learned_trigger import LearnedTrigger, LearnedTriggerConfig

    hidden = slm.model.config.hidden_size
    weight = torch.randn(hidden + LOGIT_FEATURES, generator=torch.Generator().manual_seed(0))
    if not reads_hidden:
        weight[:hidden] = 0
    weight[hidden] = 3.0  # entropy: fire where the SLM is unsure
    size = len(weight)
    config = LearnedTriggerConfig("tiny-slm", model_fingerprint(slm.model), threshold=0.5, target_rate=0.2)
    trigger = LearnedTrigger(weight, torch.tensor(-2.0), torch.zeros(size), torch.ones(size), config)
    trigger.save_pretrained(directory)
    return trigger


def test_a_learned_trigger_on_logit_features_alone_needs_no_hidden_state(slm, tmp_path):
    from s2t.policies.learned_trigger import trigger_reads_hidden

    logit_only = _learned_trigger(slm, tmp_path / "logit-only", reads_hidden=False)
    reads = _learned_trigger(slm, tmp_path / "reads", reads_hidden=True)
    assert not logit_only.needs_hidden and reads.needs_hidden
    assert not trigger_reads_hidden(tmp_path / "logit-only") and trigger_reads_hidden(tmp_path / "reads")
    assert trigger_reads_hidden(tmp_path / "missing") and trigger_reads_hidden(None)
    logits, hidden = torch.randn(5, 300), torch.randn(5, slm.model.config.hidden_size)
    assert torch.equal(logit_only.statistic(logits, None), logit_only.statistic(logits, hidden))
    with pytest.raises(ValueError, match="reads the SLM's hidden state"):
        reads.statistic(logits, None)
    refuse_on_llama_cpp(["s2t/learned", "greedy"], "entropy", selector=tmp_path / "logit-only")
    with pytest.raises(BackendUnavailableError, match="reads the SLM's hidden state.*--backend torch"):
        refuse_on_llama_cpp(["s2t/learned"], "entropy", selector=tmp_path / "reads")


def test_s2t_at_a_logit_only_learned_trigger_matches_the_torch_engine(
    slm, llm, llama_pair, tmp_path, monkeypatch
):
    monkeypatch.setenv("S2T_CACHE_DIR", str(tmp_path / "cache"))  # the GGUF tokenizers are cached there
    from s2t.api import S2TGenerator
    from s2t.backends import llama_cpp
    from s2t.backends.llama_cpp import LlamaCppGenerator

    paths, (slm_cpp, llm_cpp) = llama_pair
    trigger = _learned_trigger(slm, tmp_path / "trigger", reads_hidden=False)
    kwargs = engine_kwargs(slm) | {"max_new_tokens": 16}
    method = build_method("s2t", trigger=trigger)
    expected = decode(slm.model, PROMPTS, method, llm=llm.model, **kwargs)
    got = llama_cpp.decode(slm_cpp, PROMPTS, method, llm=llm_cpp, max_batch_size=3, **kwargs)
    assert 0 < sum(len(g.trigger_steps) for g in expected) < sum(len(g.token_ids) for g in expected)
    for ours, theirs in zip(got, expected):
        assert ours.trigger_steps == theirs.trigger_steps and ours.token_ids == theirs.token_ids

    # through the generators: loaded from its directory, pinned to the SLM's GGUF file on llama.cpp
    cpp = LlamaCppGenerator(paths[0], llm=paths[1], kv_type="f32", n_threads=1, repack=False)
    reference = S2TGenerator(slm.model, llm.model, tokenizer=slm.tokenizer)
    question, options = "How many eggs does she sell?", {"trigger": "learned", "max_new_tokens": 10}
    ours = cpp.generate([question], "s2t", selector=str(tmp_path / "trigger"), **options)[0]
    theirs = reference.generate([question], "s2t", selector=str(tmp_path / "trigger"), **options)[0]
    assert ours.token_ids == theirs.token_ids and ours.cost.triggers == theirs.cost.triggers
    _learned_trigger(slm, tmp_path / "reads", reads_hidden=True)
    with pytest.raises(BackendUnavailableError, match="does not expose"):
        cpp.generate([question], "s2t", selector=str(tmp_path / "reads"), **options)


# --- s2t serve on llama.cpp ---------------------------------------------------------------------------


@pytest.fixture()
def llama_server(slm, llama_pair):
    """``s2t serve --backend llama.cpp --method greedy`` on the tiny SLM's GGUF file; yields its URL."""
    pytest.importorskip("fastapi")
    from s2t.backends.llama_cpp import LlamaCppScheduler
    from s2t.serving import create_app, running_server

    _, (slm_cpp, _) = llama_pair
    scheduler = LlamaCppScheduler(slm_cpp, build_method("greedy"), max_batch_size=2, **engine_kwargs(slm))
    app = create_app(scheduler, slm.tokenizer, model_name="tiny", context_length=256, default_max_tokens=8)
    with running_server(app) as url:
        yield url


def test_health_on_llama_cpp_reports_what_the_torch_server_reports(slm, llama_server):
    import httpx

    health = httpx.get(f"{llama_server}/health")
    assert health.status_code == 200, health.text
    fields = {"status", "model", "method", "running", "waiting", "prefilling", "finished", "cancelled"}
    assert set(health.json()) == fields | {"failed"}
    assert health.json()["prefilling"] == 0  # llama.cpp reads a prompt whole when it joins the batch


def test_served_logprobs_on_llama_cpp_are_the_slms(slm, llama_server):
    import httpx

    from s2t.prompts import build_chat_prompt

    messages = [{"role": "user", "content": "Natalia sold clips to 48 of her friends."}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 6, "logprobs": True, "top_logprobs": 2}
    response = httpx.post(f"{llama_server}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["logprobs"]["content"]
    prompt = build_chat_prompt(slm.tokenizer, messages)
    tokens = decode(slm.model, [prompt], build_method("greedy"), **engine_kwargs(slm) | {"max_new_tokens": 6})
    tokens = tokens[0].token_ids
    with torch.no_grad():  # the SLM teacher-forced on the same tokens, in torch
        logits = slm.model(input_ids=torch.tensor([prompt + tokens])).logits[0, :, : len(slm.tokenizer)]
    reference = torch.log_softmax(logits, -1)[len(prompt) - 1 :]
    assert len(content) == len(tokens)
    for item, token, row in zip(content, tokens, reference):
        assert item["logprob"] == pytest.approx(float(row[token]), abs=1e-2)  # llama.cpp's float32 vs torch's
        tops = [top["logprob"] for top in item["top_logprobs"]]
        assert tops == pytest.approx(row.topk(2).values.tolist(), abs=1e-2)

    body = {"model": "tiny", "prompt": "Janet's ducks lay 16 eggs per day.", "max_tokens": 6, "logprobs": 2}
    response = httpx.post(f"{llama_server}/v1/completions", json=body, timeout=60)
    logprobs = response.json()["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"] and all(isinstance(lp, float) for lp in logprobs["token_logprobs"])
    assert all(1 <= len(top) <= 3 for top in logprobs["top_logprobs"])  # the top 2 and the chosen token
    assert all(token in top for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"]))


def test_echo_with_logprobs_on_llama_cpp_scores_the_prompt_like_torch(slm, llama_server):
    """The prompt's log-probabilities (lm-eval's loglikelihood) on llama.cpp: used to be a 400."""
    import httpx

    text = "Janet's ducks lay 16 eggs per day. " * 4
    prompt = slm.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = slm.model(input_ids=torch.tensor([prompt])).logits[0, :-1, : len(slm.tokenizer)]
    reference = torch.log_softmax(logits, -1)
    url = f"{llama_server}/v1/completions"
    for extra in ({"max_tokens": 0}, {"max_tokens": 4}, {"max_tokens": 4, "stream": True}):
        body = {"model": "tiny", "prompt": prompt, "echo": True, "logprobs": 2, **extra}
        response = httpx.post(url, json=body, timeout=60)
        assert response.status_code == 200, response.text
        if extra.get("stream"):
            continue  # the streamed echo is the same object (tests/test_serving.py)
        logprobs = response.json()["choices"][0]["logprobs"]
        got = logprobs["token_logprobs"][1 : len(prompt)]
        expected = [float(reference[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
        assert got == pytest.approx(expected, abs=2e-2)  # llama.cpp's float32 against torch's
        tops = [max(top.values()) for top in logprobs["top_logprobs"][1 : len(prompt)]]
        assert tops == pytest.approx(reference.max(-1).values.tolist(), abs=2e-2)
        assert response.json()["s2t_cost"]["slm_forward_tokens"] >= len(prompt)
    # the running batch's cache is untouched: an answer is the same before and after a scoring pass
    plain = {"model": "tiny", "prompt": "2+2=", "max_tokens": 6}
    before = httpx.post(url, json=plain, timeout=60).json()["choices"][0]["text"]
    httpx.post(url, json={**plain, "echo": True, "logprobs": 1}, timeout=60)
    assert httpx.post(url, json=plain, timeout=60).json()["choices"][0]["text"] == before


def test_prompt_logits_span_several_llama_cpp_batches_and_refuse_what_the_context_cannot_hold(
    slm, llama_pair
):
    """Scoring a prompt in one pass gives, after each token, the logits the decoding path gives after
    reading the prompt up to it, across llama.cpp's 512-token batches. (llama.cpp picks its matrix
    kernels by batch size, so a prefix of under ~32 tokens read alone differs in the third decimal;
    and its float32 differs from torch's by a few hundredths on this random model.)"""
    from s2t.backends.llama_cpp import BATCH_TOKENS

    _, (model, _) = llama_pair
    vocab = len(slm.tokenizer)
    prompt = [(7 * i) % 250 + 3 for i in range(BATCH_TOKENS + 40)]  # two llama.cpp batches
    got = model.prompt_logits(prompt)
    for cut in (100, BATCH_TOKENS - 1, BATCH_TOKENS, BATCH_TOKENS + 1, len(prompt)):
        model.ensure_sequences(1)  # (clears the cache)
        prefix = model.decode([(0, prompt[:cut], 0)])[0]
        torch.testing.assert_close(got[cut - 1], prefix, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        expected = torch.log_softmax(slm.model(input_ids=torch.tensor([prompt])).logits[0, :, :vocab], -1)
    # the same weights: a wrong position or a row off by one would be off by about 1
    torch.testing.assert_close(torch.log_softmax(got[:, :vocab], -1), expected, atol=0.15, rtol=0)
    for bad in ([], [5] * (model.n_ctx + 1)):
        with pytest.raises(ValueError, match="a prompt to score needs"):
            model.prompt_logits(bad)


def test_a_stop_string_on_llama_cpp_ends_the_answer_at_the_same_token_every_time(llama_server):
    """The engine thread ends a stopped answer before the next step on llama.cpp too."""
    import httpx

    messages = [{"role": "user", "content": "Natalia sold clips to 48 of her friends."}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 8}
    full = httpx.post(f"{llama_server}/v1/chat/completions", json=body, timeout=60).json()
    text = full["choices"][0]["message"]["content"]
    stop = next(text[i : i + 2] for i in range(len(text) // 2, len(text)) if text[i : i + 2].strip())
    answers = [
        httpx.post(f"{llama_server}/v1/chat/completions", json=body | {"stop": [stop]}, timeout=60).json()
        for _ in range(3)
    ]
    assert {a["choices"][0]["message"]["content"] for a in answers} == {text[: text.index(stop)]}
    assert {a["choices"][0]["finish_reason"] for a in answers} == {"stop"}
    counted = {(a["usage"]["completion_tokens"], a["s2t_cost"]["slm_forward_calls"]) for a in answers}
    assert len(counted) == 1 and next(iter(counted))[0] <= full["usage"]["completion_tokens"], counted


def test_the_context_is_at_most_the_positions_the_model_was_trained_on(
    tmp_path, slm, llama_pair, monkeypatch
):
    """`s2t serve --backend llama.cpp` on a 1,024-position GGUF used to take 4,096-token prompts."""
    import httpx
    from typer.testing import CliRunner

    from s2t.backends.llama_cpp import DEFAULT_CONTEXT, LlamaCppModel
    from s2t.cli import app as cli
    from s2t.serving import running_server, server

    monkeypatch.setenv("S2T_CACHE_DIR", str(tmp_path / "cache"))  # the GGUF tokenizer is cached there
    paths, (model, _) = llama_pair
    trained = slm.model.config.max_position_embeddings
    assert trained < DEFAULT_CONTEXT, "the tiny model should have fewer positions than the default"
    assert (model.n_ctx_train, model.n_ctx) == (trained, trained)
    assert LlamaCppModel(paths[0], n_ctx=16, kv_type="f32", n_threads=1, repack=False).n_ctx == 16

    served = {}
    monkeypatch.setattr(server, "serve", lambda app, host, port: served.update(app=app))
    base = ["serve", "--backend", "llama.cpp", "--slm", str(paths[0]), "--method", "greedy"]
    refused = CliRunner().invoke(cli, [*base, "--context-length", str(trained + 1)])
    message = " ".join(refused.output.split())
    assert refused.exit_code == 2 and f"{trained} positions; give at most {trained}" in message, message
    for extra, limit in (([], trained), (["--context-length", "64"], 64)):
        result = CliRunner().invoke(cli, [*base, *extra])
        assert result.exit_code == 0, result.output
        with running_server(served["app"]) as url:
            info = httpx.get(f"{url}/tokenizer_info").json()
            assert info["model_max_length"] == limit
            body = {"model": str(paths[0]), "prompt": [5] * limit, "max_tokens": 1}
            too_long = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["error"]
            assert too_long["code"] == "context_length_exceeded"
        assert served["app"].state.worker.scheduler.n_ctx == limit
