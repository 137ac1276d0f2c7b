"""LoRA-mode training of the S2T-Local selector (for GPU users; runs on a CPU for tiny models).

Each group's context (prompt + trajectory prefix, the last ``max_context`` tokens) and its K
candidates go through the adapted SLM in one forward pass with a 4D mask (each candidate sees
the context and itself, at the same position id). The candidates' final hidden states are
scored by the bins (the reserved output rows); the loss is the paper's selector loss plus
``prefix_kl_weight`` · KL(frozen SLM ‖ adapted SLM) on the context's last tokens, which keeps
ordinary generation close to the original model. Runs unchanged under ``accelerate launch``.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from s2t.local.scoring import attention_mask_for
from s2t.local.selector import LocalSelector
from s2t.local.train import TrainConfig, selector_loss, split_problems
from s2t.runs import read_jsonl, write_json_atomic

ADAPTER_DIR = "adapter"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _groups(groups_dir: Path, subset: str):
    records = list(read_jsonl(groups_dir / "problems.jsonl"))
    items = []
    for i, rec in enumerate(records):
        for g in rec["groups"]:
            if subset == "divergent" and not g["divergent"]:
                continue
            context = rec["prompt_ids"] + rec["trajectory_ids"][: g["position"]]
            items.append((i, context, g["candidate_ids"], g["llm_probs"]))
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
    slm = slm or load_model(collect_cfg["slm"], dtype=cfg.dtype)
    base = slm.model
    # bins and fingerprint come from the untouched base model
    selector = LocalSelector.initial(base, collect_cfg["slm"], len(slm.tokenizer))
    selector.config.score_temperature = cfg.score_temperature
    base.requires_grad_(False)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=LORA_TARGETS, task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(base, lora)
    torch.manual_seed(cfg.seed)
    bins = torch.nn.Parameter(torch.randn_like(selector.bins) * 0.01)
    params = [p for p in model.parameters() if p.requires_grad] + [bins]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    accelerator = Accelerator()
    model, optimizer = accelerator.prepare(model, optimizer)

    records, items = _groups(groups_dir, cfg.groups_subset)
    train_p, val_p = split_problems(len(records), cfg.val_fraction, cfg.seed)
    train_items = [it for it in items if it[0] in train_p]
    if not train_items:
        raise ValueError("no training groups (collect more problems, or lower --val-fraction)")
    rng = random.Random(cfg.seed)
    inner = accelerator.unwrap_model(model).base_model.model  # the causal LM with LoRA layers inside
    history = []
    for epoch in range(cfg.epochs):
        rng.shuffle(train_items)
        model.train()
        total = 0.0
        for start in tqdm(range(0, len(train_items), cfg.batch_size), desc=f"lora epoch {epoch + 1}",
                          disable=not progress or not accelerator.is_main_process):  # fmt: skip
            batch = train_items[start : start + cfg.batch_size]
            loss = 0.0
            for _, context, candidates, llm_probs in batch:
                cand_hidden, ctx_hidden = _group_forward(inner, context, candidates, max_context)
                logits = selector.scores(cand_hidden, bins)[None] / cfg.score_temperature
                loss = loss + selector_loss(logits, torch.tensor([llm_probs], device=logits.device), cfg)
                tail = ctx_hidden[-cfg.prefix_kl_tokens :]
                adapted = F.log_softmax(inner.lm_head(tail).float(), -1)
                with torch.no_grad(), accelerator.unwrap_model(model).disable_adapter():
                    _, frozen_hidden = _group_forward(inner, context, candidates, max_context)
                    frozen = F.log_softmax(inner.lm_head(frozen_hidden[-cfg.prefix_kl_tokens :]).float(), -1)
                loss = loss + cfg.prefix_kl_weight * F.kl_div(
                    adapted, frozen, log_target=True, reduction="batchmean"
                )
            loss = loss / len(batch)
            optimizer.zero_grad()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        history.append({"epoch": epoch + 1, "train_loss": total / len(train_items)})

    selector.bins = bins.detach().cpu().clone()
    selector.config.training = {
        "mode": "lora",
        "adapter": ADAPTER_DIR,
        "config": {k: v for k, v in cfg.__dict__.items()},
        "collection": {k: collect_cfg.get(k) for k in ("dataset", "split", "mode", "k", "slm", "llm")},
        "train_problem_ids": sorted(records[i]["problem_id"] for i in train_p),
        "validation_problem_ids": sorted(records[i]["problem_id"] for i in val_p),
    }
    if accelerator.is_main_process:
        out = Path(cfg.out)
        selector.save_pretrained(out)
        accelerator.unwrap_model(model).save_pretrained(out / ADAPTER_DIR)  # safetensors by default
        write_json_atomic(out / "training_history.json", history)
    accelerator.unwrap_model(model).unload()  # leave the caller's model as it was
    return selector


def load_adapted_slm(model, selector_dir: str | Path):
    """A copy of ``model`` with the selector's LoRA adapter merged in (the base model is untouched)."""
    import copy

    from peft import PeftModel

    adapted = PeftModel.from_pretrained(copy.deepcopy(model), str(Path(selector_dir) / ADAPTER_DIR))
    merged = adapted.merge_and_unload()
    merged.eval().requires_grad_(False)
    return merged
