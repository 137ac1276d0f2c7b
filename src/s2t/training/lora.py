"""LoRA-mode training of the S2T-Local selector, packed by problem so that it runs on a CPU.

One optimisation step reads whole problems: each problem's trajectory and the candidates of all
its groups go through the adapted SLM in **one** forward pass under a 4D mask
(:mod:`s2t.training.packing`), instead of one forward per group. The candidates' final hidden
states are scored by the bins (the reserved output rows); the loss is the paper's selector loss
per group plus ``prefix_kl_weight`` · KL(frozen SLM ‖ adapted SLM) over each group's last
``prefix_kl_tokens`` context tokens, which keeps ordinary generation close to the original model.
Packed and per-group losses are the same number (:func:`per_group_loss` is the reference).

What the frozen SLM contributes never changes, so it is computed once, before the first step
(the *frozen pass*, cached under ``<out>/prepared/``): its top-T log-probabilities on the
trajectory (the KL targets), and, when only the top ``lora_layers`` layers are adapted, the
hidden states entering the first adapted layer, so that training runs only the adapted layers.

Practical on a CPU: ``lora_layers`` (adapt the top N layers), ``dtype="bfloat16"`` (base
weights in bfloat16, LoRA weights and bins in float32), a checkpoint every
``checkpoint_every`` problems and at each epoch's end (an interrupt saves one too), ``--resume``
(refused when the configuration differs), validation agreement every ``eval_every`` problems
(a learning curve), and the selector kept from the best validation point.

Runs under ``accelerate launch`` (one process per GPU, or ``--cpu`` processes): every process
walks the same shuffled problems and takes its own slice of each batch; the gradients of the
trainable parameters are averaged over the processes before each step, so N processes take the
same steps as one process with the whole batch. Only the main process writes files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from s2t.policies.checkpoint import save_tensors
from s2t.policies.learned_selector import ADAPTER_DIR, LocalSelector, adapter_digest, model_fingerprint
from s2t.policies.scoring import attention_mask_for
from s2t.runs import give_plain_mode, terminate_as_interrupt, write_json_atomic
from s2t.training.collect import collected_groups_at, collected_records, collection_config, collection_summary
from s2t.training.objective import (
    TrainConfig,
    diverged,
    grouped_selection_metrics,
    selector_loss,
    split_problems,
)
from s2t.training.packing import (
    PackedProblem,
    check_record,
    group_context,
    pack_problem,
    sparse_kl,
    sparse_targets,
)

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
PREPARED_DIR = "prepared"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# TrainConfig fields that may differ when a run is resumed: they do not change what a step does (and
# --out is where the checkpoint was found, however it is spelled or wherever it was copied).
RESUMABLE_FIELDS = {"epochs", "checkpoint_every", "eval_every", "out"}


class ResumeError(ValueError):
    """A LoRA training run cannot resume (no checkpoint, or another configuration)."""


def first_adapted_layer(num_layers: int, lora_layers: int | None) -> int:
    """Index of the lowest adapted decoder layer (0 when all are adapted)."""
    if lora_layers is None:
        return 0
    if not 1 <= lora_layers <= num_layers:
        raise ValueError(f"lora_layers must lie in [1, {num_layers}] for this SLM; got {lora_layers}")
    return num_layers - lora_layers


# ---------------------------------------------------------------------------- forward passes


def _mask(allowed: torch.Tensor, model) -> torch.Tensor:
    return attention_mask_for(allowed[None, None].to(model.device), model)


def decoder_hidden(lm, packed: PackedProblem, start: int = 0, start_hidden: torch.Tensor | None = None):
    """Final (normed) hidden states (L, H) of a packed problem.

    With ``start > 0`` the decoder layers below ``start`` are skipped and ``start_hidden`` (L, H),
    the frozen states entering layer ``start``, is used instead: exact when those layers are frozen.
    """
    device = lm.device
    mask = _mask(packed.allowed, lm)
    positions = packed.position_ids.to(device)[None]
    if start == 0:
        out = lm.model(
            input_ids=packed.input_ids.to(device)[None], attention_mask=mask, position_ids=positions
        )
        return out.last_hidden_state[0]
    decoder = lm.model
    if any(t != "full_attention" for t in decoder.config.layer_types[start:]):
        raise ValueError("training from cached layer states supports full-attention layers only")
    hidden = start_hidden.to(device=device, dtype=lm.dtype)[None]
    embeddings = decoder.rotary_emb(hidden, positions)
    for layer in decoder.layers[start:]:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=embeddings, position_ids=positions)
    return decoder.norm(hidden)[0]


@torch.no_grad()
def frozen_pass(lm, packed: PackedProblem, vocab_size: int, top: int, start: int) -> dict[str, torch.Tensor]:
    """What the frozen SLM contributes to a problem's loss: KL targets and cached layer states."""
    mask = _mask(packed.allowed, lm)
    out = lm.model(
        input_ids=packed.input_ids.to(lm.device)[None],
        attention_mask=mask,
        position_ids=packed.position_ids.to(lm.device)[None],
        output_hidden_states=start > 0,
    )
    weighted = packed.kl_weight > 0
    base_hidden = out.last_hidden_state[0, : packed.base_length][weighted.to(lm.device)]
    ids, logprobs = sparse_targets(lm.get_output_embeddings()(base_hidden)[:, :vocab_size], top)
    tensors = {"kl_target_ids": ids.cpu().contiguous(), "kl_target_logprobs": logprobs.cpu().contiguous()}
    if start > 0:
        tensors["start_hidden"] = out.hidden_states[start][0].cpu().contiguous()
    return tensors


def packed_loss(
    lm,
    selector: LocalSelector,
    bins,
    packed: PackedProblem,
    prepared: dict,
    cfg: TrainConfig,
    vocab_size: int,
    start: int = 0,
):
    """The problem's loss summed over its groups (divide by the batch's group count), and its scores (M, K)."""
    hidden = decoder_hidden(lm, packed, start, prepared.get("start_hidden"))
    m, k = packed.n_groups, packed.k
    scores = selector.selection_logits(
        hidden[packed.candidate_slice()].reshape(m, k, -1), packed.slm_probs, bins
    )
    loss = selector_loss(scores, packed.llm_probs.to(scores.device), cfg) * m
    if cfg.prefix_kl_weight > 0:
        weighted = packed.kl_weight > 0
        base = hidden[: packed.base_length][weighted.to(hidden.device)]
        kl = sparse_kl(
            lm.get_output_embeddings()(base)[:, :vocab_size],
            prepared["kl_target_ids"].to(base.device),
            prepared["kl_target_logprobs"].to(base.device),
        )
        loss = loss + cfg.prefix_kl_weight * (kl * packed.kl_weight[weighted].to(kl.device)).sum()
    return loss, scores


def per_group_loss(
    lm,
    selector: LocalSelector,
    bins,
    packed: PackedProblem,
    prepared: dict,
    cfg: TrainConfig,
    vocab_size: int,
):
    """The reference: the same loss computed with one forward per group (its context + K candidates).

    Summed over the problem's groups, like :func:`packed_loss`; far slower, kept as the definition.
    """
    weighted = torch.nonzero(packed.kl_weight > 0).flatten().tolist()
    row_of = {q: i for i, q in enumerate(weighted)}  # position -> row of the stored KL targets
    total = torch.zeros((), device=lm.device)
    for g in range(packed.n_groups):
        context, candidates = group_context(packed, g)
        n, k = len(context), len(candidates)
        allowed = torch.ones(n + k, n + k, dtype=torch.bool).tril()
        allowed[n:, n:] = torch.eye(k, dtype=torch.bool)
        positions = torch.cat([torch.arange(n), torch.full((k,), n)])
        out = lm.model(
            input_ids=torch.cat([context, candidates]).to(lm.device)[None],
            attention_mask=_mask(allowed, lm),
            position_ids=positions.to(lm.device)[None],
        )
        hidden = out.last_hidden_state[0]
        scores = selector.selection_logits(hidden[n:], packed.slm_probs[g], bins)[None]
        total = total + selector_loss(scores, packed.llm_probs[g : g + 1].to(lm.device), cfg)
        if cfg.prefix_kl_weight > 0:
            w = min(cfg.prefix_kl_tokens, n)
            rows = torch.tensor([row_of[q] for q in range(n - w, n)])
            kl = sparse_kl(
                lm.get_output_embeddings()(hidden[n - w : n])[:, :vocab_size],
                prepared["kl_target_ids"][rows].to(lm.device),
                prepared["kl_target_logprobs"][rows].to(lm.device),
            )
            total = total + cfg.prefix_kl_weight * kl.mean()
    return total


@torch.no_grad()
def packed_group_scores(lm, selector: LocalSelector, problems, bins=None, start: int = 0):
    """Scores (N, K), LLM and SLM probabilities (N, K) and divergence flags (N,) of the groups of
    ``problems``: (packed problem, states entering layer ``start`` or None) pairs, one forward each."""
    scores, llm, slm, divergent = [], [], [], []
    for packed, start_hidden in problems:
        if packed.n_groups == 0:
            continue
        hidden = decoder_hidden(lm, packed, start, start_hidden)
        candidates = hidden[packed.candidate_slice()].reshape(packed.n_groups, packed.k, -1)
        scores.append(selector.selection_logits(candidates, packed.slm_probs, bins).float().cpu())
        llm.append(packed.llm_probs)
        slm.append(packed.slm_probs)
        divergent.append(packed.divergent)
    return torch.cat(scores), torch.cat(llm), torch.cat(slm), torch.cat(divergent)


# ---------------------------------------------------------------------------- trainer state


@dataclass
class TrainerState:
    """Where a run stands: epochs and problems done, optimiser steps, the learning curve."""

    epoch: int = 0  # completed epochs
    position: int = 0  # problems of the current epoch's order already trained on
    step: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # the validation point whose weights are in best.safetensors


def _config_key(cfg: TrainConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_FIELDS}


def _crossed(seen: int, step: int, every: int) -> bool:
    """Whether going from ``seen - step`` to ``seen`` problems passed a multiple of ``every`` (0: never)."""
    return bool(every) and seen // every > (seen - step) // every


class LoraTrainer:
    """Packed LoRA training of the selector from a collection directory."""

    def __init__(self, cfg: TrainConfig, slm=None, progress: bool = True, resume: bool = False):
        from accelerate import Accelerator
        from peft import LoraConfig, get_peft_model

        from s2t.models import load_model, parse_dtype

        self.cfg, self.progress = cfg, progress
        self.groups_dir, self.out = Path(cfg.groups), Path(cfg.out)
        self.collect_cfg = collection_config(self.groups_dir)
        self.records = collected_records(self.groups_dir, need_features=False)
        if not self.records:
            raise ValueError(f"{self.groups_dir} holds no collected problems yet: run `s2t collect`")
        self.k = cfg.k or self.collect_cfg.get("k", 16)
        for record in self.records:
            check_record(record, self.k, str(self.groups_dir))
        if cfg.groups_at:  # train and validate only where the inference trigger fires
            groups = [g for record in self.records for g in record["groups"]]
            keep = iter(collected_groups_at(self.groups_dir, cfg.groups_at, groups).tolist())
            self.records = [
                record | {"groups": [g for g in record["groups"] if next(keep)]} for record in self.records
            ]
        checkpoint = self.out / CHECKPOINT_DIR
        if checkpoint.is_dir() and not resume:
            raise ResumeError(
                f"{self.out} already holds a training checkpoint: pass --resume to continue it, or use a new --out"
            )
        if resume and not (checkpoint / "trainer_state.json").is_file():
            raise ResumeError(f"nothing to resume: {checkpoint} holds no checkpoint")
        if resume:
            self._check_resumable(checkpoint)

        self.accelerator = Accelerator()
        device = str(self.accelerator.device)
        slm = slm or load_model(self.collect_cfg["slm"], dtype=cfg.dtype, device=device)
        self.vocab_size = len(slm.tokenizer)
        self.lm = slm.model.to(self.accelerator.device)
        if cfg.dtype is not None and self.lm.dtype != parse_dtype(cfg.dtype):
            self.lm = self.lm.to(parse_dtype(cfg.dtype))
        self.lm.requires_grad_(False)
        self.start = first_adapted_layer(self.lm.config.num_hidden_layers, cfg.lora_layers)
        # bins and fingerprint come from the untouched base model
        self.selector = LocalSelector.initial(self.lm, self.collect_cfg["slm"], self.vocab_size)
        self.selector.config.score_temperature = cfg.score_temperature
        self.train_p, self.val_p = split_problems(len(self.records), cfg.val_fraction, cfg.seed)
        self.train_packed = {
            i: pack_problem(self.records[i], self.k, cfg.groups_subset, cfg.prefix_kl_tokens)
            for i in sorted(self.train_p)
        }
        self.train_order = [i for i in sorted(self.train_p) if self.train_packed[i].n_groups > 0]
        if not self.train_order:
            raise ValueError("no training groups (collect more problems, or lower --val-fraction)")
        # validation reads every kept group (all, not --groups-subset), so agreement is reported on all and on divergent ones
        self.val_packed = {
            i: pack_problem(self.records[i], self.k, "all", cfg.prefix_kl_tokens) for i in sorted(self.val_p)
        }
        self.prepared_dir = self.out / PREPARED_DIR / self._prepared_key()
        self._prepare()

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
            layers_to_transform=list(range(self.start, self.lm.config.num_hidden_layers)),
        )
        torch.manual_seed(cfg.seed)  # before the LoRA weights are initialised: same start on every process
        self.model = get_peft_model(self.lm, lora)
        self.inner = self.model.base_model.model  # the causal LM with LoRA layers inside
        self.bins = torch.nn.Parameter(
            (torch.randn_like(self.selector.bins) * 0.01).to(self.accelerator.device)
        )
        adapter = [p for p in self.model.parameters() if p.requires_grad]
        self.params = adapter + [self.bins]
        self.optimizer = torch.optim.AdamW(
            [{"params": adapter}, {"params": [self.bins], "lr": cfg.bins_lr or cfg.lr}],
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
        )
        self.state = TrainerState()
        if resume:
            self._load_checkpoint(checkpoint)

    # -- the frozen pass --------------------------------------------------------------------

    def _prepared_key(self) -> str:
        key = {
            "slm": model_fingerprint(self.lm),
            "dtype": str(self.lm.dtype),
            "k": self.k,
            "subset": self.cfg.groups_subset,
            "groups_at": self.cfg.groups_at,
            "start": self.start,
            "top": self.cfg.frozen_top,
            "window": self.cfg.prefix_kl_tokens,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]

    def _prepared_file(self, index: int, part: str) -> Path:
        return self.prepared_dir / f"{part}-{index}.safetensors"

    def _prepare(self) -> None:
        """Run the frozen pass once for every problem that lacks it (resumable; each file atomic)."""
        todo = [(i, "train", self.train_packed[i]) for i in self.train_order]
        todo += [(i, "val", p) for i, p in self.val_packed.items() if p.n_groups > 0]
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        mine = [t for j, t in enumerate(todo) if j % world == rank]
        missing = [t for t in mine if not self._prepared_file(t[0], t[1]).is_file()]
        self.prepared_dir.mkdir(parents=True, exist_ok=True)
        if missing:
            for index, part, packed in tqdm(
                missing,
                desc="frozen pass (once)",
                unit="problem",
                disable=not self.progress,
                dynamic_ncols=True,
            ):
                tensors = frozen_pass(self.lm, packed, self.vocab_size, self.cfg.frozen_top, self.start)
                save_tensors(tensors, self._prepared_file(index, part))
        self.accelerator.wait_for_everyone()

    def _prepared(self, index: int, part: str) -> dict[str, torch.Tensor]:
        path = self._prepared_file(index, part)
        try:
            return load_file(str(path))
        except Exception as e:  # a truncated or corrupted cache file: recompute it
            logger.warning("recomputing %s (%s)", path, e)
            packed = (self.train_packed if part == "train" else self.val_packed)[index]
            with self.model.disable_adapter():  # read only once training runs, so the adapter exists
                tensors = frozen_pass(self.lm, packed, self.vocab_size, self.cfg.frozen_top, self.start)
            save_tensors(tensors, path)
            return tensors

    # -- checkpoints --------------------------------------------------------------------------

    def _check_resumable(self, checkpoint: Path) -> None:
        saved = json.loads((checkpoint / "trainer_state.json").read_text())["config"]
        saved.pop("out", None)  # recorded by checkpoints made before it became resumable
        now = _config_key(self.cfg)
        # the collection by where it is, not how the path was typed (relative to another directory)
        saved["groups"], now["groups"] = (str(Path(p).resolve()) for p in (saved["groups"], now["groups"]))
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
            raise ResumeError(
                f"refusing to resume {self.out} with another configuration ({diffs}); only "
                f"{', '.join(sorted(RESUMABLE_FIELDS))} may change. Use a new --out to train afresh."
            )

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        state = {f"adapter.{k}": v for k, v in get_peft_model_state_dict(self.model).items()}
        state["bins"] = self.bins.detach()
        return state

    def _load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        adapter = {k[len("adapter.") :]: v for k, v in tensors.items() if k.startswith("adapter.")}
        set_peft_model_state_dict(self.model, adapter)
        with torch.no_grad():
            self.bins.copy_(tensors["bins"])

    def save_checkpoint(self) -> None:
        if not self.accelerator.is_main_process:
            return
        checkpoint = self.out / CHECKPOINT_DIR
        checkpoint.mkdir(parents=True, exist_ok=True)
        tensors = self._trainable_state()
        optim = self.optimizer.state_dict()
        for i, slots in optim["state"].items():
            for name, value in slots.items():
                tensors[f"optimizer.{i}.{name}"] = torch.as_tensor(value)
        tensors["rng.torch"] = torch.get_rng_state()
        save_tensors(tensors, checkpoint / "state.safetensors")
        write_json_atomic(
            checkpoint / "trainer_state.json",
            {
                "config": _config_key(self.cfg),
                **asdict(self.state),
                "optimizer_param_groups": optim["param_groups"],
            },
        )

    def _load_checkpoint(self, checkpoint: Path) -> None:
        try:
            tensors = load_file(str(checkpoint / "state.safetensors"))
            saved = json.loads((checkpoint / "trainer_state.json").read_text())
        except Exception as e:
            raise ResumeError(f"the checkpoint in {checkpoint} is unreadable ({e}); use a new --out") from e
        self._load_trainable_state(tensors)
        slots: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, i, name = key.split(".", 2)
                slots.setdefault(int(i), {})[name] = value
        self.optimizer.load_state_dict({"state": slots, "param_groups": saved["optimizer_param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        self.state = TrainerState(
            saved["epoch"], saved["position"], saved["step"], saved["history"], saved["best"]
        )

    # -- training -----------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(self.train_order)
        random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def train(self) -> LocalSelector:
        cfg, acc = self.cfg, self.accelerator
        rank, world = acc.process_index, acc.num_processes
        n = len(self.train_order)
        with terminate_as_interrupt():
            try:
                if not self.state.history and self.val_packed:  # a fresh run: the curve's origin
                    self._validate("start")
                for epoch in range(self.state.epoch, cfg.epochs):
                    order = self.epoch_order(epoch)
                    bar = tqdm(
                        total=n,
                        initial=self.state.position,
                        desc=f"lora epoch {epoch + 1}/{cfg.epochs}",
                        unit="problem",
                        disable=not self.progress or not acc.is_main_process,
                        dynamic_ncols=True,
                    )
                    running = {"loss": 0.0, "groups": 0, "agree": 0}
                    while self.state.position < n:
                        batch = order[self.state.position : self.state.position + cfg.batch_size]
                        stats = self._step(
                            batch[rank::world], sum(self.train_packed[i].n_groups for i in batch)
                        )
                        # weights blown up (the same on every process after the reduced step): keep
                        # the best validated point
                        if diverged(epoch + 1, self.state.best is not None, weights=self.params):
                            bar.close()
                            return self.finish()
                        for key in running:
                            running[key] += stats[key]
                        self.state.position += len(batch)
                        self.state.step += 1
                        bar.update(len(batch))
                        bar.set_postfix(
                            loss=f"{running['loss'] / max(running['groups'], 1):.3f}",
                            acc=f"{running['agree'] / max(running['groups'], 1):.1%}",
                        )
                        seen = epoch * n + self.state.position
                        # the epoch's end is validated and checkpointed below
                        if _crossed(seen, len(batch), cfg.eval_every) and self.state.position < n:
                            self._validate(f"epoch {epoch + 1}, {self.state.position} problems", running)
                        if _crossed(seen, len(batch), cfg.checkpoint_every) and self.state.position < n:
                            self.save_checkpoint()
                    bar.close()
                    self.state.epoch, self.state.position = epoch + 1, 0
                    self._validate(f"epoch {epoch + 1}", running)
                    self.save_checkpoint()
            except KeyboardInterrupt:
                self.save_checkpoint()
                logger.warning(
                    "interrupted: checkpoint saved in %s; continue with --resume", self.out / CHECKPOINT_DIR
                )
                raise
        return self.finish()

    def _step(self, problems: list[int], batch_groups: int) -> dict:
        """One optimiser step over the batch (this process's ``problems``); returns running stats."""
        acc = self.accelerator
        self.model.train()
        self.optimizer.zero_grad()
        stats = {"loss": 0.0, "groups": 0, "agree": 0}
        for i in problems:
            packed = self.train_packed[i]
            loss, scores = packed_loss(
                self.inner,
                self.selector,
                self.bins,
                packed,
                self._prepared(i, "train"),
                self.cfg,
                self.vocab_size,
                self.start,
            )
            # this process's share of the batch mean; averaging over processes gives the whole mean
            acc.backward(loss * acc.num_processes / batch_groups)
            stats["loss"] += float(loss.detach())
            stats["groups"] += packed.n_groups
            best = packed.llm_probs.argmax(-1)
            stats["agree"] += int((scores.detach().argmax(-1).cpu() == best).sum())
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            param.grad = acc.reduce(param.grad, reduction="mean")
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        return stats

    def validation_scores(self) -> tuple[torch.Tensor, ...]:
        """Scores, LLM and SLM probabilities and divergence flags of every validation group."""
        self.model.eval()
        problems = (
            (p, self._prepared(i, "val").get("start_hidden"))
            for i, p in self.val_packed.items()
            if p.n_groups > 0
        )
        return packed_group_scores(self.inner, self.selector, problems, self.bins, self.start)

    def _validate(self, where: str, running: dict | None = None) -> dict:
        row = {
            "where": where,
            "epoch": self.state.epoch,
            "problems_seen": self.state.epoch * len(self.train_order) + self.state.position,
            "step": self.state.step,
        }
        if running and running["groups"]:
            row["train_running_loss"] = running["loss"] / running["groups"]
            row["train_running_agreement"] = running["agree"] / running["groups"]
        if self.val_packed and any(p.n_groups for p in self.val_packed.values()):
            metrics = grouped_selection_metrics(*self.validation_scores())
            row["validation"] = metrics
            score = metrics["all"]["agreement_with_llm"]
            # the untrained start is a reference point of the learning curve, never the result
            if where != "start" and (
                self.state.best is None or score > self.state.best["agreement_with_llm"]
            ):
                self.state.best = {"where": where, "agreement_with_llm": score}
                if self.accelerator.is_main_process:
                    (self.out / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
                    save_tensors(self._trainable_state(), self.out / CHECKPOINT_DIR / "best.safetensors")
            if self.progress and self.accelerator.is_main_process:
                a, d = metrics["all"], metrics["divergent"]
                tqdm.write(
                    f"[{where}] validation: picks the LLM's best {a['agreement_with_llm']:.1%} of "
                    f"{a['n_groups']} groups (SLM top-1 {a['slm_top1_agreement_with_llm']:.1%}); divergent "
                    f"{d['agreement_with_llm']:.1%} of {d['n_groups']}"
                )
        self.state.history.append(row)
        return row

    def finish(self) -> LocalSelector:
        """Write the selector (the best validation point's weights, else the last) and its adapter."""
        cfg = self.cfg
        best_file = self.out / CHECKPOINT_DIR / "best.safetensors"
        self.accelerator.wait_for_everyone()
        if self.state.best is not None and best_file.is_file():
            self._load_trainable_state(load_file(str(best_file)))
        final = self.state.history[-1] if self.state.history else {}
        chosen = next(
            (h for h in self.state.history if self.state.best and h["where"] == self.state.best["where"]),
            final,
        )
        selector = self.selector
        selector.bins = self.bins.detach().float().cpu().clone()
        selector.config.training = {
            "mode": "lora",
            "adapter": ADAPTER_DIR,
            "config": asdict(cfg),
            "k": self.k,
            "adapted_layers": list(range(self.start, self.lm.config.num_hidden_layers)),
            "collection": collection_summary(self.groups_dir, cfg.groups_at),
            "train_problem_ids": sorted(self.records[i]["problem_id"] for i in self.train_p),
            "validation_problem_ids": sorted(self.records[i]["problem_id"] for i in self.val_p),
            "chosen": chosen.get("where"),
            "metrics": {
                "train": {
                    "n_groups": sum(self.train_packed[i].n_groups for i in self.train_order),
                    "running_agreement": final.get("train_running_agreement"),
                },
                "validation": chosen.get("validation"),
            },
        }
        if self.accelerator.is_main_process:
            self.model.save_pretrained(self.out / ADAPTER_DIR)  # safetensors by default
            for written in (self.out / ADAPTER_DIR).iterdir():  # peft's safetensors are owner-only
                give_plain_mode(written)
            selector.config.adapter_sha256 = adapter_digest(self.out)  # then the config that records it
            selector.save_pretrained(self.out)
            write_json_atomic(self.out / "training_history.json", self.state.history)
        self.accelerator.wait_for_everyone()
        self.model.unload()  # leave the caller's model as it was
        return selector


def train_lora(cfg: TrainConfig, slm=None, progress: bool = True, resume: bool = False) -> LocalSelector:
    """Train LoRA adapters plus the bins; saves the adapter beside the selector (``adapter/``)."""
    return LoraTrainer(cfg, slm=slm, progress=progress, resume=resume).train()
