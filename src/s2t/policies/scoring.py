"""Score K candidates in one forward pass over the shared prefix's KV cache.

The K candidates of a step share their prefix. Appending all K after the cached prefix, with a
4D attention mask in which each candidate sees the prefix and itself only, and with the same
position id for all of them, gives each candidate exactly the hidden state it would get if it
were decoded alone. The chosen candidate's key/value entries are then kept as the cache for the
next step, so scoring costs about one decoding step (K tokens instead of 1) rather than K
prefills, and the next step needs no extra forward.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from s2t.models import cache_kwargs


def candidate_attention_mask(prefix_mask: torch.Tensor, k: int, model: PreTrainedModel) -> torch.Tensor:
    """A (batch, 1, K, prefix + K) mask: candidate i attends to the valid prefix and to itself.

    SDPA takes a boolean mask (True = attend); eager attention takes an additive float mask.
    """
    batch, prefix = prefix_mask.shape
    allowed = torch.zeros(batch, 1, k, prefix + k, dtype=torch.bool, device=prefix_mask.device)
    allowed[..., :prefix] = prefix_mask.bool()[:, None, None, :]
    diagonal = torch.arange(k, device=prefix_mask.device)
    allowed[:, :, diagonal, prefix + diagonal] = True
    return attention_mask_for(allowed, model)


def attention_mask_for(allowed: torch.Tensor, model: PreTrainedModel) -> torch.Tensor:
    """A boolean (batch, 1, q, kv) "may attend" mask in the format the model's attention expects:
    boolean for SDPA, additive float (0 or the dtype's minimum) for eager attention."""
    if getattr(model.config, "_attn_implementation", "sdpa") == "sdpa":
        return allowed
    dtype = model.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


@torch.inference_mode()
def candidate_hidden_states(
    model: PreTrainedModel,
    cache: DynamicCache,
    prefix_mask: torch.Tensor,
    candidate_ids: torch.Tensor,
) -> torch.Tensor:
    """Final (normed) hidden states (batch, K, hidden) of each candidate appended after the cached prefix.

    ``prefix_mask`` (batch, prefix) is the 2D padding mask of the tokens already in ``cache``.
    The cache grows by K entries per row; call :func:`keep_candidate` (or crop) afterwards.
    """
    device = model.device
    batch, k = candidate_ids.shape
    position = prefix_mask.sum(-1)  # the next position id: the number of real tokens so far
    positions = position[:, None].expand(batch, k)
    out = model.model(
        input_ids=candidate_ids.to(device),
        attention_mask=candidate_attention_mask(prefix_mask.to(device), k, model),
        position_ids=positions.to(device),
        **cache_kwargs(model.model, cache),
        use_cache=True,
    )
    return out.last_hidden_state


def keep_candidate(cache: DynamicCache, prefix_length: int, chosen: torch.Tensor) -> None:
    """Keep, per row, only the chosen candidate's key/value entries after the prefix."""
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name)  # (batch, heads, prefix + K, head_dim)
            b, h, _, d = tensor.shape
            index = (prefix_length + chosen.to(tensor.device))[:, None, None, None].expand(b, h, 1, d)
            setattr(layer, name, torch.cat([tensor[:, :, :prefix_length], tensor.gather(2, index)], dim=2))
