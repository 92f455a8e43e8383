"""Benchmark readers: rows in each benchmark's public layout -> :class:`EvalItem` (prompt + reward meta).

Files are read from a local path, nothing is downloaded: ``.jsonl`` / ``.json`` (one object per
line, or a JSON list), ``.csv`` (GPQA's release format) and ``.parquet`` (needs pyarrow).
Each task reads the fields of its benchmark's public layout (first name found wins):

  math             AIME-style: ``problem`` | ``Problem`` | ``question``; ``answer`` | ``Answer``
  multiple_choice  GPQA: ``Question``, ``Correct Answer``, ``Incorrect Answer 1..3`` (lower/snake
                   case accepted), choices shuffled by a fixed seed per row id;
                   MMLU-Pro: ``question``, ``options`` (list), ``answer`` (letter), ``answer_index``
  ifeval           IFEval / IFBench: ``prompt``, ``instruction_id_list``, ``kwargs`` (ids must be
                   ones our checkers support, rewards/ifeval.py)
  code             ``problem`` | ``question`` | ``description`` (+ ``input_format``,
                   ``output_format`` as in Codeforces dumps); ``tests`` | ``official_tests`` |
                   ``examples``: a list of {input, output} or {stdin, expected_stdout}, or
                   assert-based test source; optional ``rating`` (Codeforces problem rating),
                   ``time_limit`` (seconds per test)

A row's id is its ``id`` / ``ID`` / ``key`` / ``question_id`` / ``Record ID`` field, else its 0-based
row number.
Prompts are built by one-line templates (fields joined by spaces, so they encode with any
tokenizer, the tiny recipe's printable-ASCII one included); ``--template`` replaces them.
Every malformed row raises :class:`DataError` naming the file, the row and the field.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
from pathlib import Path

from megatron_vp2o.config import ConfigError

LETTERS = "ABCDEFGHIJ"
TEMPLATES = {
    "math": "{problem} Please reason step by step, and put your final answer within \\boxed{{}}.",
    "multiple_choice": "{question} Choices: {choices}. Answer with the letter of the correct choice, "
                       "in the form 'Answer: (X)'.",
    "ifeval": "{prompt}",
    "code": "{problem} Write a Python 3 program that reads standard input and prints the answer; "
            "give the program in one ```python code block.",
}

TEMPLATE_FIELDS = {"math": ("problem",), "multiple_choice": ("question", "choices"), "ifeval": ("prompt",),
                   "code": ("problem",)}


class DataError(ConfigError):
    """A benchmark file or row problem (a ConfigError: the CLI reports it as one line, exit 2)."""


@dataclasses.dataclass
class EvalItem:
    """One benchmark problem: what the model is asked and what its reward needs."""

    id: str
    prompt: str  # the user message (before any chat template)
    reward: str  # reward registry name
    meta: dict  # the reward's meta
    rating: float | None = None  # Codeforces problem rating (code)


def read_rows(path: str | Path) -> list[tuple[str, dict]]:
    """``(where, row)`` pairs of a .jsonl/.json/.csv/.parquet file (``where`` = "file:line")."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data: file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"--data: reading '{path}' needs pyarrow (pip install pyarrow), "
                            "or convert it to JSONL") from None
        return [(f"{path}:{i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    try:
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                return [(f"{path}:{i + 2}", dict(row)) for i, row in enumerate(csv.DictReader(f))]
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"--data: '{path}' is not UTF-8 text") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON: {err}") from None
        return [(f"{path}:[{i}]", row) for i, row in enumerate(rows)]
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                out.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: invalid JSON: {err}") from None
    return out


def _field(row: dict, names: tuple, where: str, task: str, required: bool = True):
    for name in names:
        if row.get(name) not in (None, ""):
            return row[name]
    if required:
        raise DataError(f"{where}: missing field {names[0]!r} (a {task} row needs one of {list(names)})")
    return None


def _row_id(row: dict, index: int) -> str:
    for name in ("id", "ID", "key", "question_id", "Record ID"):
        if row.get(name) is not None:
            return str(row[name])
    return str(index)


def _math(row, where, rid, template):
    problem = _field(row, ("problem", "Problem", "question"), where, "math")
    answer = _field(row, ("answer", "Answer"), where, "math")
    return EvalItem(rid, template.format(problem=problem), "math", {"answer": str(answer)})


_GPQA = {"correct": ("Correct Answer", "correct_answer", "correct"),
         **{f"wrong{i}": (f"Incorrect Answer {i}", f"incorrect_answer_{i}") for i in (1, 2, 3)}}


def _multiple_choice(row, where, rid, template, shuffle_seed=0):
    question = _field(row, ("question", "Question"), where, "multiple_choice")
    if "options" in row:  # MMLU-Pro
        options = row["options"]
        if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS):
            raise DataError(f"{where}: field 'options' must be a list of 2..{len(LETTERS)} choices")
        letter = str(_field(row, ("answer",), where, "multiple_choice")).strip().upper()
        index = row.get("answer_index")
        if letter not in LETTERS[:len(options)] or (index is not None and LETTERS[int(index)] != letter):
            raise DataError(f"{where}: field 'answer' ({letter!r}) must be the letter of 'answer_index' "
                            f"({index!r}) among {len(options)} options")
    else:  # GPQA: correct + three incorrect, shuffled by a fixed seed per row id
        correct = _field(row, _GPQA["correct"], where, "multiple_choice")
        options = [correct] + [_field(row, _GPQA[f"wrong{i}"], where, "multiple_choice") for i in (1, 2, 3)]
        random.Random(f"{shuffle_seed}:{rid}").shuffle(options)
        letter = LETTERS[options.index(correct)]
    choices = " ".join(f"({LETTERS[i]}) {str(o).strip()}" for i, o in enumerate(options))
    return EvalItem(rid, template.format(question=question, choices=choices), "multiple_choice",
                    {"answer": letter, "num_choices": len(options)})


def _ifeval(row, where, rid, template):
    from megatron_vp2o.rewards.ifeval import CHECKERS

    prompt = _field(row, ("prompt",), where, "ifeval")
    ids, kwargs = _field(row, ("instruction_id_list",), where, "ifeval"), row.get("kwargs")
    if not isinstance(ids, list) or not isinstance(kwargs, list) or len(ids) != len(kwargs):
        raise DataError(f"{where}: fields 'instruction_id_list' and 'kwargs' must be lists of equal length")
    unknown = [i for i in ids if i not in CHECKERS]
    if unknown:
        raise DataError(f"{where}: field 'instruction_id_list': unsupported instruction {unknown[0]!r}; "
                        f"remove the row or add a checker to rewards/ifeval.py (supported: {sorted(CHECKERS)})")
    return EvalItem(rid, template.format(prompt=prompt), "ifeval",
                    {"instruction_id_list": ids, "kwargs": [k or {} for k in kwargs]})


def _code_tests(tests, where):
    if isinstance(tests, str):
        return tests
    if not isinstance(tests, list) or not tests:
        raise DataError(f"{where}: field 'tests' must be a non-empty list of {{input, output}} or a str")
    out = []
    for t in tests:
        if isinstance(t, str):
            out.append(t)
        elif isinstance(t, dict) and ("input" in t or "stdin" in t):
            out.append({"stdin": str(t.get("stdin", t.get("input", ""))),
                        "expected_stdout": str(t.get("expected_stdout", t.get("output", "")))})
        else:
            raise DataError(f"{where}: a test must be {{input, output}}, {{stdin, expected_stdout}} or a str")
    return out


def _code(row, where, rid, template):
    problem = str(_field(row, ("problem", "question", "description"), where, "code"))
    for name, label in (("input_format", "Input:"), ("output_format", "Output:")):
        if row.get(name):
            problem += f" {label} {row[name]}"
    tests = _code_tests(_field(row, ("tests", "official_tests", "examples"), where, "code"), where)
    meta = {"tests": tests}
    if row.get("time_limit") is not None:
        meta["timeout_s"] = float(row["time_limit"])
    rating = row.get("rating")
    if rating is not None and not isinstance(rating, (int, float)):
        raise DataError(f"{where}: field 'rating' must be a number (a Codeforces problem rating)")
    return EvalItem(rid, template.format(problem=problem), "code", meta, None if rating is None else float(rating))


READERS = {"math": _math, "multiple_choice": _multiple_choice, "ifeval": _ifeval, "code": _code}


def load_items(task: str, path: str | Path, template: str | None = None) -> list[EvalItem]:
    """Read a benchmark file as ``task``; errors name the file, row and field."""
    if task not in READERS:
        raise DataError(f"--task: unknown task {task!r}; choose one of {sorted(READERS)}")
    items, seen = [], set()
    for index, (where, row) in enumerate(read_rows(path)):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        try:
            item = READERS[task](row, where, _row_id(row, index), template or TEMPLATES[task])
        except (KeyError, IndexError, ValueError) as err:
            if isinstance(err, DataError):
                raise
            fields = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS[task])
            raise DataError(f"{where}: --template does not fit a {task} row ({err!r}); a {task} template "
                            f"may use {fields}") from None
        if item.id in seen:
            raise DataError(f"{where}: duplicate id {item.id!r}; ids must be unique within a file")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise DataError(f"--data: '{path}' holds no rows")
    return items
