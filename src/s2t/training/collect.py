"""Collect S2T-Local training groups on *training* problems.

A group is one decision point: the context (a problem's prompt + trajectory prefix), the SLM's
top-K candidates there, the SLM's and the LLM's probabilities on them, and trigger statistics.

Two modes:
- ``teacher-forced`` (default, cheap): the SLM decodes greedily; the LLM reads the whole
  trajectory in one forward pass; groups are the positions where any of the ``groups_at``
  trigger settings fires (default ``entropy@0.8,kl@0.9``: where the entropy trigger that
  S2T-Local runs at would fire, and where the LLM's KL trigger would, which a learned trigger
  imitates). Quantile settings are calibrated once per run, as evaluation calibrates them: on
  the statistics of greedy SLM decoding of the collection's first (training) problems, stored in
  the run's ``calibration.json``. Each group records every trigger statistic, so training can keep
  exactly the groups of the trigger it will run at.
- ``on-policy`` (as the paper): S2T decoding with the LLM selector over the SLM's top-K; groups
  are the triggered steps, on the trajectory S2T actually produced.

For every problem the SLM also reads all candidates of all its groups in one more forward over
the trajectory's KV cache (a 4D mask: each candidate sees its own prefix and itself), which
gives the candidate hidden states that the head-mode trainer needs, plus per-position features
(hidden state, entropy, margin, KL(SLM‖LLM) over the SLM's top-64, divergence label) for
learning an LLM-free trigger.

Per problem, tensors go to ``features/<index>.safetensors`` and a record (trajectory, group
metadata) is appended to ``problems.jsonl``; a run resumes by skipping recorded problems.
Collection refuses evaluation splits: nothing from a test split can leak into training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save

from s2t.data import PROBLEM_DIGEST_CHARS, Problem, data_file_digest, load_problems
from s2t.engine import Method, decode
from s2t.models import (
    DEFAULT_LLM,
    DEFAULT_SLM,
    LoadedModel,
    cache_kwargs,
    check_same_vocabulary,
    engine_kwargs,
    load_model,
    parse_dtype,
    resolve_dtype,
)
from s2t.policies import EntropyTrigger, KLTrigger, LLMSelector, MarginTrigger, TopK
from s2t.policies.checkpoint import model_fingerprint, non_finite_tensor
from s2t.policies.features import logit_statistics, rank_of
from s2t.policies.triggers import make_trigger
from s2t.prompts import build_prompt
from s2t.run_driver import RunDriver
from s2t.runs import PROBLEM_DIGESTS, RunDirectory, check_run_path, read_jsonl
from s2t.teacher_forcing import trajectory_forward

if TYPE_CHECKING:
    from s2t.methods import TriggerSetting

logger = logging.getLogger(__name__)

EVALUATION_SPLITS = {"test", "validation", "dev"}
MODES = ("teacher-forced", "on-policy")


class LeakageError(ValueError):
    """Training data would include problems from an evaluation split."""


@dataclass
class CollectConfig:
    slm: str = DEFAULT_SLM
    llm: str = DEFAULT_LLM
    dataset: str = "gsm8k"
    split: str = "train"
    limit: int | None = 300
    offset: int = 0
    data_file: str | None = None
    mode: str = "teacher-forced"
    k: int = 16
    groups_at: str = "entropy@0.8,kl@0.9"  # teacher-forced: trigger settings whose firing positions are kept
    calibration_problems: int = 8  # the dataset's first N training problems calibrate quantile settings
    on_policy_threshold: float | None = None  # on-policy: entropy threshold of the S2T trigger
    min_step: int = 3
    max_new_tokens: int = 512
    batch_size: int = 8
    dtype: str | None = None  # None: the decoding default (resolved and recorded; bfloat16 where it is fast)
    llm_dtype: str | None = None  # default: dtype
    llm_device_map: str | None = None  # e.g. "auto" to spread a large LLM over the GPUs

    def __post_init__(self):
        self.dtype = resolve_dtype(self.dtype)  # recorded, so a run says which dtype made it
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.split.lower() in EVALUATION_SPLITS:
            raise LeakageError(
                f"refusing to collect training data on the {self.dataset!r} {self.split!r} split: "
                "it is an evaluation split: a selector trained on it could not be evaluated there "
                "(collect on train problems: --split train)"
            )
        if self.k < 2:
            raise ValueError(
                f"K must be >= 2 (a selector chooses among at least two candidates); got {self.k}"
            )
        if self.calibration_problems < 1:
            raise ValueError(f"calibration_problems must be >= 1; got {self.calibration_problems}")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1 (or all, for every problem); got {self.limit}")
        if self.offset < 0 or self.min_step < 0:
            raise ValueError(f"--offset and min_step must be >= 0; got {self.offset}, {self.min_step}")
        group_settings(self.groups_at)  # validates the settings before any model loads


GROUP_TRIGGERS = ("entropy", "margin", "kl", "always")
# Collections made before the dtype was resolved and recorded stored null, which then meant float32.
LEGACY_CONFIG = {"dtype": "float32"}


def group_settings(spec: str):
    """Parse ``groups_at`` ("entropy@0.8,kl@0.9") into trigger settings; raises ``ValueError``."""
    from s2t.methods import SETTING_SYNTAX, split_method_name

    settings = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        # the trigger's name first: the method-name parser would name a method and list every trigger
        trigger = re.split(r"[@=/]", part, maxsplit=1)[0]
        if trigger not in GROUP_TRIGGERS or "/" in part:
            raise ValueError(
                f"--groups-at {part!r}: choose triggers from {', '.join(GROUP_TRIGGERS)} "
                "(e.g. entropy@0.8, kl=1.1, always), without /kK"
            )
        method = f"s2t/{part}"
        try:
            _, setting = split_method_name(method)
        except ValueError as e:  # a bad value: its reason, without the method-name wrapper
            reason = str(e).removeprefix(f"method {method!r}: ").removesuffix(f" (syntax: {SETTING_SYNTAX})")
            raise ValueError(f"--groups-at {part!r}: {reason}") from None
        settings.append(setting)
    if not settings:
        raise ValueError("--groups-at names no trigger setting (e.g. entropy@0.8,kl@0.9)")
    return settings


def position_statistics(slm_logits: torch.Tensor, llm_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each trigger's statistic at every position: (T,) float32 tensors keyed by trigger name.

    The same definitions as the triggers at decoding time (:mod:`s2t.policies.triggers`).
    """
    return {
        "entropy": EntropyTrigger().statistic(slm_logits, None),
        "margin": MarginTrigger().statistic(slm_logits, None),
        "kl": KLTrigger().statistic(slm_logits, llm_logits),
    }


def read_group_calibration(groups_dir: str | Path) -> dict:
    """A collection's ``calibration.json`` (``{label: {"trigger", "quantile", "threshold", "problems"}}``),
    or ``{}`` before any setting was calibrated."""
    stored_file = Path(groups_dir) / "calibration.json"
    return json.loads(stored_file.read_text()) if stored_file.is_file() else {}


def stored_group_thresholds(groups_dir: str | Path, groups_at: str) -> dict[str, float | None]:
    """Thresholds of ``groups_at`` settings: given (``=``), or the collection's calibrated ones (``@``).

    Raises:
        ValueError: a quantile setting the collection has not calibrated.
    """
    stored = read_group_calibration(groups_dir)
    thresholds = {}
    for s in group_settings(groups_at):
        if s.quantile is not None and s.label not in stored:
            raise ValueError(
                f"{groups_dir} has no calibrated threshold for {s.label!r} (calibrated: {', '.join(stored) or 'none'}); "
                f"give the threshold instead (e.g. {s.trigger}=VALUE)"
            )
        thresholds[s.label] = stored[s.label]["threshold"] if s.quantile is not None else s.threshold
    return thresholds


def collection_group_settings(
    groups_dir: str | Path,
) -> tuple[str, list[tuple[TriggerSetting, float | None]]] | None:
    """Where a collection kept its groups: its own ``(setting, threshold)`` pairs, with a line that
    names them and where they are recorded.

    A teacher-forced collection kept the positions where any of config.json's ``groups_at`` fires
    (thresholds: given, or calibrated in calibration.json); an on-policy one, the steps where its
    entropy trigger fired (config.json's ``on_policy_threshold``). None for a collection made before
    ``groups_at`` was recorded (its groups: entropy or divergent positions).
    """
    from s2t.methods import TriggerSetting

    config = collection_config(groups_dir)
    if config.get("mode") == "on-policy":
        threshold = config["on_policy_threshold"]
        own = [(TriggerSetting("entropy", threshold=threshold), threshold)]
        return f"its on-policy entropy trigger, config.json's on_policy_threshold {threshold!r}", own
    if not config.get("groups_at"):
        return None
    thresholds = stored_group_thresholds(groups_dir, config["groups_at"])
    own = [(s, thresholds[s.label]) for s in group_settings(config["groups_at"])]
    calibrated = [f"{s.label} at {t!r}" for s, t in own if s.quantile is not None]
    described = f"config.json's groups_at {config['groups_at']!r}" + (
        f"; calibration.json: {', '.join(calibrated)}" if calibrated else ""
    )
    return described, own


def check_complete_groups_at(groups_dir: str | Path, groups_at: str) -> None:
    """Refuse a ``groups_at`` setting that fires on positions the collection did not keep.

    A collection keeps the positions where any of its own settings fires, so it holds every firing
    position of a setting only if that setting is as strict as one of its own: the same trigger at
    an equal or stricter threshold (``entropy=0.6`` where it kept entropy >= 0.48), or anything where
    it kept every position (``always``). Below that it holds only the groups it kept for another
    setting (high KL, say): a biased sample, not the points the trigger will meet.

    Raises:
        ValueError: such a setting, naming the collection's own settings and the loosest complete
            one; or a quantile setting the collection has not calibrated.
    """
    kept = collection_group_settings(groups_dir)
    if kept is None or any(o.trigger == "always" for o, _ in kept[1]):
        # made before groups_at was recorded (what it kept completely is unknown), or kept everything
        stored_group_thresholds(groups_dir, groups_at)  # still refuses an uncalibrated quantile
        return
    described, own = kept

    def refuse(s, complete: str):
        raise ValueError(
            f"--groups-at {s.label!r} fires on positions {groups_dir} did not keep: the collection kept only "
            f"where its own settings fire ({described}), so {complete}; train there, or collect with "
            f"{s.label!r} in --groups-at"
        )

    settings = group_settings(groups_at)
    # a trigger the collection never kept at is refused first: no threshold of it could be complete,
    # so the missing-calibration hint (give TRIGGER=VALUE) would only lead to this refusal
    for s in settings:
        if s.trigger == "always" or not any(o.trigger == s.trigger for o, _ in own):
            refuse(s, f"no {s.trigger} setting is complete there")
    thresholds = stored_group_thresholds(groups_dir, groups_at)
    for s in settings:
        same = [(o, t) for o, t in own if o.trigger == s.trigger]
        higher = make_trigger(s.trigger).higher_is_critical
        bound = (min if higher else max)(t for _, t in same)
        if thresholds[s.label] >= bound if higher else thresholds[s.label] <= bound:
            continue
        loosest = " = ".join([*(o.label for o, t in same if t == bound), f"{s.trigger}={bound!r}"])
        refuse(
            s, f"its loosest complete {s.trigger} setting is {loosest} (a stricter threshold is complete too)"
        )


def collection_summary(groups_dir: str | Path, groups_at: str | None = None) -> dict:
    """What a trained selector records of the collection it learned from: its dataset, split, mode,
    K, models and kept settings, and, with ``groups_at``, the thresholds the trainer's settings
    resolved to there (``{"entropy@0.8": 0.4809}``). A quantile is calibrated per collection, and an
    evaluation calibrates its own, so the number says which points the selector was trained on."""
    config = collection_config(groups_dir)
    summary = {k: config.get(k) for k in ("dataset", "split", "mode", "k", "slm", "llm", "groups_at")}
    if groups_at:
        summary["trained_at_thresholds"] = stored_group_thresholds(groups_dir, groups_at)
    summary["problem_digests"] = collection_problem_digests(groups_dir)
    return summary


def collection_problem_digests(groups_dir: str | Path) -> list[str]:
    """The content digests (:attr:`s2t.data.Problem.digest`, first 16 hex characters, sorted) of the
    problems a collection recorded, so that a selector or a learned trigger trained on it is refused on
    them however they are labelled later (a training file evaluated as a test split). Read from the
    run's ``problem_digests.json``; a collection made before that file is re-read from the data its
    ``config.json`` names, and [] (with a warning: the check then goes by problem id only) where that
    data is not on this machine."""
    groups_dir = Path(groups_dir)
    ids = {r["problem_id"] for r in read_jsonl(groups_dir / "problems.jsonl")}
    bound = groups_dir / PROBLEM_DIGESTS
    if bound.is_file():
        digests = json.loads(bound.read_text())
    else:
        c = collection_config(groups_dir)
        try:
            problems = load_problems(c["dataset"], c["split"], None, 0, c.get("data_file"))
        except (ValueError, OSError, RuntimeError) as e:
            logger.warning(
                "%s records no problem digests and its data cannot be read (%s): the selector's leakage "
                "check will go by problem id only",
                groups_dir,
                e,
            )
            return []
        digests = {p.id: p.digest for p in problems}
    return sorted(digests[i][:PROBLEM_DIGEST_CHARS] for i in ids if i in digests)


def fires_at(setting, threshold: float | None, statistics: dict[str, torch.Tensor]) -> torch.Tensor:
    """Where a group setting fires, given its (calibrated) threshold; (T,) bool."""
    if setting.trigger == "always":
        return torch.ones_like(statistics["entropy"], dtype=torch.bool)
    return make_trigger(setting.trigger, threshold).critical(statistics[setting.trigger])


def collected_groups_at(groups_dir: str | Path, groups_at: str, groups: Sequence[dict]) -> torch.Tensor:
    """Which collected groups (records' ``groups`` entries) lie where any ``groups_at`` setting fires.

    The thresholds are the collection's calibrated ones (``entropy@0.8``) or given (``entropy=0.48``);
    each group's stored statistics (``entropy``, ``margin``, ``kl``) are compared as the trigger would
    at decoding time. Returns a (G,) bool tensor, in the order of ``groups``.

    Raises:
        ValueError: a malformed setting, a quantile the collection has not calibrated, a setting
            that fires where the collection did not keep every position
            (:func:`check_complete_groups_at`), or a ``kl`` setting on a collection made before
            per-group KL was recorded.
    """
    settings = group_settings(groups_at)
    check_complete_groups_at(groups_dir, groups_at)
    thresholds = stored_group_thresholds(groups_dir, groups_at)
    kl = torch.tensor([g.get("kl", float("nan")) for g in groups], dtype=torch.float32)
    if any(s.trigger == "kl" for s in settings) and kl.isnan().any():
        raise ValueError(
            f"{groups_dir} records no per-group KL (collected before it was recorded): re-collect with "
            "`s2t collect` into a new directory, or drop the kl setting"
        )
    stats = {
        "entropy": torch.tensor([g["entropy"] for g in groups], dtype=torch.float32),
        "margin": torch.tensor([g["margin"] for g in groups], dtype=torch.float32),
        "kl": kl,
    }
    keep = torch.zeros(len(groups), dtype=torch.bool)
    for s in settings:
        keep |= fires_at(s, thresholds[s.label], stats)
    return keep


@torch.inference_mode()
def candidate_hidden_states_at(
    model, cache, prompt_length: int, sequence_length: int, positions: Sequence[int], candidates: torch.Tensor
) -> torch.Tensor:
    """Hidden states (M, K, H) of every group's candidates, in one forward over the trajectory's cache.

    Candidate (m, j) stands at answer position ``positions[m]`` (in place of that trajectory token):
    it attends to the tokens before that position and to itself, with that position's id.
    """
    from s2t.policies.scoring import attention_mask_for

    m, k = candidates.shape
    if m == 0:
        return torch.zeros(0, k, model.config.hidden_size)
    allowed = torch.zeros(1, 1, m * k, sequence_length + m * k, dtype=torch.bool, device=model.device)
    position_ids = torch.empty(m * k, dtype=torch.long, device=model.device)
    for i, pos in enumerate(positions):
        allowed[0, 0, i * k : (i + 1) * k, : prompt_length + pos] = True
        position_ids[i * k : (i + 1) * k] = prompt_length + pos
    diagonal = torch.arange(m * k, device=model.device)
    allowed[0, 0, diagonal, sequence_length + diagonal] = True
    block = attention_mask_for(allowed, model)
    out = model.model(
        input_ids=candidates.reshape(1, m * k).to(model.device),
        attention_mask=block,
        position_ids=position_ids[None],
        **cache_kwargs(model.model, cache),
        use_cache=True,
    )
    return out.last_hidden_state[0].reshape(m, k, -1)


class RecordingLLMSelector(LLMSelector):
    """The S2T selector, recording each decision (for on-policy collection)."""

    def __init__(self):
        self.decisions: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def select(self, ctx):
        chosen = super().select(ctx)
        llm_probs = torch.softmax(ctx.llm_logits.float(), -1).gather(-1, ctx.candidates.ids)
        for i in ctx.fired.nonzero().flatten().tolist():
            # the prompt's index, not the batch row: rows shift as finished sequences leave
            self.decisions.append((ctx.sequence_ids[i], ctx.candidates.ids[i].clone(), llm_probs[i].clone()))
        return chosen


class Collector:
    """Collects groups for the configured training problems into a resumable run directory."""

    def __init__(
        self,
        config: CollectConfig,
        out_dir: str | Path,
        slm: LoadedModel | None = None,
        llm: LoadedModel | None = None,
        problems: Sequence[Problem] | None = None,
        progress: bool = True,
        workers: int = 1,
        ray_address: str | None = None,
        recompute_features: bool = False,
    ):
        """``workers > 1`` shards the problems over Ray actors, each loading its own pair (then
        ``slm``/``llm`` must be None); otherwise the pair is loaded here (or the given one used).
        ``recompute_features`` also redoes recorded problems whose ``features/`` file is missing."""
        self.config = config
        self._problems_given = problems is not None
        if problems is None:
            problems = load_problems(
                config.dataset, config.split, config.limit, config.offset, config.data_file
            )
        if not problems:
            raise ValueError(
                f"no problems to collect: {config.dataset} {config.split} holds none from --offset {config.offset}"
            )
        leaked = [p.id for p in problems if p.split.lower() in EVALUATION_SPLITS]
        if leaked:
            raise LeakageError(
                f"problem {leaked[0]} comes from an evaluation split; refusing to collect on it"
            )
        if workers > 1:
            from s2t.distributed import import_ray

            if slm is not None or llm is not None:
                raise ValueError(
                    "with workers > 1 each worker loads its own models: pass names in the config"
                )
            import_ray()  # fail before anything is written
        check_run_path(out_dir)  # before the models load
        # the models load (and K is checked against their vocabulary) before config.json is written
        self._worker = None if workers > 1 else CollectWorker(config, slm, llm)
        self.run = RunDirectory(
            out_dir,
            {
                **asdict(config),
                "kind": "s2t-local-groups",
                "data_file_sha256": data_file_digest(config.data_file),
            },
            ignore_keys={"limit", "batch_size", "llm_device_map"},
            legacy=LEGACY_CONFIG,
        )
        self.run.bind_problems((p.id, p.digest) for p in problems)
        # features first: a recorded problem never points to a missing file
        self.driver = RunDriver(
            self.run,
            "problems.jsonl",
            key=lambda r: r["problem_id"],
            side_files=self._side_files,
        )
        self.workers, self.ray_address = workers, ray_address
        self._first_stamped: dict | None = None  # see _side_files
        self.problems = list(problems)
        self.progress = progress
        self.recompute_features = recompute_features
        (self.run.path / "features").mkdir(exist_ok=True)

    def _side_files(self, record: dict) -> dict[str, bytes]:
        """A finished record's feature file, once its models are known to be the collection's (those
        of its first record that names them, read once)."""
        if self._first_stamped is None:
            self._first_stamped = next(
                (r for r in self.driver.records() if r.get("model_fingerprints")), record
            )
        check_same_models(self.run.path, [self._first_stamped, record])
        return {record["features"]: record.pop("features_data")}

    def _has_features(self, record: dict) -> bool:
        """Whether the record's feature file is there and reads whole, with finite values (what
        :func:`read_features` accepts)."""
        try:
            read_features(self.run.path, record)
            return True
        except (FileNotFoundError, ValueError):  # missing, truncated, or damaged
            return False

    def done_ids(self, records: Sequence[dict]) -> set[str]:
        """Problems already recorded (of the run's ``records``). With ``recompute_features``, a record whose feature file is
        missing or unreadable (a clone of committed results: ``features/`` is not in git) is not done and is
        collected again; otherwise the collection goes on with the problems not yet recorded (the
        features-mode and LoRA trainers need only the records)."""
        if not self.recompute_features:
            return {r["problem_id"] for r in records}
        return {r["problem_id"] for r in records if self._has_features(r)}

    def run_all(self) -> int:
        """Collect every problem not yet recorded; returns how many were collected now.

        Raises:
            RunBusyError: another collector is running on this directory (it would redo its problems).
        """
        with self.run.claim(["collect"]):
            return self._run_all()

    def _run_all(self) -> int:
        records = self.driver.records()
        done = self.done_ids(records)
        todo = self.driver.pending(self.problems, lambda p: p.id, done)
        teacher_forced = self.config.mode == "teacher-forced"
        thresholds = self.group_thresholds() if todo and teacher_forced else {}
        # recomputed features of a teacher-forced record re-read its stored trajectory (no decoding)
        known = (
            {r["problem_id"]: r["trajectory_ids"] for r in records if r["problem_id"] not in done}
            if teacher_forced
            else {}
        )
        worker = self._worker
        if worker is not None:
            worker.group_thresholds, worker.known_trajectories = thresholds, known
        make_worker = (
            (lambda: worker)
            if worker is not None
            else partial(CollectWorker, self.config, group_thresholds=thresholds, known_trajectories=known)
        )
        return self.driver.drive(
            self.problems,
            lambda p: p.id,
            make_worker,
            done=done,
            shard_size=self.config.batch_size,
            desc="collecting",
            progress=self.progress,
            workers=self.workers,
            ray_address=self.ray_address,
        )

    def group_thresholds(self) -> dict[str, float | None]:
        """Each ``groups_at`` setting's threshold: given, or calibrated once per run and stored in
        ``calibration.json`` (the quantile of the statistic over the greedy trajectories of the
        split's first ``calibration_problems`` problems from ``offset``, also where ``limit`` is
        smaller, after ``min_step``)."""
        c = self.config
        stored = read_group_calibration(self.run.path)
        missing = [s for s in group_settings(c.groups_at) if s.quantile is not None and s.label not in stored]
        if missing:
            problems = self.problems[: c.calibration_problems]
            if len(problems) < c.calibration_problems and not self._problems_given:
                # the first N problems of the split whatever --limit is, so that a collection grown
                # later (a larger --limit) holds what one collected at its full size holds
                problems = load_problems(c.dataset, c.split, c.calibration_problems, c.offset, c.data_file)
            logger.info("calibrating %s on %d training problems", c.groups_at, len(problems))
            # with Ray workers the driver calibrates on a pair of its own (once per run)
            stats = (self._worker or CollectWorker(c)).position_statistics(problems)
            for s in missing:
                trigger = make_trigger(s.trigger)
                stored[s.label] = {
                    "trigger": s.trigger,
                    "quantile": s.quantile,
                    "threshold": trigger.threshold_for_quantile(stats[s.trigger], s.quantile),
                    "problems": [p.id for p in problems],
                }
            self.run.write_json("calibration.json", stored)
        return stored_group_thresholds(self.run.path, c.groups_at)


class CollectWorker:
    """Loads (or wraps) the model pair and turns a batch of problems into finished records.

    Each record carries its feature tensors as safetensors bytes (``features_data``) for the
    one process that writes the run directory: in-process, or the driver of a Ray run (so the
    workers need no shared filesystem).
    """

    def __init__(
        self,
        config: CollectConfig,
        slm: LoadedModel | None = None,
        llm: LoadedModel | None = None,
        group_thresholds: dict[str, float | None] | None = None,
        known_trajectories: dict[str, list[int]] | None = None,
    ):
        """``known_trajectories`` (problem id -> token ids): teacher-forced trajectories already
        recorded, read again instead of decoded (recomputing missing feature files)."""
        self.config = config
        self.group_thresholds = group_thresholds or {}
        self.known_trajectories = known_trajectories or {}
        self.slm = slm or load_model(config.slm, dtype=config.dtype)
        self.llm = llm or load_model(
            config.llm, dtype=config.llm_dtype or config.dtype, device_map=config.llm_device_map
        )
        check_same_vocabulary(self.slm, self.llm)
        self.vocab_size = len(self.slm.tokenizer)
        TopK(config.k).check_vocab(self.vocab_size)
        # stamped on every record: a collection resumed with other weights at the same paths is refused
        self.fingerprints = {
            "slm": model_fingerprint(self.slm.model),
            "llm": model_fingerprint(self.llm.model),
        }

    def run_shard(self, batch: Sequence[Problem]) -> list[dict]:
        return list(self._collect_batch(batch))

    def position_statistics(self, problems: Sequence[Problem]) -> dict[str, torch.Tensor]:
        """Trigger statistics at every position after ``min_step`` of the problems' greedy SLM
        trajectories, both models teacher-forced (calibration of the ``groups_at`` settings)."""
        prompts = [build_prompt(self.slm.tokenizer, p.question) for p in problems]
        collected: dict[str, list[torch.Tensor]] = {}
        for prompt, gen in zip(prompts, self._decode(prompts, None, None)):
            _, slm_logits = trajectory_forward(self.slm.model, prompt, gen.token_ids, self.vocab_size)
            _, llm_logits = trajectory_forward(self.llm.model, prompt, gen.token_ids, self.vocab_size)
            for name, value in position_statistics(slm_logits.cpu(), llm_logits.cpu()).items():
                collected.setdefault(name, []).append(value[self.config.min_step :])
        return {name: torch.cat(values) for name, values in collected.items()}

    def _decode(self, prompts, method, llm):
        return decode(
            self.slm.model, prompts, method, llm=llm, **engine_kwargs(self.slm, self.config.max_new_tokens)
        )

    def _collect_batch(self, batch: Sequence[Problem]):
        c = self.config
        prompts = [build_prompt(self.slm.tokenizer, p.question) for p in batch]
        recorded: dict[int, list] = {}
        if c.mode == "teacher-forced":
            known = self.known_trajectories
            new = [prompt for p, prompt in zip(batch, prompts) if p.id not in known]
            decoded = iter(g.token_ids for g in self._decode(new, None, None)) if new else iter(())
            trajectories = [known[p.id] if p.id in known else next(decoded) for p in batch]
        else:
            selector = RecordingLLMSelector()
            trigger = EntropyTrigger(c.on_policy_threshold)
            gens = self._decode(
                prompts, Method(trigger, TopK(c.k), selector, c.min_step, "collect"), self.llm.model
            )
            trajectories = [g.token_ids for g in gens]
            # decisions are recorded in step order, each under its prompt's index
            steps = [list(g.trigger_steps) for g in gens]
            cursor = [0] * len(gens)
            for row, ids, probs in selector.decisions:
                recorded.setdefault(row, []).append((steps[row][cursor[row]], ids, probs))
                cursor[row] += 1
        for row, (problem, prompt, trajectory) in enumerate(zip(batch, prompts, trajectories)):
            yield self._featurize(problem, prompt, trajectory, recorded.get(row))

    def _featurize(self, problem: Problem, prompt: list[int], trajectory: list[int], on_policy) -> dict:
        c = self.config
        from transformers import DynamicCache

        t = len(trajectory)
        slm_cache = DynamicCache()
        pos_hidden, slm_logits = trajectory_forward(
            self.slm.model, prompt, trajectory, self.vocab_size, slm_cache
        )
        _, llm_logits = trajectory_forward(self.llm.model, prompt, trajectory, self.vocab_size)
        slm_logits, llm_logits = slm_logits.cpu(), llm_logits.cpu()
        slm_top1, llm_top1 = slm_logits.argmax(-1), llm_logits.argmax(-1)
        stats = position_statistics(slm_logits, llm_logits)
        entropy, margin, kl = stats["entropy"], stats["margin"], stats["kl"]
        divergent = slm_top1 != llm_top1
        eligible = torch.arange(t) >= c.min_step

        if on_policy is not None:
            positions = [s for s, _, _ in on_policy]
            cand_ids = (
                torch.stack([ids for _, ids, _ in on_policy])
                if on_policy
                else torch.zeros(0, c.k, dtype=torch.long)
            )
        else:
            chosen = torch.zeros(t, dtype=torch.bool)
            for setting in group_settings(c.groups_at):
                if setting.label not in self.group_thresholds:
                    raise RuntimeError(
                        f"no threshold for the group setting {setting.label!r} (not calibrated)"
                    )
                chosen |= fires_at(setting, self.group_thresholds[setting.label], stats)
            positions = (chosen & eligible).nonzero().flatten().tolist()
            cand_ids = (
                slm_logits[positions].topk(c.k, -1).indices
                if positions
                else torch.zeros(0, c.k, dtype=torch.long)
            )
        slm_probs = (
            torch.softmax(slm_logits[positions], -1).gather(-1, cand_ids)
            if positions
            else torch.zeros(0, c.k)
        )
        llm_probs = (
            torch.softmax(llm_logits[positions], -1).gather(-1, cand_ids)
            if positions
            else torch.zeros(0, c.k)
        )

        cand_hidden = candidate_hidden_states_at(
            self.slm.model, slm_cache, len(prompt), len(prompt) + t, positions, cand_ids
        )
        index = problem.id.rsplit("/", 1)[-1]
        llm_rank = rank_of(slm_logits, llm_top1)
        tensors = {
            "candidate_hidden": cand_hidden.half().cpu().contiguous(),
            "candidate_ids": cand_ids.contiguous(),
            "candidate_slm_probs": slm_probs.contiguous(),
            "candidate_llm_probs": llm_probs.contiguous(),
            "group_positions": torch.tensor(positions, dtype=torch.long),
            **slm_position_tensors(pos_hidden, slm_logits),
            "position_kl": kl.contiguous(),
            "position_divergent": divergent.contiguous(),
            "position_llm_top1_rank": llm_rank,
        }
        llm_best = llm_probs.argmax(-1) if positions else torch.zeros(0, dtype=torch.long)
        data = save(tensors)
        return {
            "problem_id": problem.id,
            "dataset": problem.dataset,
            "split": problem.split,
            "features": f"features/{problem.split}-{index}.safetensors",
            "features_data": data,
            "model_fingerprints": self.fingerprints,
            # a damaged file that still parses is told by its digest (records before it carry none)
            "features_sha256": hashlib.sha256(data).hexdigest(),
            "prompt_ids": prompt,
            "trajectory_ids": trajectory,
            "n_positions": t,
            "n_divergent": int(divergent[eligible].sum()),
            # what needs the LLM at every position, so that features/ can be rebuilt from the SLM alone
            "position_kl": [float(f"{float(x):.4g}") for x in kl],  # 4 significant digits, small KLs too
            "position_divergent": [int(x) for x in divergent],
            "position_llm_top1_rank": llm_rank.tolist(),
            "groups": [
                {
                    "position": pos,
                    "candidate_ids": cand_ids[i].tolist(),
                    "slm_probs": [round(float(x), 6) for x in slm_probs[i]],
                    "llm_probs": [round(float(x), 6) for x in llm_probs[i]],
                    "llm_best": int(llm_best[i]),
                    "entropy": round(float(entropy[pos]), 5),
                    "margin": round(float(margin[pos]), 5),
                    "kl": round(float(kl[pos]), 5),
                    "divergent": bool(divergent[pos]),
                }
                for i, pos in enumerate(positions)
            ],
        }


def slm_position_tensors(hidden: torch.Tensor, slm_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-position tensors of a trajectory that need only the SLM: ``position_hidden`` (T, H)
    float16, ``position_entropy`` and ``position_margin`` (T,) float32 (the triggers' definitions)
    and ``position_slm_topk_probs`` (T, 16) float32, from its last hidden states (T, H) and logits
    (T, vocab)."""
    stats = logit_statistics(slm_logits)
    return {
        "position_hidden": hidden.half().cpu().contiguous(),
        "position_entropy": stats["entropy"].contiguous(),
        "position_margin": stats["margin"].contiguous(),
        "position_slm_topk_probs": stats["top_probs"].contiguous(),
    }


# the per-position values that need the LLM; records written since they were added carry them
LLM_POSITION_KEYS = {
    "position_kl": torch.float32,
    "position_divergent": torch.bool,
    "position_llm_top1_rank": torch.long,
}


def read_features(groups_dir: str | Path, record: dict) -> dict[str, torch.Tensor]:
    """The tensors of a collected problem's ``features/`` file.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is unreadable (truncated, corrupted), does not match the digest its record
            holds (from session 34 on), or holds non-finite values (which
            collection never writes, and which would train a selector to NaN); the message names the fix.
    """
    from safetensors.torch import load

    path = Path(groups_dir) / record["features"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    data = path.read_bytes()
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error kinds on a truncated file
        raise ValueError(
            f"{path} is unreadable ({e}): {_recompute_hint(Path(groups_dir))}, which redoes it"
        ) from e
    recorded = record.get("features_sha256")
    if recorded is not None and hashlib.sha256(data).hexdigest() != recorded:
        raise ValueError(
            f"{path} does not match the SHA-256 its record holds (damaged or replaced): "
            f"{_recompute_hint(Path(groups_dir))}"
        )
    bad = non_finite_tensor(tensors)
    if bad is not None:
        raise ValueError(
            f"{path} holds non-finite values in {bad} (damaged): {_recompute_hint(Path(groups_dir))}"
        )
    return tensors


def _recompute_hint(groups_dir: Path) -> str:
    return (
        f"re-run the `s2t collect` command that made {groups_dir} (same arguments) with --recompute-features"
    )


def check_records_rebuildable(groups_dir: str | Path, records: Sequence[dict]) -> None:
    """The model-free half of :func:`check_rebuildable`: every record whose feature file is missing
    carries the per-position LLM values (``records`` are those records).

    Raises:
        FileNotFoundError: naming ``--recompute-features``.
    """
    old = [r for r in records if "position_kl" not in r]
    if old:
        raise FileNotFoundError(
            f"{len(old)} feature files of {groups_dir} are missing (e.g. {old[0]['features']}) and their "
            f"records predate the per-position LLM values: {_recompute_hint(Path(groups_dir))}"
        )


def check_rebuildable(groups_dir: str | Path, records: Sequence[dict], slm: LoadedModel | None) -> None:
    """Check that :func:`rebuild_position_tensors` can rebuild the missing feature files of ``records``.

    Raises:
        FileNotFoundError: a record that predates the per-position LLM values, or no ``slm``; the
            message names ``--recompute-features``.
        ValueError: ``slm`` is loaded in another dtype than the collection's (the rebuilt features
            would mix precisions with the stored ones); the message names the dtype to load.
    """
    groups_dir = Path(groups_dir)
    rerun = _recompute_hint(groups_dir)
    check_records_rebuildable(groups_dir, records)
    if records and slm is None:
        raise FileNotFoundError(
            f"{len(records)} feature files of {groups_dir} are missing (e.g. {records[0]['features']}): "
            f"{rerun} (training the learned trigger rebuilds them from the records with the SLM alone)"
        )
    if records:
        collected = collection_dtype(collection_config(groups_dir))
        if slm.model.dtype != parse_dtype(collected):
            raise ValueError(
                f"{groups_dir} was collected in {collected} and the SLM is loaded in "
                f"{str(slm.model.dtype).removeprefix('torch.')}: its {len(records)} missing feature files "
                f"would be rebuilt in another precision; load the SLM in {collected} (`s2t train --dtype "
                f"{collected}`), train with --trigger-rate 0, or {rerun}"
            )


def rebuild_position_tensors(record: dict, slm: LoadedModel) -> dict[str, torch.Tensor]:
    """The per-position tensors of one collected problem's feature file (the ``position_*``
    entries: see :func:`slm_position_tensors` and :data:`LLM_POSITION_KEYS`), rebuilt from its
    record where the file is missing (a clone of committed results: ``features/`` is not in git):
    the SLM re-reads the trajectory, teacher-forced, and the LLM's values come from the record, so
    no LLM is needed. :func:`check_rebuildable` says first whether the records allow it.
    """
    hidden, logits = trajectory_forward(
        slm.model, record["prompt_ids"], record["trajectory_ids"], len(slm.tokenizer)
    )
    tensors = slm_position_tensors(hidden, logits.cpu())
    tensors.update({key: torch.tensor(record[key], dtype=dtype) for key, dtype in LLM_POSITION_KEYS.items()})
    return tensors


def collection_dtype(config: dict) -> str:
    """The dtype a collection was made in, from its ``config.json`` (null in older ones: float32)."""
    return config.get("dtype") or LEGACY_CONFIG["dtype"]


def collection_config(groups_dir: str | Path) -> dict:
    """The ``config.json`` of a collection run directory (which SLM and LLM, split, K, ...)."""
    config_file = Path(groups_dir) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{groups_dir} is not a collection run directory (no config.json): run `s2t collect`"
        )
    return json.loads(config_file.read_text())


def check_same_models(groups_dir: str | Path, records: Sequence[dict]) -> None:
    """Refuse records collected with different models (the weights at a configured path replaced
    between resumes): their ``model_fingerprints`` must agree (records made before carry none).

    Raises:
        ValueError: naming two problems whose models differ and the way out.
    """
    stamped = [r for r in records if r.get("model_fingerprints")]
    other = next((r for r in stamped if r["model_fingerprints"] != stamped[0]["model_fingerprints"]), None)
    if other is not None:
        raise ValueError(
            f"{groups_dir} would mix models: {stamped[0]['problem_id']} was collected with "
            f"{stamped[0]['model_fingerprints']} and {other['problem_id']} with {other['model_fingerprints']} "
            "(the weights at the configured SLM or LLM path changed): collect into a new --out"
        )


def collected_records(groups_dir: str | Path, need_features: bool = True) -> list[dict]:
    """The problem records of a collection, one per problem (the last one written wins).

    With ``need_features``, every record's ``features/`` file must exist; otherwise the error says
    how to recompute them (the same ``s2t collect`` command with ``--recompute-features``). Records
    collected with different models are refused (:func:`check_same_models`).
    """
    groups_dir = Path(groups_dir)
    if not (groups_dir / "problems.jsonl").is_file():
        raise FileNotFoundError(
            f"{groups_dir} is not a collection directory (no problems.jsonl): run `s2t collect`"
        )
    latest: dict[str, dict] = {}
    for record in read_jsonl(groups_dir / "problems.jsonl"):
        latest[record["problem_id"]] = record
    check_same_models(groups_dir, list(latest.values()))
    if need_features:
        missing = [r["features"] for r in latest.values() if not (groups_dir / r["features"]).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} feature files of {groups_dir} are missing (e.g. {missing[0]}); re-run the "
                "`s2t collect` command that made it (same arguments) with --recompute-features to "
                "recompute them, or train with --mode features or --mode lora, which need only the records"
            )
    return list(latest.values())


def collect(config: CollectConfig, out_dir: str | Path, **kwargs) -> Path:
    """Collect (or resume collecting) S2T-Local training groups; returns the run directory."""
    collector = Collector(config, out_dir, **kwargs)
    try:
        collector.run_all()
    except BaseException:  # failed before its first record: the corrected command is not refused
        collector.run.discard_if_unused()
        raise
    return collector.run.path


__all__ = [
    "CollectConfig",
    "CollectWorker",
    "Collector",
    "collection_config",
    "collected_records",
    "rebuild_position_tensors",
    "collection_dtype",
    "read_features",
    "check_rebuildable",
    "slm_position_tensors",
    "LeakageError",
    "collect",
]
