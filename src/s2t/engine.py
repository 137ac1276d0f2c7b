"""The one decoding engine: a continuous batch.

A decoding *method* is trigger × candidates × selector (:mod:`s2t.policies`). The
:class:`Scheduler` runs the SLM over a batch of left-padded sequences with a KV cache; at every
step the trigger decides whether to intervene, and where it fires the selector picks among the
SLM's candidates. The LLM, when the method needs one at all, keeps its own KV cache and is run
lazily: only at steps where it is needed, catching up on every token since its last call in
one forward pass.

The batch is *continuous*: a request added at any time joins at the next step (its prompt is
prefilled on its own, then its KV caches are left-padded to the batch's width and appended along
the batch dimension; the LLM's cache of the joining rows is caught up to the columns the batch's
LLM has already read), and a sequence that finishes, or is cancelled, leaves at once, so the
long tail does not pay for the finished ones and a bounded batch stays full while requests
wait. Padding columns that no row needs any more are cut from the left. :func:`decode` (a list
of prompts) and the server (:mod:`s2t.serving`) both drive this one loop.

Costs are recorded per sequence *as if it had been decoded alone*, so they do not depend on
how requests were batched: the SLM's forward calls and tokens, the LLM's forward calls (one
per step at which it was needed) and tokens (everything it must have read up to its last
call), triggers, overrides (triggered steps whose chosen token differs from the SLM's top-1)
and the wall time (each step's time shared evenly between the sequences in it; a joining
prompt's prefill is charged to the sequences it admitted).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from s2t.models import cache_kwargs, contiguous_output_head
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

    @classmethod
    def total(cls, costs: Iterable[CostRecord]) -> CostRecord:
        """The field-wise sum of several sequences' costs (maj@K's samples, a request's choices)."""
        total = cls()
        for cost in costs:
            for name, value in asdict(cost).items():
                setattr(total, name, getattr(total, name) + value)
        return total


@dataclass
class Generation:
    """One decoded sequence: new token ids (stop token included), why it ended, and its cost."""

    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens reached)
    cost: CostRecord
    trigger_steps: list[int] = field(default_factory=list)
    statistics: list[float] | None = None  # the trigger statistic per step >= min_step, if recorded


def to_host(logits: torch.Tensor) -> torch.Tensor:
    """Float32 logits on the CPU, where the step's selection logic runs.

    From a GPU the copy goes through page-locked memory: a (32 × 151,936) float32 block moved in 0.35 ms
    that way on an H200 against 1.2 ms pageable, and 6.9 ms per step when the strided slice itself was
    copied (``bench/compare.py`` measured our engine at 0.44× ``generate`` at batch 32 before this).
    Each call gets a fresh buffer (torch's pinned-memory allocator recycles them), so logits a caller
    still holds are never overwritten.
    """
    if logits.device.type != "cuda":
        return logits.float().cpu()
    source = logits.float().contiguous()
    host = torch.empty(source.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(source, non_blocking=True)
    torch.cuda.current_stream(source.device).synchronize()
    return host


class ModelStream:
    """A model's KV cache over a batch's token history, fed only the columns it has not seen."""

    def __init__(self, model: PreTrainedModel, vocab_size: int, keep_hidden: bool = False):
        self.model = contiguous_output_head(model)
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
            **cache_kwargs(self.model, self.cache),
            use_cache=True,
            logits_to_keep=1,
            output_hidden_states=self.keep_hidden,
        )
        if self.keep_hidden:
            self.last_hidden = out.hidden_states[-1][:, -1].float().cpu()
        self.seen = ids.shape[1]
        return to_host(out.logits[:, -1, : self.vocab_size])

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows.to(self.model.device))
        if self.last_hidden is not None:
            self.last_hidden = self.last_hidden[rows]

    def _layers(self):
        return [layer for layer in self.cache.layers if layer.is_initialized] if self.seen else []

    def pad_left(self, columns: int) -> None:
        """Prepend ``columns`` empty (masked) columns to the cache, as more left padding would."""
        if columns <= 0 or not self.seen:
            return  # a stream that has read nothing yet reads the padding with everything else
        for layer in self._layers():
            for name in ("keys", "values"):
                tensor = getattr(layer, name)  # (batch, heads, seen, head_dim)
                zeros = tensor.new_zeros((*tensor.shape[:2], columns, tensor.shape[3]))
                setattr(layer, name, torch.cat([zeros, tensor], dim=2))
        self.seen += columns

    def crop_left(self, columns: int) -> None:
        """Drop the first ``columns`` columns (padding in every row) from the cache."""
        if columns <= 0 or not self.seen:
            return
        for layer in self._layers():
            layer.keys, layer.values = layer.keys[:, :, columns:], layer.values[:, :, columns:]
        self.seen -= columns

    def extend(self, other: ModelStream) -> None:
        """Append ``other``'s rows (a stream over the same columns) along the batch dimension."""
        if self.seen != other.seen:
            raise ValueError(f"cannot join streams over {self.seen} and {other.seen} columns")
        for mine, theirs in zip(self._layers(), other._layers()):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        if self.last_hidden is not None and other.last_hidden is not None:
            self.last_hidden = torch.cat([self.last_hidden, other.last_hidden])

    def empty_rows(self, rows: int) -> ModelStream:
        """A stream of ``rows`` all-padding rows over this stream's columns."""
        empty = ModelStream(self.model, self.vocab_size, self.keep_hidden)
        for layer in self._layers():
            shape = (rows, *layer.keys.shape[1:])
            empty.cache.update(layer.keys.new_zeros(shape), layer.values.new_zeros(shape), len(empty.cache))
        empty.seen = self.seen
        return empty


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """``token``'s log-probability under ``logits`` (one row) and the ``top`` most likely tokens'."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logprobs.topk(min(top, logprobs.shape[-1])) if top > 0 else (logprobs[:0], logprobs[:0])
    return float(logprobs[token]), [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist())]


def logprobs_of_prompt(
    logits: torch.Tensor, prompt: Sequence[int], top: int
) -> list[tuple[float, list[tuple[int, float]]]]:
    """Each prompt token's log-probability from the second token on, with the ``top`` most likely
    tokens at its position, given ``logits`` (len(prompt) - 1, vocab), row ``i`` read after token ``i``."""
    return [
        token_logprobs(logits[position], int(prompt[position + 1]), top)
        for position in range(len(prompt) - 1)
    ]


@torch.inference_mode()
def prompt_logprobs(
    model: PreTrainedModel, prompt: Sequence[int], vocab_size: int, top: int
) -> list[tuple[float, list[tuple[int, float]]]]:
    """Each prompt token's log-probability given the tokens before it (from the second token on),
    with the ``top`` most likely tokens at that position: what OpenAI's ``echo`` reports."""
    ids = torch.as_tensor([list(prompt)], dtype=torch.long, device=model.device)
    logits = to_host(model(input_ids=ids, use_cache=False).logits[0, :-1, :vocab_size])
    return logprobs_of_prompt(logits, prompt, top)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if len(p):
            ids[row, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[row, width - len(p) :] = 1
    return ids, mask


@dataclass
class Request:
    """One sequence to decode: its prompt's token ids and its own sampling settings.

    ``seed`` gives the sequence its own random stream (sampling, random trigger, random selector)
    so that its tokens do not depend on which other sequences share its batch. ``logprobs``, when
    not None, asks every step's output for the chosen token's log-probability under the SLM and the
    SLM's ``logprobs`` most likely tokens (0: the chosen token's only).
    """

    prompt: Sequence[int]
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    logprobs: int | None = None

    def __post_init__(self):
        if len(self.prompt) == 0:
            raise ValueError("every prompt needs at least one token")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {self.max_new_tokens}")
        if self.temperature < 0 or not (0.0 < self.top_p <= 1.0):
            raise ValueError(
                f"need temperature >= 0 and 0 < top_p <= 1; got {self.temperature}, {self.top_p}"
            )


@dataclass
class StepOutput:
    """What one step produced for one sequence: its new token, and its result if it finished."""

    request_id: int
    token: int | None  # None for a sequence cancelled before this step
    generation: Generation | None = None
    # When the request asked for them: the token's log-probability under the SLM's (unwarped)
    # next-token distribution, and that distribution's most likely (token, log-probability) pairs.
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class _Sequence:
    """A request's decoding state while it waits or runs."""

    def __init__(self, request_id: int, request: Request, record_statistics: bool):
        self.id = request_id
        self.request = request
        self.tokens: list[int] = []
        self.cost = CostRecord(slm_forward_calls=1, slm_forward_tokens=len(request.prompt))
        self.generator = torch.Generator().manual_seed(int(request.seed))
        self.trigger_steps: list[int] = []
        self.statistics: list[float] | None = [] if record_statistics else None
        self.warpers = LogitsProcessorList()
        if request.temperature > 0:
            self.warpers.append(TemperatureLogitsWarper(request.temperature))
            if request.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(request.top_p))

    def result(self, finish_reason: str) -> Generation:
        return Generation(self.tokens, finish_reason, self.cost, self.trigger_steps, self.statistics)


class RequestQueue:
    """The request bookkeeping every backend's continuous batch shares: ids, the waiting queue and
    cancellations.

    A backend's scheduler inherits it and keeps its own batch of started requests (``running``, and
    whatever else it holds before they run); it says how to let go of cancelled ones there
    (:meth:`_drop_cancelled_started`) and of all of them (:meth:`_abort_started`). Its :meth:`step`
    begins with :meth:`_drop_cancelled`.
    """

    def __init__(self, record_statistics: bool = False):
        self.record_statistics = record_statistics
        self.waiting: deque[_Sequence] = deque()
        self._cancelled: set[int] = set()
        self._next_id = 0

    def add(self, request: Request) -> int:
        """Queue a request; it joins the batch at the next step. Returns its id."""
        sequence = _Sequence(self._next_id, request, self.record_statistics)
        self._next_id += 1
        self.waiting.append(sequence)
        return sequence.id

    def cancel(self, request_id: int) -> None:
        """Stop a waiting or running request; it leaves at the next step (finish reason "cancelled")."""
        self._cancelled.add(request_id)

    def abort(self) -> list[int]:
        """Drop every waiting and running request (e.g. after a failed step); returns their ids."""
        dropped = self._abort_started() + [s.id for s in self.waiting]
        self.waiting.clear()
        self._cancelled.clear()
        return dropped

    def _abort_started(self) -> list[int]:
        """Drop every started request (the backend's batch); returns their ids."""
        raise NotImplementedError

    def _drop_cancelled(self) -> list[StepOutput]:
        """Remove the requests cancelled since the last step, waiting or started; their outputs."""
        if not self._cancelled:
            return []
        outputs = []
        for s in [s for s in self.waiting if s.id in self._cancelled]:
            self.waiting.remove(s)
            outputs.append(cancelled_output(s))
        outputs += self._drop_cancelled_started(self._cancelled)
        self._cancelled.clear()
        return outputs

    def _drop_cancelled_started(self, cancelled: set[int]) -> list[StepOutput]:
        """Remove the started requests whose ids are in ``cancelled`` from the batch; their outputs."""
        raise NotImplementedError


def cancelled_output(sequence: _Sequence) -> StepOutput:
    """The output of a request that leaves because it was cancelled."""
    return StepOutput(sequence.id, None, sequence.result("cancelled"))


class Scheduler(RequestQueue):
    """The continuous batch: :meth:`add` requests at any time, :meth:`step` until none is left.

    ``vocab_size`` is the tokenizer's size: logits beyond it (padding or reserved rows of the
    output embedding) are never chosen. ``max_batch_size`` bounds the running sequences; the
    others wait and join as running ones finish. With ``prefill_chunk``, a prompt longer than that
    is read ``prefill_chunk`` tokens per step, between the running batch's decoding steps, and joins
    the batch when it has been read (chunked prefill, as in vLLM): a long prompt no longer stalls
    every running sequence for its whole prefill. Not thread-safe: one thread drives it.
    """

    def __init__(
        self,
        slm: PreTrainedModel,
        method: Method | None = None,
        *,
        llm: PreTrainedModel | None = None,
        vocab_size: int,
        stop_ids: Sequence[int],
        pad_id: int,
        max_batch_size: int | None = None,
        record_statistics: bool = False,
        prefill_chunk: int | None = None,
    ):
        super().__init__(record_statistics)
        self.method = method or Method(name="greedy")
        if self.method.needs_llm and llm is None:
            raise ValueError(f"method {self.method.name!r} needs an LLM but none was given")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1; got {max_batch_size}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1; got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        # Prompts longer than prefill_chunk, read one chunk per step before they join the batch.
        self.prefilling: list[tuple[_Sequence, ModelStream]] = []
        self.method.candidates.check_vocab(vocab_size)
        self.slm, self.llm = slm, llm
        self.vocab_size, self.pad_id = vocab_size, pad_id
        self.stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
        self.max_batch_size = max_batch_size
        self.running: list[_Sequence] = []  # one per batch row, in row order
        self._reset_batch()

    def _reset_batch(self) -> None:
        self.ids = torch.empty((0, 0), dtype=torch.long)  # (rows, columns), left-padded
        self.mask = torch.empty((0, 0), dtype=torch.long)
        self.slm_stream = self._slm_stream()
        self.llm_stream = ModelStream(self.llm, self.vocab_size) if self.method.needs_llm else None
        self.slm_logits: torch.Tensor | None = None  # (rows, vocab): each row's next-token logits

    def _slm_stream(self) -> ModelStream:
        return ModelStream(self.slm, self.vocab_size, keep_hidden=self.method.trigger.needs_hidden)

    def score_prompt(self, prompt: Sequence[int], top: int) -> list[tuple[float, list[tuple[int, float]]]]:
        """The decoding model's log-probability of each prompt token after the first, with its ``top``
        alternatives (:func:`prompt_logprobs`; OpenAI's ``echo``). Call it between steps."""
        return prompt_logprobs(self.slm, prompt, self.vocab_size, top)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    def _abort_started(self) -> list[int]:
        dropped = [s.id for s in (*self.running, *(s for s, _ in self.prefilling))]
        self.running = []
        self.prefilling = []
        self._reset_batch()
        return dropped

    def step(self) -> list[StepOutput]:
        """Admit waiting requests, then decode one token for every running sequence."""
        outputs = self._drop_cancelled()
        self._admit()
        if not self.running:
            return outputs
        start = time.perf_counter()
        rows = self.running
        token, ctx = choose_tokens(
            self.method,
            rows,
            self.slm_logits,
            lambda needed: self.llm_stream.advance(self.ids, self.mask),
            slm_hidden=self.slm_stream.last_hidden,
            slm_stream=self.slm_stream,
            ids=self.ids,
            mask=self.mask,
        )
        advanced = ctx.next_slm_logits if ctx is not None else None  # the selector advanced the SLM
        if advanced is not None:
            for s, read in zip(rows, ctx.slm_tokens_read.tolist()):
                s.cost.slm_forward_calls += 1
                s.cost.slm_forward_tokens += int(read)

        self.ids = torch.cat([self.ids, token[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(token)[:, None]], dim=1)
        stopped = torch.isin(token, self.stop)
        keep = []
        for i, s in enumerate(rows):
            s.tokens.append(int(token[i]))
            s.cost.generated_tokens += 1
            finish = "stop" if stopped[i] else "length" if len(s.tokens) >= s.request.max_new_tokens else None
            out = StepOutput(s.id, int(token[i]), s.result(finish) if finish else None)
            if s.request.logprobs is not None:
                out.logprob, out.top_logprobs = token_logprobs(
                    self.slm_logits[i], int(token[i]), s.request.logprobs
                )
            outputs.append(out)
            if finish is None:
                keep.append(i)
        if len(keep) < len(rows):
            self._keep_rows(torch.tensor(keep, dtype=torch.long))
            if advanced is not None:
                advanced = advanced[keep]
        if self.running:
            if advanced is not None:
                self.slm_logits = advanced
            else:
                self.slm_logits = self.slm_stream.advance(self.ids, self.mask)
                for s in self.running:
                    s.cost.slm_forward_calls += 1
                    s.cost.slm_forward_tokens += 1
        share = (time.perf_counter() - start) / len(rows)
        for s in rows:
            s.cost.wall_time_s += share
        return outputs

    def _admit(self) -> None:
        """Prefill waiting requests on their own and join them to the running batch; a prompt longer
        than ``prefill_chunk`` is read one chunk per step first (:meth:`_prefill_chunk`)."""
        room = len(self.waiting)
        if self.max_batch_size is not None:
            room = min(room, self.max_batch_size - len(self.running) - len(self.prefilling))
        joining = [self.waiting.popleft() for _ in range(max(room, 0))]
        if self.prefill_chunk is not None:
            long = [s for s in joining if len(s.request.prompt) > self.prefill_chunk]
            self.prefilling.extend((s, self._slm_stream()) for s in long)
            joining = [s for s in joining if len(s.request.prompt) <= self.prefill_chunk]
        if self.prefilling:
            self._prefill_chunk()
        if not joining:
            return
        start = time.perf_counter()
        ids, mask = left_pad([s.request.prompt for s in joining], self.pad_id)
        slm_stream = self._slm_stream()
        logits = slm_stream.advance(ids, mask)
        self._join(joining, ids, mask, slm_stream, logits)
        share = (time.perf_counter() - start) / len(joining)
        for s in joining:
            s.cost.wall_time_s += share

    def _prefill_chunk(self) -> None:
        """Read the next ``prefill_chunk`` prompt tokens of the longest-waiting long prompt; join it
        to the batch once its whole prompt has been read."""
        start = time.perf_counter()
        sequence, stream = self.prefilling[0]
        prompt = torch.as_tensor([list(sequence.request.prompt)], dtype=torch.long)
        upto = min(stream.seen + self.prefill_chunk, prompt.shape[1])
        logits = stream.advance(prompt[:, :upto], torch.ones_like(prompt[:, :upto]))
        if upto == prompt.shape[1]:
            self.prefilling.pop(0)
            self._join([sequence], prompt, torch.ones_like(prompt), stream, logits)
        sequence.cost.wall_time_s += time.perf_counter() - start

    def _join(
        self,
        joining: list[_Sequence],
        ids: torch.Tensor,
        mask: torch.Tensor,
        slm_stream: ModelStream,
        logits: torch.Tensor,
    ) -> None:
        """Add prefilled rows (their ids, mask, SLM cache and next-token logits) to the batch."""
        if not self.running:
            self._reset_batch()
            self.ids, self.mask, self.slm_stream, self.slm_logits = ids, mask, slm_stream, logits
        else:
            width = max(self.ids.shape[1], ids.shape[1])
            self._pad_left(width - self.ids.shape[1])
            ids, mask = _pad_columns(ids, width, self.pad_id), _pad_columns(mask, width, 0)
            slm_stream.pad_left(width - slm_stream.seen)
            self.slm_stream.extend(slm_stream)
            if self.llm_stream is not None:
                self.llm_stream.extend(self._llm_catch_up(ids, [len(s.request.prompt) for s in joining]))
            self.ids, self.mask = torch.cat([self.ids, ids]), torch.cat([self.mask, mask])
            self.slm_logits = torch.cat([self.slm_logits, logits])
        self.running.extend(joining)

    def _llm_catch_up(self, ids: torch.Tensor, prompt_lengths: list[int]) -> ModelStream:
        """LLM caches for joining rows over the columns the batch's LLM has read (each row alone)."""
        seen = self.llm_stream.seen
        joined = self.llm_stream.empty_rows(0)
        for row, length in enumerate(prompt_lengths):
            first = ids.shape[1] - length  # the row's first real column
            if seen <= first:  # the batch's LLM has read only padding of this row so far
                joined.extend(self.llm_stream.empty_rows(1))
                continue
            alone = ModelStream(self.llm, self.vocab_size)
            real = ids[row : row + 1, first:seen]
            alone.advance(real, torch.ones_like(real))
            alone.pad_left(first)
            joined.extend(alone)
        return joined

    def _pad_left(self, columns: int) -> None:
        if columns <= 0:
            return
        self.ids = _pad_columns(self.ids, self.ids.shape[1] + columns, self.pad_id)
        self.mask = _pad_columns(self.mask, self.mask.shape[1] + columns, 0)
        for stream in (self.slm_stream, self.llm_stream):
            if stream is not None:
                stream.pad_left(columns)

    def _keep_rows(self, keep: torch.Tensor) -> None:
        """Keep only the batch rows ``keep``; cut padding columns that no remaining row needs."""
        self.running = [self.running[i] for i in keep.tolist()]
        if not self.running:
            self._reset_batch()
            return
        self.ids, self.mask = self.ids[keep], self.mask[keep]
        self.slm_logits = self.slm_logits[keep] if self.slm_logits is not None else None
        for stream in (self.slm_stream, self.llm_stream):
            if stream is not None:
                stream.keep_rows(keep)
        unused = int(self.mask.argmax(-1).min())  # every row holds at least one real token
        if self.llm_stream is not None and self.llm_stream.seen:
            unused = min(unused, self.llm_stream.seen)
        if unused > 0:
            self.ids, self.mask = self.ids[:, unused:], self.mask[:, unused:]
            for stream in (self.slm_stream, self.llm_stream):
                if stream is not None:
                    stream.crop_left(unused)

    def _drop_cancelled_started(self, cancelled: set[int]) -> list[StepOutput]:
        outputs = []
        for s, stream in [p for p in self.prefilling if p[0].id in cancelled]:
            self.prefilling.remove((s, stream))
            outputs.append(cancelled_output(s))
        keep = [i for i, s in enumerate(self.running) if s.id not in cancelled]
        for i in sorted(set(range(len(self.running))) - set(keep)):
            outputs.append(cancelled_output(self.running[i]))
        if len(keep) < len(self.running):
            self._keep_rows(torch.tensor(keep, dtype=torch.long))
        return outputs


def choose_tokens(
    method: Method,
    rows: Sequence[_Sequence],
    slm_logits: torch.Tensor,
    read_llm: Callable[[torch.Tensor], torch.Tensor],
    *,
    slm_hidden: torch.Tensor | None = None,
    slm_stream=None,
    ids: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, StepContext | None]:
    """One step's decision for a batch, given the SLM's next-token logits: the method, defined once.

    The trigger decides where to intervene, the candidate set and the selector pick the token there,
    and the SLM's greedy (or sampled) token is taken elsewhere. ``read_llm(needed)`` returns the LLM's
    next-token logits (rows, vocab), valid at least on the rows where ``needed`` (bool, (rows,)) is
    set; it is called only when the method needs the LLM at this step (every step for an LLM
    trigger; at triggered rows for an LLM selector), so a backend may catch its LLM up lazily. Each
    row's costs, trigger steps and statistics are updated; the SLM's own step is the caller's.
    Backends share this function (the torch :class:`Scheduler`, :mod:`s2t.backends.llama_cpp`).
    """
    steps = torch.tensor([len(s.tokens) for s in rows])  # each sequence's own step index
    generators = [s.generator for s in rows]
    fired_any_llm = torch.zeros(len(rows), dtype=torch.bool)
    llm_logits = None
    if method.trigger.needs_llm:
        fired_any_llm[:] = True
        llm_logits = read_llm(fired_any_llm.clone())
    fired, stat = method.trigger.fires(slm_logits, llm_logits, generators, slm_hidden)
    warm = steps >= method.min_step
    fired = fired & warm.to(fired.device)
    for i in warm.nonzero().flatten().tolist():
        if rows[i].statistics is not None:
            rows[i].statistics.append(float(stat[i]))

    default = slm_logits.argmax(-1)
    for i, s in enumerate(rows):
        if s.warpers:
            history = ids[i : i + 1] if ids is not None else torch.tensor([[*s.request.prompt, *s.tokens]])
            probs = torch.softmax(s.warpers(history, slm_logits[i : i + 1].clone()), -1)
            default[i] = torch.multinomial(probs[0], 1, generator=s.generator)[0]
    token = default
    ctx = None  # the selector's step context, when the trigger fired
    if fired.any():
        candidates = method.candidates(slm_logits)
        if method.selector.needs_llm and llm_logits is None:
            llm_logits = read_llm(fired.cpu().clone())
            fired_any_llm |= fired.cpu()
        ctx = StepContext(
            slm_logits,
            candidates,
            fired,
            llm_logits,
            generators,
            default,
            slm_stream,
            ids,
            mask,
            sequence_ids=[s.id for s in rows],
        )
        chosen = method.selector.select(ctx)
        token = torch.where(fired, chosen, default)
        for i in fired.nonzero().flatten().tolist():
            rows[i].cost.triggers += 1
            rows[i].cost.overrides += int(chosen[i] != candidates.ids[i, 0])
            rows[i].trigger_steps.append(int(steps[i]))
    for i in fired_any_llm.nonzero().flatten().tolist():
        # alone, the LLM would have read the prompt and every token before this step
        rows[i].cost.llm_forward_calls += 1
        rows[i].cost.llm_forward_tokens = len(rows[i].request.prompt) + int(steps[i])
    return token, ctx


def _pad_columns(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """Left-pad a (rows, columns) tensor to ``width`` columns with ``value``."""
    extra = width - tensor.shape[1]
    if extra <= 0:
        return tensor
    return torch.cat([torch.full((tensor.shape[0], extra), value, dtype=tensor.dtype), tensor], dim=1)


def decode_stream(
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
    max_batch_size: int | None = None,
    record_statistics: bool = False,
    on_step: Callable[[int, int], None] | None = None,
    scheduler_class: type | None = None,
) -> Iterator[tuple[int, Generation]]:
    """Decode ``prompts`` in one continuous batch; yield ``(prompt index, generation)`` as each finishes.

    At most ``max_batch_size`` sequences run at once (default: all); the next prompt joins as
    soon as one finishes. ``seeds`` gives each sequence its own random stream (default: its
    index). ``on_step(step, running_sequences)`` is called after every step (for progress displays).
    ``scheduler_class`` is the continuous batch that decodes (default :class:`Scheduler`; another
    backend passes its own with the same interface, e.g. the llama.cpp one).
    """
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    if len(seeds) != len(prompts):
        raise ValueError("need one seed per prompt")
    requests = [Request(p, max_new_tokens, temperature, top_p, s) for p, s in zip(prompts, seeds)]
    scheduler = (scheduler_class or Scheduler)(
        slm,
        method,
        llm=llm,
        vocab_size=vocab_size,
        stop_ids=stop_ids,
        pad_id=pad_id,
        max_batch_size=max_batch_size if max_batch_size is not None else max(len(prompts), 1),
        record_statistics=record_statistics,
    )
    index = {scheduler.add(r): i for i, r in enumerate(requests)}
    step = 0
    while scheduler.has_work():
        for out in scheduler.step():
            if out.generation is not None:
                yield index[out.request_id], out.generation
        if on_step is not None:
            on_step(step, len(scheduler.running))
        step += 1


def decode(
    slm: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    method: Method | None = None,
    **kwargs,
) -> list[Generation]:
    """Decode a batch of token-id prompts with ``method`` (default: SLM greedy); results in prompt order.

    Takes the keyword arguments of :func:`decode_stream`.
    """
    results: list[Generation | None] = [None] * len(prompts)
    for i, generation in decode_stream(slm, prompts, method, **kwargs):
        results[i] = generation
    return results
