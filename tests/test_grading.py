"""Tests for s2t.grading: answer extraction, math-verify grading, and majority voting."""

from __future__ import annotations

import threading

import pytest

from s2t.grading import (
    GradeResult,
    clean_answer,
    extract_answer,
    grade,
    is_correct,
    majority_vote,
    normalize_number,
    same_answer,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is \\boxed{18}.", "18"),
        ("first \\boxed{3} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("$\\boxed{\\frac{\\sqrt{3}}{2}}$", "\\frac{\\sqrt{3}}{2}"),
        ("The answer is $\\boxed 5$.", "5"),
        ("she earns 9 * 2 = 18 dollars\n#### 18", "18"),
        ("#### 1,000 dollars and 7 cents", "1,000"),
        ("We get 3 apples, then 12 pears. Total: 1,234,567.", "1,234,567"),
        ("The temperature is -7 degrees.", "-7"),
        ("5-3 = 2, the result is 2.5.", "2.5"),
        ("list 1,2,3", "3"),
        ("truncated \\boxed{\\frac{1}{2", "2"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("18", "18"), ("18.00", "18"), ("$18", "18"), ("\\$18.50", "18.5"), ("1,000", "1000"), ("18.", "18")],
)
def test_normalize_number(raw: str, expected: str) -> None:
    assert normalize_number(raw) == expected


def test_normalize_number_leaves_non_numbers_alone() -> None:
    assert normalize_number(" \\frac{1}{2} ") == "\\frac{1}{2}"
    assert normalize_number("-0.0") == "0"


@pytest.mark.parametrize(
    ("gold", "text"),
    [
        ("18", "So she makes \\boxed{18} dollars."),
        ("18", "\\boxed{\\$18.00}"),
        ("18", "She makes $18.00 every day."),
        ("1000", "The total is 1,000."),
        ("1000", "#### 1,000"),
        ("\\frac{1}{2}", "\\boxed{0.5}"),
        ("0.5", "\\boxed{\\frac{1}{2}}"),
        ("-3", "x = \\boxed{-3}"),
    ],
)
def test_is_correct_accepts_equivalent_answers(gold: str, text: str) -> None:
    assert is_correct(gold, text)


def test_is_correct_rejects_wrong_answer() -> None:
    assert not is_correct("18", "The answer is \\boxed{19}.")
    assert not is_correct("18", "I do not know.")


@pytest.mark.parametrize("text", ["\\boxed{", "}}}{{{\\frac", "\\boxed{\\frac{", "$$$", "\x00\xff", ""])
def test_garbage_input_is_wrong_without_raising(text: str) -> None:
    assert is_correct("18", text) is False


def test_garbage_gold_is_wrong_without_raising() -> None:
    assert is_correct("}{", "\\boxed{18}") is False


def test_grade_reports_extraction_and_correctness() -> None:
    assert grade("18", "... #### 18") == GradeResult(extracted="18", correct=True)
    assert grade("18", "nothing") == GradeResult(extracted=None, correct=False)


def test_grading_works_inside_a_thread() -> None:
    results: list[bool] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(is_correct("\\frac{1}{2}", "\\boxed{0.5}"))
            results.append(is_correct("18", "\\boxed{19}"))
        except BaseException as err:  # surface anything to the main thread
            errors.append(err)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert not errors
    assert results == [True, False]


def test_majority_vote_clear_majority() -> None:
    assert majority_vote(["3", "18", "18.00", "$18", "3"]) == "18"


def test_majority_vote_tie_goes_to_first_occurrence() -> None:
    assert majority_vote(["7", "5", "5", "7"]) == "7"
    assert majority_vote(["5", "7", "7", "5"]) == "5"


def test_majority_vote_ignores_none() -> None:
    assert majority_vote([None, None, "4", None, "5", "4.0"]) == "4"


def test_majority_vote_all_none() -> None:
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


# Spellings clean_answer rewrites before math-verify sees them (issue 23): unit words after a leading
# number, \text{} wrappers around one, and digit groups split by \, / \  / {,} / thin spaces.
@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ("18 dollars", "18"),
        ("18 dollars.", "18"),
        ("\\text{18 dollars}", "18"),
        ("\\text{ 18 dollars }", "18"),
        ("\\textbf{18}", "18"),
        ("\\mbox{18 dollars per hour}", "18"),
        ("\\$18 dollars", "\\$18"),
        ("-3 degrees", "-3"),
        ("2.5 hours", "2.5"),
        ("1,000 sq ft", "1,000"),
        ("\\frac{1}{2} cups", "\\frac{1}{2}"),
        ("25\\% off", "25\\%"),
        ("1\\,000", "1000"),
        ("1\\ 000", "1000"),
        ("1{,}000", "1000"),
        ("1\u2009000", "1000"),
        ("1\u202f000", "1000"),
        ("1\\thinspace 000", "1000"),
        ("1\\,000\\,000", "1000000"),
        ("12\\,345.5", "12345.5"),
        ("\\text{1\\,000 dollars}", "1000"),
    ],
)
def test_clean_answer_rewrites_words_wrappers_and_spaced_groups(raw: str, cleaned: str) -> None:
    assert clean_answer(raw) == cleaned


# Real expressions and answers that must reach math-verify exactly as written.
@pytest.mark.parametrize(
    "answer",
    [
        "18",
        "2x",
        "3\\sqrt{2}",
        "5 \\pi",
        "2 \\cdot 3",
        "x^2 + 1",
        "[2, 5)",
        "(1, 2)",
        "(3, -1)",
        "\\{1, 2\\}",
        "1,000",
        "10\\%",
        "0.5",
        "\\frac{270}7\\text{ degrees}",
        "864 \\mbox{ inches}^2",
        "\\text{(C)}",
        "\\text{Evelyn}",
        "\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}",
        "1\\,2",  # not a three-digit group
        "3.141\\,592",  # digits after a decimal point are not thousands groups
        "18 \\text{ dollars}",  # math-verify reads this one right already
        "2 x",  # one letter is a variable, not a unit word
        "2 pi",  # mathematics, not a unit
        "3 sqrt 2",
        "2 ln 3",
    ],
)
def test_clean_answer_leaves_real_expressions_alone(answer: str) -> None:
    assert clean_answer(answer) == answer


@pytest.mark.parametrize(
    ("gold", "text", "correct"),
    [
        ("18", "\\boxed{18 dollars}", True),
        ("18", "\\boxed{\\text{18 dollars}}", True),
        ("1000", "\\boxed{1\\,000}", True),
        ("1000", "\\boxed{1\\ 000}", True),
        ("1000", "\\boxed{1{,}000}", True),
        ("1000", "\\boxed{1\u2009000}", True),
        ("1000000", "\\boxed{1\\,000\\,000 dollars}", True),
        ("1000", "\\boxed{1\\,000}", True),
        ("5.4", "\\boxed{5.4 \\text{ cents}}", True),
        ("2x", "\\boxed{2x}", True),
        ("3\\sqrt{2}", "\\boxed{3\\sqrt{2}}", True),
        ("[2, 5)", "\\boxed{[2,5)}", True),
        ("(1, 2)", "\\boxed{(1, 2)}", True),
        ("\\text{(C)}", "\\boxed{\\text{(C)}}", True),
        ("18", "\\boxed{18x}", False),
        ("1", "\\boxed{1\\,000}", False),
        ("0", "\\boxed{1\\,000}", False),
        ("18", "\\boxed{\\text{19 dollars}}", False),
        ("[1, 2]", "\\boxed{(1, 2)}", False),
    ],
)
def test_grading_of_worded_and_spaced_answers(gold: str, text: str, correct: bool) -> None:
    assert is_correct(gold, text) is correct


def test_majority_vote_clusters_by_value_not_spelling() -> None:
    voted = majority_vote(["18 \\text{ dollars}", "18", "\\text{18}", "20", "20"])
    assert voted is not None and is_correct("18", f"\\boxed{{{voted}}}")
    assert majority_vote(["1\\,000", "7", "1000", "7", "1,000 dollars"]) == "1\\,000"
    assert majority_vote(["0.5", "3", "\\frac{1}{2}"]) == "0.5"


def test_majority_vote_ties_by_first_occurrence_of_the_value() -> None:
    assert majority_vote(["\\frac{1}{2}", "3", "0.5", "3"]) == "\\frac{1}{2}"
    assert majority_vote(["3", "\\frac{1}{2}", "0.5", "3"]) == "3"


def test_majority_vote_keeps_distinct_values_apart() -> None:
    assert majority_vote(["[1, 2]", "(1, 2)", "(1, 2)"]) == "(1, 2)"
    assert majority_vote(["2x", "2", "2"]) == "2"
    # Unparsable answers vote only with their own spelling.
    assert majority_vote(["}{", "4", "}{"]) == "}{"


def test_same_answer() -> None:
    assert same_answer("18 dollars", "\\$18.00")
    assert same_answer("1\\,000", "1000")
    assert not same_answer("18", "19")
