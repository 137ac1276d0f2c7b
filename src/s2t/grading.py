"""Final-answer extraction, grading with math-verify, and majority voting.

Extraction follows the usual conventions: the last ``\\boxed{...}`` (what our prompts ask
for), else GSM8K's ``#### <number>``, else the last number in the text (lm-evaluation-harness'
"flexible extract"). Correctness is decided by math-verify, which compares the answers as
mathematical objects (so "18.00", "\\$18" and "18" agree, and "0.5" equals "\\frac{1}{2}").

math-verify guards parsing and comparison with ``signal.alarm`` timeouts, which only work on
the main thread; elsewhere it raises. We therefore pass timeouts only on the main thread, so
grading also works inside worker threads (thread pools, Ray actors' threads).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from math_verify import parse, verify
from math_verify.errors import TimeoutException

# Seconds math-verify may spend parsing or comparing one expression (main thread only).
MATH_VERIFY_TIMEOUT_S = 5

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# A number with either proper thousands groups ("12,345.6") or none ("12345.6"). A minus sign
# counts only when it is not a binary minus ("5-3" ends in 3, not -3).
_NUMBER = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")

# Digit-group separators that math-verify misreads ("1\,000" parses as 1*0): a LaTeX thin space
# (``\,`` or ``\thinspace``), a control space, a braced comma, a Unicode thin or narrow no-break space.
_GROUP_SEPARATOR = r"(?:\\,|\\thinspace\s*|\\ |\{,\}|\u2009|\u202f)"
# Three-digit groups joined by those separators, not part of a longer number or of a decimal part.
_SPACED_GROUPS = re.compile(rf"(?<![\d.])\d{{1,3}}(?:{_GROUP_SEPARATOR}\d{{3}})+(?![\d])")
# A text-mode wrapper around the whole answer whose content starts with a number: "\text{18 dollars}".
_TEXT_WRAPPER = re.compile(
    r"\\(?:text|textbf|textrm|mbox|mathrm)\s*\{\s*((?:[-+]\s*)?(?:\\?\$\s*)?\d[^{}]*)\}"
)
# A leading number (sign, dollar sign, thousands commas, decimals, percent, or a numeric fraction)
# followed only by plain words of two or more letters: "18 dollars", "1,000 sq ft", "\frac{1}{2} cups".
_LEADING_NUMBER = (
    r"(?:[-+]\s*)?(?:\\?\$\s*)?"
    r"(?:\\[dt]?frac\{\d+\}\{\d+\}|\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?)"
    r"(?:\s*\\?%)?"
)
# Words after a number that are mathematics, not units: "2 pi" is not 2.
_MATH_WORDS = {
    "pi",
    "inf",
    "infty",
    "infinity",
    "sqrt",
    "sin",
    "cos",
    "tan",
    "cot",
    "sec",
    "csc",
    "log",
    "ln",
    "exp",
    "mod",
    "choose",
}
_NUMBER_THEN_WORDS = re.compile(
    rf"({_LEADING_NUMBER})(?:\s|\\ |\\,|~)+[A-Za-z]{{2,}}(?:[\s/-]+[A-Za-z]{{2,}})*\s*\.?"
)


@dataclass(frozen=True)
class GradeResult:
    """The answer extracted from a completion and whether it matches the gold answer."""

    extracted: str | None
    correct: bool


def _boxed_contents(text: str) -> list[str]:
    """Contents of every complete ``\\boxed{...}`` / ``\\boxed x`` in ``text``, in order.

    An unclosed box (a truncated generation) is skipped rather than guessed at.
    """
    contents: list[str] = []
    pattern = "|".join(re.escape(command) for command in _BOX_COMMANDS)
    for match in re.finditer(pattern, text):
        rest = text[match.end() :]
        if rest.startswith("{"):
            depth = 0
            for position, char in enumerate(rest):
                if char == "{":
                    depth += 1
                elif char == "}":
                    depth -= 1
                    if depth == 0:
                        contents.append(rest[1:position].strip())
                        break
        elif rest[:1].isspace():
            # "\boxed 5": the argument runs to the next whitespace or closing math delimiter.
            token = re.match(r"\s+([^\s$]+)", rest)
            if token:
                contents.append(token.group(1).rstrip("."))
    return [content for content in contents if content]


def _last_number(text: str) -> str | None:
    """The last number in ``text`` as written (commas kept), or None."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def extract_answer(text: str) -> str | None:
    """Extract the final answer from a model completion.

    Tries, in order: the content of the last complete ``\\boxed{...}`` (nested braces allowed,
    also ``\\boxed 5``); the first number after the last ``####``; the last number anywhere
    (negatives, decimals and thousands commas allowed, a trailing period dropped).
    Returns None when nothing answer-like is found.
    """
    if not isinstance(text, str) or not text:
        return None
    boxed = _boxed_contents(text)
    if boxed:
        return boxed[-1]
    if "####" in text:
        after = _NUMBER.search(text.rsplit("####", 1)[1])
        if after:
            return after.group(0)
    return _last_number(text)


def clean_answer(answer: str) -> str:
    """Rewrite the spellings math-verify misreads, leaving real expressions as they are.

    - digit groups separated by ``\\,``, ``\\ ``, ``{,}`` or a thin space are joined
      ("1\\,000" -> "1000"; math-verify would read ``1*0``);
    - a ``\\text{...}`` (or ``\\textbf``, ``\\mbox``, ``\\mathrm``) wrapper around the whole answer
      is dropped when its content starts with a number ("\\text{18 dollars}" -> "18 dollars");
    - plain words after a leading number are dropped ("18 dollars" -> "18"; math-verify would
      read a product of symbols).

    Only whole-answer patterns are rewritten: "2x", "3\\sqrt{2}", "5 \\pi", intervals and tuples
    do not match and come back unchanged.
    """
    text = answer.strip()
    text = _SPACED_GROUPS.sub(lambda match: re.sub(_GROUP_SEPARATOR, "", match.group(0)), text)
    wrapped = _TEXT_WRAPPER.fullmatch(text)
    if wrapped:
        text = wrapped.group(1).strip()
    words = _NUMBER_THEN_WORDS.fullmatch(text)
    if words and not _MATH_WORDS & set(re.findall(r"[a-z]+", text[words.end(1) :].lower())):
        text = words.group(1)
    return text


def normalize_number(answer: str) -> str:
    """Canonical form of an answer for voting: "18", "18.00", "$18" and "18." all become "18".

    Strips whitespace, dollar signs (plain or ``\\$``), a trailing period and thousands commas;
    a value that then parses as a decimal number is written without trailing zeros or exponent
    ("1,000.50" -> "1000.5"). Anything else (e.g. ``\\frac{1}{2}``) is only stripped, because
    symbolic equivalence is the grader's job, not the vote's.
    """
    text = answer.strip()
    candidate = text.replace("\\$", "").replace("$", "").replace(" ", "").rstrip(".")
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d*)?", candidate):
        candidate = candidate.replace(",", "")
    try:
        value = Decimal(candidate)
    except InvalidOperation:
        return text
    if not value.is_finite():
        return text
    value = value.normalize()
    if value == 0:
        value = Decimal(0)  # "-0" and "0.00" vote with "0"
    return format(value, "f")


def _timeouts() -> int | None:
    """math-verify's timeout for this thread: signal-based timeouts only work on the main thread."""
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _parse(expression: str) -> list:
    """math-verify ``parse`` that never raises (its TimeoutException is a BaseException)."""
    try:
        return parse(expression, parsing_timeout=_timeouts())
    except (Exception, TimeoutException):
        return []


def _parse_gold(gold: str) -> list:
    # Boxing the gold makes math-verify read it as one LaTeX answer; plain text is the fallback
    # for golds that are not valid LaTeX inside a box.
    for wrapped in (f"\\boxed{{{gold}}}", f"${gold}$", gold):
        parsed = _parse(wrapped)
        if parsed:
            return parsed
    return []


def _parse_answer(answer: str) -> list:
    """An extracted answer, cleaned (:func:`clean_answer`) and parsed in ``\\boxed{}`` form."""
    return _parse(f"\\boxed{{{clean_answer(answer)}}}")


def _verify(gold_parsed: list, prediction: list) -> bool:
    try:
        # Gold first: math-verify's comparison is not symmetric (e.g. intervals, sets).
        return bool(verify(gold_parsed, prediction, timeout_seconds=_timeouts()))
    except (Exception, TimeoutException):
        return False


def _verify_extracted(gold: str, extracted: str | None, text: str) -> bool:
    gold_parsed = _parse_gold(clean_answer(str(gold)))
    if not gold_parsed:
        return False
    if extracted is not None:
        prediction = _parse_answer(extracted)
        if prediction:
            return _verify(gold_parsed, prediction)
    prediction = _parse(text)
    return _verify(gold_parsed, prediction) if prediction else False


def is_correct(gold: str, prediction_text: str) -> bool:
    """Whether ``prediction_text`` (a completion or a bare answer) states the ``gold`` answer.

    The extracted answer is compared in ``\\boxed{}`` form; if nothing can be extracted or
    parsed, math-verify reads the full text. Never raises: unparsable input is simply wrong.
    """
    if not isinstance(prediction_text, str):
        return False
    return _verify_extracted(gold, extract_answer(prediction_text), prediction_text)


def grade(gold: str, text: str) -> GradeResult:
    """Extract the answer from ``text`` and grade it against ``gold``."""
    if not isinstance(text, str):
        return GradeResult(extracted=None, correct=False)
    extracted = extract_answer(text)
    return GradeResult(extracted=extracted, correct=_verify_extracted(gold, extracted, text))


def same_answer(first: str, second: str) -> bool:
    """Whether two extracted answers are the same value, as :func:`majority_vote` decides it."""
    if normalize_number(clean_answer(first)) == normalize_number(clean_answer(second)):
        return True
    first_parsed, second_parsed = _parse_answer(first), _parse_answer(second)
    return bool(first_parsed and second_parsed and _verify(first_parsed, second_parsed))


def majority_vote(answers: list[str | None]) -> str | None:
    """The most common answer by mathematical value, ignoring None.

    Answers are clustered as the grader compares them: :func:`clean_answer`, then math-verify
    against each cluster's first answer ("18 \\text{ dollars}", "18", "\\text{18}" and "18.00"
    are one cluster). Answers with equal :func:`normalize_number` forms share a cluster without
    asking math-verify; an answer math-verify cannot parse joins only its own spelling.
    Ties go to the cluster that appears first in ``answers``; the returned string is that
    cluster's first original spelling (so it can be graded like any single answer). None if all
    are None.
    """
    present = [answer for answer in answers if answer is not None]
    if not present:
        return None
    # One entry per cluster, in order of first appearance: [first spelling, its key, parsed, count].
    clusters: list[list] = []
    for answer in present:
        key = normalize_number(clean_answer(answer))
        parsed: list | None = None
        for cluster in clusters:
            if cluster[1] == key:
                break
            if parsed is None:
                parsed = _parse_answer(answer)
            if parsed and cluster[2] and _verify(cluster[2], parsed):
                break
        else:
            cluster = [answer, key, parsed if parsed is not None else _parse_answer(answer), 0]
            clusters.append(cluster)
        cluster[3] += 1
    best = max(cluster[3] for cluster in clusters)
    return next(cluster[0] for cluster in clusters if cluster[3] == best)
