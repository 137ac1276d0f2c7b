"""Local sufficiency: is the LLM's choice among the SLM's top-K where the two disagree?

For an SLM/LLM pair sharing a tokenizer, :func:`analyze` takes one trajectory per problem
(the SLM's greedy answer, the LLM's, or the dataset's reference solution), teacher-forces the
whole prompt + trajectory through both models in one forward pass per batch, and at every
answer position records the rank of the LLM's top-1 token in the SLM's ranking, the KL
divergence over the SLM's top-64 and the SLM's top-64 entropy. At *divergence points* (the two
top-1 tokens differ, or the KL is above a run-wide quantile) it reports hit@K, the share of
points where the LLM's token is within the SLM's top-K, with bootstrap intervals that resample
problems.

Note that at ``top1`` divergence points the LLM's token is never the SLM's top-1, so hit@1 is
0 there by construction (up to exact ties); hit@1 is informative at ``kl`` points, as in the
paper's figure.

Results go to a :class:`~s2t.runs.RunDirectory`: ``problems.jsonl`` gets one record per problem
as it finishes (trajectory and per-position statistics), so a re-run with the same arguments
skips finished problems. Everything reported is computed from those records, which is why a
resumed run gives the same summary as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from s2t.data import Problem
from s2t.engine import decode
from s2t.models import (
    LoadedModel,
    LoadedTokenizer,
    ModelSpec,
    check_same_vocabulary,
    engine_kwargs,
    load_tokenizer,
    pad_token_id,
    parse_dtype,
)
from s2t.policies.features import rank_of
from s2t.policies.triggers import EntropyTrigger, KLTrigger, check_quantile
from s2t.prompts import DEFAULT_SYSTEM_PROMPT, build_prompt
from s2t.reporting.hitk import plot_hitk
from s2t.run_driver import RunDriver
from s2t.runs import RunDirectory
from s2t.stats import ConfidenceInterval, ratio_bootstrap_ci
from s2t.teacher_forcing import teacher_force, trajectory_logits

logger = logging.getLogger(__name__)

TRAJECTORIES = ("slm", "llm", "reference")
DIVERGENCES = ("top1", "kl")
DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64)
SEGMENTS = ("first", "middle", "last")  # thirds of the answer, by relative position
PROBLEMS_FILE = "problems.jsonl"
POINTS_FILE = "points.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "hitk.png"
_KL_DECIMALS = 6  # stored per-position statistics are rounded: compact, and identical on resume
_ENTROPY_DECIMALS = 4


@dataclass
class PositionStatistics:
    """Per answer position of one trajectory: both models' top-1, the LLM top-1's SLM rank, KL, entropy.

    Position ``t`` holds the predictions for answer token ``t`` (from the logits one column before it).
    """

    slm_top1: list[int]
    llm_top1: list[int]
    rank: list[int]  # 1 + number of tokens with a strictly higher SLM logit than the LLM's top-1
    kl: list[float]  # KL(p_SLM || p_LLM) over the SLM's top-64, both renormalised
    entropy: list[float]  # entropy of the SLM's top-64, renormalised

    def __len__(self) -> int:
        return len(self.rank)


@dataclass
class AnalysisSummary:
    """hit@K at divergence points, with problem-level bootstrap intervals (None where undefined)."""

    slm: str
    llm: str
    dataset: str
    split: str
    trajectory: str
    divergence: str
    n_problems: int
    n_positions: int
    n_divergence_points: int
    divergence_share: ConfidenceInterval | None
    hit_at_k: dict[int, ConfidenceInterval | None]
    miss: ConfidenceInterval | None  # share of points with rank > max K
    by_position: dict[str, dict]  # segment -> {"n_points": int, "hit_at_k": {K: CI or None}}
    kl_threshold: float | None = None
    config: dict = field(default_factory=dict)
    out_dir: Path | None = None

    @property
    def ks(self) -> list[int]:
        return sorted(self.hit_at_k)

    def to_dict(self) -> dict:
        """The JSON form written to ``summary.json`` (and read by :mod:`s2t.reporting.hitk`)."""
        return {
            "pair": {"slm": self.slm, "llm": self.llm},
            "dataset": self.dataset,
            "split": self.split,
            "trajectory": self.trajectory,
            "divergence": self.divergence,
            "kl_threshold": self.kl_threshold,
            "n_problems": self.n_problems,
            "n_positions": self.n_positions,
            "n_divergence_points": self.n_divergence_points,
            "divergence_share": _ci_dict(self.divergence_share),
            "hit_at_k": [{"k": k, **_ci_dict(self.hit_at_k[k])} for k in self.ks],
            "miss": {"k_max": max(self.ks), **_ci_dict(self.miss)},
            "by_position": {
                segment: {
                    "n_points": table["n_points"],
                    "hit_at_k": [{"k": k, **_ci_dict(table["hit_at_k"][k])} for k in self.ks],
                }
                for segment, table in self.by_position.items()
            },
            "config": self.config,
        }


def _ci_dict(ci: ConfidenceInterval | None) -> dict:
    if ci is None:
        return {"estimate": None, "low": None, "high": None}
    return {"estimate": ci.estimate, "low": ci.low, "high": ci.high}


def score_trajectories(
    slm: LoadedModel,
    llm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
) -> list[PositionStatistics]:
    """Teacher-force each prompt + answer through both models in one forward pass per model
    (:func:`s2t.teacher_forcing.teacher_force`) and compare them at every answer position.

    Logits are made one row at a time in float32 (never ``(rows, positions, vocab)`` at once);
    logits above the tokenizer's vocabulary (reserved/padded rows) are ignored.

    Raises:
        ValueError: the counts of prompts and answers differ, or a non-empty answer has an empty prompt.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"need one answer per prompt; got {len(prompts)} prompts, {len(answers)} answers")
    vocab_size = len(slm.tokenizer)
    pad_id = pad_token_id(slm)
    slm_hidden = teacher_force(slm.model, prompts, answers, pad_id=pad_id)
    llm_hidden = teacher_force(llm.model, prompts, answers, pad_id=pad_id)
    kl_statistic, entropy_statistic = KLTrigger(), EntropyTrigger()
    results = []
    for answer, slm_rows, llm_rows in zip(answers, slm_hidden, llm_hidden):
        if len(answer) == 0:
            results.append(PositionStatistics([], [], [], [], []))
            continue
        s = trajectory_logits(slm.model, slm_rows, vocab_size)
        q = trajectory_logits(llm.model, llm_rows, vocab_size).to(s.device)
        llm_top1 = q.argmax(-1)
        results.append(
            PositionStatistics(
                slm_top1=s.argmax(-1).tolist(),
                llm_top1=llm_top1.tolist(),
                rank=rank_of(s, llm_top1).tolist(),
                kl=[round(x, _KL_DECIMALS) for x in kl_statistic.statistic(s, q).clamp(min=0).tolist()],
                entropy=[round(x, _ENTROPY_DECIMALS) for x in entropy_statistic.statistic(s, None).tolist()],
            )
        )
    return results


def _trajectories(
    problems: Sequence[Problem],
    prompts: list[list[int]],
    trajectory: str,
    slm: LoadedModel,
    llm: LoadedModel,
    max_new_tokens: int,
) -> tuple[list[list[int]], list[str]]:
    """Answer token ids and finish reasons for one batch of problems."""
    tokenizer = slm.tokenizer
    if trajectory == "reference":
        answers, reasons = [], []
        for p in problems:
            # the reference as the assistant's answer: its text, then the end-of-turn token
            ids = tokenizer(p.solution, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids = ids + [tokenizer.eos_token_id]
            answers.append(ids)
            reasons.append("reference")
        return answers, reasons
    decoder = slm if trajectory == "slm" else llm
    gens = decode(decoder.model, prompts, **engine_kwargs(decoder, max_new_tokens))
    return [g.token_ids for g in gens], [g.finish_reason for g in gens]


def _check_arguments(trajectory, divergence, kl_quantile, ks, max_new_tokens, batch_size, vocab_size):
    if trajectory not in TRAJECTORIES:
        raise ValueError(f"trajectory must be one of {', '.join(TRAJECTORIES)}; got {trajectory!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}")
    check_quantile(kl_quantile)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of integers >= 1; got {list(ks)}")
    if max(ks) > vocab_size:
        raise ValueError(f"K = {max(ks)} exceeds the vocabulary size ({vocab_size})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")


class AnalyzeShardWorker:
    """Turns a batch of problems into finished problem records: trajectories, then both models' statistics.

    Built once per process: in-process around already loaded models, or inside a Ray actor from
    :class:`~s2t.models.ModelSpec` s (each actor then loads its own pair on its own device).
    """

    def __init__(
        self,
        slm: LoadedModel | ModelSpec,
        llm: LoadedModel | ModelSpec,
        trajectory: str,
        divergence: str,
        max_new_tokens: int,
        system_prompt: str | None,
    ):
        self.slm = slm.load() if isinstance(slm, ModelSpec) else slm
        self.llm = llm.load() if isinstance(llm, ModelSpec) else llm
        check_same_vocabulary(self.slm, self.llm)
        self.trajectory, self.divergence = trajectory, divergence
        self.max_new_tokens, self.system_prompt = max_new_tokens, system_prompt

    def run_shard(self, problems: Sequence[Problem]) -> list[dict]:
        prompts = [build_prompt(self.slm.tokenizer, p.question, self.system_prompt) for p in problems]
        answers, reasons = _trajectories(
            problems, prompts, self.trajectory, self.slm, self.llm, self.max_new_tokens
        )
        statistics = score_trajectories(self.slm, self.llm, prompts, answers)
        return [
            _problem_record(problem, answer, reason, stats, self.divergence)
            for problem, answer, reason, stats in zip(problems, answers, reasons, statistics)
        ]


def _tokenizer_side(model: LoadedModel | ModelSpec) -> tuple[LoadedModel | LoadedTokenizer, str]:
    """What the driver needs of a model (name, tokenizer) and its dtype, without loading weights."""
    if isinstance(model, ModelSpec):
        return load_tokenizer(model.name), str(parse_dtype(model.dtype))
    return model, str(model.model.dtype)


def analyze(
    slm: LoadedModel | ModelSpec,
    llm: LoadedModel | ModelSpec,
    problems: Sequence[Problem],
    *,
    trajectory: str = "slm",
    divergence: str = "top1",
    kl_quantile: float = 0.95,
    ks: Sequence[int] = DEFAULT_KS,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    out_dir: str | Path | None = None,
    progress: bool = True,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    seed: int = 0,
    n_resamples: int = 10000,
    workers: int = 1,
    ray_address: str | None = None,
) -> AnalysisSummary:
    """hit@K of the LLM's top-1 within the SLM's top-K at divergence points, over ``problems``.

    Args:
        slm, llm: the pair, loaded or as :class:`~s2t.models.ModelSpec` s (loaded here, or by each
            Ray worker when ``workers > 1``); they must share a vocabulary.
        problems: the problems to analyse (ids must be unique).
        trajectory: whose text is teacher-forced: ``slm`` (its greedy answer), ``llm`` (the
            LLM's greedy answer) or ``reference`` (the dataset's solution).
        divergence: ``top1`` (the two top-1 tokens differ) or ``kl`` (KL over the SLM's top-64
            above the ``kl_quantile`` quantile of all positions of the run).
        ks: the K of hit@K; "miss" is the share of points with rank > max(ks).
        out_dir: a run directory; a re-run with the same arguments resumes. None: in memory only.
        seed, n_resamples: of the bootstrap that resamples problems.
        workers, ray_address: shard the problems over this many Ray actors (one model pair
            each; see :func:`s2t.distributed.run_sharded`); records are identical to one process's.
    """
    from s2t.distributed import import_ray

    if workers > 1:
        import_ray()  # fail before any model is loaded
        models = [
            m if isinstance(m, ModelSpec) else ModelSpec(m.name, str(m.model.dtype).removeprefix("torch."))
            for m in (slm, llm)
        ]
        slm, llm = models
    elif isinstance(slm, ModelSpec) or isinstance(llm, ModelSpec):
        slm = slm.load() if isinstance(slm, ModelSpec) else slm
        llm = llm.load() if isinstance(llm, ModelSpec) else llm
    slm_side, slm_dtype = _tokenizer_side(slm)
    llm_side, llm_dtype = _tokenizer_side(llm)
    check_same_vocabulary(slm_side, llm_side)
    tokenizer = slm_side.tokenizer
    vocab_size = len(tokenizer)
    ks = sorted(set(ks))
    _check_arguments(trajectory, divergence, kl_quantile, ks, max_new_tokens, batch_size, vocab_size)
    if not problems:
        raise ValueError("no problems to analyse")
    if len({p.id for p in problems}) != len(problems):
        raise ValueError("problem ids must be unique")
    if trajectory == "reference":
        missing = [p.id for p in problems if not p.solution]
        if missing:
            raise ValueError(
                f"trajectory 'reference' needs reference solutions, but {len(missing)} problems have none "
                f"(e.g. {missing[0]}); use trajectory 'slm' or 'llm'"
            )

    dataset, split = problems[0].dataset, problems[0].split
    config = {
        "slm": slm_side.name,
        "llm": llm_side.name,
        "slm_dtype": slm_dtype,
        "llm_dtype": llm_dtype,
        "dataset": dataset,
        "split": split,
        "first_problem": problems[0].id,
        "limit": len(problems),
        "trajectory": trajectory,
        "divergence": divergence,
        "kl_quantile": kl_quantile,
        "max_new_tokens": max_new_tokens,
        "system_prompt": system_prompt,
        "seed": seed,
        "batch_size": batch_size,
    }
    run = RunDirectory(out_dir, config, ignore_keys={"batch_size", "limit"}) if out_dir is not None else None
    if run is not None:
        run.bind_problems((p.id, p.digest) for p in problems)
    driver = RunDriver(run, PROBLEMS_FILE, key=lambda r: r["id"])
    records: dict[str, dict] = {}

    def keep(record: dict) -> None:
        records[record["id"]] = record

    with run.claim(["analyze"]) if run is not None else contextlib.nullcontext():  # one analysis at a time
        records.update((r["id"], r) for r in driver.records())
        driver.drive(
            problems,
            lambda p: p.id,
            partial(AnalyzeShardWorker, slm, llm, trajectory, divergence, max_new_tokens, system_prompt),
            done=set(records),
            shard_size=batch_size,
            on_record=keep,
            desc=f"local sufficiency ({trajectory} trajectories)",
            progress=progress,
            workers=workers,
            ray_address=ray_address,
        )

    selected = [records[p.id] for p in problems]
    statistics = summarize(
        selected,
        divergence=divergence,
        kl_quantile=kl_quantile,
        ks=ks,
        seed=seed,
        n_resamples=n_resamples,
    )
    summary = AnalysisSummary(
        slm=slm_side.name,
        llm=llm_side.name,
        dataset=dataset,
        split=split,
        trajectory=trajectory,
        **statistics,
    )
    summary.config = {k: v for k, v in config.items() if k != "limit"} | {"n_problems": len(problems)}
    summary.config["ks"] = ks
    if run is not None:
        summary.out_dir = run.path
        _write_points(run.path / POINTS_FILE, selected, divergence, summary.kl_threshold, tokenizer)
        run.write_json(SUMMARY_FILE, summary.to_dict())
        plot_hitk(summary.to_dict(), run.path / PLOT_FILE)
    return summary


def _problem_record(
    problem: Problem, answer: list[int], finish_reason: str, stats: PositionStatistics, divergence: str
) -> dict:
    """One finished problem: its trajectory, all-position statistics, and (top1) its divergence points."""
    record = {
        "id": problem.id,
        "n_positions": len(answer),
        "finish_reason": finish_reason,
        "trajectory": list(answer),
        "slm_top1": stats.slm_top1,
        "llm_top1": stats.llm_top1,
        "rank": stats.rank,
        "kl": stats.kl,
        "entropy": stats.entropy,
    }
    if divergence == "top1":
        record["points"] = divergence_points(record, "top1")
    # kl points depend on a quantile over the whole run: derived from "kl" at summary time
    return record


def divergence_points(record: dict, divergence: str, kl_threshold: float | None = None) -> list[dict]:
    """The divergence points of one problem record (``kl`` needs the run-wide threshold)."""
    n = record["n_positions"]
    points = []
    for t in range(n):
        if divergence == "top1":
            diverges = record["slm_top1"][t] != record["llm_top1"][t]
        elif kl_threshold is None:
            raise ValueError("the kl divergence needs a threshold")
        else:
            diverges = record["kl"][t] > kl_threshold
        if diverges:
            points.append(
                {
                    "position": t,
                    "relative_position": t / n,
                    "rank": record["rank"][t],
                    "kl": record["kl"][t],
                    "entropy": record["entropy"][t],
                    "slm_token": record["slm_top1"][t],
                    "llm_token": record["llm_top1"][t],
                }
            )
    return points


def kl_threshold_for(records: Sequence[dict], quantile: float) -> float | None:
    """The ``quantile`` of the KL over every position of ``records`` (None when there are none)."""
    values = np.fromiter((x for r in records for x in r["kl"]), dtype=float)
    return float(np.quantile(values, quantile)) if values.size else None


def segment_of(relative_position: float) -> str:
    """first / middle / last third of the answer."""
    return SEGMENTS[min(int(relative_position * 3), 2)]


def summarize(
    records: Sequence[dict],
    *,
    divergence: str,
    kl_quantile: float = 0.95,
    ks: Sequence[int] = DEFAULT_KS,
    seed: int = 0,
    n_resamples: int = 10000,
) -> dict:
    """Counts, divergence share, hit@K, miss share and the by-position table, from problem records."""
    ks = sorted(ks)
    threshold = kl_threshold_for(records, kl_quantile) if divergence == "kl" else None
    if divergence == "kl":
        points = [divergence_points(r, "kl", threshold) if threshold is not None else [] for r in records]
    else:
        points = [divergence_points(r, "top1") for r in records]
    positions = [r["n_positions"] for r in records]
    n_points = [len(p) for p in points]

    def ci(numerators, denominators) -> ConfidenceInterval | None:
        if sum(denominators) == 0:
            return None
        return ratio_bootstrap_ci(numerators, denominators, n_resamples=n_resamples, seed=seed)

    def hits(point_lists, k) -> list[int]:
        return [sum(p["rank"] <= k for p in pts) for pts in point_lists]

    by_position = {}
    for segment in SEGMENTS:
        in_segment = [[p for p in pts if segment_of(p["relative_position"]) == segment] for pts in points]
        counts = [len(pts) for pts in in_segment]
        by_position[segment] = {
            "n_points": sum(counts),
            "hit_at_k": {k: ci(hits(in_segment, k), counts) for k in ks},
        }
    return {
        "divergence": divergence,
        "kl_threshold": threshold,
        "n_problems": len(records),
        "n_positions": sum(positions),
        "n_divergence_points": sum(n_points),
        "divergence_share": ci(n_points, positions),
        "hit_at_k": {k: ci(hits(points, k), n_points) for k in ks},
        "miss": ci([sum(p["rank"] > ks[-1] for p in pts) for pts in points], n_points),
        "by_position": by_position,
    }


def _write_points(
    path: Path, records: Sequence[dict], divergence: str, kl_threshold: float | None, tokenizer
) -> None:
    """Rewrite the per-point file from the problem records (a derived file: always consistent)."""
    lines = []
    for record in records:
        if divergence == "kl" and kl_threshold is None:
            continue
        for point in divergence_points(record, divergence, kl_threshold):
            point = {"problem_id": record["id"], **point}
            point["slm_text"] = tokenizer.decode([point["slm_token"]])
            point["llm_text"] = tokenizer.decode([point["llm_token"]])
            lines.append(point)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for point in lines:
            f.write(json.dumps(point) + "\n")
    tmp.replace(path)
