"""Problems and prompts for the two tasks: countdown puzzles and plain arithmetic.

Countdown: three numbers from [1, 10] and a target; write an expression that uses each
number exactly once with + - * and equals the target (`evaluate_expression` checks one).
Arithmetic: "what is 15 + 8?".

Everything here is pure Python (no torch), deterministic given a seed, and shared by
training and inference: `build_prompt` is the one place a question becomes model input,
so a saved model is always queried exactly as it was trained.

    python -m pytest tests/test_data.py -v
"""

import itertools
import random
import re
import zlib

OPS = ("+", "-", "*")
TASKS = ("countdown", "arithmetic")


def apply_op(x: int, op: str, y: int) -> int:
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    raise ValueError(f"unknown operator {op!r}; expected one of {OPS}")


# -----------------------------------------------------------------------------
# Countdown

def countdown_split(numbers) -> str:
    """The split is a property of the numbers, so train and val can never share a problem:
    val = all three even (a held-out region of input space), train = at least one odd."""
    return "val" if all(n % 2 == 0 for n in numbers) else "train"


def generate_countdown_problems(n: int, split: str = "train", seed: int = 0,
                                unique: bool = False) -> list[dict]:
    """n problems {"numbers": [a, b, c], "target": t} with t = (a op1 b) op2 c in [1, 100].

    Every problem is solvable by construction. `unique=True` drops repeats (use it for a
    fixed eval set); the val split has only a few hundred distinct problems, so asking for
    more than exist raises instead of looping forever.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    rng = random.Random(seed)
    problems, seen = [], set()
    misses = 0  # consecutive draws that found nothing new: the space is exhausted
    while len(problems) < n:
        if misses > 20_000:
            raise ValueError(f"only {len(problems)} distinct countdown {split} problems found; asked for {n}")
        if split == "val":  # sample evens directly: rejection would waste 7 draws in 8
            numbers = [rng.choice((2, 4, 6, 8, 10)) for _ in range(3)]
        else:
            numbers = [rng.randint(1, 10) for _ in range(3)]
            if countdown_split(numbers) != "train":
                continue
        op1, op2 = rng.choice(OPS), rng.choice(OPS)
        target = apply_op(apply_op(numbers[0], op1, numbers[1]), op2, numbers[2])
        if not 1 <= target <= 100:
            continue
        key = (tuple(numbers), target)
        if unique:
            if key in seen:
                misses += 1
                continue
            seen.add(key)
        misses = 0
        problems.append({"numbers": numbers, "target": target})
    return problems


def countdown_question(numbers, target) -> str:
    return f"Using the numbers {list(numbers)}, create an expression that equals {target}."


COUNTDOWN_RULES = (
    "Use each number exactly once and only the operators + - * (no division). "
    "Think step by step inside <think> </think> tags, "
    "then give only the expression inside <answer> </answer> tags."
)
# The one-shot example from the seed: it teaches the tag format by showing it.
COUNTDOWN_EXAMPLE = (
    [3, 5, 2], 13,
    "<think>\nI need to reach 13 using [3, 5, 2].\n"
    "Try 3 + 5 + 2 = 10. Too small, need multiplication.\n"
    "Try 3 * 5 + 2 = 17. Too large.\n"
    "Try 5 * 2 + 3 = 13. Yes!\n</think>\n<answer>5 * 2 + 3</answer>",
)


# A countdown answer is model output: untrusted, so parsed here, never eval'd.
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
        values.append(apply_op(left, op, right))

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


# -----------------------------------------------------------------------------
# Arithmetic (the first seed's task)

def arithmetic_split(a: int, op: str, b: int) -> str:
    """About 1 in 10 (a, op, b) triples are val, chosen by a stable hash (crc32, not
    Python's salted hash()), so the split is identical on every machine and never overlaps."""
    return "val" if zlib.crc32(f"{a}{op}{b}".encode()) % 10 == 0 else "train"


def arithmetic_question(a: int, op: str, b: int) -> str:
    return f"what is {a} {op} {b}?"


def generate_arithmetic_problems(n: int, split: str = "train", seed: int = 0,
                                 max_operand: int = 20, max_factor: int = 12,
                                 ops=OPS, unique: bool = False) -> list[dict]:
    """n problems {"question": "what is 15 + 8?", "answer": "23"}.

    Operands of + and - are drawn from [0, max_operand] (so answers can be negative);
    operands of * from [0, max_factor], keeping products in the range a small model
    has seen written down. `unique=True` returns distinct problems in a seeded order,
    and all of them when the split holds fewer than n (the default val split has 104).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    bad = [op for op in ops if op not in OPS]
    if bad or not ops:
        raise ValueError(f"ops must be a non-empty subset of {OPS}, got {ops!r}")
    rng = random.Random(seed)
    if unique:
        triples = [(a, op, b) for op in ops for a in range((max_factor if op == "*" else max_operand) + 1)
                   for b in range((max_factor if op == "*" else max_operand) + 1)
                   if arithmetic_split(a, op, b) == split]
        rng.shuffle(triples)
        return [{"question": arithmetic_question(a, op, b), "answer": str(apply_op(a, op, b))}
                for a, op, b in triples[:n]]
    # Each operator is drawn as often as it has (a, b) pairs, so every triple is equally
    # likely: training then sees operators in the shares the held-out set has them.
    ops = tuple(ops)
    weights = [((max_factor if op == "*" else max_operand) + 1) ** 2 for op in ops]
    problems = []
    while len(problems) < n:
        op = rng.choices(ops, weights)[0]
        hi = max_factor if op == "*" else max_operand
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        if arithmetic_split(a, op, b) != split:
            continue
        problems.append({"question": arithmetic_question(a, op, b), "answer": str(apply_op(a, op, b))})
    return problems


ARITHMETIC_RULES = (
    "Think briefly inside <think> </think> tags, "
    "then give only the final integer inside <answer> </answer> tags."
)
ARITHMETIC_EXAMPLE = ("what is 7 * 6?", "<think>\n7 * 6 = 42.\n</think>\n<answer>42</answer>")


def countdown_solution(numbers, target) -> str | None:
    """An expression over `numbers` that equals `target`, written left to right as the
    generator builds one ((a op b) op c, over every order of the numbers), or None."""
    for order in itertools.permutations(numbers):
        for ops in itertools.product(OPS, repeat=len(order) - 1):
            expr = str(order[0])
            for op, n in zip(ops, order[1:]):
                tighter = op == "*" and ("+" in expr or "-" in expr)
                expr = f"({expr}) {op} {n}" if tighter else f"{expr} {op} {n}"
            if evaluate_expression(expr, numbers) == target:
                return expr
    return None


def worked_solution(problem: dict, tagged: bool = True) -> str | None:
    """A right answer written as the prompt's example writes one (for --worked_solutions),
    or None for a countdown problem with no solution. Untagged: the bare integer, as a
    plain "Q: ... A:" prompt is graded."""
    if task_of(problem) == "countdown":
        expr = countdown_solution(problem["numbers"], problem["target"])
        if expr is None:
            return None
        return (f"<think>\nI need to reach {problem['target']} using {list(problem['numbers'])}.\n"
                f"Try {expr} = {problem['target']}. Yes!\n</think>\n<answer>{expr}</answer>")
    if not tagged:
        return f" {problem['answer']}"
    a, op, b = problem["question"].rstrip("?").split()[2:5]
    return f"<think>\n{a} {op} {b} = {problem['answer']}.\n</think>\n<answer>{problem['answer']}</answer>"


# -----------------------------------------------------------------------------
# Questions <-> problems

_INT = r"-?[0-9]{1,9}"  # ASCII digits only, bounded so no giant ints reach int()
_COUNTDOWN_RE = re.compile(
    r"using\s+the\s+numbers\s*\[\s*(" + _INT + r"(?:\s*,\s*" + _INT + r")*)\s*\]\s*,?\s*"
    r"create\s+an\s+expression\s+that\s+equals\s+(" + _INT + r")",
    re.IGNORECASE,
)
_ARITHMETIC_RE = re.compile(
    r"\s*what\s+is\s+(" + _INT + r")\s*([-+*x×])\s*(" + _INT + r")\s*\??\s*", re.IGNORECASE)


def parse_question(text: str):
    """Turn a free-text question into a problem dict, or None if it is neither task.

    Countdown: "Using the numbers [4, 7, 3], create an expression that equals 25." (case
    and spacing tolerant; trailing instructions are ignored). Arithmetic: "what is 15 + 8?"
    (also "15+8", "15 x 8"). Returned problems carry "task" and a canonical "question".
    """
    if not isinstance(text, str):
        return None
    m = _COUNTDOWN_RE.search(text)
    if m:
        numbers = [int(x) for x in m.group(1).split(",")]
        target = int(m.group(2))
        return {"task": "countdown", "numbers": numbers, "target": target,
                "question": countdown_question(numbers, target)}
    m = _ARITHMETIC_RE.fullmatch(text)
    if m:
        a, op, b = int(m.group(1)), m.group(2).lower(), int(m.group(3))
        op = "*" if op in ("x", "×") else op
        return {"task": "arithmetic", "question": arithmetic_question(a, op, b),
                "answer": str(apply_op(a, op, b))}
    return None


def task_of(problem: dict) -> str:
    return "countdown" if "numbers" in problem else "arithmetic"


COUNTDOWN_TARGET_RANGES = ((1, 10), (11, 25), (26, 50), (51, 100))


def problem_category(problem: dict) -> str:
    """The slice of the val set a problem belongs to, for accuracy broken down by slice:
    its operator for arithmetic ("+", "-", "*"; subtraction with negative answers is where
    small models fail), its target range for countdown ("11-25")."""
    if task_of(problem) == "countdown":
        return next(f"{lo}-{hi}" for lo, hi in COUNTDOWN_TARGET_RANGES if lo <= problem["target"] <= hi)
    return problem["question"].split()[3]


def problem_question(problem: dict) -> str:
    if task_of(problem) == "countdown":
        return countdown_question(problem["numbers"], problem["target"])
    return problem["question"]


# -----------------------------------------------------------------------------
# Prompts

SYSTEM_PROMPT = "You are a mathematical puzzle solver."


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_messages(question: str) -> list[dict]:
    """The chat a question becomes: system line, one worked example, then the question
    with the task's rules. A question that is neither task is passed through as it is."""
    problem = parse_question(question)
    if problem is None:
        return [{"role": "user", "content": question}]
    if problem["task"] == "countdown":
        ex_numbers, ex_target, ex_reply = COUNTDOWN_EXAMPLE
        example_q, rules = countdown_question(ex_numbers, ex_target), COUNTDOWN_RULES
    else:
        (example_q, ex_reply), rules = ARITHMETIC_EXAMPLE, ARITHMETIC_RULES
    # The rules are stated once, on the real question; the example shows them obeyed.
    # (Repeating them on the example would add ~30 prompt tokens, the bulk of a CPU step.)
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": example_q},
        {"role": "assistant", "content": ex_reply},
        {"role": "user", "content": f"{problem['question']} {rules}"},
    ]


def plain_prompt(question: str) -> str:
    """The first seed's format for base models: "Q: what is 15 + 8? A:". Countdown keeps
    its rules, since the answer must still come in tags to be graded."""
    problem = parse_question(question)
    if problem is not None and problem["task"] == "countdown":
        return f"Q: {problem['question']} {COUNTDOWN_RULES} A:"
    if problem is not None:
        question = problem["question"]
    return f"Q: {question} A:"


def build_prompt(tokenizer, question: str) -> str:
    """The exact text the model is conditioned on, for training and inference alike.

    With a chat template (Qwen, SmolLM2) the chat above rendered with the generation
    prompt; without one (DistilGPT-2 and other base models) the plain Q/A line.
    """
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(build_messages(question), tokenize=False,
                                             add_generation_prompt=True)
    return plain_prompt(question)
