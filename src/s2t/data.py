"""Benchmark datasets as data: a registry of specs and one loader for local JSONL or the Hub.

Adding a benchmark means adding a :class:`DatasetSpec` to :data:`DATASETS` (as in
lm-evaluation-harness), not a new code path. :func:`load_problems` resolves a dataset from, in
order: an explicit JSONL file, a local data directory (``<dir>/<dataset>/<split>.jsonl``, the
directory given as an argument or by the ``S2T_DATA_DIR`` environment variable), and finally the
Hugging Face Hub through the optional ``datasets`` package. Hosts without the Hub get a
:class:`DatasetUnavailableError` that says how to point at local files.

Problem ids are ``"<dataset>/<split>/<index>"`` with the index counted over the whole split, so
results from runs with different ``limit``/``offset`` can be joined on id.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA_DIR_ENV = "S2T_DATA_DIR"


PROBLEM_DIGEST_CHARS = 16  # of Problem.digest: what a selector or learned trigger records per problem


@dataclass(frozen=True)
class Problem:
    """One benchmark problem.

    ``answer`` is the gold *final* answer as a string (e.g. ``"18"``); ``solution`` is the full
    reference solution where the dataset has one (e.g. GSM8K's ``answer`` field).
    """

    id: str
    question: str
    answer: str
    dataset: str
    split: str
    solution: str | None = None

    @property
    def digest(self) -> str:
        """:func:`question_digest` of the question: what a run directory binds this problem's id to
        (:meth:`s2t.runs.RunDirectory.bind_problems`), and what the leakage checks compare."""
        return question_digest(self.question)


def question_digest(question: str) -> str:
    """SHA-256 (hex) of a question with its whitespace runs as one space: two problems are one problem
    for the leakage checks and the run binding when their questions are, whatever their ids (a gold
    answer edited under the same ``--data-file`` is caught by the file's own digest)."""
    return hashlib.sha256(" ".join(question.split()).encode()).hexdigest()


class DatasetUnavailableError(RuntimeError):
    """The dataset is neither available locally nor loadable from the Hugging Face Hub."""


def gsm8k_final_answer(raw: Any) -> str:
    """Return the gold final answer of a GSM8K-style solution: the text after the last ``####``.

    Thousands separators are removed ("1,000" -> "1000") because GSM8K writes them
    inconsistently and graders compare numbers, not formatting.
    """
    text = str(raw)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return text.strip().replace(",", "")


def plain_answer(raw: Any) -> str:
    """Return the answer field unchanged (as a stripped string)."""
    return str(raw).strip()


def first_or_joined_answer(raw: Any) -> str:
    """Turn a list-valued answer (OlympiadBench's ``final_answer``) into one string.

    A single element is returned as is; several are joined with ", " so a multi-part answer
    reads like a tuple to the grader. Enclosing ``$...$`` are dropped because the grader
    wraps the gold in its own math delimiters.
    """
    items = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    cleaned = [str(item).strip() for item in items]
    cleaned = [
        item[1:-1].strip() if len(item) >= 2 and item[0] == item[-1] == "$" else item for item in cleaned
    ]
    return ", ".join(cleaned)


def generic_answer(raw: Any) -> str:
    """Gold answer for datasets outside the registry: as-is, unless it is GSM8K-style (``####``)."""
    if isinstance(raw, (list, tuple)):
        return first_or_joined_answer(raw)
    text = str(raw)
    return gsm8k_final_answer(text) if "####" in text else text.strip()


@dataclass(frozen=True)
class DatasetSpec:
    """Where a benchmark lives and how to read its records.

    ``splits`` are our split names; ``hub_splits`` maps any of them to a differently named Hub
    split (OlympiadBench only publishes ``train``, which we use as the test set).
    """

    name: str
    hub_id: str
    hub_config: str | None
    splits: tuple[str, ...]
    question_field: str
    answer_field: str
    extract_answer: Callable[[Any], str]
    solution_field: str | None = None
    hub_splits: Mapping[str, str] = field(default_factory=dict)

    def hub_split(self, split: str) -> str:
        """The Hub's name for our ``split``."""
        return self.hub_splits.get(split, split)


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec, overwrite: bool = False) -> DatasetSpec:
    """Add ``spec`` to :data:`DATASETS` under ``spec.name``; refuse silent replacement."""
    if spec.name in DATASETS and not overwrite:
        raise ValueError(f"dataset {spec.name!r} is already registered; pass overwrite=True to replace it")
    DATASETS[spec.name] = spec
    return spec


register_dataset(
    DatasetSpec(
        name="gsm8k",
        hub_id="openai/gsm8k",
        hub_config="main",
        splits=("train", "test"),
        question_field="question",
        answer_field="answer",
        extract_answer=gsm8k_final_answer,
        solution_field="answer",
    )
)
register_dataset(
    DatasetSpec(
        name="math500",
        hub_id="HuggingFaceH4/MATH-500",
        hub_config=None,
        splits=("test",),
        question_field="problem",
        answer_field="answer",
        extract_answer=plain_answer,
        solution_field="solution",
    )
)
register_dataset(
    DatasetSpec(
        name="aime25",
        hub_id="math-ai/aime25",
        hub_config=None,
        splits=("test",),
        question_field="problem",
        answer_field="answer",
        extract_answer=plain_answer,
    )
)
register_dataset(
    DatasetSpec(
        name="olympiadbench",
        hub_id="Hothan/OlympiadBench",
        hub_config="OE_TO_maths_en_COMP",
        splits=("test",),
        question_field="question",
        answer_field="final_answer",
        extract_answer=first_or_joined_answer,
        solution_field="solution",
        hub_splits={"test": "train"},
    )
)


def load_problems(
    dataset: str,
    split: str = "test",
    limit: int | None = None,
    offset: int = 0,
    data_file: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
) -> list[Problem]:
    """Load problems ``offset`` … ``offset + limit`` of ``dataset``/``split``.

    Resolution order: ``data_file`` (a JSONL file, used as is, any split label allowed); then
    ``<data_dir>/<dataset>/<split>.jsonl`` with ``data_dir`` defaulting to ``$S2T_DATA_DIR``;
    then the Hugging Face Hub. ``question_field``/``answer_field`` override the registered
    field names (for local files with other column names). Datasets outside the registry are
    only loadable from local files and default to ``question``/``answer`` fields.

    Raises:
        ValueError: unknown dataset or split, negative ``offset``/``limit``, or a malformed record.
        DatasetUnavailableError: no local file and the Hub could not be used.
    """
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")

    spec = DATASETS.get(dataset)
    if data_file is not None:
        if Path(data_file).is_dir():
            raise ValueError(f"--data-file {data_file} is a directory: give a JSONL file")
        records = _read_jsonl(Path(data_file))
        if not records:
            raise ValueError(f"no problems in {data_file}")
        source = str(data_file)
        return _to_problems(
            records, source, dataset, split, spec, question_field, answer_field, limit, offset
        )

    if spec is not None and split not in spec.splits:
        raise ValueError(
            f"unknown split {split!r} for dataset {dataset!r}; allowed splits: {list(spec.splits)}"
        )

    local_dir = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    local_path = Path(local_dir) / dataset / f"{split}.jsonl" if local_dir is not None else None
    if local_path is not None and local_path.is_file():
        records = _read_jsonl(local_path)
        return _to_problems(
            records, str(local_path), dataset, split, spec, question_field, answer_field, limit, offset
        )

    if spec is None:
        looked = f" (no file at {local_path})" if local_path is not None else ""
        raise ValueError(
            f"unknown dataset {dataset!r}{looked}; registered datasets: {sorted(DATASETS)}. "
            "Other datasets can be loaded from a local JSONL file with --data-file."
        )

    records = _load_from_hub(spec, split, local_path)
    source = f"{spec.hub_id} ({spec.hub_split(split)} split)"
    return _to_problems(records, source, dataset, split, spec, question_field, answer_field, limit, offset)


def data_file_digest(data_file: str | os.PathLike | None) -> str | None:
    """SHA-256 (hex) of a ``--data-file``'s bytes, or None without one (or if it cannot be read; loading
    it then fails with its own error). Run directories record it: a resumed run is bound to the file's
    content, however the path is spelled, and an edited file is refused."""
    if data_file is None:
        return None
    try:
        return hashlib.sha256(Path(data_file).read_bytes()).hexdigest()
    except OSError:
        return None


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """Parse a JSONL file into ``(1-based line number, record)`` pairs, skipping blank lines."""
    records: list[tuple[int, Any]] = []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{line_number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
                ) from err
            if not line.strip():
                continue
            try:
                records.append((line_number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number}: invalid JSON ({err.msg})") from err
    return records


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick look before asking ``datasets``, whose offline failure takes half a minute of retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or os.environ.get(
        "HF_DATASETS_OFFLINE"
    ):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_from_hub(spec: DatasetSpec, split: str, local_path: Path | None) -> list[tuple[int, Any]]:
    """Read ``spec``/``split`` from the Hub; any failure becomes a :class:`DatasetUnavailableError`."""
    hub_split = spec.hub_split(split)
    looked = f"No local file at {local_path}. " if local_path is not None else ""
    advice = (
        f"{looked}Point at a data directory containing {spec.name}/{split}.jsonl (--data-dir, or "
        f"{DATA_DIR_ENV}), or at a JSONL file of problems (--data-file, in eval, analyze and collect)."
    )
    try:
        import datasets  # optional dependency (extra "hub"); imported lazily so offline hosts work
    except ImportError as err:
        raise DatasetUnavailableError(
            f"cannot load dataset {spec.name!r} split {split!r}: the Hugging Face Hub could not be reached "
            f"because the 'datasets' package is not installed (pip install 'select-to-think[hub]'). {advice}"
        ) from err
    if not _hub_reachable():
        raise DatasetUnavailableError(
            f"cannot load dataset {spec.name!r} split {split!r}: the Hugging Face Hub is not reachable from "
            f"this machine (or HF_HUB_OFFLINE is set). {advice}"
        )
    try:
        rows: Iterable[Any] = datasets.load_dataset(spec.hub_id, spec.hub_config, split=hub_split)
        # Materialise inside the try: streaming or lazy datasets can fail while iterating too.
        return list(enumerate(rows, start=1))
    except Exception as err:  # the Hub fails in many ways (offline, 404, auth); all mean "unavailable"
        raise DatasetUnavailableError(
            f"cannot load dataset {spec.name!r} split {split!r}: the Hugging Face Hub could not be reached "
            f"for {spec.hub_id} (config {spec.hub_config!r}, split {hub_split!r}): "
            f"{type(err).__name__}: {err}. {advice}"
        ) from err


def _to_problems(
    records: list[tuple[int, Any]],
    source: str,
    dataset: str,
    split: str,
    spec: DatasetSpec | None,
    question_field: str | None,
    answer_field: str | None,
    limit: int | None,
    offset: int,
) -> list[Problem]:
    """Validate every record (so a broken file fails on any run), then build the selected slice."""
    q_field = question_field or (spec.question_field if spec else "question")
    a_field = answer_field or (spec.answer_field if spec else "answer")
    extract = spec.extract_answer if spec else generic_answer
    solution_field = spec.solution_field if spec else None

    problems: list[Problem] = []
    for index, (line_number, record) in enumerate(records):
        where = f"{source}:{line_number}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for name in (q_field, a_field):
            if name not in record:
                raise ValueError(f"{where}: missing field {name!r} (fields present: {sorted(record)})")
            if record[name] is None:
                raise ValueError(f"{where}: field {name!r} is null")
        if not str(record[q_field]).strip():
            raise ValueError(f"{where}: field {q_field!r} is empty: there is no question to answer")
        solution = record.get(solution_field) if solution_field else None
        if isinstance(solution, (list, tuple)):
            solution = "\n\n".join(str(part) for part in solution)
        answer = extract(record[a_field])
        if not answer:
            raise ValueError(f"{where}: field {a_field!r} holds no gold answer ({record[a_field]!r:.60})")
        problems.append(
            Problem(
                id=f"{dataset}/{split}/{index}",
                question=str(record[q_field]),
                answer=answer,
                dataset=dataset,
                split=split,
                solution=None if solution is None else str(solution),
            )
        )
    end = None if limit is None else offset + limit
    return problems[offset:end]
