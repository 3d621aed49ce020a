"""Speed and memory, measured and printed (tests never assert timings).

    python bench.py data                                   # problems generated per second
    python bench.py rewards                                # reward time: typical and adversarial 1 MB inputs
    python bench.py step --model smollm2 --steps 3         # GRPO step time and peak memory, bundled model
    python bench.py step --random qwen2.5-1.5b --steps 20  # a random model of Qwen2.5-1.5B's shape (GPU)
    python bench.py step --random qwen2.5-0.5b -- --dtype bfloat16 --batch_size 1 --num_generations 4 \
        --max_new_tokens 32                                # a reduced shape and config, for a CPU
    python bench.py step --model smollm2 --steps 4 --against trl -- --preset cpu   # side by side with TRL

`step` runs train_grpo's real loop (seed config unless you pass flags after `--`, e.g.
`-- --batch_size 2`) into a temporary folder and reports the mean over all steps but the
first (warm-up). `--random` hands the loop a random model of a real shape, in memory.
`--against trl` then runs TRL's GRPOTrainer on the same weights, prompts, reward and
config in a fresh process; docs/benchmarks.md says what is matched and holds the figures.
"""

import argparse
import contextlib
import json
import statistics
import subprocess
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
    import train_grpo

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
            train_grpo.countdown_reward(text, [3, 5, 2], 13)
        cd = (time.perf_counter() - start) / reps
        start = time.perf_counter()
        for _ in range(reps):
            train_grpo.arithmetic_reward(text, "13")
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


def bench_step(args, train_args, results=None):
    """Our loop (and TRL's with --against trl); `results` gets both summaries when given."""
    import torch

    import train_grpo

    if args.random:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # Handed to the real loop in memory, instead of writing GBs of random weights.
        preloaded = random_model(args.random, device)
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()  # as load_model_and_tokenizer would
        model_flag = f"random-{args.random}"
        params = sum(p.numel() for p in preloaded[0].parameters())
        if results is not None:
            results["params"] = params
        print(f"random {args.random}: {params / 1e6:.0f}M params on {device}")
    else:
        preloaded, model_flag = None, args.model
    with tempfile.TemporaryDirectory() as out:
        argv = ["--model", model_flag, "--num_iterations", str(args.steps), "--eval_every", str(10**6),
                "--save_every", "0", "--plot_every", str(10**6), "--sample_every", str(10**6), "--output_dir", out,
                *train_args]
        if "--preset" not in train_args:
            argv += ["--preset", "none"]
        # The two evals (start, end) answer one batch as wide as a step's rollouts, so a
        # compiled sampler meets one batch shape, as a real run's steps do, not a second one.
        cfg = train_grpo.parse_args(argv)
        if args.against == "trl" and cfg.dynamic_sampling:
            # TRL has no dynamic sampling (trl#3708): a step of ours would sample up to
            # max_sampling_rounds batches against TRL's one, so both sample one.
            print("--against trl: --dynamic_sampling off on our side too, as TRL has none")
            argv += ["--dynamic_sampling", "false"]
        rows = cfg.batch_size * cfg.num_generations
        size = rows if cfg.task == "countdown" else min(rows, 104)  # arithmetic's val split holds 104
        argv = ["--eval_size", str(size), "--eval_batch_size", str(rows), *argv]
        code = train_grpo.main(argv, preloaded=preloaded)
        if code:
            return code
        metrics = json.loads((Path(out) / "grpo_metrics.json").read_text())
    ours = summarise(metrics["steps"])
    print(f"\nours: {len(metrics['steps'])} steps ({ours['timed']} timed; the first, warm-up, took "
          f"{ours['warmup']:.2f} s): {ours['step']:.2f} s/step = generation {ours['gen']:.2f} + reference/old "
          f"log-probs {ours['ref']:.2f} + policy forward/backward {ours['train']:.2f} + optimizer "
          f"{ours['opt']:.2f} s; {ours['tokens_per_second']:.0f} completion tokens/s, mean completion "
          f"{ours['completion']:.0f} tokens, peak memory {ours['peak']:.2f} GB")
    print_floors(metrics, ours, "cuda" if metrics["runtime"]["device"].startswith("cuda") else "cpu")
    if results is not None:
        results["ours"], results["max_new_tokens"] = ours, cfg.max_new_tokens
    if args.against != "trl":
        return 0
    cmd = [sys.executable, str(Path(__file__).resolve()), "trl-step", "--steps", str(args.steps),
           "--model", args.model, *(["--random", args.random] if args.random else []),
           "--bf16", str(bool(metrics.get("cpu_autocast"))), "--", *argv]
    print("\nTRL's GRPOTrainer on the same setup, in a fresh process ...", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("TRL_RESULT ")]
    if done.returncode or not lines:
        print(done.stdout[-3000:] + done.stderr[-3000:])
        print("The TRL run failed (above). Is it installed? pip install -r requirements-bench.txt")
        return 1
    trl = json.loads(lines[-1][len("TRL_RESULT "):])
    if results is not None:
        results["trl"] = trl
    print(f"\n{'':<6}{'s/step':>8}{'warm-up s':>11}{'mean completion':>17}{'peak GB':>9}")
    for name, r in (("ours", ours), ("TRL", trl)):
        print(f"{name:<6}{r['step']:>8.2f}{r['warmup']:>11.2f}{r['completion']:>17.0f}{r['peak']:>9.2f}")
    print(f"TRL / ours step time: {trl['step'] / ours['step']:.2f}x "
          f"(trl {trl['version']}, transformers {trl['transformers']}; {ours['timed']} timed steps each)")
    return 0


def summarise(steps: list) -> dict:
    timed = steps[1:] or steps
    mean = lambda key: statistics.mean(s[key] for s in timed)
    return {"step": mean("step_seconds"), "gen": mean("gen_seconds"), "ref": mean("ref_seconds"),
            "train": mean("train_seconds"), "opt": mean("optimizer_seconds"), "timed": len(timed),
            "tokens_per_second": mean("tokens_per_second"), "completion": mean("completion_len"),
            "warmup": steps[0]["step_seconds"], "peak": max(s["peak_memory_gb"] for s in steps), "mfu": mean("mfu")}


def bench_trl_step(args, train_args):
    """TRL's GRPOTrainer on our config, weights, prompts and reward; prints one TRL_RESULT line."""
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    import data
    import plumbing
    import precision
    import train_grpo

    cfg = train_grpo.parse_args(train_args)
    device, dtype, _ = precision.choose_runtime(cfg)
    if args.random:
        model, tokenizer = random_model(args.random, device)
    else:
        model, tokenizer = plumbing.load_model_and_tokenizer(cfg.model, dtype)
    no_template = not data.has_chat_template(tokenizer)
    problems = [p for step in range(args.steps) for p in train_grpo.train_problems(cfg, step)]
    dataset = Dataset.from_dict({"prompt": train_grpo.prompts_for(tokenizer, problems),
                                 "problem": [json.dumps(p) for p in problems]})

    def reward(completions, problem, **_):
        return [train_grpo.grade(c, json.loads(p), no_template).reward for c, p in zip(completions, problem)]

    class StepClock(TrainerCallback):
        def __init__(self):
            self.seconds, self.lengths = [], []

        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            if device == "cuda":
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.start)

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

    G = cfg.num_generations
    with tempfile.TemporaryDirectory() as folder:
        model.to(dtype).save_pretrained(folder)  # TRL builds its reference model from a path
        tokenizer.save_pretrained(folder)
        del model
        config = trl.GRPOConfig(
            output_dir=folder, max_steps=args.steps, per_device_train_batch_size=cfg.batch_size * G,
            gradient_accumulation_steps=1, num_generations=G, max_completion_length=cfg.max_new_tokens,
            temperature=cfg.temperature, top_k=0, top_p=1.0, repetition_penalty=1.0,
            learning_rate=cfg.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high or cfg.epsilon,
            mask_truncated_completions=cfg.mask_truncated_completions,
            num_iterations=cfg.num_inner_updates, loss_type=cfg.loss_type,
            scale_rewards="group" if cfg.scale_rewards else "none", max_grad_norm=cfg.clip_grad_norm,
            optim="adamw_bnb_8bit" if cfg.optimizer == "adamw8bit" else "adamw_torch",
            gradient_checkpointing=cfg.gradient_checkpointing, bf16=args.bf16 == "True" or device == "cuda",
            use_cpu=device == "cpu", model_init_kwargs={"dtype": dtype}, shuffle_dataset=False,
            seed=cfg.seed, logging_steps=1, report_to="none", save_strategy="no", disable_dropout=True,
            log_completions=False)
        clock = StepClock()
        trainer = trl.GRPOTrainer(model=folder, reward_funcs=reward, args=config, train_dataset=dataset,
                                  processing_class=tokenizer, callbacks=[clock])
        trainer.train()
    peak = plumbing.peak_memory_gb(device)  # measured as ours is
    timed = clock.seconds[1:] or clock.seconds
    print("TRL_RESULT " + json.dumps({
        "step": statistics.mean(timed), "warmup": clock.seconds[0], "peak": peak,
        "completion": statistics.mean(clock.lengths[1:] or clock.lengths) if clock.lengths else float("nan"),
        "version": trl.__version__, "transformers": transformers.__version__}))
    return 0


def memory_bandwidth_gbs(device="cuda", gib: int = 2) -> float:
    """Memory bandwidth, measured: bytes read plus written per second by the fastest of five
    large copies (a VM's noise only ever makes a copy slower)."""
    import torch

    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    src = torch.ones(gib * 2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    fastest = float("inf")
    for _ in range(5):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * src.numel() / fastest / 1e9


# Optimizer bytes moved per trainable weight and step: AdamW reads and writes the float32
# weight and both moments and reads the gradient (28 B); 8-bit moments are 1 B each (16 B).
# Master weights add the bf16 gradient read and the bf16 weight written back (4 B).
OPTIMIZER_BYTES = {"adamw": 28, "adamw8bit": 16}


def phase_floors(metrics: dict, bandwidth_gbs: float) -> dict:
    """{phase: (floor in s, what bounds it)} for the mean timed step: each phase's model
    FLOPs over runtime.peak_flops, and generation also no faster than reading every weight
    once per decode step (as many steps as the mean completion: a lower bound)."""
    cfg, runtime, timed = metrics["config"], metrics["runtime"], metrics["steps"][1:] or metrics["steps"]
    mean = lambda key: statistics.mean(s[key] for s in timed)  # noqa: E731
    weights, peak, bandwidth = runtime["matmul_params"], runtime["peak_flops"], bandwidth_gbs * 1e9
    G = cfg["num_generations"]
    sampled = mean("groups_sampled") * (mean("prompt_len") + G * mean("completion_len"))
    trained = mean("groups_trained") * (mean("prompt_len") + G * mean("completion_len"))
    # The device line carries precision.weights_note: what the weights are and whether masters exist.
    float32_weights = "float32 weights" in runtime["device"]
    compute_bytes = 4 if float32_weights and not metrics.get("cpu_autocast") else 2
    decode = mean("completion_len") * weights * compute_bytes / bandwidth
    gen_flops = 2 * weights * sampled / peak
    ref_passes = int(cfg["beta"] > 0) + int(cfg["num_inner_updates"] > 1)
    update_passes = (2 if cfg["lora_rank"] else 3) + int(cfg["gradient_checkpointing"])  # + the recompute
    extra = 4 if "master copy in the optimizer" in runtime["device"] else 0
    optimizer_bytes = runtime["trainable_params"] * (OPTIMIZER_BYTES[cfg["optimizer"]] + extra)
    return {"gen": (max(gen_flops, decode), "weights read" if decode > gen_flops else "FLOPs"),
            "ref": (2 * weights * trained * ref_passes / peak, "FLOPs"),
            "train": (2 * weights * trained * update_passes * cfg["num_inner_updates"] / peak, "FLOPs"),
            "opt": (optimizer_bytes * cfg["num_inner_updates"] / bandwidth, "bytes moved")}


def print_floors(metrics: dict, ours: dict, device: str) -> None:
    bandwidth = memory_bandwidth_gbs(device, gib=1)
    floors = phase_floors(metrics, bandwidth)
    source = metrics["runtime"]["device"].split("MFU against")[-1].strip()
    print(f"\nfloors at {source}, memory {bandwidth:.0f} GB/s (measured copy); "
          f"MFU of the whole step {100 * ours['mfu']:.1f}%")
    print(f"{'phase':<10}{'measured s':>11}{'floor s':>9}{'x floor':>9}  bound by")
    for phase, name in (("gen", "generation"), ("ref", "reference"), ("train", "fwd+bwd"), ("opt", "optimizer")):
        floor, why = floors[phase]
        ratio = f"{ours[phase] / floor:>9.1f}" if floor > 0 else f"{'-':>9}"
        print(f"{name:<10}{ours[phase]:>11.2f}{floor:>9.3f}{ratio}  {why}")


@contextlib.contextmanager
def cuda_graph_recordings():
    """While open, a list that gains an entry each time inductor records a CUDA graph
    (reduce-overhead); bench.py gpu and the gpu tests count with it."""
    from torch._inductor import cudagraph_trees

    recorded, real = [], cudagraph_trees.CUDAGraphTreeManager.record_function
    cudagraph_trees.CUDAGraphTreeManager.record_function = lambda self, *a, **k: recorded.append(1) or real(
        self, *a, **k)
    try:
        yield recorded
    finally:
        cudagraph_trees.CUDAGraphTreeManager.record_function = real


def bench_gpu(args) -> int:
    """The one command for a GPU box: the gpu tests, then the seed config on a random
    Qwen2.5-1.5B shape, ours and (if installed) TRL's, in one table."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        print("bench.py gpu: this PyTorch sees no CUDA device; run it on a GPU machine", file=sys.stderr)
        return 2
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-s"],
                           cwd=Path(__file__).resolve().parent, capture_output=True, text=True)
    print(tests.stdout[-4000:])
    summary = (tests.stdout.strip().splitlines() or ["(no output)"])[-1]
    args.random, args.steps = "qwen2.5-1.5b", max(args.steps, 6)
    args.against = "trl" if importlib.util.find_spec("trl") else None
    results = {}
    with cuda_graph_recordings() as recordings:
        code = bench_step(args, [], results)
    if code:
        return code
    bandwidth = memory_bandwidth_gbs()
    weight_bytes = 2 * results["params"]  # bf16; the tied head reads the embedding matrix once per token
    floor = results["max_new_tokens"] * weight_bytes / (bandwidth * 1e9)
    print(f"\n== {torch.cuda.get_device_name()}, torch {torch.__version__}; gpu tests: {summary}")
    print(f"memory bandwidth (measured copy) {bandwidth:.0f} GB/s: generation floor {floor:.2f} s "
          f"({results['max_new_tokens']} decode steps, each reading {weight_bytes / 1e9:.1f} GB of bf16 weights)")
    print(f"{'':<6}{'s/step':>8}{'gen':>7}{'gen/floor':>10}{'ref':>7}{'fwd+bwd':>9}{'optim':>7}{'first step':>12}"
          f"{'tokens/s':>10}{'peak GB':>9}")
    ours = results["ours"]
    print(f"{'ours':<6}{ours['step']:>8.2f}{ours['gen']:>7.2f}{ours['gen'] / floor:>10.1f}{ours['ref']:>7.2f}"
          f"{ours['train']:>9.2f}{ours['opt']:>7.2f}{ours['warmup']:>12.2f}{ours['tokens_per_second']:>10.0f}"
          f"{ours['peak']:>9.2f}")
    if "trl" in results:
        trl = results["trl"]
        print(f"{'TRL':<6}{trl['step']:>8.2f}{'':>7}{'':>10}{'':>7}{'':>9}{'':>7}{trl['warmup']:>12.2f}{'':>10}"
              f"{trl['peak']:>9.2f}")
    else:
        print("TRL not installed (pip install -r requirements-bench.txt): no side-by-side")
    print(f"first step {ours['warmup']:.1f} s, of which ~{max(ours['warmup'] - ours['step'], 0):.1f} s compiling "
          f"and recording; CUDA-graph recordings over the run: {len(recordings)} (one set per shape met; "
          f"the gpu tests check that later steps add none)")
    return 0 if tests.returncode == 0 else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Measure speed and memory.")
    p.add_argument("what", nargs="+", choices=["data", "rewards", "step", "trl-step", "gpu"])
    p.add_argument("--model", default="smollm2", help="for step: any --model train_grpo accepts")
    p.add_argument("--random", choices=sorted(SHAPES), help="for step: a random model of this shape instead")
    p.add_argument("--steps", type=int, default=3, help="for step: steps to run (the first is not timed)")
    p.add_argument("--against", choices=["trl"], help="for step: then run TRL's GRPOTrainer on the same setup")
    p.add_argument("--bf16", default="False", help=argparse.SUPPRESS)  # trl-step: match our autocast choice
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = parser().parse_args(argv)
    code = 0
    for what in args.what:
        print(f"== {what}")
        if what == "data":
            bench_data()
        elif what == "rewards":
            bench_rewards()
        elif what == "trl-step":
            code = bench_trl_step(args, train_args) or code
        elif what == "gpu":
            code = bench_gpu(args) or code
        else:
            code = bench_step(args, train_args) or code
    return code


if __name__ == "__main__":
    sys.exit(main())
