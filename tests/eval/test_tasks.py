"""Contract: each reader takes its benchmark's public layout (shipped samples) and names the file, row and
field of a malformed row; `vp2o eval` rejects bad input with one line and exit code 2, writing nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_vp2o.cli.main import main
from megatron_vp2o.eval.tasks import LETTERS, DataError, load_items

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "eval"


def test_shipped_samples_read_in_their_layouts():
    aime = load_items("math", DATA / "math_aime_sample.jsonl")
    assert aime[0].id == "s-1" and aime[0].meta == {"answer": "16"} and "\\boxed{}" in aime[0].prompt
    gpqa = load_items("multiple_choice", DATA / "gpqa_sample.csv")
    for item in gpqa:  # the gold letter points at the correct answer's text, wherever the shuffle put it
        letter = item.meta["answer"]
        correct = {"g-1": "photon", "g-2": "sp", "g-3": "46"}[item.id]
        assert f"({letter}) {correct} (" in item.prompt or f"({letter}) {correct}. Answer" in item.prompt
    assert [i.meta["answer"] for i in gpqa] == [i.meta["answer"] for i in load_items("multiple_choice",
                                                                                     DATA / "gpqa_sample.csv")]
    mmlu = load_items("multiple_choice", DATA / "mmlu_pro_sample.jsonl")
    assert [i.meta for i in mmlu] == [{"answer": "A", "num_choices": 8}, {"answer": "C", "num_choices": 4},
                                      {"answer": "D", "num_choices": 6}]
    ifeval = load_items("ifeval", DATA / "ifeval_sample.jsonl")
    assert ifeval[0].id == "1" and ifeval[0].prompt.startswith("Describe a lighthouse")
    code = load_items("code", DATA / "code_sample.jsonl")
    assert code[0].rating == 800 and code[0].meta["timeout_s"] == 2.0
    assert code[0].meta["tests"][0] == {"stdin": "1 2\n", "expected_stdout": "3\n"}
    assert "Input: One line" in code[0].prompt


def test_gpqa_shuffle_is_fixed_per_row_id_and_spreads_letters(tmp_path):
    rows = [{"Question": f"q{i}", "Correct Answer": "right", "Incorrect Answer 1": "w1",
             "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3", "id": i} for i in range(40)]
    path = tmp_path / "gpqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    letters = [it.meta["answer"] for it in load_items("multiple_choice", path)]
    path.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))  # file order does not matter
    assert letters == [it.meta["answer"] for it in reversed(load_items("multiple_choice", path))]
    assert set(letters) == set(LETTERS[:4])


@pytest.mark.parametrize("task, row, words", [
    ("math", {"problem": "1+1"}, ["missing field 'answer'"]),
    ("multiple_choice", {"question": "q", "options": ["a", "b"], "answer": "B", "answer_index": 0},
     ["field 'answer'", "answer_index"]),
    ("multiple_choice", {"Question": "q", "Correct Answer": "a"}, ["Incorrect Answer 1"]),
    ("ifeval", {"prompt": "p", "instruction_id_list": ["language:response_language"], "kwargs": [{}]},
     ["instruction_id_list", "language:response_language", "supported"]),
    ("ifeval", {"prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": []}, ["equal length"]),
    ("code", {"problem": "p", "tests": []}, ["field 'tests'"]),
    ("code", {"problem": "p", "tests": [{"input": "1"}], "rating": "hard"}, ["field 'rating'"]),
])
def test_malformed_rows_name_file_row_and_field(tmp_path, task, row, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"problem": "x", "answer": "1"}) + "\n" + json.dumps(row) + "\n")
    if task != "math":
        path.write_text("\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        load_items(task, path)
    assert f"{path}:2" in str(err.value) and all(w in str(err.value) for w in words)


def _rejected(capsys, tmp_path, args: list[str], words: list[str]) -> None:
    out = tmp_path / "out"
    assert main(["eval", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vp2o eval: error:"), err
    assert all(w in err for w in words), err
    assert not out.exists()


MATH = ["--task", "math", "--data", str(DATA / "math_aime_sample.jsonl")]


@pytest.mark.parametrize("args, words", [
    (MATH, ["--ckpt", "--responses"]),
    (["--ckpt", "checkpoints/tiny_policy"], ["--task"]),
    (["--ckpt", "/no/such/ckpt", *MATH], ["--ckpt", "/no/such/ckpt"]),
    (["--ckpt", "checkpoints/tiny_policy", "--task", "poetry", "--data", str(DATA / "math_aime_sample.jsonl")],
     ["--task", "poetry", "math"]),
    (["--ckpt", "checkpoints/tiny_policy", "--task", "math", "--data", "/no/file.jsonl"], ["--data", "/no/file.jsonl"]),
    (["--ckpt", "checkpoints/tiny_policy", *MATH, "--samples", "0"], ["--samples"]),
    (["--compare", "/no/base", "/no/vp2o"], ["--compare", "/no/base", "results.json"]),
    (["--ckpt", "checkpoints/tiny_policy", *MATH, "--template", "{question}"], ["--template", "problem"]),
    (["--ckpt", "checkpoints/tiny_policy", *MATH, "parallel.ep=3"], ["parallel"]),
    (["--ckpt", "checkpoints/tiny_policy", *MATH, "--config", "examples/configs/tiny_cpu.yaml", "rl.samplin.x=1"],
     ["rl.samplin"]),
])
def test_bad_input_is_one_line_exit_2_nothing_written(capsys, tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(ROOT)
    _rejected(capsys, tmp_path, args, words)


def test_bad_responses_files(capsys, tmp_path):
    resp = tmp_path / "r.jsonl"
    resp.write_text(json.dumps({"id": "s-1", "responses": ["1"]}) + "\n")
    _rejected(capsys, tmp_path, ["--responses", str(resp), *MATH], ["ids must match", "s-2"])
    lines = [{"id": f"s-{i}", "responses": ["1"] * (1 + (i == 4))} for i in range(1, 5)]
    resp.write_text("".join(json.dumps(r) + "\n" for r in lines))
    _rejected(capsys, tmp_path, ["--responses", str(resp), *MATH], ["same number of responses"])
    resp.write_text(json.dumps({"id": "s-1", "responses": "not a list"}) + "\n")
    _rejected(capsys, tmp_path, ["--responses", str(resp), *MATH], [f"{resp}:1", "responses"])


def test_responses_matched_by_line_number_without_ids(capsys, tmp_path):
    data = tmp_path / "aime.jsonl"
    data.write_text("".join(json.dumps({"problem": f"{i}+{i}", "answer": str(2 * i)}) + "\n" for i in range(3)))
    resp = tmp_path / "r.jsonl"
    resp.write_text("".join(json.dumps({"responses": [f"\\boxed{{{2 * i}}}", "\\boxed{-1}"]}) + "\n"
                            for i in range(3)))
    assert main(["eval", "--responses", str(resp), "--task", "math", "--data", str(data), "--out",
                 str(tmp_path / "o")]) == 0
    summary = json.loads((tmp_path / "o" / "results.json").read_text())["checkpoints"][0]["results"]["aime"]["summary"]
    assert summary["pass@1"] == 0.5 and summary["pass@2"] == 1.0 and "tokens/median" not in summary
