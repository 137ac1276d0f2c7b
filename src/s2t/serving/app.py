"""The OpenAI-compatible FastAPI application: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/models`` and ``/health``.

The method, trigger, K and selector are the scheduler's, fixed at start-up; each request brings
its own ``max_tokens``, ``temperature``, ``top_p``, ``stop`` and ``seed``, and may ask for
log-probabilities (``logprobs``/``echo`` on completions, ``logprobs``/``top_logprobs`` on chat),
which come from the decoding model's next-token distribution (the SLM's; the LLM's when it is
served alone, as the ``llm`` baseline; the prompt's, for ``echo``, on the torch engine only: the
llama.cpp backend answers that with a 400). Every answer carries OpenAI's ``usage`` block
and our cost record (``s2t_cost``: LLM calls and tokens, triggers, trigger rate, ...) for its
sequence, as if it had been decoded alone; a stream carries them in a last chunk with no choices,
only when ``stream_options.include_usage`` asks. Parameters OpenAI defines that we do not implement
get a 400 naming them. Errors use OpenAI's shape; a client that disconnects (streaming or not)
frees its batch slot at the next step.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from transformers import PreTrainedTokenizerBase

from s2t.api import llm_alone_cost
from s2t.engine import Generation, Request, Scheduler, StepOutput, prompt_logprobs
from s2t.prompts import build_chat_prompt
from s2t.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    SamplingRequest,
    check_unicode,
)
from s2t.serving.worker import EngineWorker, Ticket

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


# Chat roles the tokenizer's template may not know, and the role they play (OpenAI maps
# ``developer`` to the system message for models that have no developer role).
ROLE_ALIASES = {"developer": "system"}


async def _gather(items: AsyncIterator) -> list:
    return [item async for item in items]


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
    # echo's prompt log-probabilities come from one forward pass of the torch SLM over the prompt
    # (prompt_logprobs); the llama.cpp backend keeps only each sequence's next-token logits.
    scores_prompts = isinstance(scheduler, Scheduler)
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
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
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

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "select-to-think"}
        # the LLM alone decodes greedily with no trigger: its greedy Method's parts would mislead
        described = {"name": method.name, "decoder": "the LLM alone"} if llm_alone else method.describe()
        return {"object": "list", "data": [{**card, "s2t_method": described}]}

    def prepare(
        body: SamplingRequest,
        prompt: list[int],
        prompt_param: str,
        max_tokens: int | None,
        logprobs: int | None = None,
    ) -> Request:
        if body.model != model_name:
            raise OpenAIError(
                404,
                f"The model `{body.model}` does not exist; this server serves `{model_name}`",
                param="model",
                code="model_not_found",
            )
        body.check_supported()
        if not prompt:
            raise OpenAIError(400, "the prompt is empty", param=prompt_param)
        room = context_length - len(prompt)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = f" and {max_tokens} tokens to generate" if max_tokens is not None else ""
            raise OpenAIError(
                400,
                f"This model's maximum context length is {context_length} tokens; the prompt has "
                f"{len(prompt)} tokens{asked}",
                param=prompt_param if room < 1 else "max_tokens",
                code="context_length_exceeded",
            )
        seed = body.seed if body.seed is not None else random.getrandbits(31)
        max_new_tokens = max_tokens if max_tokens is not None else min(default_max_tokens, room)
        # max_tokens 0 (echo only) is answered without decoding; Request needs at least one token.
        return Request(prompt, max(1, max_new_tokens), body.temperature, body.top_p, seed, logprobs)

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
        # UTF-8 bytes) keep the likelier one's entry.
        top = [
            None if pairs is None else _first_per_key((token_text(t), lp) for t, lp in pairs)
            for pairs in tops
        ]
        body = {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}
        return body, offset

    async def answer(
        ticket: Ticket, text: TextStream
    ) -> AsyncIterator[tuple[str, list[StepOutput]] | Generation]:
        """Text as it may be sent, each piece with the steps whose tokens it completes, then the
        finished :class:`Generation`; frees the slot if abandoned."""
        finished = False
        pending: list[StepOutput] = []  # steps whose text is held back (a possible stop string)
        try:
            while True:
                item = await ticket.events.get()
                if isinstance(item, Exception):
                    raise OpenAIError(500, f"decoding failed: {item}", type="server_error")
                if isinstance(item, Generation):
                    finished = True
                    rest = text.finish()
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
                worker.cancel(ticket)

    def summary(prompt: list[int], text: TextStream, generation: Generation) -> tuple[str, dict]:
        finish = "stop" if text.stopped else generation.finish_reason
        completion = len(generation.token_ids)
        usage = {
            "prompt_tokens": len(prompt),
            "completion_tokens": completion,
            "total_tokens": len(prompt) + completion,
        }
        cost = llm_alone_cost(generation.cost) if llm_alone else generation.cost
        return finish, {"usage": usage, "s2t_cost": {**cost.to_dict(), "method": method.name}}

    async def collect(ticket: Ticket, text: TextStream, connection: HTTPRequest) -> list | None:
        """The whole answer, or None if the client went away meanwhile (its batch slot is freed)."""
        task = asyncio.ensure_future(_gather(answer(ticket, text)))
        while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_S))[0]:
            if await connection.is_disconnected():
                task.cancel()  # closes answer(), which cancels the ticket
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                return None
        return task.result()

    async def respond(
        body: SamplingRequest, prompt: list[int], request: Request, chat: bool, connection: HTTPRequest
    ):
        echo = not chat and body.echo
        want_logprobs = request.logprobs is not None
        echoed_text, echoed = "", None  # completions' echo: the prompt's text and logprobs object
        offset = 0  # completions' text_offset of the next token
        if echo:
            echoed_text = body.prompt
            if want_logprobs:
                scored = await worker.call(
                    lambda: prompt_logprobs(scheduler.slm, prompt, scheduler.vocab_size, request.logprobs)
                )
                echoed, _ = completion_logprobs(
                    prompt, [None] + [lp for lp, _ in scored], [None] + [top for _, top in scored], 0
                )
            offset = len(echoed_text)
        prefix = "chatcmpl" if chat else "cmpl"
        head = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

        def logprobs_of(entries: list[StepOutput]) -> dict | None:
            nonlocal offset
            if not want_logprobs:
                return None
            if chat:
                return chat_logprobs(entries)
            part, offset = completion_logprobs(
                [e.token for e in entries],
                [e.logprob for e in entries],
                [e.top_logprobs for e in entries],
                offset,
            )
            return part

        def merge(first: dict | None, second: dict | None) -> dict | None:
            if first is None or second is None:
                return first or second
            return {key: first[key] + second[key] for key in first}

        if not body.stream and echo and body.max_tokens == 0:  # score the prompt, decode nothing
            usage = {"prompt_tokens": len(prompt), "completion_tokens": 0, "total_tokens": len(prompt)}
            choice = {"index": 0, "text": echoed_text, "logprobs": echoed, "finish_reason": "length"}
            return {
                **head,
                "object": "text_completion",
                "choices": [choice],
                "usage": usage,
                "s2t_cost": {"method": method.name, "generated_tokens": 0},
            }

        stream = TextStream(tokenizer, body.stop_strings())
        ticket = await worker.submit(request, stream)
        if not body.stream:
            pieces = await collect(ticket, stream, connection)
            if pieces is None:  # nobody is left to read an answer
                return JSONResponse(OpenAIError(400, "the client disconnected").body(), status_code=400)
            finish, extra = summary(prompt, stream, pieces[-1])
            content = "".join(delta for delta, _ in pieces[:-1])
            logprobs = logprobs_of([e for _, entries in pieces[:-1] for e in entries])
            if chat:
                message = {"role": "assistant", "content": content}
                choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}
            else:
                text, logprobs = echoed_text + content, merge(echoed, logprobs)
                choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
            return {
                **head,
                "object": "chat.completion" if chat else "text_completion",
                "choices": [choice],
                **extra,
            }

        include_usage = body.include_usage()
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None = None, first: bool = False, logprobs=None) -> str:
            if chat:
                content = (
                    {"role": "assistant", "content": ""}
                    if first
                    else {}
                    if delta is None
                    else {"content": delta}
                )
                choice = {"index": 0, "delta": content, "logprobs": logprobs, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": logprobs, "finish_reason": finish}
            # With include_usage every chunk has a usage field, null until the last one (OpenAI's spec).
            usage = {"usage": None} if include_usage else {}
            return f"data: {json.dumps({**head, 'object': kind, 'choices': [choice], **usage})}\n\n"

        async def events() -> AsyncIterator[str]:
            if chat:
                yield chunk(None, first=True)
            elif echo:
                yield chunk(echoed_text, logprobs=echoed)
            try:
                async for item in answer(ticket, stream):
                    if isinstance(item, Generation):
                        finish, extra = summary(prompt, stream, item)
                        yield chunk(None, finish)
                        if include_usage:
                            yield f"data: {json.dumps({**head, 'object': kind, 'choices': [], **extra})}\n\n"
                    else:
                        delta, entries = item
                        yield chunk(delta, logprobs=logprobs_of(entries))
            except OpenAIError as error:
                yield f"data: {json.dumps(error.body())}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, connection: HTTPRequest):
        prompt = tokenizer(check_unicode(body.prompt, "prompt"), add_special_tokens=False)["input_ids"]
        request = prepare(body, prompt, "prompt", body.max_tokens, body.logprobs)
        if body.echo and body.logprobs is not None and not scores_prompts:
            raise OpenAIError(
                400,
                "echo with logprobs (the prompt's log-probabilities) is computed only by the torch "
                "engine; serve with --backend torch for it (logprobs without echo work on every backend)",
                param="echo",
            )
        return await respond(body, prompt, request, False, connection)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, connection: HTTPRequest):
        messages = [
            {"role": ROLE_ALIASES.get(m.role, m.role), "content": check_unicode(m.text(), "messages")}
            for m in body.messages
        ]
        prompt = build_chat_prompt(tokenizer, messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        request = prepare(body, prompt, "messages", max_tokens, logprobs)
        return await respond(body, prompt, request, True, connection)

    return app
