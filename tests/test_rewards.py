"""Reward functions: a table of cases per rule, adversarial inputs, and properties.

    python -m pytest tests/test_rewards.py -v
"""

import itertools
import random
import time

import pytest
from hypothesis import given, settings, strategies as st

import data
from data import evaluate_expression, generate_countdown_problems
from train_grpo import (arithmetic_reward, countdown_reward, grade, grade_countdown, last_answer,
                        with_partial_credit)

THINK = "<think>\nsome reasoning\n</think>\n"


def ans(expr):
    return f"{THINK}<answer>{expr}</answer>"


# (completion, numbers, target, expected reward, why)
COUNTDOWN_CASES = [
    (ans("5 * 2 + 3"), [3, 5, 2], 13, 1.0, "correct"),
    (ans("3 + 2 * 5"), [3, 5, 2], 13, 1.0, "numbers reordered"),
    (ans("(3 + 5) * 2"), [3, 5, 2], 16, 1.0, "parentheses change precedence"),
    (ans("((3)) + ((5 * 2))"), [3, 5, 2], 13, 1.0, "redundant parentheses"),
    (ans("3 - 5 - 2"), [3, 5, 2], -4, 1.0, "left-associative minus"),
    (ans("3 - (5 - 2)"), [3, 5, 2], 0, 1.0, "grouped minus"),
    (ans("  5*2+3\n"), [3, 5, 2], 13, 1.0, "answer is stripped, spaces optional"),
    (ans("5\n*\t2 +\n3"), [3, 5, 2], 13, 1.0, "any whitespace separates tokens"),
    ("<answer>5 * 2 + 3</answer>", [3, 5, 2], 13, 1.0, "correct without think still scores 1"),
    (ans("5 * 2 + 3"), [3, 5, 2], 14, 0.2, "wrong value"),
    (ans("5 * 2"), [3, 5, 2], 10, 0.2, "missing number"),
    (ans("5 * 2 + 3 + 0"), [3, 5, 2], 13, 0.2, "extra number"),
    (ans("5 * 2 + 5"), [3, 5, 2], 15, 0.2, "number reused, another unused"),
    (ans("5 * 3 - 2"), [3, 5, 5], 13, 0.2, "duplicate number used once"),
    (ans("5 * 5 - 3 * 4"), [3, 5, 5, 4], 13, 1.0, "duplicates each used once"),
    (ans("10 / 2 + 8"), [10, 2, 8], 13, 0.2, "division"),
    (ans("2 ** 3 + 5"), [2, 3, 5], 13, 0.2, "power"),
    (ans("-3 + 5 * 2"), [3, 5, 2], 7, 0.2, "unary minus"),
    (ans("+3 + 5 * 2"), [3, 5, 2], 13, 0.2, "unary plus"),
    (ans("5 * 2 + 3 = 13"), [3, 5, 2], 13, 0.2, "equation instead of expression"),
    (ans("5.0 * 2 + 3"), [3, 5, 2], 13, 0.2, "decimal"),
    (ans("05 * 2 + 3"), [3, 5, 2], 13, 0.2, "leading zero"),
    (ans("5 2 + 3"), [3, 5, 2], 55, 0.2, "two literals without an operator"),
    (ans("5 * 2 +"), [3, 5, 2], 10, 0.2, "dangling operator"),
    (ans("(5 * 2 + 3"), [3, 5, 2], 13, 0.2, "unbalanced ("),
    (ans("5 * 2) + 3"), [3, 5, 2], 13, 0.2, "unbalanced )"),
    (ans("5 * 2 + 3 ()"), [3, 5, 2], 13, 0.2, "empty parentheses"),
    (ans("x = 5 * 2 + 3"), [3, 5, 2], 13, 0.2, "names"),
    (ans("abs(5 * 2 + 3)"), [3, 5, 2], 13, 0.2, "function call"),
    (ans("٥ * ٢ + ٣"), [3, 5, 2], 13, 0.2, "unicode digits"),
    (ans("5 × 2 + 3"), [3, 5, 2], 13, 0.2, "unicode times"),
    (ans(""), [3, 5, 2], 13, 0.2, "empty answer"),
    (THINK + "<answer>1 + 2 + 3</answer> then <answer>5 * 2 + 3</answer>", [3, 5, 2], 13, 1.0,
     "last answer wins (correct)"),
    (THINK + "<answer>5 * 2 + 3</answer> then <answer>1 + 2 + 3</answer>", [3, 5, 2], 13, 0.2,
     "last answer wins (wrong)"),
    (THINK + "<answer>oops <answer>5 * 2 + 3</answer>", [3, 5, 2], 13, 1.0,
     "last pair = nearest opening tag before the last closing tag"),
    (THINK + "5 * 2 + 3", [3, 5, 2], 13, 0.1, "think only"),
    ("<answer>5 * 2 + 4</answer>", [3, 5, 2], 13, 0.1, "answer tags only, wrong"),
    ("5 * 2 + 3", [3, 5, 2], 13, 0.0, "no tags at all, even if right"),
    ("<think>3 < 4 and 5 > 2</think><answer>1</answer>", [3, 5, 2], 13, 0.2,
     "'<' inside think still counts as a think pair"),
    ("</think><think>", [3, 5, 2], 13, 0.0, "tags in the wrong order"),
    ("</answer>5 * 2 + 3<answer>", [3, 5, 2], 13, 0.0, "answer tags in the wrong order"),
    ("<think>unclosed <answer>5 * 2 + 3</answer>", [3, 5, 2], 13, 1.0, "correct without think pair"),
    ("", [3, 5, 2], 13, 0.0, "empty completion"),
]


@pytest.mark.parametrize("completion, numbers, target, expected, why", COUNTDOWN_CASES,
                         ids=[c[-1] for c in COUNTDOWN_CASES])
def test_countdown_reward_table(completion, numbers, target, expected, why):
    assert countdown_reward(completion, numbers, target) == pytest.approx(expected), why


def test_grade_reports_components():
    g = grade_countdown(ans("5 * 2 + 3"), [3, 5, 2], 13)
    assert (g.reward, g.correct, g.has_think, g.has_answer) == (1.0, True, True, True)
    g = grade_countdown("<answer>9</answer>", [3, 5, 2], 13)
    assert (g.correct, g.has_think, g.has_answer) == (False, False, True)
    assert grade(ans("5 * 2 + 3"), {"numbers": [3, 5, 2], "target": 13}).correct
    assert grade(ans("23"), {"question": "what is 15 + 8?", "answer": "23"}).correct


ARITHMETIC_CASES = [
    (ans("23"), "23", False, 1.0, "correct"),
    (ans("  23 \n"), "23", False, 1.0, "whitespace around"),
    (ans("-7"), "-7", False, 1.0, "negative"),
    (ans("7"), "-7", False, 0.2, "sign matters"),
    (ans("-0"), "0", False, 1.0, "minus zero is zero"),
    (ans("023"), "23", False, 1.0, "same integer"),
    (ans("23.0"), "23", False, 0.2, "decimal is not an integer"),
    (ans("the answer is 23"), "23", False, 0.2, "prose in the answer"),
    (ans("15 + 8"), "23", False, 0.2, "expression, not the value"),
    (ans("24"), "23", False, 0.2, "wrong"),
    ("<answer>23</answer>", "23", False, 1.0, "no think needed when right"),
    (THINK + "23", "23", False, 0.1, "think only"),
    ("23", "23", False, 0.0, "no tags with a chat prompt"),
    (ans("1") + "<answer>23</answer>", "23", False, 1.0, "last answer wins"),
    (" 23", "23", True, 1.0, "plain prompt: first integer"),
    (" the answer is -7.", "-7", True, 1.0, "plain prompt: negative inside prose"),
    (" 8 and then 23", "23", True, 0.0, "plain prompt: only the first integer counts"),
    (" I don't know", "23", True, 0.0, "plain prompt: no integer"),
    ("9" * 5000, "23", False, 0.0, "5,000 digits, no tags"),
    (ans("9" * 5000), "9" * 5000, False, 1.0, "5,000-digit correct answer"),
    ("9" * 5000, "23", True, 0.0, "5,000 digits, plain prompt"),
]


@pytest.mark.parametrize("completion, answer, no_template, expected, why", ARITHMETIC_CASES,
                         ids=[c[-1] for c in ARITHMETIC_CASES])
def test_arithmetic_reward_table(completion, answer, no_template, expected, why):
    assert arithmetic_reward(completion, answer, no_template=no_template) == pytest.approx(expected), why


PARTIAL_CASES = [  # weight 0.5, answer -14: 0.2 for the tags + 0.5 * max(0, 1 - |given - answer| / 15)
    (ans("-14"), "-14", 1.0, "right: exactly CORRECT_REWARD, no credit on top"),
    (ans("-13"), "-14", 0.2 + 0.5 * 14 / 15, "one off"),
    (ans("-1"), "-14", 0.2 + 0.5 * 2 / 15, "the magnitude of a"),
    (ans("14"), "-14", 0.2, "the wrong sign: 28 away, nothing"),
    (ans("-30"), "-14", 0.2 + 0.5 * 0 / 15, "more than |answer| + 1 away"),
    (ans("x"), "-14", 0.2, "not an integer"),
    (ans("9" * 5000), "-14", 0.2, "5,000 digits: no int() of it"),
    (THINK + "-14", "-14", 0.1, "no answer tags: nothing graded"),
    (" -13", "-14", 0.5 * 14 / 15, "plain prompt: the first integer"),
]


@pytest.mark.parametrize("completion, answer, expected, why", PARTIAL_CASES, ids=[c[-1] for c in PARTIAL_CASES])
def test_partial_credit_ranks_wrong_answers_by_nearness(completion, answer, expected, why):
    plain = not completion.startswith("<")
    problem = {"question": "what is 1 - 15?", "answer": answer}
    g = with_partial_credit(grade(completion, problem, plain), completion, problem, 0.5, plain)
    assert g.reward == pytest.approx(expected), why
    assert g.correct == (expected == 1.0)
    assert with_partial_credit(grade(completion, problem, plain), completion, problem, 0.0, plain) == \
        grade(completion, problem, plain)  # weight 0: the exact-match reward


def test_worked_solutions_are_right_and_written_as_the_prompt_example_writes_one():
    problems = (data.generate_arithmetic_problems(200, seed=1) + data.generate_arithmetic_problems(104, "val", unique=True)
                + generate_countdown_problems(200, seed=1) + generate_countdown_problems(50, "val", seed=1))
    for problem in problems:
        assert grade(data.worked_solution(problem), problem).correct, problem
    assert any(p["answer"].startswith("-") for p in problems if "answer" in p)  # negatives among them
    example_question, example_reply = data.ARITHMETIC_EXAMPLE
    assert data.worked_solution(data.parse_question(example_question)) == example_reply
    assert data.worked_solution(data.parse_question("what is 17 - 20?")) == \
        "<think>\n17 - 20 = -3.\n</think>\n<answer>-3</answer>"
    plain = data.parse_question("what is 17 - 20?")
    assert grade(data.worked_solution(plain, tagged=False), plain, no_template=True).correct


@pytest.mark.parametrize("numbers, target, expected", [
    ([3, 5, 2], 13, "3 * 5 - 2"),
    ([3, 5, 2], 16, "(3 + 5) * 2"),   # a sum times a number needs its parentheses
    ([2, 2, 2], 100, None),           # no expression over the numbers reaches it
])
def test_countdown_solution_is_found_by_search_or_is_none(numbers, target, expected):
    assert data.countdown_solution(numbers, target) == expected
    assert data.worked_solution({"numbers": numbers, "target": target}) is None or expected is not None


def test_partial_credit_leaves_countdown_alone():
    problem = {"numbers": [3, 5, 7], "target": 22}
    completion = ans("3 * 5 + 6")
    assert with_partial_credit(grade(completion, problem), completion, problem, 0.5) == grade(completion, problem)


def test_last_answer():
    assert last_answer("<answer> a </answer>x<answer>b</answer>") == "b"
    assert last_answer("<answer>a") is None
    assert last_answer("no tags") is None


def test_code_in_the_answer_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payloads = [
        f"__import__('pathlib').Path({str(marker)!r}).write_text('x')",
        f"open({str(marker)!r}, 'w').write('x') or 5 * 2 + 3",
        f"[5 * 2 + 3 for _ in [open({str(marker)!r}, 'w')]][0]",
    ]
    for payload in payloads:
        assert countdown_reward(ans(payload), [3, 5, 2], 13) == pytest.approx(0.2)
        assert arithmetic_reward(ans(payload), "13") == pytest.approx(0.2)
    assert not marker.exists()


ADVERSARIAL = [
    "",
    "\x00" * 100 + ans("5 * 2 + 3\x00"),
    ans("9**9**9**9"),
    ans("9" * 100_000 + " * 2 + 3"),
    ans("(" * 100_000 + "5 * 2 + 3" + ")" * 100_000),
    ans("(" * 500_000),
    ans("5 " + "* 2 " * 200_000),
    "<answer>" * 200_000 + "</answer>" * 200_000,
    "<think>" * 300_000,
    ans("x" * 1_000_000),
    ans("1 + " * 250_000 + "1"),
    "\U0001f600" * 100_000 + ans("5 * 2 + 3"),
]


@pytest.mark.parametrize("completion", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_inputs_return_a_float_quickly(completion):
    start = time.perf_counter()
    c = countdown_reward(completion, [3, 5, 2], 13)
    a = arithmetic_reward(completion, "13")
    p = arithmetic_reward(completion, "13", no_template=True)
    assert all(isinstance(x, float) and 0.0 <= x <= 1.0 for x in (c, a, p))
    # Not a speed test (python bench.py rewards measures that): a guard against
    # super-linear blow-ups, which on these 1 MB inputs would take minutes, not seconds.
    assert time.perf_counter() - start < 5.0


def test_deep_nesting_with_correct_answer_is_still_correct():
    expr = "(" * 50_000 + "5 * 2 + 3" + ")" * 50_000
    assert countdown_reward(ans(expr), [3, 5, 2], 13) == 1.0


def test_rewards_reject_non_string_numbers_without_raising():
    assert evaluate_expression("1 + 2 + 3", [1, 2, 3]) == 6
    assert evaluate_expression("1 + 2 + 3", [1, 2]) is None


# -----------------------------------------------------------------------------
# Properties: a correct expression always scores 1.0; a mutated one never does.

def expressions(numbers):
    """Every expression over all of `numbers` in both parenthesisations."""
    for a, b, c in itertools.permutations(numbers):
        for o1, o2 in itertools.product("+-*", repeat=2):
            yield f"({a} {o1} {b}) {o2} {c}"
            yield f"{a} {o1} ({b} {o2} {c})"


def true_value(expr):
    # Our own generated expressions only (digits, + - * and parentheses): a trusted oracle.
    return eval(expr, {"__builtins__": {}})


problems = st.integers(0, 10**6).map(
    lambda seed: generate_countdown_problems(1, split=random.Random(seed).choice(["train", "val"]),
                                             seed=seed)[0])


@settings(max_examples=300, deadline=None)
@given(problem=problems, pick=st.integers(0, 10**6))
def test_any_correct_expression_scores_one(problem, pick):
    correct = [e for e in expressions(problem["numbers"]) if true_value(e) == problem["target"]]
    assert correct, "generated problems are solvable"
    expr = correct[pick % len(correct)]
    assert countdown_reward(ans(expr), problem["numbers"], problem["target"]) == 1.0


MUTATIONS = [
    lambda e, r: e.replace(e.strip("() ")[0], str(int(e.strip("() ")[0]) + 1), 1),  # change a literal
    lambda e, r: e + " + 1",                       # extra number
    lambda e, r: e.replace("*", "/", 1) if "*" in e else e + " / 1",  # division
    lambda e, r: "-" + e,                          # unary minus
    lambda e, r: e.replace(" ", "", 1)[:-1],       # truncated
    lambda e, r: e + " ** 1",                      # power
]


@settings(max_examples=300, deadline=None)
@given(problem=problems, pick=st.integers(0, 10**6), which=st.integers(0, len(MUTATIONS) - 1))
def test_a_mutated_expression_never_scores_one(problem, pick, which):
    correct = [e for e in expressions(problem["numbers"]) if true_value(e) == problem["target"]]
    expr = correct[pick % len(correct)]
    mutated = MUTATIONS[which](expr, pick)
    numbers, target = problem["numbers"], problem["target"]
    # A mutation may by chance produce another valid expression; the reward must then agree
    # with the oracle, so the property is: reward 1.0 only for a valid, correct expression.
    score = countdown_reward(ans(mutated), numbers, target)
    if which in (1, 2, 3, 4, 5):
        assert score < 1.0, mutated
    else:
        literals = sorted(int(t) for t in mutated.replace("(", " ").replace(")", " ").split()
                          if t.isdigit())
        should = literals == sorted(numbers) and true_value(mutated) == target
        assert (score == 1.0) == should, mutated


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_reward_never_raises_on_arbitrary_text(text):
    for completion in (text, ans(text), f"<think>{text}</think><answer>{text}</answer>"):
        assert 0.0 <= countdown_reward(completion, [3, 5, 2], 13) <= 1.0
        assert 0.0 <= arithmetic_reward(completion, "23") <= 1.0
        assert 0.0 <= arithmetic_reward(completion, "23", no_template=True) <= 1.0
