"""Train the S2T-Local selector from collected groups.

``head`` mode (CPU-friendly): the SLM stays frozen; only the 16 reserved output rows (the score
bins) are trained, on candidate hidden states precomputed once by ``s2t collect``. Minutes on
a CPU.

``lora`` mode: peft LoRA (r=16, α=32, dropout 0.05 on the attention and MLP projections) plus
the bins, and 0.1·KL to the frozen SLM on the prefix so ordinary generation is preserved. Each
problem's trajectory and all its groups' candidates go through the SLM in one forward pass under
a 4D mask (:mod:`s2t.training.lora`), which makes it practical on a CPU with ``lora_layers``.

Both modes share the configuration, the paper's loss, the split of problems (not groups) into
training and validation parts, and the selection metrics (:mod:`s2t.training.objective`). All of it
uses the collection's *training* split.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from s2t.policies.learned_selector import LocalSelector
from s2t.runs import file_in_the_way, terminate_as_interrupt, write_json_atomic
from s2t.training.collect import (
    collected_groups_at,
    collected_records,
    collection_config,
    collection_summary,
    read_features,
)
from s2t.training.objective import (
    TrainConfig,
    diverged,
    selection_metrics,
    selector_loss,
    split_problems,
)

logger = logging.getLogger(__name__)


@dataclass
class GroupTensors:
    hidden: torch.Tensor  # (N, K, H) float16
    llm_probs: torch.Tensor  # (N, K)
    slm_probs: torch.Tensor  # (N, K)
    divergent: torch.Tensor  # (N,) bool
    problem: torch.Tensor  # (N,) index into problem_ids
    problem_ids: list[str]
    groups: list[dict]  # (N,) the records' ``groups`` entries: entropy, margin, kl, position, ...


def load_groups(groups_dir: str | Path) -> tuple[GroupTensors, dict]:
    """Load a collection run: its config and every group's tensors, in the order of
    :func:`s2t.training.feature_training.load_group_arrays` (problem, then position).

    Raises:
        ValueError: an empty collection.
    """
    groups_dir = Path(groups_dir)
    config = collection_config(groups_dir)
    records = collected_records(groups_dir)
    if not records:
        raise ValueError(f"{groups_dir} holds no collected problems yet")
    hidden, llm, slm, div, prob, ids, groups = [], [], [], [], [], [], []
    for i, rec in enumerate(records):
        t = read_features(groups_dir, rec)
        n = t["candidate_hidden"].shape[0]
        hidden.append(t["candidate_hidden"])
        llm.append(t["candidate_llm_probs"])
        slm.append(t["candidate_slm_probs"])
        div.append(torch.tensor([g["divergent"] for g in rec["groups"]], dtype=torch.bool).reshape(n))
        prob.append(torch.full((n,), i, dtype=torch.long))
        ids.append(rec["problem_id"])
        groups.extend(rec["groups"])
    data = GroupTensors(
        torch.cat(hidden), torch.cat(llm), torch.cat(slm), torch.cat(div), torch.cat(prob), ids, groups
    )
    return data, config


def train_head(cfg: TrainConfig, slm=None, progress: bool = True) -> LocalSelector:
    """Train only the score bins on precomputed candidate hidden states (frozen SLM)."""
    from s2t.models import load_model

    data, collect_cfg = load_groups(cfg.groups)
    data = _at_k(data, cfg.k or collect_cfg["k"], collect_cfg["k"])
    slm = slm or load_model(collect_cfg["slm"], dtype=cfg.dtype)
    selector = LocalSelector.initial(slm.model, collect_cfg["slm"], len(slm.tokenizer))
    selector.config.score_temperature = cfg.score_temperature
    if data.hidden.shape[-1] != selector.config.hidden_size:
        raise ValueError(
            f"collected hidden states have size {data.hidden.shape[-1]}, the SLM has {selector.config.hidden_size}: "
            "the groups were collected with another SLM"
        )
    train_p, val_p = split_problems(len(data.problem_ids), cfg.val_fraction, cfg.seed)
    keep = torch.ones(len(data.problem), dtype=torch.bool) if cfg.groups_subset == "all" else data.divergent
    if cfg.groups_at:
        at = collected_groups_at(cfg.groups, cfg.groups_at, data.groups)
        if not at.any():
            raise ValueError(f"no groups in {cfg.groups} where {cfg.groups_at} fires")
        keep &= at
    in_train = keep & torch.tensor([int(p) in train_p for p in data.problem])
    in_val = keep & torch.tensor([int(p) in val_p for p in data.problem])
    if not in_train.any():
        raise ValueError("no training groups (collect more problems, or lower --val-fraction)")

    torch.manual_seed(cfg.seed)
    bins = torch.nn.Parameter(torch.randn_like(selector.bins) * 0.01)
    optimizer = torch.optim.AdamW([bins], lr=cfg.lr, weight_decay=cfg.weight_decay)
    x_train, y_train = data.hidden[in_train].float(), data.llm_probs[in_train]
    history = []
    best_state, best_val = bins.detach().clone(), float("-inf")

    def train_loss() -> float:  # the current bins' loss on the training groups
        with torch.no_grad():
            logits = selector.selection_logits(x_train, data.slm_probs[in_train], bins)
            return float(selector_loss(logits, y_train, cfg))

    start_loss = train_loss()
    for epoch in tqdm(range(cfg.epochs), desc="training bins", disable=not progress):
        perm = torch.randperm(len(x_train))
        total = 0.0
        for start in range(0, len(perm), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            logits = selector.selection_logits(x_train[idx], data.slm_probs[in_train][idx], bins)
            loss = selector_loss(logits, y_train[idx], cfg)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([bins], cfg.grad_clip)
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        with torch.no_grad():
            val = (
                selection_metrics(
                    selector.selection_logits(data.hidden[in_val].float(), data.slm_probs[in_val], bins),
                    data.llm_probs[in_val],
                    data.slm_probs[in_val],
                )
                if in_val.any()
                else {}
            )
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": total / len(x_train),
                **{f"val_{k}": v for k, v in val.items()},
            }
        )
        if diverged(
            epoch + 1, best_val > float("-inf"), end_loss=train_loss(), start_loss=start_loss, weights=[bins]
        ):
            history[-1]["diverged"] = True
            break
        score = val.get("agreement_with_llm", -total)
        if score > best_val:
            best_val, best_state = score, bins.detach().clone()
    selector.bins = best_state
    with torch.no_grad():
        metrics = {
            "train": selection_metrics(
                selector.selection_logits(x_train, data.slm_probs[in_train]),
                y_train,
                data.slm_probs[in_train],
            ),
            "validation": selection_metrics(
                selector.selection_logits(data.hidden[in_val].float(), data.slm_probs[in_val]),
                data.llm_probs[in_val],
                data.slm_probs[in_val],
            )
            if in_val.any()
            else None,
        }
    selector.config.training = {
        "mode": "head",
        "config": asdict(cfg),
        "collection": collection_summary(cfg.groups, cfg.groups_at),
        "train_problem_ids": sorted(data.problem_ids[i] for i in train_p),
        "validation_problem_ids": sorted(data.problem_ids[i] for i in val_p),
        "metrics": metrics,
    }
    selector.save_pretrained(cfg.out)
    write_json_atomic(Path(cfg.out) / "training_history.json", history)
    return selector


def _at_k(data: GroupTensors, k: int, collected_k: int) -> GroupTensors:
    """``data`` restricted to each group's top ``k`` candidates (``ValueError`` above the collection's K)."""
    if not 2 <= k <= collected_k:
        raise ValueError(f"k={k} must lie in [2, {collected_k}] (the collection's K)")
    return GroupTensors(
        data.hidden[:, :k],
        data.llm_probs[:, :k],
        data.slm_probs[:, :k],
        data.divergent,
        data.problem,
        data.problem_ids,
        data.groups,
    )


# What `s2t train` writes into its --out directory (any mode): the files a new training replaces.
OUTPUT_FILES = (
    "selector.safetensors",
    "selector_config.json",
    "trigger.safetensors",
    "trigger_config.json",
    "ladder.json",
    "training_history.json",
)
OUTPUT_DIRS = ("adapter", "checkpoint", "prepared")  # lora mode's
OUTPUT_NAMES = (*OUTPUT_FILES, *OUTPUT_DIRS)


def check_output_dir(out: str | Path, overwrite: bool = False, resume: bool = False) -> None:
    """Check ``out`` before any training: where a new selector may go (see :func:`replacing_output`).

    Raises:
        ValueError: ``out`` is a file, lies under one, is a collection directory, or holds a trained
            selector or trigger without ``overwrite`` (or ``resume``, which lora mode continues);
            ``overwrite`` with ``resume``; see also :func:`restore_set_aside`, which runs first.
    """
    out = Path(out)
    if overwrite and resume:
        raise ValueError("--overwrite starts the training again and --resume continues it: give one")
    blocking = file_in_the_way(out)
    if blocking == out:
        raise ValueError(f"--out {out} is a file: give a directory for the selector")
    if blocking is not None:
        raise ValueError(f"--out {out} lies under {blocking}, which is a file")
    collection = next((p for p in (out, *out.parents) if (p / "problems.jsonl").is_file()), None)
    if collection is not None:
        where = "is" if collection == out else f"lies in {collection}, which is"
        raise ValueError(
            f"--out {out} {where} a collection directory: give the selector a directory of its own"
        )
    restore_set_aside(out)  # what a killed --overwrite set aside is the training this directory holds
    held = [name for name in ("selector_config.json", "trigger_config.json") if (out / name).is_file()]
    if held and not (overwrite or resume):
        raise ValueError(
            f"{out} holds a trained selector ({held[0]}): pass --overwrite to replace it, or use a new --out"
        )


@contextmanager
def replacing_output(out: str | Path, overwrite: bool):
    """With ``overwrite``, set aside what an earlier training saved in ``out`` (:data:`OUTPUT_NAMES`,
    moved to ``out/.replaced``, so that no stale learned trigger stays beside a new selector) for the
    block: dropped when it ends normally, put back when it raises (a bad option found late, a model that
    does not load, an interrupt or SIGTERM, from before the first file moves), so no failed training
    costs the earlier one. Without ``overwrite``, nothing
    is done."""
    out = Path(out)
    if not overwrite or not out.is_dir():
        yield
        return
    aside = out / ".replaced"
    with terminate_as_interrupt():  # a killed training (SIGTERM) puts the earlier one back too
        restore_set_aside(out)
        originals = [name for name in OUTPUT_NAMES if (out / name).exists()]
        try:
            aside.mkdir()
            for name in originals:
                (out / name).rename(aside / name)
            yield
        except BaseException:
            _put_back(out, aside, originals)
            raise
    shutil.rmtree(aside)


def _put_back(out: Path, aside: Path, originals: list[str]) -> None:
    """Undo :func:`replacing_output` at any point: what was set aside goes back in place of what the
    failed training wrote, an original not yet moved stays, and what the training added goes."""
    for name in OUTPUT_NAMES:
        if (aside / name).exists():
            _remove(out / name)
            (aside / name).rename(out / name)
        elif name not in originals:
            _remove(out / name)
    if aside.exists():
        shutil.rmtree(aside)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def restore_set_aside(out: str | Path) -> None:
    """Put back an earlier training that a killed ``--overwrite`` run left in ``out/.replaced``
    (SIGKILL, a power cut), if ``out`` holds no training of its own; an empty one is removed.

    Raises:
        ValueError: ``out`` holds both a training and a set-aside one: which to keep is the user's call.
    """
    out, aside = Path(out), Path(out) / ".replaced"
    if not aside.is_dir():
        return
    held = [name for name in OUTPUT_NAMES if (aside / name).exists()]
    if not held:
        shutil.rmtree(aside)
        return
    mine = [name for name in OUTPUT_NAMES if (out / name).exists()]
    if mine:
        raise ValueError(
            f"{aside} holds an earlier training ({', '.join(held)}) that an interrupted --overwrite set "
            f"aside, and {out} another ({', '.join(mine)}; possibly cut off while saving): delete the one "
            "you do not want, then retry"
        )
    for name in held:
        (aside / name).rename(out / name)
    shutil.rmtree(aside)
    logger.warning("put back the earlier training an interrupted --overwrite had set aside in %s", aside)


def train(cfg: TrainConfig, progress: bool = True, resume: bool = False, **kwargs) -> LocalSelector:
    """Train a selector in ``cfg.mode``; ``resume`` continues a LoRA run from its checkpoint."""
    if cfg.mode == "head":
        if resume:
            raise ValueError("--resume applies to lora mode; head training takes minutes and restarts")
        return train_head(cfg, progress=progress, **kwargs)
    from s2t.training.lora import train_lora

    return train_lora(cfg, progress=progress, resume=resume, **kwargs)


__all__ = [
    "GroupTensors",
    "TrainConfig",
    "check_output_dir",
    "load_groups",
    "replacing_output",
    "train",
    "train_head",
]
