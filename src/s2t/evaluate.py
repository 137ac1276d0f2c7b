"""Evaluation: run methods over benchmark problems, grade them, and record every result.

Each finished (method, problem) is appended to ``results.jsonl`` in the run directory as soon
as its batch completes; a killed run resumes where it stopped, and a different configuration
for the same directory is refused. Trigger thresholds are calibrated on *training* problems
(never on the problems being evaluated) once per run and stored in ``calibration.json`` so
that a resumed run uses exactly the same threshold.

Methods: ``greedy`` (SLM), ``llm`` (LLM greedy), ``s2t``, ``takeover``, ``random-select``
(sharing the run's trigger configuration) and ``maj@k`` (k samples at temperature 0.7,
top-p 0.8, majority vote over extracted answers; pass@k is recorded beside it, labelled).

A sweep is a list of methods that carry their own trigger setting in their name
(``s2t/entropy@0.8``, ``s2t/always``, ``takeover/kl@0.95/k4``; see :mod:`s2t.methods`): each is
calibrated on its own (one entry per trigger and quantile in ``calibration.json``) and a sweep
can gain settings later without re-running what finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from s2t.api import CalibrationStore, Calibrator, ResolvedMethod, S2TGenerator
from s2t.backends import make_generator, resolve_backend
from s2t.data import Problem, data_file_digest, load_problems
from s2t.engine import CostRecord, Method
from s2t.grading import grade, majority_vote
from s2t.method_names import LLM_ALONE
from s2t.methods import (
    CalibrationSource,
    MethodSpec,
    build_method,
    check_unread_options,
    is_local_method,
    majority_samples,
    selector_training_overlap,
    split_label,
)
from s2t.methods import canonical_method_name as _canonical_method_name
from s2t.models import (
    DEFAULT_LLM,
    DEFAULT_SLM,
    LEGACY_DECODING,
    batch_invariant,
    check_model_options,
    parse_dtype,
    resolve_dtype,
)
from s2t.policies.candidates import TopK
from s2t.run_driver import RunDriver
from s2t.runs import ConfigMismatchError, RunDirectory, read_jsonl

logger = logging.getLogger(__name__)


# What a llama.cpp run records as its dtype: the GGUF files' own weight types (Q4_K_M for the built-in
# models), which the torch ``--dtype`` does not change.
GGUF_DTYPE = "gguf"


@dataclass
class EvalConfig:
    """Everything that determines an evaluation's results (stored as the run's config.json)."""

    slm: str = DEFAULT_SLM
    llm: str = DEFAULT_LLM
    dataset: str = "gsm8k"
    split: str = "test"
    limit: int | None = 100
    offset: int = 0
    data_file: str | None = None
    methods: list[str] = field(default_factory=lambda: ["greedy", "s2t"])
    max_new_tokens: int = 512
    trigger: str = "entropy"
    threshold: float | None = None
    quantile: float | None = 0.95
    k: int = 8
    ratio: float | None = None
    min_step: int = 3
    calibration_dataset: str | None = None  # default: the dataset's training split, else GSM8K's
    calibration_split: str = "train"
    calibration_problems: int = 8
    sample_temperature: float = 0.7
    sample_top_p: float = 0.8
    seed: int = 0
    dtype: str | None = None
    llm_dtype: str | None = None  # default: dtype
    llm_device_map: str | None = None  # e.g. "auto": spread a large LLM over the GPUs
    batch_size: int = 8
    selector: str | None = None  # a trained S2T-Local selector directory (for the s2t-local method)
    backend: str = "auto"  # torch or llama.cpp; "auto" is resolved (and recorded) at construction

    def __post_init__(self):
        """Check every option and every method's whole configuration (selector checkpoint included),
        so that a bad configuration fails before any model loads or any run directory is made."""
        canonical: dict[str, str] = {}
        for m in self.methods:
            name = canonical_method_name(m)
            if name in canonical:
                same = (
                    "is listed twice" if canonical[name] == m else f"and {canonical[name]!r} are one setting"
                )
                raise ValueError(f"method {m!r} {same} ({name}): give each setting once")
            canonical[name] = m
        self.methods = list(canonical)
        if self.calibration_dataset is None:
            self.calibration_dataset = CalibrationSource.for_dataset(self.dataset).dataset
        if not self.methods:
            raise ValueError("no methods given: --methods takes a comma-separated list, e.g. greedy,s2t")
        if self.seed < 0:  # numpy's generators (the bootstrap) take none
            raise ValueError(f"--seed must be >= 0; got {self.seed}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1 (or all, for every problem); got {self.limit}")
        if self.offset < 0:
            raise ValueError(f"--offset must be >= 0; got {self.offset}")
        # a method the backend cannot run is refused before its selector checkpoint is read
        self.backend = resolve_backend(
            self.backend, [self.slm, self.llm], self.methods, self.trigger, selector=self.selector
        )
        self.check_distinct_settings(self.methods)  # raises ValueError naming the method or the option
        self._check_unused_options()
        if self.backend == "llama.cpp":
            given = {self.dtype, self.llm_dtype} - {None, GGUF_DTYPE}
            for dtype in given:
                parse_dtype(dtype)  # a typo is refused here as on torch
            if given:
                logger.warning(
                    "--dtype and --llm-dtype apply to the torch backend; llama.cpp runs the GGUF files' own "
                    "weight types (Q4_K_M for the built-in models), so they are ignored"
                )
            self.dtype = self.llm_dtype = GGUF_DTYPE  # recorded: the torch dtype would misname the run
        else:
            self.dtype = resolve_dtype(self.dtype)  # recorded, so a run says which dtype made it
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        if self.calibration_problems < 1 and self.threshold is None:
            raise ValueError("calibration_problems must be >= 1 unless a threshold is given")

    def setting(self, method: str) -> tuple | None:
        """What ``method`` runs under this run's options (None for maj@K): a plain name runs at the
        run's options, so `s2t` under --trigger learned is `s2t/learned`."""
        spec = self.spec(method)
        if spec is None:
            return None
        label = split_label(method.split("/", 1)[0])[1]
        return spec.method, label, spec.trigger, spec.quantile, spec.threshold, spec.k, spec.ratio

    def check_distinct_settings(self, methods: Sequence[str], earlier: Sequence[str] = ()) -> None:
        """Refuse two names of one setting among ``methods``, or a method of ``methods`` that is one
        setting with a method an earlier invocation of the run asked for (``earlier``, canonical
        names; one that no longer parses under this invocation's options is passed over).

        Raises:
            ValueError: naming both methods, or the method whose options are wrong.
        """
        settings: dict[tuple, str] = {}
        for name in earlier:
            try:
                settings.setdefault(self.setting(name), name)
            except ValueError:  # e.g. an S2T-Local method, and no --selector given this time
                continue
        for name in methods:
            key = self.setting(name)
            if key is not None and settings.get(key, name) != name:
                where = (
                    "this run's options"
                    if settings[key] in methods
                    else "this run's options (the run holds it)"
                )
                raise ValueError(
                    f"methods {settings[key]!r} and {name!r} are one setting under {where} "
                    f"(--trigger {self.trigger}, --k {self.k}): give each setting once"
                )
            settings[key] = name

    def _check_unused_options(self) -> None:
        """Check the options that no listed method reads as well (the models' names, the run's trigger
        options, ``--selector``, ``--llm-device-map``): the run records them, and a later invocation
        that adds a method to this run directory reads them, so a typo must fail now, not then."""
        check_model_options(self.slm, self.llm, self.llm_dtype, self.llm_device_map)
        check_unread_options(
            list(map(self.spec, self.methods)), self.method_options(), self.calibration_source()
        )

    def calibration_source(self) -> CalibrationSource:
        """The training problems and token budget every trigger of this run is calibrated on."""
        return CalibrationSource(
            self.calibration_dataset, self.calibration_split, self.calibration_problems, self.max_new_tokens
        )

    def spec(self, method: str) -> MethodSpec | None:
        """The checked :class:`~s2t.methods.MethodSpec` of ``method`` under this run's options (None for maj@K)."""
        if majority_samples(method) is not None:
            return None
        return MethodSpec.parse(method, **self.method_options(), calibration=self.calibration_source())

    def method_options(self) -> dict:
        """This run's options as :meth:`~s2t.methods.MethodSpec.parse` takes them (calibration aside)."""
        return dict(
            trigger=self.trigger,
            threshold=self.threshold,
            quantile=self.quantile,
            k=self.k,
            ratio=self.ratio,
            min_step=self.min_step,
            selector=self.selector,
            slm=self.slm,
        )

    def trigger_name(self, method: str) -> str | None:
        """The trigger a method consults (None for greedy, the LLM alone and maj@K)."""
        spec = self.spec(method)
        return spec.trigger if spec is not None and spec.trigger != "never" else None

    def uses_selector(self, method: str) -> bool:
        """Whether ``method``'s results depend on ``--selector``: S2T-Local, or any learned trigger
        (``--trigger learned`` or ``/learned`` in the name), which is stored with the selector."""
        spec = self.spec(method)
        return spec is not None and spec.selector is not None

    def selector_digest(self, method: str) -> str:
        """What of ``--selector`` made ``method``'s results: its weights' digest for S2T-Local (the
        form records have always carried), and its learned trigger's, prefixed ``trigger:``, where the
        method fires on it."""
        from s2t.policies.learned_selector import CONFIG_NAME, checkpoint_digest
        from s2t.policies.learned_trigger import WEIGHTS_NAME as TRIGGER_WEIGHTS

        spec = self.spec(method)
        parts = []
        if is_local_method(method):
            parts.append(checkpoint_digest(self.selector))
            adapter = json.loads((Path(self.selector) / CONFIG_NAME).read_text()).get("adapter_sha256")
            if adapter:  # a LoRA selector saved with its adapter's hash: most of its weights
                parts.append("adapter:" + adapter[:16])
        if spec.trigger == "learned":
            parts.append("trigger:" + checkpoint_digest(self.selector, TRIGGER_WEIGHTS))
        return "+".join(parts)

    def needs_llm(self, method: str) -> bool:
        """Whether ``method`` needs the LLM loaded (decided from the configuration, before any model loads)."""
        spec = self.spec(method)
        return spec is not None and spec.needs_llm


RESULTS_FILE = "results.jsonl"  # one record per finished (method, problem)
# A shard of evaluation work: for each method, the problems to run it on.
EvalShard = list[tuple[str, list[Problem]]]

# Config entries that do not change results, so a run may resume with other values. The batch size
# is one only where decoding is batch-invariant (see batch_invariant).
RESUMABLE_KEYS = {"limit", "batch_size", "methods", "llm_device_map"}
# The selector changes only s2t-local's results (unless the trigger is the learned one, stored with
# it): a run may gain s2t-local later; each s2t-local record names its selector's weights digest
# and a different selector for the same run directory is refused.
SELECTOR_KEY = "selector"
# Which selector directory each selector-reading method was run with ({method: directory}), over every
# invocation of the run; ``selector`` is the latest invocation's that read one.
SELECTORS_KEY = "selectors"
# Runs made before the dtype (and backend) were resolved and recorded stored null, which meant these.
LEGACY_CONFIG = LEGACY_DECODING


def invocation_id() -> str:
    """Names one evaluator's records (UTC start time, process id and a random suffix): a run whose
    records have several was resumed or sharded."""
    return f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}/{os.getpid()}/{uuid.uuid4().hex[:6]}"


def canonical_method_name(name: str) -> str:
    """A method name ``s2t eval`` accepts, canonically spelled: those of :data:`s2t.methods.METHODS`
    (with a trigger setting, or labelled ``METHOD:LABEL``) and ``maj@K``; else ``ValueError``."""
    return _canonical_method_name(name, majority=True)


def record_key(record: dict) -> tuple[str, str]:
    """What identifies an evaluation record: its (method, problem)."""
    return record["method"], record["problem_id"]


def unit_key(method: str, problem: Problem) -> tuple[str, str]:
    """The key of the record that finishes ``method`` on ``problem`` (see :func:`record_key`)."""
    return method, problem.id


def _one_shard(method: str, problems: list[Problem]) -> list[EvalShard]:
    return [[(method, problems)]]


def sample_seed(seed: int, problem_id: str, sample: int) -> int:
    """A per-(problem, sample) seed that does not depend on batching or resumption."""
    return zlib.crc32(f"{seed}/{problem_id}/{sample}".encode())


def _cost_dict(cost: CostRecord) -> dict:
    return cost.to_dict()


def _sum_costs(costs: Sequence[CostRecord]) -> dict:
    return CostRecord.total(costs).to_dict()


class Evaluator:
    """Runs an :class:`EvalConfig` into a run directory, resuming what is already there."""

    def __init__(
        self,
        config: EvalConfig,
        out_dir: str | Path | None,
        generator: S2TGenerator | None = None,
        progress: bool = True,
        problems: Sequence[Problem] | None = None,
        thresholds: dict[str, float] | None = None,
    ):
        """``out_dir=None`` makes an evaluator that only computes records (:meth:`run_method`) and
        writes nothing: a distributed worker whose driver owns the run directory
        (:mod:`s2t.evaluate_distributed`). It cannot calibrate, so give it the calibrated ``thresholds``
        (:meth:`prepare_methods` of the driver's evaluator)."""
        self.config = config
        # Problems first: a dataset that cannot be loaded must not leave a run directory behind.
        self.problems = list(problems) if problems is not None else self._load_problems()
        if not self.problems and out_dir is not None:  # (a distributed worker is handed its problems later)
            raise ValueError(
                f"no problems to evaluate: {config.dataset} {config.split} holds none from --offset {config.offset}"
            )
        if any(map(config.uses_selector, config.methods)):
            self._check_selector_leakage()  # nor a selector or learned trigger trained on the evaluated problems
        # the selectors are guarded per method by the records' digests
        resumable = RESUMABLE_KEYS | {SELECTOR_KEY, SELECTORS_KEY}
        if config.backend == "llama.cpp":
            # the GGUF files fix the precision there; the torch dtype (a CPU-dependent default) does not
            # apply, so a run started on a CPU without native bfloat16 resumes on one with it
            resumable |= {"dtype", "llm_dtype"}
        if not batch_invariant(config.backend, config.dtype, config.llm_dtype):
            resumable = resumable - {"batch_size"}
            if out_dir is not None:
                _check_same_batch_size(Path(out_dir), config)
        if out_dir is not None:  # before config.json is rewritten, and whether or not work is left
            for method in filter(config.uses_selector, config.methods):
                _check_same_selector(Path(out_dir), method, config.selector_digest(method))
        self.invocation = invocation_id()
        self.run = (
            RunDirectory(
                out_dir, _recorded_config(out_dir, config), ignore_keys=resumable, legacy=LEGACY_CONFIG
            )
            if out_dir is not None
            else None
        )
        if self.run is not None:
            self.run.bind_problems((p.id, p.digest) for p in self.problems)
        self.driver = RunDriver(self.run, RESULTS_FILE, key=record_key)
        self.progress = progress
        self._generator = generator
        # A run calibrates into its own calibration.json (resumed runs reuse it); a worker without a
        # run directory holds its driver's thresholds and cannot calibrate.
        self.store = (
            CalibrationStore(self.run.path / "calibration.json")
            if self.run is not None
            else CalibrationStore(
                None, {k: {"threshold": t} for k, t in (thresholds or {}).items()}, read_only=True
            )
        )
        self._calibrator: Calibrator | None = None

    @property
    def calibrator(self) -> Calibrator:
        """Calibrates this run's triggers on training problems, keyed ``trigger@quantile`` in the run's store."""
        if self._calibrator is None:
            self._calibrator = Calibrator(
                self.generator,
                self.store,
                scoped=False,
                batch_size=self.config.batch_size,
                evaluated_questions=[p.question for p in self.problems],
            )
        return self._calibrator

    @property
    def generator(self) -> S2TGenerator:
        if self._generator is None:
            c = self.config
            self._generator = make_generator(
                c.backend, c.slm, c.llm, dtype=c.dtype, llm_dtype=c.llm_dtype, llm_device_map=c.llm_device_map
            )
        return self._generator

    def _load_problems(self) -> list[Problem]:
        c = self.config
        return load_problems(c.dataset, c.split, limit=c.limit, offset=c.offset, data_file=c.data_file)

    def finished(self) -> set[tuple[str, str]]:
        """The (method, problem id) pairs the run directory holds a record of."""
        return self.driver.done()

    def prepare_methods(self) -> dict[str, float]:
        """Build every configured method now; returns the calibrated thresholds (key -> threshold).

        This calibrates each trigger setting (once per run, stored in ``calibration.json``) and
        loads and checks an S2T-Local selector (its base model, and leakage against the evaluated
        problems). Distributed runs call it on the driver before fanning out and hand the
        thresholds to the workers.
        """
        labels = set()
        for name in self.config.methods:
            spec = self.config.spec(name)
            if spec is not None and spec.trigger != "never":
                self._method(name)
                if spec.needs_calibration:
                    labels.add(Calibrator.label(spec))
        entries = self.store.entries()
        return {label: entries[label]["threshold"] for label in sorted(labels)}

    def run_all(self, on_record: Callable[[dict], None] | None = None) -> list[dict]:
        """Evaluate every configured method on every problem not yet finished; returns all records.

        Each method's unfinished problems run as one continuous batch (a finished problem's place
        goes to the next one at once); ``on_record`` sees each record after it is written.
        """
        done = self.finished()
        pending = [
            m for m in self.config.methods if self.driver.pending(self.problems, partial(unit_key, m), done)
        ]
        if any(m != LLM_ALONE for m in pending):  # the SLM decodes: --k must fit its vocabulary
            TopK(self.config.k).check_vocab(self.generator.vocab_size)
        with self.run.claim(pending) if self.run is not None else contextlib.nullcontext():
            for method in filter(self.config.uses_selector, pending):
                # its selector or learned trigger is loaded and checked against the SLM (which only a
                # loaded model allows) before any method decodes: a refused one leaves nothing to resume
                self._method(method)
            self._drive_all(self.finished(), on_record)  # what finished until the claim
        return self.driver.records()

    def _drive_all(self, done: set, on_record: Callable[[dict], None] | None) -> None:
        for method in self.config.methods:
            problem_key = partial(unit_key, method)
            if self.config.uses_selector(method) and self.driver.pending(self.problems, problem_key, done):
                self.check_same_selector(method)
            self.driver.drive(
                self.problems,
                problem_key,
                lambda: self,
                done=done,
                shards=partial(_one_shard, method),
                on_record=on_record,
                postfix=partial(self._accuracy_postfix, method),
                desc=method,
                progress=self.progress,
            )

    def run_shard(self, shard: EvalShard) -> Iterator[dict]:
        """The graded records of each (method, problems) pair of ``shard``, in order, as each finishes,
        each with the batch size and the invocation that made it."""
        made_by = {"batch_size": self.config.batch_size, "invocation": self.invocation}
        for method, problems in shard:
            for record in self.run_method(method, problems):
                yield record | made_by

    def check_same_selector(self, method: str) -> None:
        """Refuse to mix results of two different trained selectors (or learned triggers) under one
        method name (also checked when the evaluator is made; again here, since another process may
        write the run)."""
        _check_same_selector(self.run.path, method, self.config.selector_digest(method))

    def _accuracy_postfix(self, method: str) -> dict[str, str]:
        """The progress bar's running accuracy of ``method`` over every record of it written so far."""
        recs = [r for r in self.driver.records() if r["method"] == method]
        return {"acc": f"{sum(r['correct'] for r in recs) / max(len(recs), 1):.0%}"}

    def run_method(self, method: str, problems: Sequence[Problem]):
        """Yield one graded record per problem, as each finishes."""
        samples = majority_samples(method)
        if samples is not None:
            yield from self._run_majority(samples, problems)
            return
        resolved = self._resolve(method)
        extra = {"selector": self.config.selector_digest(method)} if self.config.uses_selector(method) else {}
        if self.config.trigger_name(method) is not None:
            extra["setting"] = _setting_record(resolved.method)
        # One continuous batch: a finished problem's place goes to the next one at once.
        outs = self.generator.generate_stream(
            [p.question for p in problems],
            resolved,
            max_new_tokens=self.config.max_new_tokens,
            batch_size=self.config.batch_size,
            seeds=[sample_seed(self.config.seed, p.id, 0) for p in problems],
            progress=self.progress,
        )
        for index, out in outs:
            p = problems[index]
            g = grade(p.answer, out.text)
            yield {
                "method": method,
                "problem_id": p.id,
                "gold": p.answer,
                "extracted": g.extracted,
                "correct": g.correct,
                "finish_reason": out.finish_reason,
                "trigger_steps": out.trigger_steps,
                "cost": _cost_dict(out.cost),
                "text": out.text,
                **extra,
            }

    def _run_majority(self, k: int, problems: Sequence[Problem]):
        c = self.config
        greedy = build_method("greedy")
        # Whole problems per batch: k samples of one problem never straddle two batches.
        per_batch = max(1, c.batch_size // k)
        for start in range(0, len(problems), per_batch):
            batch = problems[start : start + per_batch]
            questions = [p.question for p in batch for _ in range(k)]
            seeds = [sample_seed(c.seed, p.id, j) for p in batch for j in range(k)]
            outs = self.generator.generate(
                questions,
                greedy,
                max_new_tokens=c.max_new_tokens,
                batch_size=max(c.batch_size, k),
                temperature=c.sample_temperature,
                top_p=c.sample_top_p,
                seeds=seeds,
                progress=self.progress,
            )
            for i, p in enumerate(batch):
                samples = outs[i * k : (i + 1) * k]
                grades = [grade(p.answer, s.text) for s in samples]
                answers = [g.extracted for g in grades]
                voted = majority_vote(answers)
                vote_index = answers.index(voted) if voted is not None else None
                yield {
                    "method": f"maj@{k}",
                    "problem_id": p.id,
                    "gold": p.answer,
                    "extracted": voted,
                    "correct": bool(vote_index is not None and grades[vote_index].correct),
                    "pass_at_k": any(g.correct for g in grades),
                    "sample_answers": answers,
                    "sample_correct": [g.correct for g in grades],
                    "finish_reason": [s.finish_reason for s in samples],
                    "cost": _sum_costs([s.cost for s in samples]),
                    "sample_texts": [s.text for s in samples],  # the k answers, in seed order
                }

    def _resolve(self, name: str) -> ResolvedMethod:
        """The method ``name`` resolved against this run's models, calibrated into this run's store."""
        return self.generator.resolve(self.config.spec(name), calibrator=self.calibrator)

    def _method(self, name: str) -> Method:
        return self._resolve(name).method

    def _check_selector_leakage(self) -> None:
        """Refuse a selector, or a learned trigger, trained (or validated) on any of the evaluated
        problems (read from their configs, before any model loads)."""
        specs = [s for s in map(self.config.spec, self.config.methods) if s is not None and s.selector]
        for what, leaked in selector_training_overlap(self.config.selector, specs, self.problems).items():
            _refuse_leak(what, leaked)


def _refuse_leak(what: str, leaked: set[str]) -> None:
    if leaked:
        raise ValueError(
            f"{what} was trained on {len(leaked)} of the evaluated problems (e.g. {sorted(leaked)[0]}): "
            "refusing a leaky evaluation"
        )


def _digest_parts(digest: str) -> dict[str, str]:
    """A record's selector digest by part: ``"ab12+adapter:cd34+trigger:ef56"`` ->
    ``{"weights": "ab12", "adapter": "cd34", "trigger": "ef56"}`` (see :meth:`EvalConfig.selector_digest`)."""
    parts = {}
    for part in digest.split("+"):
        kind, _, value = part.rpartition(":")
        parts[kind or "weights"] = value
    return parts


def _check_same_selector(run_dir: Path, method: str, digest: str) -> None:
    """Refuse a selector (``digest``) for ``method`` where ``run_dir`` holds results of another
    under the same label: a label (none, or ``s2t-local:lora``'s ``lora``) names one selector's
    weights and one learned trigger for every method and setting that carries it."""
    base, _, setting = method.partition("/")
    label = split_label(base)[1]
    mine = _digest_parts(digest)
    for r in read_jsonl(run_dir / RESULTS_FILE):
        if r.get("selector") is None or split_label(r["method"].split("/", 1)[0])[1] != label:
            continue  # None: no selector read, or a record made before digests were recorded
        theirs = _digest_parts(r["selector"])
        clash = sorted(kind for kind in mine.keys() & theirs.keys() if mine[kind] != theirs[kind])
        if clash:
            what = {"weights": "selector", "adapter": "LoRA adapter", "trigger": "learned trigger"}[clash[0]]
            labelled = f"{split_label(base)[0]}:LABEL" + (f"/{setting}" if setting else "")
            named = f"label {label!r}" if label else "no label"
            raise ValueError(
                f"{run_dir} holds {r['method']} results of another {what} under {named} (digest "
                f"{theirs[clash[0]]}, this one is {mine[clash[0]]}): a label names one selector and one "
                f"learned trigger; name this one's method {labelled} with a new label (e.g. "
                "s2t-local:lora, s2t:hidden/learned), or use a new --out directory"
            )


def _recorded_config(out_dir: str | Path, config: EvalConfig) -> dict:
    """What ``config.json`` records for this invocation of a run that may be resumed, or gain methods
    or a selector, over several invocations (or lanes running side by side): every method any
    invocation asked for, in first-asked order, and the selector directory behind each
    selector-using method (S2T-Local, learned triggers): ``selectors`` per method, ``selector`` the
    latest invocation's that ran such a method."""
    read = {m: config.selector for m in config.methods if config.uses_selector(m)}
    recorded = asdict(config) | {
        "data_file_sha256": data_file_digest(config.data_file),
        SELECTORS_KEY: read,
    }
    if not read:  # a --selector no method of this invocation reads is not the run's
        recorded[SELECTOR_KEY] = None
    stored = Path(out_dir) / "config.json"
    try:
        earlier = json.loads(stored.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):  # none yet (RunDirectory names a bad one)
        return recorded
    methods = list(earlier.get("methods") or [])
    config.check_distinct_settings(config.methods, earlier=methods)  # not one setting twice over invocations
    recorded["methods"] = methods + [m for m in config.methods if m not in methods]
    recorded[SELECTORS_KEY] = dict(earlier.get(SELECTORS_KEY) or {}) | read
    if not read:
        recorded[SELECTOR_KEY] = earlier.get(SELECTOR_KEY)
    return recorded


def precision_keys(config: EvalConfig) -> dict[str, str]:
    """The recorded settings that decide a run's precision (on llama.cpp, the GGUF files do: the torch
    dtypes are not compared there)."""
    if config.backend == "llama.cpp":
        return {"backend": config.backend}
    return {"backend": config.backend, "dtype": config.dtype, "llm_dtype": config.llm_dtype}


def _check_same_batch_size(out_dir: Path, config: EvalConfig) -> None:
    """Refuse to resume a batch-dependent run (:func:`s2t.models.batch_invariant`) with another batch size."""
    stored = out_dir / "config.json"
    if not stored.is_file():
        return
    recorded = json.loads(stored.read_text())
    if any(recorded.get(key, value) != value for key, value in precision_keys(config).items()):
        return  # another precision or backend: refused as another configuration, which says so
    earlier = recorded.get("batch_size")
    if earlier is not None and earlier != config.batch_size:
        raise ConfigMismatchError(
            f"{out_dir} was decoded with --batch-size {earlier} in {config.dtype} on {config.backend}, "
            "where a problem's tokens depend on its batch (only float32 on torch is batch-invariant): "
            f"resume it with --batch-size {earlier}, or use a new --out directory"
        )


def _setting_record(method: Method) -> dict:
    """The trigger setting a record was made with, threshold included."""
    return {
        "trigger": method.trigger.name,
        "threshold": method.trigger.threshold,
        "quantile": method.quantile,
        "k": method.candidates.k,
    }


def evaluate(config: EvalConfig, out_dir: str | Path, progress: bool = True, **kwargs) -> dict:
    """Run (or resume) an evaluation and write its report; returns the summary."""
    from s2t.reporting.eval_report import write_report

    evaluator = Evaluator(config, out_dir, progress=progress, **kwargs)
    try:
        evaluator.run_all()
    except BaseException:  # failed before its first result: the corrected command is not refused
        evaluator.run.discard_if_unused()
        raise
    return write_report(evaluator.run.path)
