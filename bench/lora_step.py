"""What one LoRA training step costs on real problems: packed by problem vs one forward per group.

For each setting (adapted layers × base dtype) it times, per collected problem, the packed
forward + backward (from the cached frozen states below the adapted layers when only the top
layers are adapted), and the one-time frozen pass. The per-group loop (the old trainer: one
forward with the adapter, one without, and a backward, per group) is timed on a few groups of
one problem and scaled to the problem's group count. Medians over problems, in seconds.

    python bench/lora_step.py --groups results/collect-gsm8k-train-300 --problems 3 \
        --out results/bench/lora_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from s2t.models import load_model
from s2t.policies.learned_selector import LocalSelector
from s2t.training.collect import collected_records, collection_config
from s2t.training.lora import LORA_TARGETS, first_adapted_layer, frozen_pass, packed_loss, per_group_loss
from s2t.training.packing import pack_problem
from s2t.training.train import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default="results/collect-gsm8k-train-300")
    parser.add_argument("--problems", type=int, default=3, help="problems timed per setting")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--layers", default="24,8", help="adapted-layer counts to time")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--per-group-groups", type=int, default=3, help="groups timed for the per-group loop")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    collect_cfg = collection_config(args.groups)
    records = collected_records(args.groups, need_features=False)[: args.problems]
    cfg = TrainConfig(groups=args.groups, out="unused", mode="lora", lora_dropout=0.0)
    rows = []
    for dtype in args.dtypes.split(","):
        slm = load_model(collect_cfg["slm"], dtype=dtype, device="cpu")
        vocab = len(slm.tokenizer)
        for n_layers in map(int, args.layers.split(",")):
            lm = slm.model
            start = first_adapted_layer(lm.config.num_hidden_layers, n_layers)
            selector = LocalSelector.initial(lm, "slm", vocab)
            packs = [pack_problem(r, args.k, "all", cfg.prefix_kl_tokens) for r in records]
            frozen_s, prepared = [], []
            for p in packs:
                t0 = time.perf_counter()
                prepared.append(frozen_pass(lm, p, vocab, cfg.frozen_top, start))
                frozen_s.append(time.perf_counter() - t0)
            torch.manual_seed(0)
            model = get_peft_model(
                lm,
                LoraConfig(
                    r=16,
                    lora_alpha=32,
                    lora_dropout=0.0,
                    target_modules=LORA_TARGETS,
                    layers_to_transform=list(range(start, lm.config.num_hidden_layers)),
                ),
            )
            inner = model.base_model.model
            bins = torch.nn.Parameter(selector.bins.clone())
            step_s = []
            for p, prep in zip(packs, prepared):
                t0 = time.perf_counter()
                loss, _ = packed_loss(inner, selector, bins, p, prep, cfg, vocab, start)
                loss.backward()
                step_s.append(time.perf_counter() - t0)
            # the per-group loop on the first few groups of the first problem, scaled to all its groups
            sub = pack_problem(
                {**records[0], "groups": records[0]["groups"][: args.per_group_groups]}, args.k
            )
            sub_prep = frozen_pass(lm, sub, vocab, cfg.frozen_top, 0)
            t0 = time.perf_counter()
            per_group_loss(inner, selector, bins, sub, sub_prep, cfg, vocab).backward()
            # the old loop also ran a second (frozen) forward per group for the KL targets
            with torch.no_grad(), model.disable_adapter():
                for g in range(sub.n_groups):
                    frozen_pass(
                        lm,
                        pack_problem({**records[0], "groups": [records[0]["groups"][g]]}, args.k),
                        vocab,
                        cfg.frozen_top,
                        0,
                    )
            per_group = (time.perf_counter() - t0) / sub.n_groups * packs[0].n_groups
            model.unload()
            row = {
                "dtype": dtype,
                "adapted_layers": n_layers,
                "k": args.k,
                "threads": args.threads,
                "problems": len(packs),
                "tokens_per_problem": statistics.median(len(p.input_ids) for p in packs),
                "groups_per_problem": statistics.median(p.n_groups for p in packs),
                "packed_step_s": statistics.median(step_s),
                "frozen_pass_s": statistics.median(frozen_s),
                "per_group_loop_s_first_problem": per_group,
                "packed_step_s_first_problem": step_s[0],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        del slm
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps(
                {
                    "machine": "CPU, 2 cores (AMD EPYC Zen 3), nothing else running",
                    "torch": torch.__version__,
                    "rows": rows,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
