"""Teacher forcing: read a given trajectory through a model in one forward pass, for per-position statistics.

Decoding produces one token per forward; the local-sufficiency analysis (:mod:`s2t.analysis`) and
the collection of S2T-Local training groups (:mod:`s2t.training.collect`) instead need a model's
view at *every* position of a trajectory that already exists (the SLM's greedy answer, the LLM's,
a reference solution). Both read prompt + trajectory with :func:`teacher_force`, so what the
analysis reports and what the selector and the learned trigger are trained on come from the same
forward: the hidden state and the logits at each column that predicts a trajectory token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from s2t.engine import left_pad
from s2t.models import cache_kwargs


@torch.inference_mode()
def teacher_force(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    trajectories: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    cache: DynamicCache | None = None,
) -> list[torch.Tensor]:
    """Final hidden states of each row's prompt + trajectory, at the columns that predict the trajectory.

    All rows go through the model in one forward pass, left-padded so that they end in the same
    column (with a padding mask and position ids counting real tokens only; a batch that needs no
    padding is read without either, exactly as a single sequence). Row ``i``'s result is a
    ``(len(trajectories[i]), hidden)`` tensor in the model's dtype, on its device: entry ``t`` is the
    state after ``prompt + trajectory[:t]``, the one that predicts ``trajectory[t]`` (turn it into
    logits with :func:`trajectory_logits`). Rows with an empty trajectory are not run and get a
    ``(0, hidden)`` tensor.

    Args:
        model: a causal LM whose ``model`` attribute is its decoder stack (Qwen2, Llama, ...).
        prompts, trajectories: token ids, one prompt per trajectory.
        pad_id: the id that fills padding columns (masked, so any valid id).
        cache: a ``DynamicCache`` to keep every row's key/value entries (whole prompt and trajectory,
            left-padded like the input), e.g. for
            :func:`s2t.training.collect.candidate_hidden_states_at`.

    Raises:
        ValueError: the counts of prompts and trajectories differ, or a row with a trajectory has
            an empty prompt (its first trajectory token would have no column to be predicted from).
    """
    if len(prompts) != len(trajectories):
        raise ValueError(
            f"need one trajectory per prompt; got {len(prompts)} prompts, {len(trajectories)} trajectories"
        )
    rows = [i for i, trajectory in enumerate(trajectories) if len(trajectory) > 0]
    if any(len(prompts[i]) == 0 for i in rows):
        raise ValueError("every prompt needs at least one token")
    empty = torch.zeros(0, model.config.hidden_size, dtype=model.dtype, device=model.device)
    hidden: list[torch.Tensor] = [empty] * len(prompts)
    if not rows:
        return hidden
    ids, mask = left_pad([list(prompts[i]) + list(trajectories[i]) for i in rows], pad_id)
    padding = {}
    if not bool(mask.all()):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        padding = {"attention_mask": mask.to(model.device), "position_ids": positions.to(model.device)}
    out = model.model(
        input_ids=ids.to(model.device),
        **padding,
        **cache_kwargs(model.model, cache),
        use_cache=cache is not None,
    )
    width = ids.shape[1]
    for row, i in enumerate(rows):
        # the last column reads the trajectory's last token, which predicts nothing in it
        hidden[i] = out.last_hidden_state[row, width - 1 - len(trajectories[i]) : width - 1]
    return hidden


@torch.inference_mode()
def trajectory_logits(model: PreTrainedModel, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Float32 logits ``(T, vocab_size)`` from final hidden states ``(T, hidden)`` through the model's
    output head; the rows above the tokenizer's vocabulary (reserved/padded ids) are dropped."""
    return model.get_output_embeddings()(hidden)[:, :vocab_size].float()


def trajectory_forward(
    model: PreTrainedModel,
    prompt: Sequence[int],
    trajectory: Sequence[int],
    vocab_size: int,
    cache: DynamicCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence teacher-forced: (hidden ``(T, H)``, float32 logits ``(T, vocab_size)``) at the
    positions that predict each of the ``T`` trajectory tokens (see :func:`teacher_force`)."""
    hidden = teacher_force(model, [prompt], [trajectory], cache=cache)[0]
    return hidden, trajectory_logits(model, hidden, vocab_size)
