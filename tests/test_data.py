"""Tests for s2t.data: registry, local JSONL loading, id stability, and clear errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from s2t import data
from s2t.data import (
    DATA_DIR_ENV,
    DATASETS,
    DatasetUnavailableError,
    Problem,
    gsm8k_final_answer,
    load_problems,
)

SHARED_GSM8K = Path("/work/shared/data/gsm8k")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def gsm8k_records(n: int) -> list[dict]:
    return [{"question": f"q{i}?", "answer": f"work {i}\n#### {i * 1000:,}"} for i in range(n)]


@pytest.fixture(autouse=True)
def no_ambient_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    # The Makefile may export S2T_DATA_DIR; tests must not depend on it.
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import datasets` raise ImportError.
    monkeypatch.setitem(sys.modules, "datasets", None)


def test_registry_has_the_benchmarks() -> None:
    assert {"gsm8k", "math500", "aime25", "olympiadbench"} <= set(DATASETS)
    assert DATASETS["gsm8k"].hub_id == "openai/gsm8k"
    assert DATASETS["olympiadbench"].hub_split("test") == "train"


def test_gsm8k_gold_is_text_after_hashes_without_thousands_commas() -> None:
    assert gsm8k_final_answer("so 5 + 5 = 10\n#### 1,000") == "1000"
    assert gsm8k_final_answer("#### 18 ") == "18"


def test_olympiadbench_gold_from_list() -> None:
    extract = DATASETS["olympiadbench"].extract_answer
    assert extract(["$\\frac{1}{2}$"]) == "\\frac{1}{2}"
    assert extract(["3", "4"]) == "3, 4"


def test_data_file_loads_problems_with_gold_and_solution(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", gsm8k_records(3))
    problems = load_problems("gsm8k", data_file=str(path))
    assert problems[2] == Problem(
        id="gsm8k/test/2",
        question="q2?",
        answer="2000",
        dataset="gsm8k",
        split="test",
        solution="work 2\n#### 2,000",
    )


def test_ids_are_stable_under_offset_and_limit(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", gsm8k_records(10))
    full = load_problems("gsm8k", data_file=path)
    window = load_problems("gsm8k", data_file=path, offset=3, limit=4)
    assert [p.id for p in window] == ["gsm8k/test/3", "gsm8k/test/4", "gsm8k/test/5", "gsm8k/test/6"]
    assert window == full[3:7]
    assert load_problems("gsm8k", data_file=path, offset=8, limit=5) == full[8:]


def test_blank_lines_are_skipped_and_do_not_shift_ids(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    lines = [json.dumps(r) for r in gsm8k_records(2)]
    path.write_text(f"\n{lines[0]}\n\n   \n{lines[1]}\n\n", encoding="utf-8")
    problems = load_problems("gsm8k", data_file=path)
    assert [p.id for p in problems] == ["gsm8k/test/0", "gsm8k/test/1"]


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    good = json.dumps(gsm8k_records(1)[0])
    path.write_text(f"{good}\n\n{{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl:3: invalid JSON"):
        load_problems("gsm8k", data_file=path)


def test_missing_field_names_file_line_and_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "missing.jsonl", [*gsm8k_records(1), {"question": "no answer"}])
    with pytest.raises(ValueError, match=r"missing\.jsonl:2: missing field 'answer'"):
        load_problems("gsm8k", data_file=path)


def test_field_overrides_and_unregistered_dataset(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mine.jsonl",
        [{"prompt": "1+1?", "target": "2"}, {"prompt": "gsm style", "target": "x\n#### 3,500"}],
    )
    problems = load_problems(
        "mine", split="dev", data_file=path, question_field="prompt", answer_field="target"
    )
    assert [(p.id, p.question, p.answer) for p in problems] == [
        ("mine/dev/0", "1+1?", "2"),
        ("mine/dev/1", "gsm style", "3500"),
    ]


def test_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", gsm8k_records(4))
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    problems = load_problems("gsm8k", split="train", limit=2)
    assert [p.id for p in problems] == ["gsm8k/train/0", "gsm8k/train/1"]
    assert problems[1].answer == "1000"


def test_data_dir_argument_takes_precedence_over_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_jsonl(tmp_path / "arg" / "gsm8k" / "test.jsonl", gsm8k_records(2))
    write_jsonl(tmp_path / "env" / "gsm8k" / "test.jsonl", gsm8k_records(5))
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    assert len(load_problems("gsm8k", data_dir=tmp_path / "arg")) == 2


def test_unknown_dataset_lists_registered_names() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'.*gsm8k"):
        load_problems("nope")


def test_unknown_split_lists_allowed_splits() -> None:
    with pytest.raises(ValueError, match=r"unknown split 'dev'.*\['train', 'test'\]"):
        load_problems("gsm8k", split="dev")


def test_negative_offset_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="offset"):
        load_problems("gsm8k", data_file=write_jsonl(tmp_path / "g.jsonl", gsm8k_records(1)), offset=-1)


def test_without_local_data_or_datasets_package_error_is_clear(tmp_path: Path, no_hub: None) -> None:
    with pytest.raises(DatasetUnavailableError) as info:
        load_problems("math500", data_dir=tmp_path)
    message = str(info.value)
    assert "'math500'" in message and "'test'" in message
    assert "Hub could not be reached" in message
    assert "--data-file" in message and DATA_DIR_ENV in message
    assert isinstance(info.value, RuntimeError)


def test_hub_failure_becomes_dataset_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: True)

    class FakeDatasets:
        @staticmethod
        def load_dataset(*args: object, **kwargs: object) -> None:
            raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    with pytest.raises(DatasetUnavailableError, match="openai/gsm8k.*ConnectionError: offline"):
        load_problems("gsm8k")


def test_hub_rows_are_loaded_with_hub_split_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: True)
    calls = []

    class FakeDatasets:
        @staticmethod
        def load_dataset(hub_id: str, config: str | None, split: str) -> list[dict]:
            calls.append((hub_id, config, split))
            return [{"question": "q", "final_answer": ["$5$"], "solution": ["step"]}]

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    (problem,) = load_problems("olympiadbench")
    assert calls == [("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train")]
    assert (problem.id, problem.answer, problem.solution) == ("olympiadbench/test/0", "5", "step")


@pytest.mark.skipif(not SHARED_GSM8K.is_dir(), reason="shared GSM8K data not present")
def test_real_local_gsm8k() -> None:
    problems = load_problems("gsm8k", split="test", data_dir=SHARED_GSM8K.parent)
    assert len(problems) == 1319
    assert problems[0].answer == "18"
    assert problems[0].id == "gsm8k/test/0"


def test_unreachable_hub_fails_fast_with_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("S2T_DATA_DIR", raising=False)
    with pytest.raises(DatasetUnavailableError, match="not reachable.*S2T_DATA_DIR"):
        load_problems("gsm8k", "test", data_dir=None)


def test_a_data_file_that_is_a_directory_is_refused_as_such(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is a directory: give a JSONL file"):
        load_problems("tiny", "test", data_file=tmp_path)
