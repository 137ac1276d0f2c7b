"""The decoding engine: S2T degenerates to its baselines exactly, batching and lazy LLM calls change nothing."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from s2t.engine import CostRecord, Method, Request, Scheduler, decode
from s2t.methods import build_method, calibrate
from s2t.policies import EntropyTrigger, LLMSelector, SLMSelector, TopK
from s2t.prompts import build_prompt

QUESTIONS = [
    "Janet's ducks lay 16 eggs per day.",
    "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many?",
    "2 + 2?",
]


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [build_prompt(tokenizer, q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def kw(tokenizer):
    return dict(
        vocab_size=len(tokenizer),
        stop_ids=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id,
        max_new_tokens=24,
    )


def tokens(gens):
    return [g.token_ids for g in gens]


def test_prompts_have_different_lengths_so_padding_is_exercised(prompts):
    assert len({len(p) for p in prompts}) == len(prompts)


def test_s2t_with_k1_reproduces_greedy(slm, llm, prompts, kw):
    greedy = decode(slm.model, prompts, **kw)
    for trigger in ("always", "entropy"):
        method = build_method("s2t", trigger=trigger, threshold=0.0 if trigger == "entropy" else None, k=1)
        s2t = decode(slm.model, prompts, method, llm=llm.model, **kw)
        assert tokens(s2t) == tokens(greedy)
        assert all(g.cost.triggers == kw["max_new_tokens"] - method.min_step for g in s2t)
        assert all(g.cost.overrides == 0 for g in s2t)


def test_takeover_always_reproduces_llm_greedy(slm, llm, prompts, kw):
    method = build_method("takeover", trigger="always", min_step=0)
    takeover = decode(slm.model, prompts, method, llm=llm.model, **kw)
    assert tokens(takeover) == tokens(decode(llm.model, prompts, **kw))
    assert any(g.cost.overrides > 0 for g in takeover), "tiny SLM and LLM should disagree somewhere"


@pytest.mark.parametrize("name", ["greedy", "s2t", "takeover", "random-select"])
def test_batched_decoding_equals_one_prompt_at_a_time(slm, llm, prompts, kw, name):
    method = build_method(name, trigger="entropy", threshold=2.0, k=4)
    batched = decode(slm.model, prompts, method, llm=llm.model, seeds=[7, 8, 9], **kw)
    single = [
        decode(slm.model, [p], method, llm=llm.model, seeds=[s], **kw)[0] for p, s in zip(prompts, [7, 8, 9])
    ]
    assert tokens(batched) == tokens(single)
    for b, s in zip(batched, single):
        assert (b.cost.llm_forward_calls, b.cost.llm_forward_tokens) == (
            s.cost.llm_forward_calls,
            s.cost.llm_forward_tokens,
        )
        assert b.trigger_steps == s.trigger_steps


def test_sampling_is_per_sequence_reproducible_and_batch_independent(slm, prompts, kw):
    batched = decode(slm.model, prompts, temperature=0.7, top_p=0.8, seeds=[1, 2, 3], **kw)
    single = [
        decode(slm.model, [p], temperature=0.7, top_p=0.8, seeds=[s], **kw)[0]
        for p, s in zip(prompts, [1, 2, 3])
    ]
    assert tokens(batched) == tokens(single)
    other = decode(slm.model, prompts, temperature=0.7, top_p=0.8, seeds=[4, 5, 6], **kw)
    assert tokens(other) != tokens(batched)


class RecordingLLMSelector(LLMSelector):
    def __init__(self):
        self.seen = []

    def select(self, ctx):
        self.seen.append(ctx.llm_logits[ctx.fired].clone())
        return super().select(ctx)


class EagerEntropyTrigger(EntropyTrigger):
    """Same firing rule, but claims to need the LLM every step: the LLM then runs at every step."""

    needs_llm = True


def test_lazy_llm_catch_up_equals_always_running_llm(slm, llm, prompts, kw):
    lazy_sel, eager_sel = RecordingLLMSelector(), RecordingLLMSelector()
    lazy = decode(slm.model, prompts, Method(EntropyTrigger(2.0), TopK(8), lazy_sel), llm=llm.model, **kw)
    eager = decode(
        slm.model, prompts, Method(EagerEntropyTrigger(2.0), TopK(8), eager_sel), llm=llm.model, **kw
    )
    assert tokens(lazy) == tokens(eager)
    assert sum(g.cost.triggers for g in lazy) > 0
    assert len(lazy_sel.seen) == len(eager_sel.seen)
    for a, b in zip(lazy_sel.seen, eager_sel.seen):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for g_lazy, g_eager, p in zip(lazy, eager, prompts):
        # lazily, the LLM is called once per trigger and reads up to the last trigger only
        assert g_lazy.cost.llm_forward_calls == g_lazy.cost.triggers
        if g_lazy.trigger_steps:
            assert g_lazy.cost.llm_forward_tokens == len(p) + g_lazy.trigger_steps[-1]
        assert g_eager.cost.llm_forward_calls == g_eager.cost.generated_tokens


def test_generation_stops_at_a_stop_token(slm, prompts, kw):
    free = decode(slm.model, prompts[:1], **kw)[0]
    stop_token = free.token_ids[4]
    first = free.token_ids.index(stop_token)
    stopped = decode(slm.model, prompts[:1], **dict(kw, stop_ids=[stop_token]))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert free.finish_reason == "length" and len(free.token_ids) == kw["max_new_tokens"]


def test_reserved_rows_above_the_tokenizer_vocabulary_are_never_generated(slm, prompts, kw, tokenizer):
    model = slm.model
    with torch.no_grad():
        saved = model.lm_head.weight[len(tokenizer) :].clone()
        # make the reserved rows dominate every logit
        model.lm_head.weight[len(tokenizer) :] = model.lm_head.weight[: len(tokenizer)].abs().max() * 50
    try:
        gens = decode(model, prompts, **kw)
        assert max(max(g.token_ids) for g in gens) < len(tokenizer)
    finally:
        with torch.no_grad():
            model.lm_head.weight[len(tokenizer) :] = saved


def test_calibrated_quantile_gives_the_matching_trigger_rate(slm, prompts, kw):
    method = Method(EntropyTrigger(), TopK(4), SLMSelector(), min_step=3)
    threshold = calibrate(method, slm.model, prompts, quantile=0.8, **kw)
    assert method.trigger.threshold == threshold
    gens = decode(slm.model, prompts, method, **kw)
    steps = sum(len(g.token_ids) - 3 for g in gens)
    rate = sum(g.cost.triggers for g in gens) / steps
    assert abs(rate - 0.2) < 0.06


def test_cost_record_counts_forward_passes(slm, prompts, kw):
    g = decode(slm.model, prompts[:1], **kw)[0]
    assert g.cost.slm_forward_calls == kw["max_new_tokens"]  # prefill + one per token except the last
    assert g.cost.slm_forward_tokens == len(prompts[0]) + kw["max_new_tokens"] - 1
    assert g.cost.llm_forward_calls == 0 and g.cost.llm_forward_tokens == 0


def test_method_needing_an_llm_without_one_is_refused(slm, prompts, kw):
    with pytest.raises(ValueError, match="needs an LLM"):
        decode(slm.model, prompts, build_method("s2t", threshold=1.0), **kw)


# --- continuous batching: sequences join a running batch and leave it; each decodes as if alone ---

MORE_QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then half as many in May. She eats three for "
    "breakfast and bakes muffins with four. How many eggs does she sell?",
    "9 * 2?",
]


def continuous_method(name, slm, tokenizer):
    """The methods under test; triggers fire often so that selectors (and the LLM) run before joins."""
    if name == "s2t-local":
        from s2t.policies.learned_selector import LocalSelector

        selector = LocalSelector.initial(slm.model, "tiny", len(tokenizer))
        torch.manual_seed(0)
        selector.bins = torch.randn_like(selector.bins)
        return Method(EntropyTrigger(0.0), TopK(4), selector)
    if name == "takeover-always":
        return build_method("takeover", trigger="always", min_step=0)
    if name == "s2t-kl":
        return build_method("s2t", trigger="kl", threshold=0.05, k=4)
    return build_method(name, trigger="entropy", threshold=2.0, k=4)


def run_schedule(scheduler, arrivals):
    """Step ``scheduler``, adding ``arrivals[step]`` (a list of Requests) before each step."""
    ids, results, step = {}, {}, 0
    while step <= max(arrivals) or scheduler.has_work():
        for request in arrivals.get(step, []):
            ids[scheduler.add(request)] = request
        for out in scheduler.step():
            if out.generation is not None:
                results[out.request_id] = out.generation
        step += 1
    return [(ids[i], results[i]) for i in sorted(ids)]


@pytest.mark.parametrize(
    "name", ["greedy", "s2t", "takeover", "random-select", "takeover-always", "s2t-kl", "s2t-local"]
)
def test_sequences_joining_mid_batch_decode_as_if_alone(slm, llm, tokenizer, prompts, kw, name):
    method = continuous_method(name, slm, tokenizer)
    longer, short = (
        build_prompt(tokenizer, MORE_QUESTIONS[0]),
        build_prompt(tokenizer, MORE_QUESTIONS[1], None),
    )
    assert len(longer) > max(map(len, prompts)) and len(short) < min(map(len, prompts))
    arrivals = {  # different lengths and budgets, so rows join and leave at different steps
        0: [Request(prompts[0], 14, seed=1)],
        3: [Request(prompts[1], 20, seed=2), Request(short, 5, seed=3)],
        7: [Request(longer, 12, seed=4)],
        9: [Request(prompts[2], 10, temperature=0.7, top_p=0.8, seed=5)],
        30: [Request(short, 6, seed=6)],  # joins after the batch ran empty
    }
    common = {k: v for k, v in kw.items() if k != "max_new_tokens"}
    scheduler = Scheduler(slm.model, method, llm=llm.model, **common)
    together = run_schedule(scheduler, arrivals)
    assert len(together) == 6
    for request, got in together:
        alone = decode(
            slm.model,
            [request.prompt],
            method,
            llm=llm.model,
            seeds=[request.seed],
            max_new_tokens=request.max_new_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            **common,
        )[0]
        assert got.token_ids == alone.token_ids
        assert got.finish_reason == alone.finish_reason
        assert got.trigger_steps == alone.trigger_steps
        for field_name in (
            "slm_forward_calls",
            "slm_forward_tokens",
            "llm_forward_calls",
            "llm_forward_tokens",
        ):
            assert getattr(got.cost, field_name) == getattr(alone.cost, field_name), field_name
    if name != "greedy":
        assert any(g.cost.triggers for _, g in together)


def test_bounded_batch_stays_full_and_drops_unused_padding(slm, prompts, kw, tokenizer):
    many = [p for p in prompts for _ in range(3)]
    running, widths = [], []  # per step, once waiting requests were admitted
    admit = Scheduler._admit

    def spy(self):
        admit(self)
        running.append(len(self.running))
        widths.append(self.ids.shape[1])

    Scheduler._admit = spy
    try:
        streamed = decode(slm.model, many, max_batch_size=2, **kw)
    finally:
        Scheduler._admit = admit
    assert tokens(streamed) == tokens(decode(slm.model, many, **kw))
    steps_with_waiting = len(running) - kw["max_new_tokens"]  # the last sequence's steps may run alone
    assert running[:steps_with_waiting] == [2] * steps_with_waiting
    # without cutting unused padding, the width would grow by one column per step
    assert max(widths) <= max(map(len, prompts)) + kw["max_new_tokens"]


def test_cancelled_sequences_leave_at_the_next_step(slm, prompts, kw):
    common = {k: v for k, v in kw.items() if k != "max_new_tokens"}
    scheduler = Scheduler(slm.model, **common)
    first = scheduler.add(Request(prompts[0], 50))
    second = scheduler.add(Request(prompts[1], 50))
    waiting = scheduler.add(Request(prompts[2], 50))
    scheduler.max_batch_size = 2
    scheduler.step()
    assert [s.id for s in scheduler.running] == [first, second]
    scheduler.cancel(first)
    scheduler.cancel(waiting)
    outputs = scheduler.step()
    cancelled = {o.request_id: o.generation for o in outputs if o.token is None}
    assert set(cancelled) == {first, waiting}
    assert cancelled[first].finish_reason == "cancelled" and len(cancelled[first].token_ids) == 1
    assert [s.id for s in scheduler.running] == [second]
    alone = decode(slm.model, [prompts[1]], **common, max_new_tokens=50)[0]
    while scheduler.has_work():
        done = [o.generation for o in scheduler.step() if o.generation is not None]
    assert done[0].token_ids == alone.token_ids


def test_step_context_names_each_rows_sequence_while_rows_leave(slm, llm, prompts, kw):
    fired_for = []

    class NamingSelector(LLMSelector):
        def select(self, ctx):
            fired_for.extend(ctx.sequence_ids[i] for i in ctx.fired.nonzero().flatten().tolist())
            return super().select(ctx)

    common = {k: v for k, v in kw.items() if k != "max_new_tokens"}
    scheduler = Scheduler(
        slm.model, Method(EntropyTrigger(0.0), TopK(4), NamingSelector()), llm=llm.model, **common
    )
    results = run_schedule(scheduler, {0: [Request(p, n) for p, n in zip(prompts, (5, 14, 9))]})
    assert [len(g.token_ids) for _, g in results] == [5, 14, 9]
    assert Counter(fired_for) == {i: g.cost.triggers for i, (_, g) in enumerate(results)}


@pytest.mark.parametrize("name", ["greedy", "s2t", "s2t-kl", "s2t-local"])
def test_chunked_prefill_decodes_the_same_tokens(slm, llm, tokenizer, prompts, kw, name):
    method = continuous_method(name, slm, tokenizer)
    longer = build_prompt(tokenizer, MORE_QUESTIONS[0])
    arrivals = {
        0: [Request(prompts[0], 14, seed=1)],
        3: [Request(prompts[1], 20, seed=2), Request(longer, 12, seed=4)],
        5: [Request(prompts[2], 10, temperature=0.7, top_p=0.8, seed=5)],
    }
    common = {k: v for k, v in kw.items() if k != "max_new_tokens"}
    whole = run_schedule(Scheduler(slm.model, method, llm=llm.model, **common), arrivals)
    chunk = 5
    assert len(longer) > 2 * chunk and all(len(p) > chunk for p in prompts)
    chunked = run_schedule(
        Scheduler(slm.model, method, llm=llm.model, prefill_chunk=chunk, **common), arrivals
    )
    for (request, got), (_, expected) in zip(chunked, whole):
        assert got.token_ids == expected.token_ids, request.prompt
        assert got.trigger_steps == expected.trigger_steps


def test_a_long_prompt_prefills_between_the_running_batchs_steps(slm, tokenizer, prompts, kw):
    # No stop token can be generated (a reserved id): sequences end only at their budget.
    common = {k: v for k, v in kw.items() if k != "max_new_tokens"} | {"stop_ids": [len(tokenizer)]}
    scheduler = Scheduler(slm.model, prefill_chunk=16, **common)
    short = build_prompt(tokenizer, MORE_QUESTIONS[1], None)[:4]
    running = scheduler.add(Request(short, 100))
    scheduler.step()
    longer = build_prompt(tokenizer, MORE_QUESTIONS[0])
    waiting = scheduler.add(Request(longer, 3))
    chunks = -(-len(longer) // 16)
    assert 2 < chunks < 90
    for _ in range(chunks - 1):  # the running sequence decodes a token at every step meanwhile
        assert [o.request_id for o in scheduler.step()] == [running]
        assert [s.id for s, _ in scheduler.prefilling] == [waiting]
    assert sorted(o.request_id for o in scheduler.step()) == [running, waiting]  # read, joined, decoded
    assert scheduler.prefilling == []
    cancelled = scheduler.add(Request(longer, 3))
    scheduler.step()
    assert [s.id for s, _ in scheduler.prefilling] == [cancelled]
    scheduler.cancel(cancelled)
    outputs = scheduler.step()
    assert any(o.request_id == cancelled and o.generation.finish_reason == "cancelled" for o in outputs)
    assert scheduler.prefilling == []
    with pytest.raises(ValueError, match="prefill_chunk"):
        Scheduler(slm.model, prefill_chunk=0, **common)


def test_the_first_candidate_is_greedys_token_when_logits_tie():
    """bfloat16 logits tie often, and torch.topk leaves the order of ties unspecified: the first
    candidate must be argmax's token (the lowest tied id), or keeping it would leave greedy's path."""
    torch.manual_seed(0)
    logits = (torch.randn(64, 151936) * 3).to(torch.bfloat16)
    top = logits.max(-1).values
    planted = torch.randint(0, 151936, (64,))
    logits[torch.arange(64), planted] = top  # a second token tied at the maximum, anywhere
    logits[:4, :] = top[:4, None]  # more tokens tied at the maximum than K
    cands = TopK(8)(logits)
    assert torch.equal(cands.ids[:, 0], logits.argmax(-1))
    assert (cands.slm_probs[:, :-1] >= cands.slm_probs[:, 1:]).all()  # still best first
    assert (cands.ids.sort(-1).values.diff(dim=-1) > 0).all()  # K distinct tokens


def test_cost_records_total_field_by_field():
    a = CostRecord(generated_tokens=3, slm_forward_calls=3, llm_forward_tokens=7, triggers=1, wall_time_s=0.5)
    b = CostRecord(
        generated_tokens=5, slm_forward_tokens=9, llm_forward_calls=2, overrides=1, wall_time_s=0.25
    )
    total = CostRecord.total([a, b])
    assert total == CostRecord(8, 3, 9, 2, 7, 1, 1, 0.75)
    assert total.trigger_rate == 1 / 8
    assert CostRecord.total([]) == CostRecord()
