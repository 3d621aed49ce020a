"""Ask a trained model a question, with the exact prompt it was trained on, and check it.

    python inference.py "Using the numbers [4, 7, 3], create an expression that equals 25."
    python inference.py "what is 15 + 8?" --num_samples 8          # sampled, with a score
    python inference.py "what is 15 + 8?" --model smollm2          # the untrained bundled model
    python inference.py - < questions.txt                          # one question per line
"""

import argparse
import json
import sys
from pathlib import Path

import data


def parse_cli(argv):
    p = argparse.ArgumentParser(description="Query a model trained by train_grpo.py and check its answers.")
    p.add_argument("question", help='the question, or "-" to read one question per line from standard input')
    p.add_argument("--model", default="saved_model",
                   help="saved_model/ (default), any folder, hub id, .gguf file, or smollm2 (bundled, untrained)")
    p.add_argument("--num_samples", type=int, default=1, help="answers to sample per question")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; default: greedy for one sample, the training temperature for several")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="default: the trained model's max_new_tokens (from grpo_config.json), else 160")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = p.parse_args(argv)
    if args.num_samples < 1:
        p.error("--num_samples must be at least 1")
    if args.temperature is not None and args.temperature < 0:
        p.error("--temperature must be 0 (greedy) or more")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        p.error("--max_new_tokens must be at least 1")
    return args


def training_config(model: str) -> dict:
    """The run's config saved next to the model, if there is one (it may be hand-edited)."""
    path = Path(model) / "grpo_config.json"
    try:
        cfg = json.loads(path.read_text())
        return cfg if isinstance(cfg, dict) else {}
    except (OSError, ValueError):
        return {}


def answer_question(model, tokenizer, question: str, args, end_ids) -> tuple:
    """Print the model's answers to one question; return (correct, total, checkable)."""
    import torch

    import engine
    import train_grpo

    problem = data.parse_question(question)
    no_template = not data.has_chat_template(tokenizer)
    prompt = data.build_prompt(tokenizer, question)
    greedy = args.temperature == 0
    torch.manual_seed(args.seed)
    roll = engine.generate_rollouts(model, tokenizer, [prompt], args.num_samples, args.max_new_tokens,
                                    args.temperature or 1.0, end_ids, greedy=greedy,
                                    sampler="groups")  # a static cache would compile for a minute first
    print(f"Question: {problem['question'] if problem else question.strip()}")
    correct = 0
    for i, text in enumerate(roll.texts, 1):
        answer = train_grpo.extract_answer(text, no_template)
        if problem is None:
            mark, tail = "?", ""
        else:
            g = train_grpo.grade(text, problem, no_template)
            correct += g.correct
            mark, tail = ("✓" if g.correct else "✗"), f"  (reward {g.reward:.1f})"
        if args.num_samples == 1:
            print("Model output:")
            print("  " + text.strip().replace("\n", "\n  "))
            print(f"Answer: {answer if answer is not None else '(none given)'} {mark}{tail}")
        else:
            print(f"  {i}. {answer if answer is not None else '(no answer)'} {mark}{tail}")
    if problem is None:
        print("  (not a countdown or arithmetic question, so the answer cannot be checked)")
        return 0, args.num_samples, False
    if problem["task"] == "arithmetic":
        print(f"Correct answer: {problem['answer']}")
    if args.num_samples > 1:
        print(f"{correct}/{args.num_samples} correct ({correct / args.num_samples:.0%})")
    return correct, args.num_samples, True


def main(argv=None) -> int:
    args = parse_cli(sys.argv[1:] if argv is None else argv)
    import torch

    import engine
    import plumbing

    trained = training_config(args.model)
    if args.max_new_tokens is None:
        args.max_new_tokens = int(trained.get("max_new_tokens", 160))
    if args.temperature is None:
        args.temperature = 0.0 if args.num_samples == 1 else float(trained.get("temperature", 1.0))

    if args.question == "-":
        questions = [line.strip() for line in sys.stdin if line.strip()]
        if not questions:
            print("inference.py: error: no questions on standard input (one per line)", file=sys.stderr)
            return 1
    else:
        questions = [args.question]

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    try:  # a missing saved_model/ is reported by resolve_model, with how to train one
        model, tokenizer = plumbing.load_model_and_tokenizer(args.model, dtype)
    except plumbing.UsageError as err:
        print(f"inference.py: error: {err}", file=sys.stderr)
        return 1
    model.to(device).eval()
    end_ids = engine.end_token_ids(tokenizer, model)

    correct = total = unchecked = 0
    for n, question in enumerate(questions):
        if n:
            print()
        c, t, checkable = answer_question(model, tokenizer, question, args, end_ids)
        if checkable:
            correct, total = correct + c, total + t
        else:
            unchecked += 1
    if len(questions) > 1:
        rate = f" ({correct / total:.0%})" if total else ""
        print(f"\nSummary: {len(questions)} questions, {correct}/{total} answers correct{rate}"
              + (f", {unchecked} questions could not be checked" if unchecked else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
