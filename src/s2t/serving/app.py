"""The OpenAI-compatible FastAPI application: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/models`` and ``/health``.

The method, trigger, K and selector are the scheduler's, fixed at start-up; each request brings
its own ``max_tokens``, ``temperature``, ``top_p``, ``stop`` and ``seed``. Every answer carries
OpenAI's ``usage`` block and our cost record (``s2t_cost``: LLM calls and tokens, triggers,
trigger rate, ...) for its sequence, as if it had been decoded alone. Errors use OpenAI's shape;
a client that disconnects (streaming or not) frees its batch slot at the next step.
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

from s2t.engine import Generation, Request, Scheduler
from s2t.prompts import build_chat_prompt
from s2t.serving.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, SamplingRequest
from s2t.serving.worker import EngineWorker, Ticket

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


async def _gather(items: AsyncIterator) -> list:
    return [item async for item in items]


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
) -> FastAPI:
    """The application serving ``scheduler``'s method under the name ``model_name``.

    ``context_length`` bounds prompt + ``max_tokens``; ``default_max_tokens`` applies when a request
    gives none (cut to what the context leaves).
    """
    worker = EngineWorker(scheduler)
    method = scheduler.method

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
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "method": method.name, **worker.load()}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "select-to-think"}
        return {"object": "list", "data": [{**card, "s2t_method": method.describe()}]}

    def prepare(
        body: SamplingRequest, prompt: list[int], prompt_param: str, max_tokens: int | None
    ) -> Request:
        if body.model != model_name:
            raise OpenAIError(
                404,
                f"The model `{body.model}` does not exist; this server serves `{model_name}`",
                param="model",
                code="model_not_found",
            )
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
        return Request(prompt, max_new_tokens, body.temperature, body.top_p, seed)

    async def answer(ticket: Ticket, text: TextStream) -> AsyncIterator[str | Generation]:
        """Text as it may be sent, then the finished :class:`Generation`; frees the slot if abandoned."""
        finished = False
        try:
            while True:
                item = await ticket.events.get()
                if isinstance(item, Exception):
                    raise OpenAIError(500, f"decoding failed: {item}", type="server_error")
                if isinstance(item, Generation):
                    finished = True
                    rest = text.finish()
                    if rest:
                        yield rest
                    yield item
                    return
                if text.stopped:
                    continue  # tokens decoded after a stop string, before the cancel took effect
                delta = text.add(item)
                if text.stopped:
                    worker.cancel(ticket)
                if delta:
                    yield delta
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
        return finish, {"usage": usage, "s2t_cost": {**generation.cost.to_dict(), "method": method.name}}

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
        stream = TextStream(tokenizer, body.stop_strings())
        ticket = await worker.submit(request)
        prefix = "chatcmpl" if chat else "cmpl"
        head = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if not body.stream:
            pieces = await collect(ticket, stream, connection)
            if pieces is None:  # nobody is left to read an answer
                return JSONResponse(OpenAIError(400, "the client disconnected").body(), status_code=400)
            finish, extra = summary(prompt, stream, pieces[-1])
            content = "".join(pieces[:-1])
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
                if chat
                else {"index": 0, "text": content, "logprobs": None, "finish_reason": finish}
            )
            return {
                **head,
                "object": "chat.completion" if chat else "text_completion",
                "choices": [choice],
                **extra,
            }

        def chunk(delta: str | None, finish: str | None = None, first: bool = False, **extra) -> str:
            if chat:
                content = (
                    {"role": "assistant", "content": ""}
                    if first
                    else {}
                    if delta is None
                    else {"content": delta}
                )
                choice = {"index": 0, "delta": content, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            kind = "chat.completion.chunk" if chat else "text_completion"
            return f"data: {json.dumps({**head, 'object': kind, 'choices': [choice], **extra})}\n\n"

        async def events() -> AsyncIterator[str]:
            if chat:
                yield chunk(None, first=True)
            try:
                async for item in answer(ticket, stream):
                    if isinstance(item, Generation):
                        finish, extra = summary(prompt, stream, item)
                        yield chunk(None, finish, **extra)
                    else:
                        yield chunk(item)
            except OpenAIError as error:
                yield f"data: {json.dumps(error.body())}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, connection: HTTPRequest):
        prompt = tokenizer(body.prompt, add_special_tokens=False)["input_ids"]
        return await respond(
            body, prompt, prepare(body, prompt, "prompt", body.max_tokens), False, connection
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, connection: HTTPRequest):
        prompt = build_chat_prompt(tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await respond(body, prompt, prepare(body, prompt, "messages", max_tokens), True, connection)

    return app
