"""Pack all of a problem's groups into one sequence, so LoRA training costs one forward per problem.

A collected problem is a prompt, the SLM's trajectory, and groups: at answer position ``pos``
the SLM's top-K candidates for that position. The per-group view runs, for every group, its
context (prompt + trajectory[:pos]) followed by its K candidates. Packed, the problem runs once:

    prompt + trajectory[:last group's position]  ++  candidates of group 1  ++ ... ++ of group M

under a 4D mask in which the trajectory is causal and candidate (m, j) sees the tokens before
its group's position and itself, with that position's id. Every hidden state is then exactly
what the per-group forward gives it (collection uses the same trick over a KV cache).

The selector loss reads the candidates' hidden states. The prefix KL of the per-group loss
(KL(frozen SLM ‖ adapted SLM) averaged over each group's last ``window`` context tokens) becomes
one weighted sum over trajectory positions: position q carries Σ 1/W_m over the groups m whose
window covers it. Summed over groups, packed and per-group losses are the same number.

The frozen SLM's distribution is kept sparse (its top-T tokens plus the rest as one bucket):
the KL of those coarsened distributions, exact when the rest is empty and a lower bound
otherwise, is what both views use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class CollectionFormatError(ValueError):
    """A collection record lacks what packed training needs."""


REQUIRED_FIELDS = ("problem_id", "prompt_ids", "trajectory_ids", "groups")
REQUIRED_GROUP_FIELDS = ("position", "candidate_ids", "llm_probs", "slm_probs", "divergent")


def check_record(record: dict, k: int, source: str) -> None:
    """Refuse a record that cannot be packed, naming what is missing and how to get it."""
    fix = f"re-run `s2t collect --out {source}` (same arguments) with this version of s2t"
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        raise CollectionFormatError(f"{source}: a problem record lacks {', '.join(missing)}; {fix}")
    for group in record["groups"]:
        absent = [f for f in REQUIRED_GROUP_FIELDS if f not in group]
        if absent:
            raise CollectionFormatError(
                f"{source}: a group of {record['problem_id']} lacks {', '.join(absent)}; {fix}"
            )
        if len(group["candidate_ids"]) < k:
            raise CollectionFormatError(
                f"{source} was collected with K={len(group['candidate_ids'])} candidates per group; training "
                f"with K={k} needs at least that many: lower --k, or collect again with `s2t collect --k {k}`"
            )
        if not 0 <= group["position"] < len(record["trajectory_ids"]):
            raise CollectionFormatError(
                f"{source}: a group of {record['problem_id']} stands at position {group['position']}, outside "
                f"its {len(record['trajectory_ids'])}-token trajectory; {fix}"
            )


@dataclass
class PackedProblem:
    """One problem's trajectory and candidates as a single sequence."""

    problem_id: str
    input_ids: torch.Tensor  # (L,) trajectory prefix, then M·K candidates
    position_ids: torch.Tensor  # (L,)
    allowed: torch.Tensor  # (L, L) bool: row may attend to column
    base_length: int  # S: prompt + trajectory tokens in the sequence
    candidate_ids: torch.Tensor  # (M, K)
    llm_probs: torch.Tensor  # (M, K)
    slm_probs: torch.Tensor  # (M, K)
    divergent: torch.Tensor  # (M,) bool
    contexts: torch.Tensor  # (M,) context length of each group (prompt + position)
    kl_weight: torch.Tensor  # (S,) Σ 1/W over the groups whose KL window covers the position

    @property
    def n_groups(self) -> int:
        return int(self.candidate_ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.candidate_ids.shape[1])

    def candidate_slice(self) -> slice:
        return slice(self.base_length, self.base_length + self.n_groups * self.k)


def pack_problem(record: dict, k: int, subset: str = "all", window: int = 64) -> PackedProblem:
    """Pack a collected problem's groups (``subset``: all, or divergent) at the SLM's top-``k``.

    Candidates are stored best-first by the SLM's probability, so the first ``k`` are its top-K.
    """
    groups = [g for g in record["groups"] if subset == "all" or g["divergent"]]
    prompt, trajectory = list(record["prompt_ids"]), list(record["trajectory_ids"])
    p = len(prompt)
    contexts = [p + g["position"] for g in groups]
    s = max(contexts, default=p)  # nothing after the last group's context is ever read
    m = len(groups)
    length = s + m * k
    base_ids = (prompt + trajectory)[:s]
    cand = torch.tensor([g["candidate_ids"][:k] for g in groups], dtype=torch.long).reshape(m, k)
    input_ids = torch.cat([torch.tensor(base_ids, dtype=torch.long), cand.reshape(-1)])
    allowed = torch.zeros(length, length, dtype=torch.bool)
    allowed[:s, :s] = torch.ones(s, s, dtype=torch.bool).tril()
    position_ids = torch.empty(length, dtype=torch.long)
    position_ids[:s] = torch.arange(s)
    kl_weight = torch.zeros(s, dtype=torch.float64)
    for i, n in enumerate(contexts):
        rows = slice(s + i * k, s + (i + 1) * k)
        allowed[rows, :n] = True
        position_ids[rows] = n
        w = min(window, n)
        kl_weight[n - w : n] += 1.0 / w
    diagonal = torch.arange(s, length)
    allowed[diagonal, diagonal] = True
    return PackedProblem(
        problem_id=record["problem_id"],
        input_ids=input_ids,
        position_ids=position_ids,
        allowed=allowed,
        base_length=s,
        candidate_ids=cand,
        llm_probs=torch.tensor([g["llm_probs"][:k] for g in groups], dtype=torch.float32).reshape(m, k),
        slm_probs=torch.tensor([g["slm_probs"][:k] for g in groups], dtype=torch.float32).reshape(m, k),
        divergent=torch.tensor([bool(g["divergent"]) for g in groups], dtype=torch.bool),
        contexts=torch.tensor(contexts, dtype=torch.long),
        kl_weight=kl_weight.float(),
    )


def group_context(packed: PackedProblem, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-group view of one group: its context ids and its K candidate ids."""
    n = int(packed.contexts[group])
    return packed.input_ids[:n], packed.candidate_ids[group]


def sparse_targets(logits: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen SLM's top-``top`` token ids and log-probabilities at each position (Q, top)."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    values, ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
    return ids.to(torch.int32), values


def sparse_kl(logits: torch.Tensor, target_ids: torch.Tensor, target_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(frozen ‖ adapted) per position (Q,), over the frozen top-T tokens plus one bucket for the rest.

    ``logits`` (Q, V) are the adapted SLM's; ``target_*`` (Q, T) the frozen SLM's top-T.
    """
    log_q = F.log_softmax(logits.float(), dim=-1)
    ids = target_ids.long()
    log_q_top = log_q.gather(-1, ids)
    log_q_rest = log_q.scatter(-1, ids, float("-inf")).logsumexp(-1)
    p_top = target_logprobs.exp()
    p_rest = (1.0 - p_top.sum(-1)).clamp_min(0.0)
    top_terms = (p_top * (target_logprobs - log_q_top)).sum(-1)
    # no rest (the targets hold every token): p_rest is rounding noise and log q_rest is -inf
    has_rest = torch.isfinite(log_q_rest)
    rest_terms = torch.xlogy(p_rest, p_rest) - p_rest * torch.where(has_rest, log_q_rest, 0.0)
    return top_terms + torch.where(has_rest, rest_terms, 0.0)
