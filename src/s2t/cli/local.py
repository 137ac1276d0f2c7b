"""``s2t collect`` and ``s2t train``: distil the LLM's selection into the SLM (S2T-Local)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated

import typer

from s2t.cli.app import (
    DecodeDtypeOpt,
    DtypeOpt,
    LLMDeviceMapOpt,
    LLMDtypeOpt,
    LLMOpt,
    RayAddressOpt,
    SLMOpt,
    WorkersOpt,
    app,
    console,
    fail,
    fail_interrupted,
    fail_to_write,
    limit_option,
    nonempty_path,
)
from s2t.models import DEFAULT_LLM, DEFAULT_SLM


@app.command()
def collect(
    dataset: Annotated[
        str, typer.Option(help="Training dataset (gsm8k, or any name with --data-file).")
    ] = "gsm8k",
    split: Annotated[str, typer.Option(help="A training split; evaluation splits are refused.")] = "train",
    limit: Annotated[int | None, limit_option("Collect on the first N problems (after --offset)")] = 300,
    offset: Annotated[int, typer.Option(help="Skip this many problems first.")] = 0,
    data_file: Annotated[str | None, typer.Option(help="A local JSONL with question/answer fields.")] = None,
    mode: Annotated[
        str, typer.Option(help="teacher-forced (cheap) or on-policy (S2T decoding, as the paper).")
    ] = ("teacher-forced"),
    k: Annotated[int, typer.Option("--k", "-k", help="Candidates per group (the SLM's top-K).")] = 16,
    groups_at: Annotated[
        str,
        typer.Option(
            help="teacher-forced: keep the positions where any of these trigger settings fires "
            "(entropy/margin/kl @QUANTILE or =THRESHOLD, or always; quantiles calibrated on the "
            "collection's first --calibration-problems problems)."
        ),
    ] = "entropy@0.8,kl@0.9",
    calibration_problems: Annotated[
        int, typer.Option(help="Training problems that calibrate --groups-at quantiles.")
    ] = 8,
    threshold: Annotated[float | None, typer.Option(help="on-policy: entropy trigger threshold.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Trajectory length limit.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Problems decoded together.")] = 8,
    out: Annotated[
        str | None, typer.Option(callback=nonempty_path, help="Output directory (resumed if it exists).")
    ] = None,
    slm: SLMOpt = DEFAULT_SLM,
    llm: LLMOpt = DEFAULT_LLM,
    dtype: DecodeDtypeOpt = None,
    llm_dtype: LLMDtypeOpt = None,
    llm_device_map: LLMDeviceMapOpt = None,
    workers: WorkersOpt = 1,
    ray_address: RayAddressOpt = None,
    recompute_features: Annotated[
        bool,
        typer.Option(
            help="Also redo recorded problems whose features/ file is missing or unreadable (a clone "
            "of committed results): --mode head needs them, and so does a learned trigger on records "
            "older than the per-position values. Without it a resumed run goes on with new problems."
        ),
    ] = False,
) -> None:
    """Collect (context, top-K candidates, LLM preference) groups on training problems."""
    from s2t.data import DatasetUnavailableError
    from s2t.training.collect import CollectConfig
    from s2t.training.collect import collect as run_collect

    out = out or str(Path("runs") / f"groups-{dataset}-{split}-{offset}-{limit}-{mode}")
    try:
        if mode == "on-policy" and threshold is None:
            raise ValueError("on-policy collection needs --threshold (the entropy trigger's threshold)")
        config = CollectConfig(
            slm=slm,
            llm=llm,
            dataset=dataset,
            split=split,
            limit=limit,
            offset=offset,
            data_file=data_file,
            mode=mode,
            k=k,
            groups_at=groups_at,
            calibration_problems=calibration_problems,
            on_policy_threshold=threshold,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            dtype=dtype,
            llm_dtype=llm_dtype,
            llm_device_map=llm_device_map,
        )
        console.print(f"collecting into {out}" + (f" on {workers} Ray workers" if workers > 1 else ""))
        run_collect(
            config, out, workers=workers, ray_address=ray_address, recompute_features=recompute_features
        )
    except (ValueError, RuntimeError, FileNotFoundError, DatasetUnavailableError) as e:
        fail(str(e))
    except OSError as e:  # e.g. an --out that is a file
        fail_to_write(e, out)
    except KeyboardInterrupt:
        fail_interrupted(out)
    console.print(f"done: {out}/problems.jsonl and {out}/features/")


@app.command("train")
def train_command(
    groups: Annotated[
        str, typer.Option(callback=nonempty_path, help="A collection directory made by `s2t collect`.")
    ],
    out: Annotated[
        str,
        typer.Option(callback=nonempty_path, help="Where to save the selector (safetensors + JSON config)."),
    ],
    mode: Annotated[
        str,
        typer.Option(
            help="features (a listwise scorer over the SLM's own top-K distribution; no extra forward "
            "at inference; minutes), head (frozen SLM, score bins) or lora (the paper's; packed by problem)."
        ),
    ] = "head",
    groups_at: Annotated[
        str | None,
        typer.Option(
            help="Train (and validate) only on groups where these trigger settings fire (e.g. entropy@0.8, "
            "calibrated by the collection, or entropy=0.48): the points the selector will meet."
        ),
    ] = None,
    groups_subset: Annotated[
        str, typer.Option(help="all, or divergent (SLM top-1 ≠ LLM top-1) only.")
    ] = "all",
    epochs: Annotated[int | None, typer.Option(help="Epochs (default: 30 for head, 3 for lora).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: 1e-2 head, 5e-5 lora).")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Per step: groups in head mode (256), problems in lora mode (1).")
    ] = None,
    val_fraction: Annotated[
        float, typer.Option(help="Share of training problems held out for validation.")
    ] = 0.1,
    seed: Annotated[int, typer.Option(min=0, help="Seed for the split and initialisation.")] = 0,
    lora_r: Annotated[int, typer.Option(help="lora: LoRA rank.")] = 16,
    lora_alpha: Annotated[int, typer.Option(help="lora: LoRA alpha (scale alpha/r).")] = 32,
    bins_lr: Annotated[
        float | None, typer.Option(help="lora: learning rate of the score bins (default: --lr).")
    ] = None,
    lora_dropout: Annotated[float, typer.Option(help="lora: dropout on the LoRA layers.")] = 0.05,
    lora_layers: Annotated[
        int | None, typer.Option(help="lora: adapt only the top N decoder layers (default: all).")
    ] = None,
    k: Annotated[
        int | None,
        typer.Option(
            "--k",
            "-k",
            help="Candidates per group (default: 8 for features, the collection's K for head and lora).",
        ),
    ] = None,
    prefix_kl_weight: Annotated[
        float, typer.Option(help="lora: weight of the KL to the frozen SLM on the prefix (0 to skip).")
    ] = 0.1,
    checkpoint_every: Annotated[
        int, typer.Option(help="lora: problems between checkpoints (one at each epoch's end too).")
    ] = 50,
    eval_every: Annotated[
        int, typer.Option(help="lora: problems between validation points (a learning curve).")
    ] = 100,
    resume: Annotated[
        bool, typer.Option("--resume", help="lora: continue the checkpoint in --out (same configuration).")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace the selector (and learned trigger) an earlier training saved in --out; without it "
            "such an --out is refused.",
        ),
    ] = False,
    trigger_rate: Annotated[
        float,
        typer.Option(
            help="Also train an LLM-free trigger firing on this share of steps, in [0, 1) (0 to skip)."
        ),
    ] = 0.05,
    trigger_label: Annotated[
        str,
        typer.Option(
            help="What the learned trigger predicts: kl@Q (KL(SLM||LLM) in its top 1-Q, where the "
            "paper's KL trigger fires) or divergent (LLM top-1 != SLM top-1)."
        ),
    ] = "kl@0.95",
    trigger_features: Annotated[
        str,
        typer.Option(
            help="What the learned trigger reads: auto (the hidden state if it helps on an inner split of "
            "the training problems) or logits (entropy, margin and top probabilities only; runs on llama.cpp)."
        ),
    ] = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """Train the S2T-Local selector (and an LLM-free trigger) from collected groups."""
    from s2t.policies.learned_selector import SelectorCheckpointError
    from s2t.training.collect import check_complete_groups_at, collection_config
    from s2t.training.objective import LORA_DEFAULT_LR, TrainConfig
    from s2t.training.train import check_output_dir, replacing_output, train
    from s2t.training.trigger import TRIGGER_FEATURES, check_trigger_data

    defaults = {"head": (30, 1e-2, 256), "lora": (3, LORA_DEFAULT_LR, 1), "features": (30, 3e-3, 256)}
    # every option is checked here or by the training configuration, before any model loads
    try:
        if mode not in defaults:
            raise ValueError(f"mode must be features, head or lora; got {mode!r}")
        collected_k = collection_config(groups)["k"]  # also: a missing collection, before any model loads
        if k is not None and k > collected_k:
            raise ValueError(
                f"--k {k} exceeds the collection's K={collected_k} (its groups hold {collected_k} candidates)"
            )
        if groups_subset not in ("all", "divergent"):
            raise ValueError(f"--groups-subset must be all or divergent; got {groups_subset!r}")
        if mode == "features" and groups_subset != "all":
            raise ValueError(
                "--groups-subset applies to head and lora modes; features mode trains on all groups"
            )
        if not 0.0 <= trigger_rate < 1.0:
            raise ValueError(f"--trigger-rate must lie in [0, 1) (0 trains no trigger); got {trigger_rate}")
        if trigger_features not in TRIGGER_FEATURES:
            raise ValueError(
                f"--trigger-features must be one of {', '.join(TRIGGER_FEATURES)}; got {trigger_features!r}"
            )
        if trigger_rate > 0:
            check_trigger_data(groups, trigger_label)
        if groups_at:
            check_complete_groups_at(groups, groups_at)
        if resume and mode != "lora":
            raise ValueError(
                "--resume applies to lora mode; features and head training take minutes and restart"
            )
        check_output_dir(out, overwrite=overwrite, resume=resume)
        d_epochs, d_lr, d_bs = defaults[mode]
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    # None is "not given": an explicit 0 goes on to the configuration, which refuses it
    epochs = d_epochs if epochs is None else epochs
    lr = d_lr if lr is None else lr
    batch_size = d_bs if batch_size is None else batch_size
    trigger_failure = None  # the selector is saved, the learned trigger failed: the selector stays
    with replacing_output(out, overwrite):  # an earlier training comes back unless this one succeeds
        try:
            if mode == "features":
                selector = _train_features(
                    groups,
                    out,
                    8 if k is None else k,
                    groups_at,
                    epochs,
                    lr,
                    batch_size,
                    val_fraction,
                    seed,
                    dtype,
                )
            else:
                config = TrainConfig(
                    groups=groups,
                    out=out,
                    mode=mode,
                    groups_subset=groups_subset,
                    groups_at=groups_at,
                    epochs=epochs,
                    lr=lr,
                    batch_size=batch_size,
                    val_fraction=val_fraction,
                    seed=seed,
                    dtype=dtype,
                    lora_r=lora_r,
                    lora_alpha=lora_alpha,
                    lora_dropout=lora_dropout,
                    lora_layers=lora_layers,
                    k=k,
                    bins_lr=bins_lr,
                    prefix_kl_weight=prefix_kl_weight,
                    checkpoint_every=checkpoint_every,
                    eval_every=eval_every,
                )
                selector = train(config, resume=resume)
                if mode == "lora":
                    from accelerate import PartialState

                    if (
                        not PartialState().is_main_process
                    ):  # under `accelerate launch`: the main process reports
                        return
            try:
                trigger = (
                    _train_trigger(
                        groups, out, trigger_rate, val_fraction, seed, dtype, trigger_label, trigger_features
                    )
                    if trigger_rate > 0
                    else None
                )
            except (ValueError, FileNotFoundError) as e:
                trigger, trigger_failure = (
                    None,
                    f"the selector is saved in {out}; the learned trigger failed: {e}",
                )
        except typer.Exit:  # a failure already reported (it is a RuntimeError to click)
            raise
        except KeyboardInterrupt:
            fail(
                f"interrupted; what was trained is in {out}/checkpoint: continue with the same command and --resume"
                if mode == "lora" and (Path(out) / "checkpoint").is_dir()
                else "interrupted: nothing was saved"
                + (" (the earlier training is back in place)" if overwrite else "")
            )
        except (ValueError, RuntimeError, FileNotFoundError, SelectorCheckpointError) as e:
            fail(str(e))
    # the training is in place (an earlier one is gone): what follows only reports on it
    if trigger_failure:
        fail(trigger_failure)
    try:
        report_k = selector.config.k if mode == "features" else k  # None: the collection's K
        _report(selector, trigger, trigger_rate, out, groups, report_k, groups_at, dtype)
    except KeyboardInterrupt:
        saved = "selector and its learned trigger are" if trigger is not None else "selector is"
        fail(
            f"interrupted while reporting: the trained {saved} saved in {out} (its ladder.json was not written)"
        )


@cache
def _collection_slm(groups: str, dtype):
    """The collection's SLM, loaded once per command (the selector, the trigger and the ladder share it),
    by default in the collection's dtype: rebuilt trigger features must match the stored ones."""
    from s2t.models import load_model
    from s2t.training.collect import collection_config, collection_dtype

    config = collection_config(groups)
    return load_model(config["slm"], dtype=dtype or collection_dtype(config))


def _train_features(groups, out, k, groups_at, epochs, lr, batch_size, val_fraction, seed, dtype):
    from s2t.training.feature_training import FeatureTrainConfig, train_feature_selector

    try:
        config = FeatureTrainConfig(
            groups=groups,
            out=out,
            k=k,
            groups_at=groups_at,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
        )
        return train_feature_selector(config, slm=_collection_slm(groups, dtype))
    except RuntimeError as e:  # e.g. a learning rate whose steps overflow float32
        fail(f"training failed: {e}")
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))


def _report(selector, trigger, trigger_rate: float, out: str, groups: str, k, groups_at, dtype) -> None:
    metrics = selector.config.training["metrics"]
    for part in ("train", "validation"):
        m = metrics.get(part)
        if not m:
            continue
        if m.get("running_agreement") is not None:  # lora: measured during the last epoch, with dropout
            console.print(f"train ({m['n_groups']} groups): running agreement {m['running_agreement']:.1%}")
        for subset, v in m.items() if "all" in m else [("all", m)]:
            if v and "agreement_with_llm" in v:
                console.print(
                    f"{part} ({subset} groups, {v['n_groups']}): picks the LLM's best candidate "
                    f"{v['agreement_with_llm']:.1%} of the time (the SLM's top-1: {v['slm_top1_agreement_with_llm']:.1%})"
                )
    if trigger is not None:
        from s2t.training.ladder import MIN_VERDICT_PROBLEMS

        m = trigger.config.metrics
        console.print(
            f"learned trigger: threshold {trigger.threshold:.4f} for a {trigger_rate:.0%} trigger rate"
        )
        for name in ("learned", "shallow", "entropy", "margin"):
            if name in m:
                recall = next(v for k, v in m[name].items() if k.startswith("recall_at"))
                console.print(
                    f"  {name:8s} validation AUROC {m[name]['auroc']:.3f}, recall of {m.get('label', 'divergent')} "
                    f"steps {recall:.1%}"
                )
        if m.get("validation_problems", MIN_VERDICT_PROBLEMS) < MIN_VERDICT_PROBLEMS:
            console.print(
                f"  (on {m['validation_problems']} validation problem(s): too few to compare the triggers; "
                f"hold out at least {MIN_VERDICT_PROBLEMS} with --val-fraction or a larger collection)"
            )
    _ladder(selector, out, groups, k, groups_at, dtype)
    console.print(f"saved to {out}")


def _ladder(selector, out: str, groups: str, k, groups_at, dtype) -> None:
    """The selector ladder on the validation problems: the SLM's top-1, the shallow model, this one."""
    from s2t.runs import write_json_atomic
    from s2t.training.collect import collection_config
    from s2t.training.ladder import format_ladder, selector_ladder, verdict

    held_out = selector.config.training.get("validation_problem_ids") or []
    if not held_out:
        console.print(
            "no validation problems (--val-fraction held out none of the collection's problems): "
            "no selector ladder"
        )
        return
    k = collection_config(groups)["k"] if k is None else k
    try:
        ladder = selector_ladder(groups, held_out, k, groups_at, [out], slm=_collection_slm(groups, dtype))
    except ValueError as e:
        console.print(f"no selector ladder: {e}")
        return
    write_json_atomic(Path(out) / "ladder.json", ladder)
    console.print(f"selector ladder on the {len(held_out)} validation problems (K={k}):")
    console.print(format_ladder(ladder), markup=False, soft_wrap=True)
    console.print(verdict(ladder), markup=False, soft_wrap=True)


def _train_trigger(
    groups: str, out: str, rate: float, val_fraction: float, seed: int, dtype, label: str, features: str
):

    from s2t.training.collect import collection_config
    from s2t.training.trigger import train_trigger

    slm_name = collection_config(groups)["slm"]
    trigger = train_trigger(
        groups,
        _collection_slm(groups, dtype),
        slm_name,
        rate,
        val_fraction,
        seed,
        label=label,
        features=features,
    )
    trigger.save_pretrained(out)
    return trigger
