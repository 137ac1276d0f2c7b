"""The one decoding engine.

A decoding *method* is trigger × candidates × selector (:mod:`s2t.policies`). The engine
runs the SLM over a batch of left-padded prompts with a KV cache; at every step the trigger
decides whether to intervene, and where it fires the selector picks among the SLM's
candidates. The LLM, when the method needs one at all, keeps its own KV cache and is run
lazily: only at steps where it is needed, catching up on every token since its last call in
one forward pass. Sequences that finish are dropped from the batch so that the long tail
does not pay for the finished ones.

Costs are recorded per sequence *as if it had been decoded alone*, so they do not depend on
how problems were batched: the SLM's forward calls and tokens, the LLM's forward calls (one
per step at which it was needed) and tokens (everything it must have read up to its last
call), triggers, overrides (triggered steps whose chosen token differs from the SLM's top-1)
and the wall time (the batch's time shared evenly between its sequences).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from s2t.policies.candidates import TopK
from s2t.policies.selectors import Selector, SLMSelector, StepContext
from s2t.policies.triggers import NeverTrigger, Trigger


@dataclass
class Method:
    """A decoding method: when to intervene, what to choose from, and who chooses."""

    trigger: Trigger = field(default_factory=NeverTrigger)
    candidates: TopK = field(default_factory=TopK)
    selector: Selector = field(default_factory=SLMSelector)
    min_step: int = 3  # no trigger in the first steps: the reference skips the first 3
    name: str = "custom"
    quantile: float | None = None  # target quantile when the trigger's threshold is to be calibrated

    def __post_init__(self):
        if self.min_step < 0:
            raise ValueError(f"min_step must be >= 0; got {self.min_step}")

    @property
    def needs_llm(self) -> bool:
        return self.trigger.needs_llm or self.selector.needs_llm

    def describe(self) -> dict:
        return {
            "name": self.name,
            "trigger": self.trigger.describe(),
            "candidates": self.candidates.describe(),
            "selector": self.selector.describe(),
            "min_step": self.min_step,
            "quantile": self.quantile,
        }


@dataclass
class CostRecord:
    """What one generated sequence cost, as if decoded alone (see the module docstring)."""

    generated_tokens: int = 0
    slm_forward_calls: int = 0
    slm_forward_tokens: int = 0
    llm_forward_calls: int = 0
    llm_forward_tokens: int = 0
    triggers: int = 0
    overrides: int = 0
    wall_time_s: float = 0.0

    @property
    def trigger_rate(self) -> float:
        return self.triggers / self.generated_tokens if self.generated_tokens else 0.0

    def to_dict(self) -> dict:
        return dict(asdict(self), trigger_rate=self.trigger_rate)


@dataclass
class Generation:
    """One decoded sequence: new token ids (stop token included), why it ended, and its cost."""

    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens reached)
    cost: CostRecord
    trigger_steps: list[int] = field(default_factory=list)
    statistics: list[float] | None = None  # the trigger statistic per step >= min_step, if recorded


class ModelStream:
    """A model's KV cache over a batch's token history, fed only the columns it has not seen."""

    def __init__(self, model: PreTrainedModel, vocab_size: int, keep_hidden: bool = False):
        self.model = model
        self.vocab_size = vocab_size
        self.cache = DynamicCache()
        self.seen = 0
        self.keep_hidden = keep_hidden
        self.last_hidden: torch.Tensor | None = None  # (batch, hidden) when keep_hidden

    @torch.inference_mode()
    def advance(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Feed the unseen columns of ``ids``; return next-token logits (batch, vocab) in float32."""
        device = self.model.device
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids[:, self.seen :].to(device),
            attention_mask=mask.to(device),
            position_ids=positions[:, self.seen :].to(device),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
            output_hidden_states=self.keep_hidden,
        )
        if self.keep_hidden:
            self.last_hidden = out.hidden_states[-1][:, -1].float().cpu()
        self.seen = ids.shape[1]
        return out.logits[:, -1, : self.vocab_size].float().cpu()

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows.to(self.model.device))
        if self.last_hidden is not None:
            self.last_hidden = self.last_hidden[rows]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if len(p):
            ids[row, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[row, width - len(p) :] = 1
    return ids, mask


def decode(
    slm: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    method: Method | None = None,
    *,
    llm: PreTrainedModel | None = None,
    vocab_size: int,
    stop_ids: Sequence[int],
    pad_id: int,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seeds: Sequence[int] | None = None,
    record_statistics: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> list[Generation]:
    """Decode a batch of token-id prompts with ``method`` (default: SLM greedy).

    ``vocab_size`` is the tokenizer's size: logits beyond it (padding or reserved rows of the
    output embedding) are never chosen. ``seeds`` gives each sequence its own random stream
    (sampling, random trigger, random selector) so that results do not depend on batching.
    ``on_step(step, active_sequences)`` is called after every step (for progress displays).
    """
    method = method or Method(name="greedy")
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if temperature < 0 or not (0.0 < top_p <= 1.0):
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1; got {temperature}, {top_p}")
    if method.needs_llm and llm is None:
        raise ValueError(f"method {method.name!r} needs an LLM but none was given")
    method.candidates.check_vocab(vocab_size)
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    if len(seeds) != len(prompts):
        raise ValueError("need one seed per prompt")

    start = time.perf_counter()
    n = len(prompts)
    prompt_lengths = [len(p) for p in prompts]
    ids, mask = left_pad(prompts, pad_id)
    rows = torch.arange(n)  # original index of each row still in the batch
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
    warpers = LogitsProcessorList()
    if temperature > 0:
        warpers.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))

    tokens: list[list[int]] = [[] for _ in range(n)]
    costs = [CostRecord(slm_forward_calls=1, slm_forward_tokens=L) for L in prompt_lengths]
    trigger_steps: list[list[int]] = [[] for _ in range(n)]
    statistics: list[list[float]] | None = [[] for _ in range(n)] if record_statistics else None
    finish = ["length"] * n

    slm_stream = ModelStream(slm, vocab_size, keep_hidden=method.trigger.needs_hidden)
    llm_stream = ModelStream(llm, vocab_size) if method.needs_llm else None
    slm_logits = slm_stream.advance(ids, mask)

    for step in range(max_new_tokens):
        row_gens = [generators[r] for r in rows.tolist()]
        llm_logits = None
        if method.trigger.needs_llm:
            llm_logits = llm_stream.advance(ids, mask)
            _charge_llm(costs, rows, torch.ones(len(rows), dtype=torch.bool), prompt_lengths, step)
        fired, stat = method.trigger.fires(slm_logits, llm_logits, row_gens, slm_stream.last_hidden)
        if step < method.min_step:
            fired = torch.zeros_like(fired)
        elif statistics is not None:
            for i, r in enumerate(rows.tolist()):
                statistics[r].append(float(stat[i]))

        if temperature > 0:
            probs = torch.softmax(warpers(ids, slm_logits.clone()), dim=-1)
            default = torch.stack(
                [torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(row_gens)]
            )
        else:
            default = slm_logits.argmax(-1)
        token = default
        advanced = None  # next-step SLM logits, when the selector already advanced the SLM
        if fired.any():
            candidates = method.candidates(slm_logits)
            if method.selector.needs_llm and llm_logits is None:
                llm_logits = llm_stream.advance(ids, mask)
                _charge_llm(costs, rows, fired, prompt_lengths, step)
            ctx = StepContext(
                slm_logits, candidates, fired, llm_logits, row_gens, default, slm_stream, ids, mask
            )
            chosen = method.selector.select(ctx)
            advanced = ctx.next_slm_logits
            token = torch.where(fired, chosen, default)
            for i in fired.nonzero().flatten().tolist():
                r = int(rows[i])
                costs[r].triggers += 1
                costs[r].overrides += int(chosen[i] != candidates.ids[i, 0])
                trigger_steps[r].append(step)

        for i, r in enumerate(rows.tolist()):
            tokens[r].append(int(token[i]))
            costs[r].generated_tokens += 1
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)

        done = torch.isin(token, stop)
        for r in rows[done].tolist():
            finish[r] = "stop"
        if on_step is not None:
            on_step(step, int((~done).sum()))
        if advanced is not None:
            read = ctx.slm_tokens_read.tolist()
            for i, r in enumerate(rows.tolist()):
                costs[r].slm_forward_calls += 1
                costs[r].slm_forward_tokens += int(read[i])

        if done.any():
            keep = (~done).nonzero().flatten()
            rows, ids, mask = rows[keep], ids[keep], mask[keep]
            if advanced is not None:
                advanced = advanced[keep]
            if len(rows) == 0:
                break
            slm_stream.keep_rows(keep)
            if llm_stream is not None:
                llm_stream.keep_rows(keep)
        if step == max_new_tokens - 1:
            break
        if advanced is not None:
            slm_logits = advanced
            continue
        slm_logits = slm_stream.advance(ids, mask)
        for r in rows.tolist():
            costs[r].slm_forward_calls += 1
            costs[r].slm_forward_tokens += 1

    share = (time.perf_counter() - start) / n
    results = []
    for r in range(n):
        costs[r].wall_time_s = share
        stats = statistics[r] if statistics is not None else None
        results.append(Generation(tokens[r], finish[r], costs[r], trigger_steps[r], stats))
    return results


def _charge_llm(
    costs: list[CostRecord], rows: torch.Tensor, needed: torch.Tensor, prompt_lengths: list[int], step: int
) -> None:
    """Charge one LLM call to each row that needed it; alone, it would have read everything so far."""
    for i in needed.nonzero().flatten().tolist():
        r = int(rows[i])
        costs[r].llm_forward_calls += 1
        costs[r].llm_forward_tokens = prompt_lengths[r] + step
