"""How often a trained selector picks the LLM's best candidate on collected groups it never trained on.

Any selector (head or LoRA) is measured the same way: each held-out problem's groups are packed
into one sequence (:mod:`s2t.training.packing`), the SLM (with the LoRA adapter merged in, for a
LoRA selector) reads it once, and the bins score every group's top-K candidates. Reported on all
groups and on the divergent ones (SLM top-1 ≠ LLM top-1), beside the SLM's own top-1.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from s2t.policies.learned_selector import LocalSelector, load_adapted_slm
from s2t.training.collect import collected_records, collection_config
from s2t.training.lora import packed_group_scores
from s2t.training.objective import grouped_selection_metrics
from s2t.training.packing import check_record, pack_problem


@torch.no_grad()
def selector_agreement(
    selector_dir: str | Path,
    groups_dir: str | Path,
    k: int = 8,
    problem_ids: list[str] | None = None,
    dtype: str | None = None,
    slm=None,
    progress: bool = True,
) -> dict:
    """Agreement with the LLM at top-``k`` on ``problem_ids`` (default: the selector's validation problems)."""
    from s2t.models import load_model

    selector_dir, groups_dir = Path(selector_dir), Path(groups_dir)
    collect_cfg = collection_config(groups_dir)
    slm = slm or load_model(collect_cfg["slm"], dtype=dtype)
    selector = LocalSelector.from_pretrained(selector_dir, model=slm.model)
    training = selector.config.training
    wanted = set(problem_ids if problem_ids is not None else training.get("validation_problem_ids", []))
    if not wanted:
        raise ValueError(f"{selector_dir} names no validation problems: pass the problem ids to measure on")
    trained_on = wanted & set(training.get("train_problem_ids", []))
    if trained_on:
        raise ValueError(
            f"the selector was trained on {len(trained_on)} of these problems (e.g. {min(trained_on)})"
        )
    records = [r for r in collected_records(groups_dir, need_features=False) if r["problem_id"] in wanted]
    if len(records) != len(wanted):
        raise ValueError(f"{groups_dir} holds {len(records)} of the {len(wanted)} problems asked for")
    for record in records:
        check_record(record, k, str(groups_dir))
    model = load_adapted_slm(slm.model, selector_dir) if training.get("mode") == "lora" else slm.model
    problems = (
        (pack_problem(r, k), None)
        for r in tqdm(records, desc="scoring held-out groups", unit="problem", disable=not progress)
    )
    metrics = grouped_selection_metrics(*packed_group_scores(model, selector, problems))
    return {
        "selector": str(selector_dir),
        "mode": training.get("mode"),
        "k": k,
        "problems": len(records),
        "dtype": str(model.dtype),
        **metrics,
    }
