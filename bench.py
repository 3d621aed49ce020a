"""Speed and memory, measured and printed (tests never assert timings).

    python bench.py data                                   # problems generated per second
    python bench.py rewards                                # reward time: typical and adversarial 1 MB inputs
    python bench.py step --model smollm2 --steps 3         # GRPO step time and peak memory, bundled model
    python bench.py step --random qwen2.5-1.5b --steps 20  # a random model of Qwen2.5-1.5B's shape (GPU)
    python bench.py step --random qwen2.5-0.5b -- --dtype bfloat16 --batch_size 1 --num_generations 4 \
        --max_new_tokens 32                                # a reduced shape and config, for a CPU

`step` runs train_grpo's real loop (seed config unless you pass flags after `--`, e.g.
`-- --batch_size 2`) into a temporary folder and reports the mean over all steps but the
first (warm-up). A random model samples random tokens, so every completion runs to
max_new_tokens: the worst case for time and memory.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))

# Shapes of real models, for random initialisation where the weights cannot be downloaded.
SHAPES = {
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6),
    # Same family at a third of the size: what a 2-core CPU can still step through.
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}


def bench_data():
    import data

    for name, make in [("countdown train", lambda: data.generate_countdown_problems(10_000, "train")),
                       ("countdown val", lambda: data.generate_countdown_problems(10_000, "val")),
                       ("arithmetic train", lambda: data.generate_arithmetic_problems(10_000, "train"))]:
        start = time.perf_counter()
        make()
        print(f"{name:<18} 10,000 problems in {time.perf_counter() - start:.3f} s")


def bench_rewards():
    from train_grpo import arithmetic_reward, countdown_reward

    def ans(x):
        return f"<think>r</think><answer>{x}</answer>"

    cases = {
        "typical correct": ans("5 * 2 + 3"),
        "1 MB digits": ans("9" * 1_000_000),
        "1 MB open parens": ans("(" * 1_000_000),
        "1 MB nested, correct": ans("(" * 500_000 + "5*2+3" + ")" * 500_000),
        "1 MB of '1 + '": ans("1 + " * 250_000 + "1"),
        "1 MB answer tags": "<answer>" * 60_000 + "</answer>" * 60_000,
        "1 MB NUL bytes": "\x00" * 1_000_000,
        "1 MB emoji": "\U0001f600" * 250_000 + ans("5 * 2 + 3"),
    }
    for name, text in cases.items():
        reps = 10_000 if len(text) < 100 else 3
        start = time.perf_counter()
        for _ in range(reps):
            countdown_reward(text, [3, 5, 2], 13)
        cd = (time.perf_counter() - start) / reps
        start = time.perf_counter()
        for _ in range(reps):
            arithmetic_reward(text, "13")
        ar = (time.perf_counter() - start) / reps
        print(f"{name:<22} countdown {cd * 1e3:9.3f} ms   arithmetic {ar * 1e3:9.3f} ms")


def random_model(shape: str, device: str):
    """A randomly initialised Qwen2 of a real shape, built directly on `device`, with the
    tiny offline tokenizer (its ids all fit inside the model's vocabulary)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tiny import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer(chat=True)
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    return model, tokenizer


def bench_step(args, train_args):
    import torch

    import train_grpo

    if args.random:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = random_model(args.random, device)
        # Hand the in-memory model to the real loop instead of writing GBs of random weights.
        train_grpo.load_model_and_tokenizer = lambda name, dtype: (model.to(dtype), tokenizer)
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()  # as load_model_and_tokenizer would
        model_flag = f"random-{args.random}"
        print(f"random {args.random}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params on {device}")
    else:
        model_flag = args.model
    with tempfile.TemporaryDirectory() as out:
        argv = ["--model", model_flag, "--num_iterations", str(args.steps), "--eval_size", "1",
                "--eval_every", str(10**6), "--save_every", "0", "--plot_every", str(10**6),
                "--sample_every", str(10**6), "--output_dir", out, *train_args]
        if "--preset" not in train_args:
            argv += ["--preset", "none"]
        code = train_grpo.main(argv)
        if code:
            return code
        steps = json.loads((Path(out) / "grpo_metrics.json").read_text())["steps"]
    timed = steps[1:] or steps
    mean = lambda key: statistics.mean(s[key] for s in timed)
    print(f"\n{len(steps)} steps ({len(timed)} timed; the first, warm-up, took {steps[0]['step_seconds']:.2f} s): "
          f"{mean('step_seconds'):.2f} s/step = generation {mean('gen_seconds'):.2f} + reference/old log-probs "
          f"{mean('ref_seconds'):.2f} + policy forward/backward {mean('train_seconds'):.2f} + optimizer "
          f"{mean('optimizer_seconds'):.2f} s; {mean('tokens_per_second'):.0f} completion tokens/s, "
          f"mean completion {mean('completion_len'):.0f} tokens, peak memory {max(s['peak_memory_gb'] for s in steps):.2f} GB")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description="Measure speed and memory.")
    p.add_argument("what", nargs="+", choices=["data", "rewards", "step"])
    p.add_argument("--model", default="smollm2", help="for step: any --model train_grpo accepts")
    p.add_argument("--random", choices=sorted(SHAPES), help="for step: a random model of this shape instead")
    p.add_argument("--steps", type=int, default=3, help="for step: steps to run (the first is not timed)")
    args = p.parse_args(argv)
    code = 0
    for what in args.what:
        print(f"== {what}")
        if what == "data":
            bench_data()
        elif what == "rewards":
            bench_rewards()
        else:
            code = bench_step(args, train_args) or code
    return code


if __name__ == "__main__":
    sys.exit(main())
