"""LoRA-mode training of the S2T-Local selector (for GPU users; runs on a CPU for tiny models).

Each group's context (prompt + trajectory prefix, the last ``max_context`` tokens) and its K
candidates go through the adapted SLM in one forward pass with a 4D mask (each candidate sees
the context and itself, at the same position id). The candidates' final hidden states are
scored by the bins (the reserved output rows); the loss is the paper's selector loss plus
``prefix_kl_weight`` · KL(frozen SLM ‖ adapted SLM) on the context's last tokens, which keeps
ordinary generation close to the original model.

Runs unchanged under ``accelerate launch`` (one process per GPU, or ``--cpu`` processes): every
process walks the same shuffled groups and takes its own slice of each batch, and the gradients
of the trainable parameters (LoRA weights and bins) are averaged over the processes before each
step, so N processes take the same steps as one process with the whole batch. (The forward
runs on the inner causal LM with a custom 4D mask rather than through a DDP wrapper, which is why
the averaging is explicit.) Only the main process writes the checkpoint.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from s2t.local.collect import collected_records
from s2t.local.scoring import attention_mask_for
from s2t.local.selector import LocalSelector
from s2t.local.train import TrainConfig, selection_metrics, selector_loss, split_problems
from s2t.runs import write_json_atomic

ADAPTER_DIR = "adapter"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _groups(groups_dir: Path, subset: str):
    records = collected_records(groups_dir, need_features=False)
    items = []
    for i, rec in enumerate(records):
        for g in rec["groups"]:
            if subset == "divergent" and not g["divergent"]:
                continue
            context = rec["prompt_ids"] + rec["trajectory_ids"][: g["position"]]
            items.append((i, context, g["candidate_ids"], g["llm_probs"], g["slm_probs"]))
    return records, items


def _group_forward(model, context: list[int], candidates: list[int], max_context: int):
    """Hidden states of the candidates (K, H) and the context logits, in one masked forward pass."""
    context = context[-max_context:]
    n, k = len(context), len(candidates)
    device = next(model.parameters()).device
    ids = torch.tensor([context + candidates], device=device)
    allowed = torch.ones(n + k, n + k, dtype=torch.bool, device=device).tril()
    allowed[n:, n:] = torch.eye(k, dtype=torch.bool, device=device)
    mask = attention_mask_for(allowed[None, None], model)
    positions = torch.cat([torch.arange(n), torch.full((k,), n)]).to(device)[None]
    out = model.model(input_ids=ids, attention_mask=mask, position_ids=positions)
    hidden = out.last_hidden_state[0]
    return hidden[n:], hidden[:n]


def train_lora(cfg: TrainConfig, slm=None, progress: bool = True, max_context: int = 1024) -> LocalSelector:
    """Train LoRA adapters plus the bins; saves the adapter beside the selector (``adapter/``)."""
    import json

    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    from s2t.models import load_model

    groups_dir = Path(cfg.groups)
    collect_cfg = json.loads((groups_dir / "config.json").read_text())
    accelerator = Accelerator()
    slm = slm or load_model(collect_cfg["slm"], dtype=cfg.dtype, device=str(accelerator.device))
    base = slm.model.to(accelerator.device)
    # bins and fingerprint come from the untouched base model
    selector = LocalSelector.initial(base, collect_cfg["slm"], len(slm.tokenizer))
    selector.config.score_temperature = cfg.score_temperature
    base.requires_grad_(False)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=LORA_TARGETS, task_type="CAUSAL_LM")  # fmt: skip
    torch.manual_seed(cfg.seed)  # before the LoRA weights are initialised: same start on every process
    model = get_peft_model(base, lora)
    bins = torch.nn.Parameter((torch.randn_like(selector.bins) * 0.01).to(accelerator.device))
    params = [p for p in model.parameters() if p.requires_grad] + [bins]
    optimizer = accelerator.prepare(torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
    rank, world = accelerator.process_index, accelerator.num_processes

    records, items = _groups(groups_dir, cfg.groups_subset)
    train_p, val_p = split_problems(len(records), cfg.val_fraction, cfg.seed)
    train_items = [it for it in items if it[0] in train_p]
    if not train_items:
        raise ValueError("no training groups (collect more problems, or lower --val-fraction)")
    rng = random.Random(cfg.seed)
    inner = model.base_model.model  # the causal LM with LoRA layers inside
    history = []
    for epoch in range(cfg.epochs):
        rng.shuffle(train_items)
        model.train()
        total = 0.0
        for start in tqdm(range(0, len(train_items), cfg.batch_size), desc=f"lora epoch {epoch + 1}",
                          disable=not progress or not accelerator.is_main_process):  # fmt: skip
            batch = train_items[start : start + cfg.batch_size]
            loss = torch.zeros((), device=accelerator.device)
            for _, context, candidates, llm_probs, _ in batch[rank::world]:
                cand_hidden, ctx_hidden = _group_forward(inner, context, candidates, max_context)
                logits = selector.scores(cand_hidden, bins)[None] / cfg.score_temperature
                loss = loss + selector_loss(logits, torch.tensor([llm_probs], device=logits.device), cfg)
                tail = ctx_hidden[-cfg.prefix_kl_tokens :]
                adapted = F.log_softmax(inner.lm_head(tail).float(), -1)
                with torch.no_grad(), model.disable_adapter():
                    _, frozen_hidden = _group_forward(inner, context, candidates, max_context)
                    frozen = F.log_softmax(inner.lm_head(frozen_hidden[-cfg.prefix_kl_tokens :]).float(), -1)
                loss = loss + cfg.prefix_kl_weight * F.kl_div(
                    adapted, frozen, log_target=True, reduction="batchmean"
                )
            # this process's share of the batch mean; averaging over processes gives the whole mean
            loss = loss * world / len(batch)
            optimizer.zero_grad()
            if loss.requires_grad:  # a process whose slice of a short last batch is empty has no graph
                accelerator.backward(loss)
            for param in params:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                param.grad = accelerator.reduce(param.grad, reduction="mean")
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            total += float(accelerator.reduce(loss.detach(), reduction="mean")) * len(batch)
        history.append({"epoch": epoch + 1, "train_loss": total / len(train_items)})

    model.eval()
    with torch.no_grad():
        metrics = {
            "train": _metrics(inner, selector, bins, train_items, max_context),
            "validation": _metrics(
                inner, selector, bins, [it for it in items if it[0] in val_p], max_context
            ),
        }
    selector.bins = bins.detach().cpu().clone()
    selector.config.training = {
        "mode": "lora",
        "adapter": ADAPTER_DIR,
        "config": {k: v for k, v in cfg.__dict__.items()},
        "collection": {k: collect_cfg.get(k) for k in ("dataset", "split", "mode", "k", "slm", "llm")},
        "train_problem_ids": sorted(records[i]["problem_id"] for i in train_p),
        "validation_problem_ids": sorted(records[i]["problem_id"] for i in val_p),
        "metrics": metrics,
    }
    if accelerator.is_main_process:
        out = Path(cfg.out)
        selector.save_pretrained(out)
        model.save_pretrained(out / ADAPTER_DIR)  # safetensors by default
        write_json_atomic(out / "training_history.json", history)
    accelerator.wait_for_everyone()
    model.unload()  # leave the caller's model as it was
    return selector


def _metrics(inner, selector: LocalSelector, bins, items, max_context: int) -> dict | None:
    """Selection metrics of the adapted SLM on groups (None when there are none)."""
    if not items:
        return None
    scores = torch.stack([selector.scores(_group_forward(inner, ctx, cands, max_context)[0], bins).float().cpu()
                          for _, ctx, cands, _, _ in items])  # fmt: skip
    llm = torch.tensor([it[3] for it in items])
    slm = torch.tensor([it[4] for it in items])
    return selection_metrics(scores, llm, slm)


def load_adapted_slm(model, selector_dir: str | Path):
    """A copy of ``model`` with the selector's LoRA adapter merged in (the base model is untouched)."""
    import copy

    from peft import PeftModel

    adapted = PeftModel.from_pretrained(copy.deepcopy(model), str(Path(selector_dir) / ADAPTER_DIR))
    merged = adapted.merge_and_unload()
    merged.eval().requires_grad_(False)
    return merged
