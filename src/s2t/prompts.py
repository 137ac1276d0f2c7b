"""Prompt construction: the chat template and the step-by-step system prompt of the paper."""

from __future__ import annotations

import logging

from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def build_prompt(
    tokenizer: PreTrainedTokenizerBase, question: str, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
) -> list[int]:
    """Token ids of a chat prompt asking ``question``, ending where the assistant's answer begins."""
    messages = [{"role": "user", "content": question}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return build_chat_prompt(tokenizer, messages)


def build_chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat (``[{"role", "content"}, ...]``), ending where the assistant's answer begins."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        logger.warning("tokenizer has no chat template; using a plain-text prompt")
        lines = [m["content"] if m["role"] == "system" else f"Question: {m['content']}" for m in messages]
        text = "\n\n".join(lines) + "\nAnswer:"
    return tokenizer(text, add_special_tokens=False)["input_ids"]
