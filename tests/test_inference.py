"""inference.py on a tiny model trained for one step.

    python -m pytest tests/test_inference.py -v
"""

import io

import pytest

import inference

COUNTDOWN_Q = "Using the numbers [4, 7, 3], create an expression that equals 25."


def run(argv, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = inference.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_countdown_question_is_checked(tiny_run_dir, capsys, monkeypatch):
    monkeypatch.chdir(tiny_run_dir)  # the default --model is ./saved_model
    code, out, _ = run([COUNTDOWN_Q], capsys)
    assert code == 0
    assert f"Question: {COUNTDOWN_Q}" in out and "Model output:" in out
    assert "Answer:" in out and ("✗" in out or "✓" in out) and "reward" in out


def test_arithmetic_question_shows_the_correct_answer(tiny_run_dir, capsys):
    code, out, _ = run(["WHAT IS 15+8", "--model", str(tiny_run_dir / "saved_model")], capsys)
    assert code == 0 and "Question: what is 15 + 8?" in out and "Correct answer: 23" in out


def test_num_samples_prints_each_answer_and_the_fraction_correct(tiny_run_dir, capsys):
    code, out, _ = run(["what is 2 + 2?", "--model", str(tiny_run_dir / "saved_model"), "--num_samples", "3"], capsys)
    assert code == 0
    for i in (1, 2, 3):
        assert f"  {i}. " in out
    assert "/3 correct (" in out


def test_max_new_tokens_defaults_to_the_trained_value(tiny_run_dir):
    cfg = inference.training_config(str(tiny_run_dir / "saved_model"))
    assert cfg["max_new_tokens"] == 6
    assert inference.training_config(str(tiny_run_dir)) == {}


def test_unrecognised_question_still_gets_an_answer(tiny_run_dir, capsys):
    code, out, _ = run(["Tell me a joke.", "--model", str(tiny_run_dir / "saved_model")], capsys)
    assert code == 0 and "Model output:" in out and "cannot be checked" in out


def test_questions_from_stdin_with_a_summary(tiny_run_dir, capsys, monkeypatch):
    stdin = f"{COUNTDOWN_Q}\n\nwhat is 3 * 4?\nhello there\n"
    code, out, _ = run(["-", "--model", str(tiny_run_dir / "saved_model"), "--num_samples", "2"], capsys,
                       stdin=stdin, monkeypatch=monkeypatch)
    assert code == 0
    assert out.count("Question:") == 3
    assert "Summary: 3 questions," in out and "/4 answers correct" in out and "1 questions could not be checked" in out


def test_missing_model_directory_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["what is 1 + 1?"], capsys)
    assert code == 1 and "python train_grpo.py" in err and len(err.strip().splitlines()) == 1
    code, out, err = run(["what is 1 + 1?", "--model", str(tmp_path / "nope")], capsys)
    assert code == 1 and "no model at" in err


def test_unreadable_model_directory_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    code, _, err = run(["what is 1 + 1?", "--model", str(bad)], capsys)
    assert code == 1 and "could not load model" in err and "Traceback" not in err


def test_bad_flags_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        inference.main(["what is 1 + 1?", "--num_samples", "0"])
    assert exc.value.code == 2
