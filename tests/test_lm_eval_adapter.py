"""The lm-evaluation-harness backend: registered as ``s2t``, answers generate_until, honours stop strings."""

from __future__ import annotations

import pytest

from s2t.api import S2TGenerator
from s2t.lm_eval_adapter import truncate_at_stop

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from s2t.lm_eval_adapter import S2TLM  # noqa: E402


def request(context: str, **gen_kwargs) -> Instance:
    return Instance(request_type="generate_until", doc={}, arguments=(context, gen_kwargs), idx=0)


@pytest.fixture(scope="module")
def model(slm, llm):
    return S2TLM(
        method="s2t",
        trigger="margin",
        threshold=0.9,
        k=4,
        batch_size=2,
        max_new_tokens=6,
        generator=S2TGenerator(slm, llm=llm),
    )


def test_the_model_is_registered_with_lm_eval_under_s2t():
    assert get_model("s2t") is S2TLM


def test_generate_until_answers_each_request_and_cuts_at_the_first_stop_string(model, monkeypatch):
    import s2t.lm_eval_adapter as adapter

    budgets = []

    def spy(*args, **kwargs):
        budgets.append(kwargs["max_new_tokens"])
        return decode(*args, **kwargs)

    decode = adapter.decode
    monkeypatch.setattr(adapter, "decode", spy)
    prompt = "Question: How many eggs are left? 16 - 3 - 4\nAnswer:"
    free = model.generate_until([request(prompt, until=[], max_gen_toks=12)])[0]
    assert free, "the tiny model generated nothing to cut"
    stop = free[len(free) // 2 :][:2]  # a string that occurs in the free answer
    cut, again, short = model.generate_until(
        [
            request(prompt, until=["@@never@@", stop], max_gen_toks=12),
            request(prompt, until=[], max_gen_toks=12),
            request(prompt, until=[], max_gen_toks=2),
        ]
    )
    assert again == free, "the same request must give the same answer"
    assert cut == free[: free.index(stop)] and stop not in cut
    assert sorted(budgets) == [2, 12, 12, 12], "max_gen_toks is each request's token budget"
    assert len(short) <= len(free)
    assert model.generate_until([]) == []


def test_chat_template_renders_the_history_with_the_slm_template(model):
    text = model.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}])
    assert text.startswith("<|im_start|>user\nWhat is 2 + 2?") and text.endswith("<|im_start|>assistant\n")
    assert model.tokenizer_name


def test_loglikelihood_requests_are_refused_with_a_clear_message(model):
    with pytest.raises(NotImplementedError, match="only generates"):
        model.loglikelihood([request("a", until=[])])
    with pytest.raises(NotImplementedError, match="only generates"):
        model.loglikelihood_rolling([request("a")])


def test_model_args_are_checked_and_paths_load_by_name(tiny_pair_dir):
    with pytest.raises(ValueError, match="unknown method"):
        S2TLM(slm=tiny_pair_dir["slm"], llm=None, method="beam")
    with pytest.raises(ValueError, match="needs a trained selector"):
        S2TLM(slm=tiny_pair_dir["slm"], llm=None, method="s2t-local", trigger="entropy", threshold=1.0)
    lm = S2TLM.create_from_arg_string(
        f"slm={tiny_pair_dir['slm']},llm={tiny_pair_dir['llm']},method=greedy,max_new_tokens=3",
        {"batch_size": "auto", "device": "cpu"},
    )
    assert lm.batch_size == 8 and len(lm.generate_until([request("What is 2 + 2?", until=["\n\n"])])) == 1


def test_truncate_at_stop_cuts_at_the_earliest_stop_string():
    assert truncate_at_stop("a b. c\n\nd", ["\n\n", "."]) == "a b"
    assert truncate_at_stop("abc", []) == "abc"
