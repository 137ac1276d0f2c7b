"""OpenAI's request and error shapes, as pydantic models (unknown fields are accepted and ignored)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def check_unicode(text: str, param: str, label: str | None = None) -> str:
    """``text`` if it is valid Unicode; a 400 naming ``param`` (and ``label``, e.g. "prompt 2 of
    5", in its message) if it holds a lone surrogate (JSON's ``"\\ud800"``), which no tokenizer can
    encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise OpenAIError(
            400,
            f"{label or param} is not valid Unicode (a lone surrogate at character {error.start})",
            param=param,
        ) from None
    return text


MAX_STOP_STRINGS = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class SamplingRequest(BaseModel):
    """What both endpoints share: the model name and per-request decoding settings.

    Parameters OpenAI defines that change the answer but that we do not implement are declared
    here so that :meth:`check_supported` can refuse them by name (a silent 200 would mislead);
    metadata such as ``user``, and any field this server does not know, is accepted and ignored,
    as vLLM does; :meth:`ignored_fields` names them, so that a misspelt parameter is logged.
    """

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        """An optional parameter sent as ``null`` takes its default (OpenAI's clients may send them)."""
        if isinstance(data, dict):
            optional = {name for name, field in cls.model_fields.items() if not field.is_required()}
            data = {key: value for key, value in data.items() if value is not None or key not in optional}
        return data

    model: str
    max_tokens: StrictInt | None = Field(None, ge=0)  # 0 only with ``echo`` (completions): score the prompt
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # 0: the method's own (greedy) decoding
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: StrictBool = False
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**63 - 1)  # a 64-bit seed, as torch takes
    n: StrictInt = Field(1, ge=1, le=128)  # choices per prompt (samples; their seeds follow seed)
    stream_options: StreamOptions | None = None
    user: str | None = None  # metadata, accepted and ignored (as OpenAI's other metadata below)
    # Refused unless at their no-op values (see check_supported).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def check_supported(self) -> None:
        """Raise a 400 naming the first parameter asked for that this server does not implement."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise OpenAIError(400, f"{name} is not supported by this server", param=name)
        if self.logit_bias:
            raise OpenAIError(400, "logit_bias is not supported by this server", param="logit_bias")
        if self.seed is not None and self.seed + self.n - 1 > 2**63 - 1:
            raise OpenAIError(
                400,
                f"the {self.n} samples take seeds seed to seed + {self.n - 1}, which must stay below 2**63",
                param="seed",
            )
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(
                400, "stream_options is only allowed when stream is true", param="stream_options"
            )

    def ignored_fields(self) -> list[str]:
        """The request's fields that this server does not know (a misspelt ``max_token``, a
        vendor's extension), sorted; they change nothing."""
        return sorted(self.model_extra or ())

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        # OpenAI takes 4; lm-evaluation-harness tasks give more (their ``until`` and the EOS string)
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise OpenAIError(400, f"stop takes up to {MAX_STOP_STRINGS} non-empty strings", param="stop")
        return stops


class CompletionRequest(SamplingRequest):
    """A completions request. ``prompt`` is one text, a list of texts, one token-id list or a list
    of them, as OpenAI's API takes; each prompt gets ``n`` choices, prompt ``i``'s at indices
    ``i * n`` to ``i * n + n - 1``."""

    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(
        None, ge=0, le=20
    )  # log-probabilities of the top-N tokens per position
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value):
        def token_ids(v) -> bool:
            return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

        if (
            isinstance(value, str)
            or token_ids(value)
            or (isinstance(value, list) and all(isinstance(v, str) for v in value))
            or (isinstance(value, list) and all(token_ids(v) for v in value))
        ):
            return value
        raise ValueError("takes a string, a list of strings, a list of token ids or a list of token-id lists")

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs_count(cls, value):
        if value is False:  # no log-probabilities, as some clients say it
            return None
        if value is True:
            raise ValueError("takes the number of top log-probabilities per token (0 to 20), not true")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a text or a list of token ids; a 400 if there is none."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise OpenAIError(400, "the prompt is empty (an empty list)", param="prompt")
        return list(prompt)

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of not in (None, 1):
            raise OpenAIError(
                400,
                "best_of is not supported by this server (n samples are returned, none chosen)",
                param="best_of",
            )
        if self.suffix:
            raise OpenAIError(400, "suffix is not supported by this server", param="suffix")
        if self.max_tokens == 0 and not self.echo:
            raise OpenAIError(400, "max_tokens: 0 is only allowed with echo", param="max_tokens")
        if self.max_tokens == 0 and self.stream:
            raise OpenAIError(400, "max_tokens: 0 (scoring the prompt) cannot be streamed", param="stream")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None  # null only for an assistant's message (as OpenAI)

    @model_validator(mode="after")
    def _content_given(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs its content (a string or a list of text parts)")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)  # no prompt scoring (max_tokens 0) in chat
    max_completion_tokens: StrictInt | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    response_format: dict | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        for name in ("tools", "functions", "function_call"):
            if getattr(self, name):
                raise OpenAIError(
                    400, f"{name} is not supported by this server (no tool calling)", param=name
                )
        if self.tool_choice not in (None, "none"):
            raise OpenAIError(
                400, "tool_choice is not supported by this server (no tool calling)", param="tool_choice"
            )
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise OpenAIError(
                400,
                "response_format other than text is not supported by this server",
                param="response_format",
            )


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize`` request: a ``prompt`` text, or chat ``messages`` rendered with the model's
    template (lm-evaluation-harness' remote tokenizer uses it)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: StrictBool = True  # for a prompt: the tokenizer's own (none for Qwen's)
    add_generation_prompt: StrictBool = True  # for messages: end where the assistant's answer begins
    continue_final_message: StrictBool = False  # for messages: end inside the last (assistant's) one
    return_token_strs: StrictBool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    """vLLM's ``/detokenize`` request: token ids to turn back into text."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[StrictInt]
