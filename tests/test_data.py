"""Problem generators, splits and question parsing.

    python -m pytest tests/test_data.py -v
"""

import itertools

import pytest

from data import (countdown_split, generate_arithmetic_problems, generate_countdown_problems,
                  parse_question, arithmetic_split)


def solvable(numbers, target):
    """Brute force: every order of the numbers, both parenthesisations, every operator."""
    ops = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
    for a, b, c in itertools.permutations(numbers):
        for f, g in itertools.product(ops.values(), repeat=2):
            if g(f(a, b), c) == target or f(a, g(b, c)) == target:
                return True
    return False


@pytest.mark.parametrize("split", ["train", "val"])
def test_countdown_problems_follow_the_rules(split):
    problems = generate_countdown_problems(2000, split=split, seed=1)
    assert len(problems) == 2000
    for p in problems:
        assert len(p["numbers"]) == 3 and all(1 <= x <= 10 for x in p["numbers"])
        assert 1 <= p["target"] <= 100
        assert countdown_split(p["numbers"]) == split
        assert solvable(p["numbers"], p["target"]), p


def test_countdown_split_rule():
    val = generate_countdown_problems(500, split="val", seed=0)
    train = generate_countdown_problems(500, split="train", seed=0)
    assert all(all(x % 2 == 0 for x in p["numbers"]) for p in val)
    assert all(any(x % 2 == 1 for x in p["numbers"]) for p in train)
    keys = lambda ps: {(tuple(p["numbers"]), p["target"]) for p in ps}
    assert not keys(val) & keys(train)


def test_countdown_is_deterministic_and_seed_dependent():
    assert generate_countdown_problems(50, seed=3) == generate_countdown_problems(50, seed=3)
    assert generate_countdown_problems(50, seed=3) != generate_countdown_problems(50, seed=4)


def test_countdown_unique_eval_set_and_its_limit():
    val = generate_countdown_problems(200, split="val", seed=0, unique=True)
    assert len({(tuple(p["numbers"]), p["target"]) for p in val}) == 200
    with pytest.raises(ValueError, match="distinct"):
        generate_countdown_problems(100_000, split="val", seed=0, unique=True)


def test_generators_reject_unknown_split():
    with pytest.raises(ValueError):
        generate_countdown_problems(1, split="test")
    with pytest.raises(ValueError):
        generate_arithmetic_problems(1, split="test")


def test_arithmetic_problems_are_correct_and_in_range():
    for p in generate_arithmetic_problems(1000, seed=0, max_operand=20, max_factor=12):
        parsed = parse_question(p["question"])
        assert parsed is not None and parsed["answer"] == p["answer"]
        a, op, b = p["question"][len("what is "):-1].split()
        a, b = int(a), int(b)
        assert 0 <= a <= (12 if op == "*" else 20) and 0 <= b <= (12 if op == "*" else 20)
        assert str(eval(f"{a} {op} {b}")) == p["answer"]  # trusted input: our own question


def test_arithmetic_val_never_overlaps_train():
    train = {p["question"] for p in generate_arithmetic_problems(3000, "train", seed=0)}
    val = {p["question"] for p in generate_arithmetic_problems(300, "val", seed=0)}
    assert val and not train & val
    for q in val:
        a, op, b = q[len("what is "):-1].split()
        assert arithmetic_split(int(a), op, int(b)) == "val"


def test_arithmetic_train_draws_every_triple_equally_often():
    # The held-out set is every val triple once, so training should see operators in the same
    # shares: 21 x 21 pairs each for + and -, 13 x 13 for *, not a third each.
    train = generate_arithmetic_problems(6000, "train", seed=0)
    pairs = {"+": 21 * 21, "-": 21 * 21, "*": 13 * 13}
    for op, n in pairs.items():
        share = sum(f" {op} " in p["question"] for p in train) / len(train)
        assert share == pytest.approx(n / sum(pairs.values()), abs=0.025), op


def test_arithmetic_respects_ops_and_is_deterministic():
    probs = generate_arithmetic_problems(200, seed=5, ops=("*",))
    assert all(" * " in p["question"] for p in probs)
    assert probs == generate_arithmetic_problems(200, seed=5, ops=("*",))
    with pytest.raises(ValueError):
        generate_arithmetic_problems(1, ops=("/",))


@pytest.mark.parametrize("text, expected", [
    ("Using the numbers [4, 7, 3], create an expression that equals 25.",
     {"numbers": [4, 7, 3], "target": 25}),
    ("using   the NUMBERS [4,7,3] create an expression that equals 25",
     {"numbers": [4, 7, 3], "target": 25}),
    ("Using the numbers [ 2 , 8 , 6 ], create an expression that equals 40. Use each once.",
     {"numbers": [2, 8, 6], "target": 40}),
    ("what is 15 + 8?", {"answer": "23", "question": "what is 15 + 8?"}),
    ("What is 15+8", {"answer": "23", "question": "what is 15 + 8?"}),
    ("  WHAT IS 7 x 6 ?  ", {"answer": "42", "question": "what is 7 * 6?"}),
    ("what is 3 - 10?", {"answer": "-7"}),
])
def test_parse_question_recognises_both_tasks(text, expected):
    parsed = parse_question(text)
    assert parsed is not None
    for key, value in expected.items():
        assert parsed[key] == value


@pytest.mark.parametrize("text", [
    "", "hello", "what is the capital of France?", "what is 15 / 8?", "what is 15 +?",
    "Using the numbers [], create an expression that equals 5.",
    "Using the numbers [٤, 7], create an expression that equals 11.",
    "what is 99999999999999999999 * 2?", None, 42,
])
def test_parse_question_rejects_everything_else(text):
    assert parse_question(text) is None


def test_arithmetic_eval_set_is_distinct_and_all_of_a_small_split():
    val = generate_arithmetic_problems(128, "val", seed=3, unique=True)
    questions = [p["question"] for p in val]
    assert len(questions) == len(set(questions)) == 104  # the whole val split, once each
    assert val == generate_arithmetic_problems(128, "val", seed=3, unique=True)
    assert val[:10] != generate_arithmetic_problems(10, "val", seed=4, unique=True)  # seeded order
    assert generate_arithmetic_problems(10, "val", seed=3, unique=True) == val[:10]
    train = {p["question"] for p in generate_arithmetic_problems(2000, "train", seed=0)}
    assert not train & set(questions)


def test_problem_category_is_the_operator_or_the_target_range():
    from data import problem_category
    assert problem_category({"question": "what is 3 - 17?", "answer": "-14"}) == "-"
    assert problem_category({"numbers": [2, 4, 6], "target": 10}) == "1-10"
    assert problem_category({"numbers": [2, 4, 6], "target": 11}) == "11-25"
    assert problem_category({"numbers": [10, 10, 2], "target": 100}) == "51-100"
    val = generate_arithmetic_problems(200, "val", unique=True)
    assert sorted({problem_category(p) for p in val}) == ["*", "+", "-"]
