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


def build_chat_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> list[int]:
    """Token ids of a chat (``[{"role", "content"}, ...]``), rendered with the tokenizer's chat template
    (transformers' ``apply_chat_template``), ending where the assistant's answer begins; or, with
    ``add_generation_prompt=False``, after the last message, and with ``continue_final_message``, inside
    the last message (an assistant's answer to go on with). A tokenizer without a template gets a
    plain-text prompt (``Question: ...`` / ``Answer: ...``).

    Raises:
        ValueError: both ``add_generation_prompt`` and ``continue_final_message``, or
            ``continue_final_message`` with a last message that is not the assistant's.
    """
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
    if continue_final_message and messages[-1]["role"] != "assistant":
        raise ValueError("continue_final_message needs the last message to be the assistant's")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
        )
    else:
        logger.warning("tokenizer has no chat template; using a plain-text prompt")
        prefix = {"system": "", "assistant": "Answer: "}
        lines = [prefix.get(m["role"], "Question: ") + m["content"] for m in messages]
        text = "\n\n".join(lines) + ("\nAnswer:" if add_generation_prompt else "")
    return tokenizer(text, add_special_tokens=False)["input_ids"]
