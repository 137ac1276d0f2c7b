"""The OpenAI-compatible FastAPI application: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/models`` and ``/health``, with vLLM's ``/tokenize``, ``/detokenize`` and ``/tokenizer_info``.

The method, trigger, K and selector are the scheduler's, fixed at start-up; each request brings
its own ``max_tokens``, ``temperature``, ``top_p``, ``stop`` and ``seed``, and may ask for
log-probabilities (``logprobs``/``echo`` on completions, ``logprobs``/``top_logprobs`` on chat),
which come from the decoding model's next-token distribution (the SLM's; the LLM's when it is
served alone, as the ``llm`` baseline; for ``echo``, the prompt's, from one pass over it). A
completions ``prompt`` may be a list of texts or of token-id lists, as OpenAI's API takes
(lm-evaluation-harness' ``local-completions`` sends lists); each prompt gets ``n`` choices (samples,
their seeds ``seed``, ``seed + 1``, ...), all decoded in the same continuous batch. Every answer
carries OpenAI's ``usage`` block and our cost record (``s2t_cost``: LLM calls and tokens, triggers,
trigger rate, ...), summed over its choices, each as if decoded alone; a stream carries them in a
last chunk with no choices, only when ``stream_options.include_usage`` asks. Parameters OpenAI
defines that we do not implement get a 400 naming them. Errors use OpenAI's shape; a client that
disconnects (streaming or not) frees its batch slot at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from transformers import PreTrainedTokenizerBase

from s2t.api import llm_alone_cost
from s2t.engine import CostRecord, Generation, Request, Scheduler, StepOutput
from s2t.prompts import build_chat_prompt
from s2t.serving.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    OpenAIError,
    SamplingRequest,
    TokenizeRequest,
    check_unicode,
)
from s2t.serving.worker import EngineWorker, Ticket

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


# Chat roles the tokenizer's template may not know, and the role they play (OpenAI maps
# ``developer`` to the system message for models that have no developer role).
ROLE_ALIASES = {"developer": "system"}


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Request messages as the chat template takes them (``developer`` as ``system``); a 400 for text
    no tokenizer can encode."""
    return [
        {"role": ROLE_ALIASES.get(m.role, m.role), "content": check_unicode(m.text(), "messages")}
        for m in messages
    ]


def _union_member(part) -> bool:
    """Whether a pydantic error location's part names a union's member type, not a field."""
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "list", "dict"})


async def _gather(items: AsyncIterator) -> list:
    return [item async for item in items]


async def _all_or_none(coroutines) -> list | None:
    """The coroutines' results, run concurrently; None if any gives None. If one raises, the others
    are cancelled (which frees their batch slots) and the error propagates."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        results = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return None if any(r is None for r in results) else results


async def _interleave(iterators: list[AsyncIterator]) -> AsyncIterator:
    """The items of several async iterators in the order they come; the first error propagates, and
    closing this closes them all (each frees its batch slot)."""
    queue: asyncio.Queue = asyncio.Queue()
    finished = object()

    async def pump(iterator: AsyncIterator) -> None:
        try:
            async for item in iterator:
                await queue.put(item)
        except Exception as error:  # handed to the reader, who raises it
            await queue.put(error)
        finally:
            queue.put_nowait(finished)

    tasks = [asyncio.ensure_future(pump(iterator)) for iterator in iterators]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is finished:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Usage:
    """What one choice used: its prompt and completion tokens, and its decoding cost."""

    prompt_tokens: int
    completion_tokens: int
    cost: CostRecord


@dataclass
class Choice:
    """One prompt being answered: its token ids, the text ``echo`` returns for it, its decoding
    request and detokenizer; the echoed log-probabilities, the next token's ``text_offset`` and the
    engine's ticket are filled in as it runs."""

    index: int
    prompt: list[int]
    prompt_text: str
    request: Request
    text: TextStream
    sample: int = 0  # which of the prompt's n samples
    echoed_text: str = ""
    echoed: dict | None = None
    offset: int = 0
    ticket: Ticket | None = None
    scoring: CostRecord | None = None  # echo's pass over the prompt (its log-probabilities)


def _byte_level_decoder(tokenizer: PreTrainedTokenizerBase) -> dict[str, int] | None:
    """GPT-2's byte-to-character table, inverted, when the tokenizer is byte-level BPE (Qwen's is)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or "ByteLevel" not in str(backend.decoder):
        return None
    # GPT-2's bytes_to_unicode: printable bytes stand for themselves, the rest map to 256 + n.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte], extra = chr(256 + extra), extra + 1
    return {char: byte for byte, char in chars.items()}


def _first_per_key(pairs) -> dict:
    result: dict = {}
    for key, value in pairs:
        result.setdefault(key, value)
    return result


class TextStream:
    """Detokenizes a growing answer; holds back what might be the start of a stop string (or of an
    unfinished UTF-8 character) and ends the text before the first stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.tokens: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token: int) -> str:
        """Take a token; return the text that may be sent now."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = text[: min(hits)], True
            return self._flush(len(self.text))
        self.text = text
        safe = len(text) - self.holdback - int(text.endswith("\ufffd"))
        return self._flush(safe)

    def finish(self) -> str:
        return self._flush(len(self.text))

    def _flush(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : upto], upto
        return delta


def create_app(
    scheduler: Scheduler,
    tokenizer: PreTrainedTokenizerBase,
    *,
    model_name: str,
    context_length: int,
    default_max_tokens: int = 512,
    llm_alone: bool = False,
) -> FastAPI:
    """The application serving ``scheduler``'s method under the name ``model_name``.

    ``context_length`` bounds prompt + ``max_tokens``; ``default_max_tokens`` applies when a request
    gives none (cut to what the context leaves). ``llm_alone``: the scheduler decodes greedily with
    the LLM (the ``llm`` baseline), so its forward passes are reported as LLM cost.
    """
    worker = EngineWorker(scheduler)
    method = scheduler.method
    byte_decoder = getattr(tokenizer, "byte_decoder", None) or _byte_level_decoder(tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="select-to-think", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(OpenAIError)
    async def openai_error(request: HTTPRequest, error: OpenAIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: HTTPRequest, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return await openai_error(request, OpenAIError(400, "the request body is not valid JSON"))
        # pydantic names the member of a union it tried (``prompt.str``): not a parameter of the request
        loc = [str(p) for p in first.get("loc", ())[1:] if not _union_member(p)]
        param = ".".join(loc) or None
        reason = str(first.get("msg")).removeprefix("Value error, ")
        if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
            reason = "the request has no JSON body"
        message = f"{param}: {reason}" if param else reason
        return await openai_error(request, OpenAIError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: HTTPRequest, error: HTTPException) -> JSONResponse:
        return await openai_error(request, OpenAIError(error.status_code, str(error.detail)))

    @app.get("/health")
    async def health():
        status = {"status": "ok", "model": model_name, "method": method.name, **worker.load()}
        if not worker.alive():  # the engine thread is gone: no request would be answered
            return JSONResponse(status | {"status": "error", "error": "the decoding thread has stopped"}, 503)
        return status

    def model_card() -> dict:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "select-to-think"}
        # the LLM alone decodes greedily with no trigger: its greedy Method's parts would mislead
        described = {"name": method.name, "decoder": "the LLM alone"} if llm_alone else method.describe()
        return {**card, "s2t_method": described}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        """One model's card (OpenAI's ``client.models.retrieve``); a 404 for another name."""
        check_model(model_id)
        return model_card()

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise OpenAIError(
                404,
                f"The model `{name}` does not exist; this server serves `{model_name}`",
                param="model",
                code="model_not_found",
            )

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        """The tokenizer's special tokens and chat template (vLLM's endpoint, which
        lm-evaluation-harness' ``local-completions`` uses as its tokenizer when a server has it)."""
        return {
            "tokenizer_class": type(tokenizer).__name__,
            "eos_token": tokenizer.eos_token,
            "bos_token": tokenizer.bos_token,
            "pad_token": tokenizer.pad_token,
            "chat_template": getattr(tokenizer, "chat_template", None),
            "model_max_length": context_length,
        }

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        """Token ids of a text or of chat messages (vLLM's endpoint): ``{"tokens", "count",
        "max_model_len"}``."""
        check_model(body.model)
        if body.messages is not None:
            messages = chat_messages(body.messages)
            try:
                tokens = build_chat_prompt(
                    tokenizer,
                    messages,
                    add_generation_prompt=body.add_generation_prompt,
                    continue_final_message=body.continue_final_message,
                )
            except ValueError as e:
                raise OpenAIError(400, str(e), param="messages") from None
        else:
            text = check_unicode(body.prompt, "prompt")
            tokens = tokenizer(text, add_special_tokens=body.add_special_tokens)["input_ids"]
        answer = {"tokens": tokens, "count": len(tokens), "max_model_len": context_length}
        if body.return_token_strs:
            answer["token_strs"] = tokenizer.convert_ids_to_tokens(tokens)
        return answer

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        """The text of token ids (vLLM's endpoint): ``{"prompt"}``."""
        check_model(body.model)
        return {"prompt": tokenizer.decode(checked_tokens(body.tokens, "tokens"))}

    def checked_tokens(tokens: list[int], param: str, label: str | None = None) -> list[int]:
        if bad := [t for t in tokens if not 0 <= t < scheduler.vocab_size]:
            where = f" in {label}" if label else ""
            raise OpenAIError(
                400,
                f"token id {bad[0]}{where} is outside the vocabulary (0 to {scheduler.vocab_size - 1})",
                param=param,
            )
        return list(tokens)

    def prepare(
        body: SamplingRequest,
        prompt: list[int],
        prompt_param: str,
        max_tokens: int | None,
        logprobs: int | None = None,
        label: str = "the prompt",
        sample: int = 0,
    ) -> Request:
        """The engine's request for one prompt's ``sample``-th choice (``label`` names the prompt in
        errors: "prompt 2 of 5" in a list); a 400 for an empty prompt or one that leaves no room in
        the context (``max_tokens`` 0, echo's scoring only, needs none). The request as a whole is
        checked first, once (:func:`check_request`)."""
        if not prompt:
            raise OpenAIError(400, f"{label} is empty", param=prompt_param)
        room = context_length - len(prompt)
        least = 0 if max_tokens == 0 else 1  # a token to generate, unless only scoring the prompt
        if room < least or (max_tokens is not None and max_tokens > room):
            asked = (
                f" and asks for {max_tokens} token{'s' * (max_tokens > 1)} to generate" if max_tokens else ""
            )
            raise OpenAIError(
                400,
                f"This model's maximum context length is {context_length} tokens; {label} has "
                f"{len(prompt)} tokens{asked}",
                param=prompt_param if room < least else "max_tokens",
                code="context_length_exceeded",
            )
        # the n samples of a prompt: seed, seed + 1, ... (check_supported keeps them below 2**63)
        seed = random.getrandbits(31) if body.seed is None else body.seed + sample
        max_new_tokens = max_tokens if max_tokens is not None else min(default_max_tokens, room)
        # max_tokens 0 (echo only) is answered without decoding; Request needs at least one token.
        return Request(prompt, max(1, max_new_tokens), body.temperature, body.top_p, seed, logprobs)

    def check_request(body: SamplingRequest) -> None:
        """A 4xx for another model or a parameter this server does not implement (once per request,
        before any prompt is read)."""
        check_model(body.model)
        body.check_supported()

    def token_bytes(token: int) -> bytes:
        """The bytes a token stands for (byte-level BPE pieces need not be whole UTF-8 characters)."""
        piece = tokenizer.convert_ids_to_tokens(token)
        if isinstance(piece, str) and byte_decoder and all(char in byte_decoder for char in piece):
            return bytes(byte_decoder[char] for char in piece)
        return tokenizer.decode([token]).encode("utf-8")

    def token_text(token: int) -> str:
        return token_bytes(token).decode("utf-8", errors="replace")

    def chat_logprobs(entries: list[StepOutput]) -> dict:
        """OpenAI's chat ``logprobs`` object for these tokens."""

        def item(token: int, logprob: float) -> dict:
            return {"token": token_text(token), "logprob": logprob, "bytes": list(token_bytes(token))}

        content = [
            {**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top_logprobs or []]}
            for e in entries
        ]
        return {"content": content, "refusal": None}

    def completion_logprobs(tokens: list[int], logprobs: list, tops: list, offset: int) -> tuple[dict, int]:
        """OpenAI's completions ``logprobs`` object (``tokens``, ``token_logprobs``, ``top_logprobs``,
        ``text_offset``) for these tokens, whose text starts at ``offset``; and the offset after them."""
        texts, offsets = [token_text(t) for t in tokens], []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        # A dict keyed by text, as OpenAI's legacy shape has it: tokens that read alike (e.g. partial
        # UTF-8 bytes) keep the likelier one's entry. The chosen token is always in it, after the top
        # ``logprobs`` (so up to logprobs + 1 entries, and one with ``logprobs: 0``), as OpenAI does.
        top = [
            None
            if pairs is None
            else _first_per_key((token_text(t), lp) for t, lp in [*pairs, (token, chosen)])
            for token, chosen, pairs in zip(tokens, logprobs, tops)
        ]
        body = {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}
        return body, offset

    async def answer(choice: Choice) -> AsyncIterator[tuple[str, list[StepOutput]] | Generation]:
        """Text as it may be sent, each piece with the steps whose tokens it completes, then the
        finished :class:`Generation`; frees the slot if abandoned."""
        finished = False
        pending: list[StepOutput] = []  # steps whose text is held back (a possible stop string)
        try:
            while True:
                item = await choice.ticket.events.get()
                if isinstance(item, Exception):
                    raise OpenAIError(500, f"decoding failed: {item}", type="server_error")
                if isinstance(item, Generation):
                    finished = True
                    rest = choice.text.finish()
                    if rest or pending:
                        yield rest, pending
                    yield item
                    return
                step, delta = item  # the engine thread detokenized it (and ended it at a stop string)
                pending.append(step)
                if delta:
                    yield delta, pending
                    pending = []
        finally:
            if not finished:  # the client went away (or an error): free the batch slot
                worker.cancel(choice.ticket)

    def summary(choice: Choice, generation: Generation | None) -> tuple[str, Usage]:
        """The choice's finish reason, and its usage (prompt and completion tokens) and cost: the
        decoding's, and echo's pass over the prompt if it asked for the prompt's log-probabilities."""
        cost = CostRecord.total([c for c in (choice.scoring, generation and generation.cost) if c])
        cost = llm_alone_cost(cost) if llm_alone else cost
        prompt = len(choice.prompt) if choice.sample == 0 else 0  # a prompt's tokens count once (totals)
        if generation is None:  # echo with max_tokens 0: the prompt scored, nothing decoded
            return "length", Usage(prompt, 0, cost)
        finish = "stop" if choice.text.stopped else generation.finish_reason
        return finish, Usage(prompt, len(generation.token_ids), cost)

    def totals(usages: list[Usage]) -> dict:
        """OpenAI's ``usage`` block and our ``s2t_cost``, summed over the request's choices (as
        OpenAI counts them, a prompt's tokens once however many samples ``n`` asks of it; the cost
        counts each sample's own pass over the prompt)."""
        prompt, completion = sum(u.prompt_tokens for u in usages), sum(u.completion_tokens for u in usages)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        cost = CostRecord.total([u.cost for u in usages])
        return {"usage": usage, "s2t_cost": {**cost.to_dict(), "method": method.name}}

    async def start(choice: Choice, echo: bool, decodes: bool, first: Choice | None = None) -> None:
        """Score the prompt for echo's log-probabilities, then submit the choice's decoding. ``first``:
        the prompt's first sample, already started, whose scoring the others reuse (and count once)."""
        if echo:
            choice.echoed_text, choice.offset = choice.prompt_text, len(choice.prompt_text)
            if choice.request.logprobs is not None and first is not None:
                choice.echoed = first.echoed
            elif choice.request.logprobs is not None:
                started = time.perf_counter()
                # one pass of the decoding model over the prompt, on the engine thread between steps
                scored = await worker.call(
                    lambda: scheduler.score_prompt(choice.prompt, choice.request.logprobs)
                )
                choice.scoring = CostRecord(
                    slm_forward_calls=1,
                    slm_forward_tokens=len(choice.prompt),
                    wall_time_s=time.perf_counter() - started,
                )
                choice.echoed, _ = completion_logprobs(
                    choice.prompt, [None] + [lp for lp, _ in scored], [None] + [top for _, top in scored], 0
                )
        if decodes:
            choice.ticket = await worker.submit(choice.request, choice.text)

    def logprobs_of(choice: Choice, entries: list[StepOutput], chat: bool) -> dict | None:
        if choice.request.logprobs is None:
            return None
        if chat:
            return chat_logprobs(entries)
        part, choice.offset = completion_logprobs(
            [e.token for e in entries],
            [e.logprob for e in entries],
            [e.top_logprobs for e in entries],
            choice.offset,
        )
        return part

    def merge(first: dict | None, second: dict | None) -> dict | None:
        if first is None or second is None:
            return first or second
        return {key: first[key] + second[key] for key in first}

    async def complete(choice: Choice, chat: bool, connection: HTTPRequest) -> tuple[dict, Usage] | None:
        """One choice's whole answer and usage, or None if the client went away meanwhile (its batch
        slot is freed)."""
        generation, content, entries = None, "", []
        if choice.ticket is not None:
            task = asyncio.ensure_future(_gather(answer(choice)))
            while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_S))[0]:
                if await connection.is_disconnected():
                    task.cancel()  # closes answer(), which cancels the ticket
                    try:
                        await task
                    except asyncio.CancelledError:
                        pass
                    return None
            *pieces, generation = task.result()
            content = "".join(delta for delta, _ in pieces)
            entries = [e for _, steps in pieces for e in steps]
        finish, usage = summary(choice, generation)
        logprobs = logprobs_of(choice, entries, chat) if generation is not None else None
        if chat:
            message = {"role": "assistant", "content": content}
            body = {"index": choice.index, "message": message, "logprobs": logprobs, "finish_reason": finish}
        else:
            text, logprobs = choice.echoed_text + content, merge(choice.echoed, logprobs)
            body = {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return body, usage

    async def chunks(choice: Choice, chat: bool) -> AsyncIterator[dict | Usage]:
        """One choice's streamed ``choices`` entries as they come, then its :class:`Usage`."""

        def entry(delta: str | None, finish: str | None = None, first: bool = False, logprobs=None) -> dict:
            if chat:
                content = (
                    {"role": "assistant", "content": ""}
                    if first
                    else {}
                    if delta is None
                    else {"content": delta}
                )
                return {
                    "index": choice.index,
                    "delta": content,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }
            return {"index": choice.index, "text": delta or "", "logprobs": logprobs, "finish_reason": finish}

        if chat:
            yield entry(None, first=True)
        elif choice.echoed_text:
            yield entry(choice.echoed_text, logprobs=choice.echoed)
        async for item in answer(choice):
            if isinstance(item, Generation):
                finish, usage = summary(choice, item)
                yield entry(None, finish)
                yield usage
            else:
                delta, steps = item
                yield entry(delta, logprobs=logprobs_of(choice, steps, chat))

    async def respond(
        body: SamplingRequest,
        prompts: list[tuple[list[int], str, Request]],
        chat: bool,
        connection: HTTPRequest,
    ):
        """Answer ``prompts`` (token ids, the text echo returns, and the decoding request of each; a
        prompt appears ``n`` times in a row), one choice each, decoded in the same continuous batch."""
        if ignored := body.ignored_fields():
            logger.warning("request fields ignored (unknown to this server): %s", ", ".join(ignored))
        echo = not chat and body.echo
        decodes = body.stream or not (echo and body.max_tokens == 0)  # max_tokens 0: score the prompt only
        stops = body.stop_strings()
        choices = [
            Choice(index, prompt, text, request, TextStream(tokenizer, stops), sample=index % body.n)
            for index, (prompt, text, request) in enumerate(prompts)
        ]
        for choice in choices:  # every decoding is submitted before any is awaited: they share a batch
            await start(
                choice, echo, decodes, choices[choice.index - choice.sample] if choice.sample else None
            )
        prefix = "chatcmpl" if chat else "cmpl"
        head = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

        if not body.stream:
            answers = await _all_or_none(complete(choice, chat, connection) for choice in choices)
            if answers is None:  # nobody is left to read an answer
                return JSONResponse(OpenAIError(400, "the client disconnected").body(), status_code=400)
            return {
                **head,
                "object": "chat.completion" if chat else "text_completion",
                "choices": [choice for choice, _ in answers],
                **totals([usage for _, usage in answers]),
            }

        include_usage = body.include_usage()
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[dict], **extra) -> str:
            return f"data: {json.dumps({**head, 'object': kind, 'choices': choices, **extra})}\n\n"

        async def events() -> AsyncIterator[str]:
            usages = []
            # With include_usage every chunk has a usage field, null until the last one (OpenAI's spec).
            empty = {"usage": None} if include_usage else {}
            try:
                async with aclosing(_interleave([chunks(choice, chat) for choice in choices])) as items:
                    async for item in items:
                        if isinstance(item, Usage):
                            usages.append(item)
                        else:
                            yield event([item], **empty)
                if include_usage:
                    yield event([], **totals(usages))
            except OpenAIError as error:
                yield f"data: {json.dumps(error.body())}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def tokens_of(prompt: str | list[int], param: str, label: str) -> tuple[list[int], str]:
        """A prompt's token ids and its text: a text is tokenized (no special tokens added); token ids
        must be the tokenizer's (errors name the prompt by ``label``)."""
        if isinstance(prompt, str):
            text = check_unicode(prompt, param, label)
            return tokenizer(text, add_special_tokens=False)["input_ids"], prompt
        tokens = checked_tokens(prompt, param, label)
        return tokens, tokenizer.decode(tokens)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, connection: HTTPRequest):
        check_request(body)
        prompts, given = [], body.prompts()
        for number, prompt in enumerate(given, 1):
            label = f"prompt {number} of {len(given)}" if len(given) > 1 else "the prompt"
            tokens, text = tokens_of(prompt, "prompt", label)
            for sample in range(body.n):
                request = prepare(body, tokens, "prompt", body.max_tokens, body.logprobs, label, sample)
                prompts.append((tokens, text, request))
        return await respond(body, prompts, False, connection)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, connection: HTTPRequest):
        check_request(body)
        messages = chat_messages(body.messages)
        prompt = build_chat_prompt(tokenizer, messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        requests = [
            prepare(body, prompt, "messages", max_tokens, logprobs, sample=sample) for sample in range(body.n)
        ]
        return await respond(body, [(prompt, "", request) for request in requests], True, connection)

    return app
