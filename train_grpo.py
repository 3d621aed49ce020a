"""GRPO for countdown puzzles and arithmetic: the whole algorithm, top to bottom.

One step: take a batch of problems, sample a group of G completions for each, grade
them, turn each group's rewards into advantages (r - mean) / (std + eps), and take a
PPO-clipped policy-gradient step with a KL penalty to a frozen reference model.

How this departs from a textbook policy gradient, and from DeepSeekMath's GRPO:
  1) KL to the frozen reference is Schulman's k3 estimator, exp(ref - logp) - (ref - logp) - 1,
     added to the loss per token (as DeepSeekMath and TRL do), not folded into the reward,
     and capped per token (--kl_cap), so one unlikely token cannot outweigh the batch.
  2) With num_inner_updates == 1 the ratio is exactly 1 (old log-probs are the current
     ones, detached), so the clip never bites and the update is plain REINFORCE with group
     baselines; the clip matters only with several inner updates on one batch.
  3) --loss_type chooses how token losses are averaged (see `grpo_loss`).
  4) A group whose rewards are all equal gets advantage exactly 0 (see `group_advantages`).
  5) Optional, off by default: DAPO's levers, partial credit for near misses, and worked
     solutions standing in for a completion where a group has no right answer.

Machinery lives next door: engine.py (sampling), precision.py (dtype, master weights,
optimizer), plumbing.py (models on disk, torchrun, checkpoints, run files).

    python train_grpo.py                        # seed config: Qwen2.5-1.5B-Instruct on CUDA
    python train_grpo.py --preset cpu           # the bundled SmolLM2-135M on a laptop CPU
    python train_grpo.py --resume               # continue the run in --output_dir
    torchrun --nproc_per_node 8 train_grpo.py   # 8 GPUs, batch_size prompts on each
    python train_grpo.py --help                 # every flag, with its default
"""

import contextlib
import copy
import dataclasses
import difflib
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

import data
import engine
import plumbing
import precision
import tracking

# -----------------------------------------------------------------------------
# Config: the single source of truth. Every field is a CLI flag of the same name.

@dataclasses.dataclass
class GRPOConfig:
    # what to train
    model: str = "Qwen/Qwen2.5-1.5B-Instruct"  # hub id, local dir, .gguf file, or "smollm2" (bundled)
    task: str = "countdown"               # countdown | arithmetic
    preset: str = ""                      # cpu | smollm2_countdown (one GPU) | none; "" = cpu without CUDA, else none
    config: str = ""                      # JSON or YAML file of fields (a run's saved_model/grpo_config.json replays it); flags win
    # the GRPO step
    num_iterations: int = 1200            # training steps
    batch_size: int = 4                   # prompts per step per process (torchrun: x number of processes)
    num_generations: int = 16             # completions per prompt (the group size)
    max_new_tokens: int = 160             # completion budget, room for <think> reasoning
    temperature: float = 1.2              # sampling temperature; log-probs use the same one
    learning_rate: float = 2e-6           # learning rate at step 1
    final_lr_ratio: float = 1.0           # cosine-decay the learning rate to this fraction of it at the last step; 1 = constant
    beta: float = 0.01                    # KL penalty weight; 0 = no reference model at all
    kl_cap: float = 10.0                  # per-token k3 KL above this counts as this, with no gradient; 0 = no cap
    epsilon: float = 0.2                  # PPO clip range: ratio kept in [1-eps, 1+eps]
    epsilon_high: float = 0.0             # upper clip instead (DAPO's clip-higher uses 0.28): ratio below 1+epsilon_high; 0 = epsilon
    mask_truncated_completions: bool = False  # completions cut off at max_new_tokens get no loss (DAPO's overlong filtering)
    dynamic_sampling: bool = False        # train only on groups whose rewards differ, sampling more prompts to fill the batch (DAPO)
    max_sampling_rounds: int = 3          # --dynamic_sampling: at most this many rounds of batch_size prompts per step
    partial_credit: float = 0.0           # arithmetic: a wrong integer answer earns up to this much more by nearness; 0 = off
    worked_solutions: bool = False        # a group with no right answer trains on a worked solution in place of one completion
    num_inner_updates: int = 1            # policy updates per generated batch
    clip_grad_norm: float = 0.5           # max global gradient norm
    loss_type: str = "grpo"               # grpo | dr_grpo | dapo: how token losses are averaged
    scale_rewards: bool = True            # divide advantages by the group std (false by default with --loss_type dr_grpo)
    micro_batch_size: int = 0             # sequences per forward/backward; 0 = whole batch at once
    # evaluation and outputs
    seed: int = 0                         # seeds problems, sampling and the eval set
    eval_every: int = 50                  # greedy val eval every N steps (and at step 0 and the end)
    eval_size: int = 128                  # val problems per eval (>= 100: fewer is too noisy)
    eval_batch_size: int = 64             # prompts per greedy generate call during eval
    plot_every: int = 10                  # redraw the PNG plots every N steps
    sample_every: int = 10                # append completions to grpo_samples.jsonl every N steps
    save_every: int = 100                 # checkpoint every N steps (0 = only on Ctrl-C)
    output_dir: str = "."                 # where metrics, plots, samples, checkpoints/, saved_model/ go
    resume: bool = False                  # continue from the latest checkpoint in output_dir
    overwrite: bool = False               # allow replacing a previous run's outputs in output_dir
    report_to: str = "none"               # none | tensorboard | wandb: also send every step and eval there (rank 0)
    run_name: str = ""                    # tracking run name; "" = output_dir's name and the start time (a resume keeps it)
    wandb_project: str = "grpo"           # W&B project (WANDB_MODE=offline works without a network)
    # hardware
    device: str = "auto"                  # auto | cuda | cpu
    dtype: str = "auto"                   # auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float32
    master_weights: bool = True           # bf16 weights: optimizer updates a float32 copy so small steps add up (+4 B/param)
    cpu_autocast: str = "auto"            # auto | on | off: bf16 autocast on CPU (auto = if the CPU has bf16 units)
    cpu_linear: str = "auto"              # auto | onednn | torch: kernels of float32 linear layers on CPU (auto = the faster, timed)
    optimizer: str = "adamw8bit"          # adamw8bit (bitsandbytes) | adamw (torch)
    gradient_checkpointing: bool = True   # recompute activations in backward: less memory, more compute
    lora_rank: int = 0                    # LoRA adapters of this rank train instead of every weight (peft); 0 = full fine-tuning
    lora_alpha: float = 32.0              # LoRA scale: adapters add (lora_alpha / lora_rank) * B A to each weight
    lora_target_modules: str = "all-linear"  # comma-separated module names to adapt (q_proj,v_proj), or all-linear
    sampler: str = "auto"                 # auto | groups | static | generate: rollout sampler (auto = groups: ours, on a static KV cache)
    compile: str = "auto"                 # auto | on | off: torch.compile the groups sampler's decode step (auto = on with CUDA only: on CPU compiling costs more than it buys)
    dist_timeout_minutes: int = 10        # torchrun: a rank that waits this long for the others fails instead of hanging


# Presets set defaults; flags given explicitly on the command line still win.
PRESETS = {
    "none": {},
    # Sized to learn visibly on a 2-core CPU in minutes (docs/results.md has the runs). At
    # temperature 1.2 a 135M model writes incoherent text and never earns a reward; at 1.0
    # arithmetic with tags is learnable within tens of steps. Its entropy collapses within
    # ~20 steps, after which most groups answer alike: dynamic sampling keeps every update
    # fed with groups that carry signal, and overlong filtering keeps completions ending.
    # A negative answer is almost never sampled right, so a worked solution supplies it; once
    # a group's answers agree, 4 of them say what 8 would, so 6 prompts x 4 (the rows of
    # 3 x 8) see twice the problems, and more unsolved groups get a solution. Held-out accuracy
    # still rises from step 60 to 100 (subtraction most), so the preset runs 100.
    # Torch AdamW, not 8-bit: bitsandbytes' CPU step is slow, and its memory saving is moot.
    "cpu": dict(model=plumbing.BUNDLED_ALIAS, task="arithmetic", num_iterations=100, batch_size=6,
                num_generations=4, max_new_tokens=48, temperature=1.0, learning_rate=1e-5,
                beta=0.01, dynamic_sampling=True, mask_truncated_completions=True, worked_solutions=True,
                eval_every=20, eval_size=104, eval_batch_size=52, plot_every=5,
                sample_every=5, save_every=10, gradient_checkpointing=False, optimizer="adamw"),
    # Countdown on one GPU with the bundled model, where 128 tokens leave room to reason.
    "smollm2_countdown": dict(model=plumbing.BUNDLED_ALIAS, task="countdown", num_iterations=300, batch_size=8,
                              num_generations=16, max_new_tokens=128, temperature=1.0,
                              learning_rate=1e-5, beta=0.01, dtype="float32", eval_every=50,
                              eval_size=200, plot_every=10, sample_every=10, save_every=50,
                              gradient_checkpointing=False),
}
CHOICES = {"task": data.TASKS, "preset": ("", *PRESETS), "loss_type": ("grpo", "dr_grpo", "dapo"),
           "device": ("auto", "cuda", "cpu"), "dtype": ("auto", "bfloat16", "float32"),
           "cpu_autocast": ("auto", "on", "off"), "cpu_linear": ("auto", "onednn", "torch"),
           "optimizer": ("adamw8bit", "adamw"),
           "sampler": ("auto", "groups", "static", "generate"), "compile": ("auto", "on", "off"),
           "report_to": tracking.BACKENDS}
FIELD_HELP = {}  # filled from the trailing comments above, so --help and the source agree


def parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def field_help() -> dict:
    """One-line help per field, read from its trailing comment in this file."""
    if not FIELD_HELP:
        source = Path(__file__).read_text()
        for f in dataclasses.fields(GRPOConfig):
            m = re.search(rf"^\s+{f.name}: [^\n#]*#\s*(.*)$", source, re.MULTILINE)
            FIELD_HELP[f.name] = m.group(1).strip() if m else ""
    return FIELD_HELP


def usage_text() -> str:
    lines = ["usage: python train_grpo.py [--field value ...]", "",
             "Every GRPOConfig field is a flag (defaults = the seed config; --preset cpu for a laptop):"]
    for f in dataclasses.fields(GRPOConfig):
        lines.append(f"  --{f.name:<24} {f.default!r:<30} {field_help()[f.name]}")
    return "\n".join(lines)


def parse_args(argv) -> GRPOConfig:
    """argv -> GRPOConfig: preset defaults first, then explicit flags. Raises plumbing.UsageError."""
    fields = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    given = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise plumbing.UsageError(f"unexpected argument {arg!r}: flags look like --name value")
        name, _, value = arg[2:].partition("=")
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"; did you mean --{close[0]}?" if close else ""
            raise plumbing.UsageError(f"unknown flag --{name}{hint} (python train_grpo.py --help lists them all)")
        if not value and "=" not in arg:
            if fields[name].type in (bool, "bool") and (not args or args[0].startswith("--")):
                value = "true"  # a bare boolean flag: --resume
            elif not args:
                raise plumbing.UsageError(f"--{name} needs a value")
            else:
                value = args.pop(0)
        given[name] = value
    types = {name: field_type(f) for name, f in fields.items()}
    from_file = plumbing.read_config_file(given["config"], types) if "config" in given else {}
    given = {**from_file, **given}  # flags on the command line win over the file
    preset = given.get("preset", "")
    if preset == "" and not torch.cuda.is_available() and given.get("device") != "cuda":
        preset = "cpu"  # never start the seed's multi-day job on a CPU by accident
    values = dict(PRESETS.get(preset, {}))  # an unknown preset is reported by validate()
    for name, text in given.items():
        kind = field_type(fields[name])
        try:
            values[name] = parse_bool(text) if kind is bool else kind(text)
        except ValueError:
            raise plumbing.UsageError(f"--{name} expects {kind.__name__}, got {text!r}") from None
    values["preset"] = preset
    if values.get("loss_type") == "dr_grpo" and "scale_rewards" not in given:
        values["scale_rewards"] = False  # Dr. GRPO removes both the length and the std normalisation
    cfg = GRPOConfig(**values)
    validate(cfg)
    return cfg


def field_type(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "bool": bool, "str": str}.get(f.type, f.type)


def validate(cfg: GRPOConfig) -> None:
    for name, options in CHOICES.items():
        if getattr(cfg, name) not in options:
            raise plumbing.UsageError(f"--{name} must be one of {', '.join(o for o in options if o)}, got {getattr(cfg, name)!r}")
    positive = ["num_iterations", "batch_size", "num_generations", "max_new_tokens", "eval_size",
                "eval_batch_size", "num_inner_updates", "plot_every", "sample_every", "eval_every",
                "dist_timeout_minutes", "max_sampling_rounds"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise plumbing.UsageError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("temperature", "learning_rate", "clip_grad_norm"):
        if not getattr(cfg, name) > 0 or not math.isfinite(getattr(cfg, name)):
            raise plumbing.UsageError(f"--{name} must be a positive number, got {getattr(cfg, name)}")
    for name in ("beta", "kl_cap", "epsilon", "epsilon_high", "micro_batch_size", "save_every", "lora_rank"):
        if not getattr(cfg, name) >= 0:
            raise plumbing.UsageError(f"--{name} must be zero or more, got {getattr(cfg, name)}")
    if cfg.num_generations < 2:
        raise plumbing.UsageError("--num_generations must be at least 2: advantages compare completions within a group")
    if not 0 <= cfg.final_lr_ratio <= 1:
        raise plumbing.UsageError(f"--final_lr_ratio must be between 0 and 1 (1 keeps the learning rate constant), "
                                  f"got {cfg.final_lr_ratio}")
    if not 0 <= cfg.partial_credit < CORRECT_REWARD - 2 * FORMAT_REWARD:
        raise plumbing.UsageError(f"--partial_credit must be at least 0 and below "
                                  f"{CORRECT_REWARD - 2 * FORMAT_REWARD:g}, so that a near miss earns less than "
                                  f"the right answer; got {cfg.partial_credit}")


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


def grade_countdown(completion: str, numbers, target: int) -> Grade:
    fmt = format_grade(completion)
    answer = last_answer(completion)
    if answer is not None and data.evaluate_expression(answer, numbers) == target:
        return Grade(CORRECT_REWARD, True, fmt.has_think, True)
    return fmt


def countdown_reward(completion: str, numbers, target: int) -> float:
    """1.0 for a correct expression in the last <answer> block; else 0.1 per tag pair."""
    return grade_countdown(completion, numbers, target).reward


_INTEGER = re.compile(r"-?[0-9]+")
_BOUNDED_INT = re.compile(r"-?[0-9]{1,9}")  # few enough digits for int()


def same_integer(a: str, b: str) -> bool:
    """Compare integer strings without int(): Python refuses to parse more than 4300
    digits, and a model can write 5000."""
    def norm(s):
        neg, digits = s.startswith("-"), s.lstrip("-").lstrip("0") or "0"
        return ("-" if neg and digits != "0" else "") + digits
    return norm(a) == norm(b)


def extract_answer(completion: str, no_template: bool = False):
    """What is graded: the last <answer> block, or for base-model prompts ("Q: what is
    5 + 3? A:"), which have no tags, the first integer written. None if there is none."""
    if no_template:
        m = _INTEGER.search(completion)
        return m.group() if m else None
    return last_answer(completion)


def grade_arithmetic(completion: str, answer: str, no_template: bool = False) -> Grade:
    given = extract_answer(completion, no_template)
    if no_template:
        correct = given is not None and same_integer(given, answer)
        return Grade(CORRECT_REWARD if correct else 0.0, correct, False, given is not None)
    fmt = format_grade(completion)
    if given is not None and _INTEGER.fullmatch(given) and same_integer(given, answer):
        return Grade(CORRECT_REWARD, True, fmt.has_think, True)
    return fmt


def arithmetic_reward(completion: str, answer: str, no_template: bool = False) -> float:
    """1.0 if the last <answer> block is exactly the integer answer; else 0.1 per tag pair.
    With no_template=True (no chat template), 1.0 if the first integer written is the answer."""
    return grade_arithmetic(completion, answer, no_template).reward


def with_partial_credit(g: Grade, completion: str, problem: dict, weight: float, no_template: bool = False) -> Grade:
    """--partial_credit: a wrong integer answer to an arithmetic problem earns
    weight * max(0, 1 - |given - answer| / (|answer| + 1)) on top of its format reward.
    Exact-match reward gives a group no signal where the policy is never right (at first,
    almost every subtraction with a negative answer); nearness ranks its wrong answers, and a
    wrong sign is at least |answer| away, so earns little. Accuracy stays exact match."""
    if weight == 0 or g.correct or "answer" not in problem:  # the default run pays for no second parse
        return g
    given = extract_answer(completion, no_template)
    if given is None or not _BOUNDED_INT.fullmatch(given):
        return g
    answer = int(problem["answer"])
    nearness = max(0.0, 1 - abs(int(given) - answer) / (abs(answer) + 1))
    return g._replace(reward=g.reward + weight * nearness)


def grade(completion: str, problem: dict, no_template: bool = False) -> Grade:
    """Grade a completion against a problem of either task."""
    if "numbers" in problem:
        return grade_countdown(completion, problem["numbers"], problem["target"])
    return grade_arithmetic(completion, problem["answer"], no_template)


# -----------------------------------------------------------------------------
# Problems and prompts

def train_problems(cfg: GRPOConfig, step: int, dist: plumbing.Dist = plumbing.Dist(),
                   sampling_round: int = 0) -> list[dict]:
    """The problems of one step depend only on (seed, step): a resumed run sees the same
    ones. With N ranks the step draws N * batch_size and each rank takes its own slice.
    Dynamic sampling's later rounds continue the same draw, so round 0 is the plain step."""
    seed, n = plumbing.seed_for(cfg.seed, step), cfg.batch_size * dist.world
    if cfg.task == "countdown":
        problems = data.generate_countdown_problems(n * (sampling_round + 1), "train", seed=seed)
    else:
        problems = data.generate_arithmetic_problems(n * (sampling_round + 1), "train", seed=seed)
    first = sampling_round * n + dist.rank * cfg.batch_size
    return problems[first:first + cfg.batch_size]


def eval_problems(cfg: GRPOConfig) -> list[dict]:
    """A fixed val set of distinct problems: a repeat would count one question twice.
    Arithmetic's val split has only 104, so eval_size >= 104 means all of them."""
    if cfg.task == "countdown":
        return data.generate_countdown_problems(cfg.eval_size, "val", seed=cfg.seed, unique=True)
    return data.generate_arithmetic_problems(cfg.eval_size, "val", seed=cfg.seed, unique=True)


def prompts_for(tokenizer, problems) -> list[str]:
    return [data.build_prompt(tokenizer, data.problem_question(p)) for p in problems]


# -----------------------------------------------------------------------------
# The policy and its frozen reference

def disable_dropout(model) -> None:
    """Dropout off for good: GRPO compares log-probs of the same weights (sampling vs
    update, policy vs reference), and dropout noise would make KL > 0 at step 0. Covers
    nn.Dropout modules and the float rates attention layers read (attention_dropout)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def load_policy_and_reference(cfg: GRPOConfig, device, dtype, preloaded=None) -> tuple:
    """-> (policy, frozen reference or None (beta == 0, or LoRA), tokenizer), ready to train.
    `preloaded`: a (model, tokenizer) in memory to use instead of --model (bench.py's).
    Gradient checkpointing is switched on once: it acts only in training mode, and
    generation runs in eval mode, so nothing is toggled per step."""
    if preloaded is None:
        policy, tokenizer = plumbing.load_model_and_tokenizer(cfg.model, dtype)
    else:
        policy, tokenizer = preloaded[0].to(dtype), preloaded[1]
    policy.to(device)
    disable_dropout(policy)
    ref_model = None
    if cfg.lora_rank:  # the frozen base doubles as the reference: see reference_model
        plumbing.add_lora_adapters(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
    elif cfg.beta > 0:  # frozen copy of the starting weights; never updated, never gets .grad
        ref_model = copy.deepcopy(policy).eval().requires_grad_(False)
    if cfg.gradient_checkpointing:
        engine.enable_checkpointing(policy)
    policy.train()
    return policy, ref_model, tokenizer


@contextlib.contextmanager
def reference_model(run):
    """The frozen reference to score against. With LoRA it is the policy itself with its
    adapters switched off: the base weights never train, so they are the starting policy,
    and no second copy of the model is needed."""
    if not run.cfg.lora_rank:
        yield run.ref_model
        return
    with plumbing.adapters_off(plumbing.lora_layers(run.policy)):
        yield run.policy


class Run(NamedTuple):
    """What every step and eval of a run needs, built once by `start_run`."""
    cfg: GRPOConfig
    policy: torch.nn.Module
    tokenizer: object
    end_ids: list                            # token ids that end a completion
    ref_model: torch.nn.Module | None = None  # None when beta == 0 or with LoRA
    optimizer: object = None
    autocast: torch.dtype | None = None      # bf16 autocast over float32 weights on CPU, or None
    dist: plumbing.Dist = plumbing.Dist()
    matmul_params: int = 0                   # weights in matmuls (the output head, not the embedding lookup)
    peak_flops: float = 0.0                  # FLOP/s that MFU is measured against
    compiled: bool = False                   # the groups sampler's decode step runs compiled

    @property
    def no_template(self) -> bool:
        """A base model without a chat template: plain "Q: ... A:" prompts, graded on the first integer."""
        return not data.has_chat_template(self.tokenizer)


# -----------------------------------------------------------------------------
# Log-probs of the completion tokens, without a full-vocabulary tensor for every position.

LOGPROB_CHUNK_BYTES = 64 * 2**20  # float32 logits at once (Qwen: ~110 rows); larger chunks ran slower on CPU (docs/benchmarks.md)


class _TargetLogprob(torch.autograd.Function):
    """(logits[target] - logz, logz), logz = logsumexp(logits). The gradient,
    d logp / d logits = onehot(target) - softmax(logits), is written into the logits' own
    storage (theirs alone: the chunk recomputes them for backward), so backward allocates
    no (R, V) tensor; it is the very sum autograd forms, so gradients do not move."""

    @staticmethod
    def forward(ctx, logits, targets):
        logz = torch.logsumexp(logits, dim=-1)                                       # (R,)
        ctx.save_for_backward(logits, targets, logz)
        ctx.mark_non_differentiable(logz)
        return logits.gather(-1, targets[:, None]).squeeze(-1) - logz, logz

    @staticmethod
    def backward(ctx, grad, _):
        logits, targets, logz = ctx.saved_tensors
        grad_logits = logits.sub_(logz[:, None]).exp_().mul_(-grad[:, None])        # -g softmax
        return grad_logits.scatter_add_(-1, targets[:, None], grad[:, None]), None  # + g at the target


def _chunk_logprobs(head, hidden, targets, temperature, entropies=None):
    """log softmax(head(hidden) / T)[target] for one chunk of rows, and its entropy
    appended to `entropies` if given and still empty (backward's recompute of a
    checkpointed chunk finds it filled, and skips the work)."""
    logits = head(hidden).float()                                        # (R, V)
    if temperature != 1.0:
        logits = logits / temperature
    logp, logz = _TargetLogprob.apply(logits, targets)
    if entropies is not None and not entropies:
        with torch.no_grad():
            p_logits = (logits - logz[:, None]).exp_().mul_(logits)      # p * logits, one (R, V) tensor
            entropies.append(logz - p_logits.sum(-1))                     # H = logz - sum p * logits
    return logp


def completion_logprobs(model, rollouts: engine.Rollouts, temperature: float, autocast=None, group_size: int = 1,
                        entropy: bool = True):
    """(N, L) log-prob of each completion token under `model` at the sampling temperature,
    and (N, L) entropies (None if not `entropy`), both 0 outside the completion mask
    (padding after an end token, which no loss reads: the head, the costliest part of a
    pass's elementwise work, runs on real tokens only); differentiable when grad is enabled.
    The head runs in row chunks under activation checkpointing, so backward recomputes a
    chunk's logits instead of keeping all N * L * V of them."""
    input_ids, P = rollouts.input_ids, rollouts.prompt_len
    with precision.autocast(input_ids.device, autocast):
        hidden = engine.completion_hidden_states(model, rollouts, group_size)  # (N, L, H) predicts tokens P..
        N, L, H = hidden.shape
        real = rollouts.completion_mask.reshape(N * L).nonzero().squeeze(1)     # (T,) the tokens that count
        flat_h, flat_t = hidden.reshape(N * L, H)[real], input_ids[:, P:].reshape(N * L)[real]
        head = model.get_output_embeddings()
        rows = max(1, LOGPROB_CHUNK_BYTES // (4 * head.weight.shape[0]))
        logps, ents = [], []
        for i in range(0, len(real), rows):
            box = [] if entropy else None
            args = (head, flat_h[i:i + rows], flat_t[i:i + rows], temperature, box)
            if torch.is_grad_enabled():
                logps.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
            else:
                logps.append(_chunk_logprobs(*args))
            ents += box or []
    zeros = hidden.new_zeros(N * L, dtype=torch.float32)
    if not logps:
        return zeros.view(N, L), zeros.view(N, L) if entropy else None
    return (zeros.index_copy(0, real, torch.cat(logps)).view(N, L),
            zeros.index_copy(0, real, torch.cat(ents)).view(N, L) if entropy else None)


# -----------------------------------------------------------------------------
# Advantages and the loss

def has_spread(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """(B,) True for each group whose rewards are not all equal: the groups with a signal."""
    groups = rewards.view(-1, num_generations)
    return (groups != groups[:, :1]).any(dim=1)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """(N,) rewards -> (N,) advantages, normalised within each prompt's group:
    A_i = (r_i - mean(group)) / (std(group) + eps). A group whose rewards are all equal
    carries no signal and gets A = 0 exactly: the float32 mean of 16 rewards of 0.1 is not
    exactly 0.1, and the 7e-9 left over, divided by eps, would be an advantage of -7e-5
    that Adam turns into a full-size step when every group of a batch is like that."""
    groups = rewards.view(-1, num_generations)                         # (B, G)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    spread = has_spread(rewards, num_generations)[:, None]             # (B, 1)
    return torch.where(spread, centred, torch.zeros_like(centred)).view(-1)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, cfg: GRPOConfig, total_sequences=None, total_tokens=None):
    """PPO-clipped GRPO loss with a k3 KL penalty. Returns (loss, stats).

    logp, old_logp, ref_logp: (N, L) token log-probs under the policy (with grad), the
    policy that sampled (detached) and the frozen reference (None when beta == 0).
    advantages: (N,); mask: (N, L) bool, the completion tokens that count.

      ratio_t = exp(logp_t - old_logp_t)
      loss_t  = -min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps_high) * A) + beta * KL_t
                (eps_high = epsilon_high, or eps when that is 0: a higher upper clip lets an
                unlikely token with A > 0 grow further, DAPO's answer to entropy collapse)
      KL_t    = min(k3_t, kl_cap),  k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1
                (k3: unbiased, always >= 0; kl_cap 0 = no cap)

    Why a cap: k3 grows like exp(ref - logp), so one sampled token the policy has made 50x
    less likely than the reference did weighs ~50 against ~0.1 for a typical token, and its
    gradient (1 - exp(ref - logp)) ~ -50 outweighs the whole batch's policy gradient, which
    clipping the norm then scales down with it. A capped token keeps its value in the loss
    but gets no KL gradient (verl caps k3 at 10 the same way).

    cfg.loss_type picks how token losses become one number (|o_i| = tokens in completion i):
      grpo    : 1/N sum_i 1/|o_i| sum_t loss_it  (the seed: each completion weighs the same,
                so a token of a short completion weighs more than one of a long completion)
      dapo    : sum_i sum_t loss_it / sum_i |o_i| (every token weighs the same)
      dr_grpo : sum_i sum_t loss_it / (N * max_new_tokens)  (a constant: no length bias)
    total_sequences / total_tokens are the whole batch's counts (over micro-batches and
    ranks), so the parts' losses add up to exactly the whole batch's loss.
    """
    # Masked positions (prompt, padding, after the end token) are zeroed *before* exp():
    # masking only the output would still send 0 * inf = NaN back through exp in backward.
    zero = torch.zeros_like(logp)
    A = advantages[:, None]                                            # (N, 1)
    ratio = torch.exp(torch.where(mask, logp - old_logp, zero))        # (N, L)
    high = cfg.epsilon_high or cfg.epsilon
    clipped = torch.clamp(ratio, 1 - cfg.epsilon, 1 + high)
    per_token = -torch.min(ratio * A, clipped * A)                     # (N, L)
    if cfg.beta > 0:
        delta = torch.where(mask, ref_logp - logp, zero)
        k3 = torch.exp(delta) - delta - 1                              # (N, L)
        kl = k3.clamp(max=cfg.kl_cap) if cfg.kl_cap > 0 else k3
        per_token = per_token + cfg.beta * kl
    else:
        kl = k3 = zero
    per_token = torch.where(mask, per_token, zero)
    lengths = mask.sum(1).clamp(min=1)                                 # (N,)
    N = total_sequences if total_sequences is not None else logp.shape[0]
    T = total_tokens if total_tokens is not None else mask.sum().clamp(min=1)
    if cfg.loss_type == "grpo":
        loss = (per_token.sum(1) / lengths).sum() / N
    elif cfg.loss_type == "dapo":
        loss = per_token.sum() / T
    elif cfg.loss_type == "dr_grpo":
        loss = per_token.sum() / (N * cfg.max_new_tokens)
    else:
        raise ValueError(f"unknown loss_type {cfg.loss_type!r}")
    with torch.no_grad():
        m = mask.float()
        n_tok = m.sum().clamp(min=1)
        is_clipped = ((ratio < 1 - cfg.epsilon) & (A < 0)) | ((ratio > 1 + high) & (A > 0))
        worst = float(torch.where(mask, k3, zero).max()) if mask.numel() else 0.0
        stats = {"kl": float((kl * m).sum() / n_tok), "kl_max": worst,
                 "clip_frac": float((is_clipped.float() * m).sum() / n_tok),
                 "ratio_mean": float((ratio * m).sum() / n_tok), "tokens": float(m.sum())}
    return loss, stats


# -----------------------------------------------------------------------------
# Evaluation: greedy accuracy on a fixed val set of distinct problems.

def evaluate(run: Run, problems) -> dict:
    """Greedy accuracy and format rate on a fixed val set, plus a few samples to read.
    With N ranks each answers every N-th problem; the answers are gathered in order."""
    cfg, dist = run.cfg, run.dist
    mine = problems[dist.rank::dist.world]
    size = max(1, min(cfg.eval_batch_size, len(mine)))  # a rank may hold no problems at all
    # A compiled sampler records a graph per batch shape, so a short last chunk is topped up with copies.
    static = engine.choose_sampler(cfg.sampler, run.policy.device) == "static" or run.compiled
    texts = []
    for i in range(0, len(mine), size):
        prompts = prompts_for(run.tokenizer, mine[i:i + size])
        n = len(prompts)
        if static:
            prompts += prompts[-1:] * (size - n)
        with plumbing.lora_merged(run.policy), precision.autocast(run.policy.device, run.autocast):
            texts += engine.generate_rollouts(run.policy, run.tokenizer, prompts, 1, cfg.max_new_tokens, 1.0,
                                              run.end_ids, greedy=True, sampler=cfg.sampler,
                                              compiled=run.compiled).texts[:n]
    parts = plumbing.gather_objects(texts, dist)
    texts = [parts[i % dist.world][i // dist.world] for i in range(len(problems))]  # back in val order
    grades = [grade(text, problem, run.no_template) for problem, text in zip(problems, texts)]
    n, correct = len(grades), sum(g.correct for g in grades)
    by_category = {}
    for problem, g in zip(problems, grades):
        by_category.setdefault(data.problem_category(problem), []).append(g.correct)
    return {"accuracy": correct / n, "accuracy_ci95": wilson_interval(correct, n),
            "format_rate": sum(is_formatted(g, run.no_template) for g in grades) / n,
            "reward_mean": sum(g.reward for g in grades) / n, "n": n,
            "by_category": {c: {"n": len(v), "accuracy": sum(v) / len(v)} for c, v in sorted(by_category.items())},
            "samples": [{"question": data.problem_question(p), "completion": t, "reward": g.reward}
                        for p, t, g in list(zip(problems, texts, grades))[:3]]}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> list:
    """95% Wilson interval for successes / n: unlike the normal approximation it stays
    inside [0, 1] and is honest at 0/n, where a base model starts."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [0.0 if successes == 0 else centre - half, 1.0 if successes == n else centre + half]


def is_formatted(g: Grade, no_template: bool) -> bool:
    """Chat prompts ask for both tag pairs; a plain prompt only for an answer."""
    return g.has_answer if no_template else (g.has_think and g.has_answer)


# -----------------------------------------------------------------------------
# The run: set-up, the loop, one GRPO step, and its update.

def log(dist: plumbing.Dist, line: str) -> None:
    """One process speaks for all, above the progress bar."""
    if dist.is_main:
        from tqdm import tqdm
        tqdm.write(line)


def start_run(cfg: GRPOConfig, preloaded=None) -> tuple:
    """Everything before the first step: processes, output checks, device and dtype, the
    models and optimizer, a checkpoint to resume, and the numerics. -> (run, metrics, step)."""
    dist = plumbing.init_distributed(cfg.dist_timeout_minutes, cpu_only=cfg.device == "cpu")
    paths = plumbing.run_paths(cfg.output_dir)
    plumbing.check_outputs(cfg, paths, delete=dist.is_main)
    plumbing.barrier(dist)
    if dist.is_main:
        tracking.require(cfg.report_to)  # a missing package fails now, not after loading the model
    device, dtype, device_line = precision.choose_runtime(cfg)
    log(dist, "config: " + json.dumps(dataclasses.asdict(cfg)))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    t0 = time.perf_counter()
    policy, ref_model, tokenizer = load_policy_and_reference(cfg, device, dtype, preloaded)
    optimizer = precision.make_optimizer(cfg, policy)
    metrics = {"config": dataclasses.asdict(cfg), "steps": [], "eval": []}
    start_step, ckpt = 0, None
    if cfg.resume:
        ckpt = plumbing.latest_checkpoint(paths.checkpoints)
        with precision.masters_in_model(optimizer):  # float32 masters restored exactly
            state = plumbing.load_checkpoint(ckpt, policy, dist.world)
        optimizer.load_state_dict(state["optimizer"])
        start_step, metrics = state["step"], state["metrics"]
        metrics["config"] = dataclasses.asdict(cfg)
        if dist.is_main:
            plumbing.drop_samples_after(paths.samples, start_step)  # those steps run again
    # Timed once per run; rank 0 decides for all, and a resumed run keeps its numerics.
    width = getattr(policy.config, "hidden_size", 1024)
    autocast, why = precision.choose_cpu_autocast(cfg, device, dtype, width, metrics.get("cpu_autocast"))
    onednn, linear_why = precision.choose_cpu_linear(cfg, device, autocast or dtype, width, metrics.get("cpu_onednn"))
    chosen = [float(autocast is not None), float(onednn)] if dist.is_main else [0.0, 0.0]
    autocast_on, onednn = (x > 0 for x in plumbing.all_reduce_floats(chosen, dist))
    autocast = torch.bfloat16 if autocast_on else None
    metrics["cpu_autocast"], metrics["cpu_onednn"] = autocast_on, onednn
    if onednn:
        for model in (policy, ref_model):  # ref_model is None without KL and under LoRA
            if model is not None:
                precision.route_linears_to_onednn(model)
    why = ", ".join(w for w in (why, linear_why) if w)
    sampler = engine.choose_sampler(cfg.sampler, device)
    compiled = sampler == "groups" and engine.choose_compile(cfg.compile, device)
    sampler += " sampler" + (", compiled decode step" if compiled else "")
    processes = f"; {dist.world} processes ({torch.distributed.get_backend()})" if dist.world > 1 else ""
    peak, source = precision.peak_flops(device, autocast or dtype, width, onednn)
    matmul_params = sum(m.weight.numel() for m in policy.modules() if isinstance(m, torch.nn.Linear))
    metrics["runtime"] = {"device": f"{device_line}{f', {why}' if why else ''}; {sampler}{processes}; "
                                    f"MFU against {peak / 1e12:.3g} TFLOP/s ({source})",
                          "peak_flops": peak, "matmul_params": matmul_params,
                          "trainable_params": sum(p.numel() for p in policy.parameters() if p.requires_grad),
                          **plumbing.provenance()}
    run = Run(cfg, policy, tokenizer, engine.end_token_ids(tokenizer, policy), ref_model, optimizer, autocast, dist,
              matmul_params, peak, compiled)
    log(dist, f"device: {metrics['runtime']['device']}")
    trainable = metrics["runtime"]["trainable_params"]
    lora = f", {trainable / 1e6:.2f}M in LoRA rank-{cfg.lora_rank} adapters train" if cfg.lora_rank else ""
    log(dist, f"model: {cfg.model} ({sum(p.numel() for p in policy.parameters()) / 1e6:.0f}M params{lora}, loaded in "
              f"{time.perf_counter() - t0:.0f}s), {'plain Q/A' if run.no_template else 'chat'} prompts, "
              f"end tokens {run.end_ids}")
    if ckpt is not None:
        log(dist, f"resumed from {ckpt} at step {start_step}")
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    return run, metrics, start_step


def train(cfg: GRPOConfig, preloaded=None) -> dict:
    """Eval at step 0, then num_iterations GRPO steps, each logged, and evaluated, plotted,
    sampled and checkpointed on schedule; then saved_model/. Returns the metrics."""
    from tqdm import tqdm

    import plot_metrics

    run, metrics, start_step = start_run(cfg, preloaded)
    dist, paths, val = run.dist, plumbing.run_paths(cfg.output_dir), eval_problems(cfg)
    tracker = tracking.Tracker(cfg, metrics, start_step, dist)

    def run_eval(step):
        t = time.perf_counter()
        rec = {"step": step, **evaluate(run, val)}
        rec["seconds"] = time.perf_counter() - t
        metrics["eval"].append(rec)
        tracker.log_eval(rec)
        log(dist, eval_line(rec))

    with tracker, plumbing.StopFlag() as stop, tqdm(total=cfg.num_iterations, initial=start_step, desc="GRPO",
                                                    dynamic_ncols=True, file=sys.stderr,
                                                    disable=not dist.is_main) as bar:
        if start_step == 0:
            run_eval(0)
            if dist.is_main:
                plumbing.write_json(paths.metrics, metrics)
        for step in range(start_step + 1, cfg.num_iterations + 1):
            try:
                record, rows = grpo_step(run, step)
            except engine.NonFiniteLogits as err:
                raise diverged(run, paths, step - 1, metrics, err) from None
            metrics["steps"].append(record)
            sampled = step % cfg.sample_every == 0 or step == 1
            tracker.log_step(record, rows[:3] if sampled else None)
            recent = [r["step_seconds"] for r in metrics["steps"][-20:]]
            log(dist, progress_line(record, cfg.num_iterations, (cfg.num_iterations - step) * sum(recent) / len(recent)))
            if step % cfg.eval_every == 0 or step == cfg.num_iterations:
                try:
                    run_eval(step)
                except engine.NonFiniteLogits as err:
                    raise diverged(run, paths, step, metrics, err) from None
            if dist.is_main:
                plumbing.write_json(paths.metrics, metrics)
                if sampled:
                    plumbing.append_samples(paths.samples, rows)
                if step % cfg.plot_every == 0 or step == cfg.num_iterations:
                    plot_metrics.plot_all(metrics, cfg.output_dir)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", acc=f"{record['accuracy']:.2f}",
                            kl=f"{record['kl']:.4f}")
            bar.update(1)
            # a signal may reach one rank only: all stop together, after the same step
            stopping = plumbing.all_reduce_floats([float(stop.requested)], dist, op="max")[0] > 0
            if (cfg.save_every and step % cfg.save_every == 0) or stopping:
                if dist.is_main:
                    with precision.masters_in_model(run.optimizer):  # a bf16 run saves its float32 masters
                        plumbing.save_checkpoint(paths.checkpoints, step, run.policy, run.optimizer, metrics,
                                                 world=dist.world)
                plumbing.barrier(dist)
                if stopping:
                    launch = "python" if dist.world == 1 else f"torchrun --nproc_per_node {dist.world}"
                    log(dist, f"saved {paths.checkpoints / f'step_{step:06d}'}; continue with: {launch} "
                              f"train_grpo.py --resume --output_dir {cfg.output_dir}")
                    return metrics
    if dist.is_main:
        with precision.masters_in_model(run.optimizer):
            plumbing.save_final_model(paths.saved_model, run.policy, run.tokenizer, cfg)
    plumbing.barrier(dist)
    first, last = metrics["eval"][0], metrics["eval"][-1]
    log(dist, f"done: greedy val accuracy {first['accuracy']:.3f} (step {first['step']}) -> "
              f"{last['accuracy']:.3f} (step {last['step']}); model saved to {paths.saved_model}")
    return metrics


def diverged(run: Run, paths, step: int, metrics: dict, err) -> plumbing.UsageError:
    """Saves the state that gave non-finite logits apart from checkpoints/step_*, so that
    --resume never picks it up, and returns the error that ends the run."""
    if run.dist.is_main:
        with precision.masters_in_model(run.optimizer):
            plumbing.save_checkpoint(paths.checkpoints / "diverged", step, run.policy, run.optimizer, metrics,
                                     world=run.dist.world, keep=1)
    plumbing.barrier(run.dist)
    return plumbing.UsageError(f"{err}: the weights have diverged. Their state after step {step} is in "
                               f"{paths.checkpoints / 'diverged'} for inspection; resume from the last "
                               f"checkpoint (--resume) with a lower --learning_rate")


# How each rank's value of a step becomes the whole batch's. Ranks hold equal numbers of
# completions, so means average; the update's statistics are already each rank's share
# of the whole batch, so they add; times, memory and the worst KL are the largest, and
# counts every rank already holds for the whole batch stay as they are.
OVER_RANKS = {**dict.fromkeys(("reward_mean", "reward_sq", "accuracy", "format_rate", "zero_spread_frac",
                               "completion_len", "truncated_frac", "prompt_len"), "mean"),
              **dict.fromkeys(("loss", "kl", "clip_frac", "ratio_mean", "entropy", "groups_sampled",
                               "groups_trained", "groups_guided", "flops"), "sum"),
              **dict.fromkeys(("kl_max", "step_seconds", "gen_seconds", "peak_memory_gb", "ref_seconds",
                               "train_seconds", "optimizer_seconds", "tokens_trained"), "max")}


def sample_and_grade(run: Run, problems) -> tuple:
    """G completions of each problem, sampled from softmax(logits / T), and their grades."""
    prompts = prompts_for(run.tokenizer, problems)
    with plumbing.lora_merged(run.policy), precision.autocast(run.policy.device, run.autocast):
        rollouts = engine.generate_rollouts(run.policy, run.tokenizer, prompts, run.cfg.num_generations,
                                            run.cfg.max_new_tokens, run.cfg.temperature, run.end_ids,
                                            sampler=run.cfg.sampler, compiled=run.compiled)
    G = run.cfg.num_generations
    return prompts, rollouts, [grade_of(run, text, problems[i // G]) for i, text in enumerate(rollouts.texts)]


def grade_of(run: Run, completion: str, problem: dict) -> Grade:
    """A training reward: the grade, with --partial_credit for a near miss."""
    g = grade(completion, problem, run.no_template)
    return with_partial_credit(g, completion, problem, run.cfg.partial_credit, run.no_template)


def worked_solutions_for(run: Run, problems, grades) -> list:
    """--worked_solutions: for each group none of whose G completions is right, the (token
    ids, text) of a worked solution to train on in place of its last completion; else None.

    Off-policy guidance, after LUFFY (Yan et al., 2025) without its policy shaping: where the
    policy never samples the right answer (at first, most subtractions with a negative
    answer) its group has no right answer to reinforce, and partial credit can only rank
    wrong ones. The solution is scored as if the policy had sampled it: its old log-probs
    are the policy's own, so its ratio starts at 1, and its gradient is A * grad log
    p(solution), a supervised step weighted by its advantage. It costs the group one
    sampled completion; a solution longer than max_new_tokens is not used."""
    G, tok = run.cfg.num_generations, run.tokenizer
    if not run.cfg.worked_solutions:
        return [None] * len(problems)
    out = []
    for g, problem in enumerate(problems):
        text = data.worked_solution(problem, tagged=not run.no_template)
        if text is None or any(x.correct for x in grades[g * G:(g + 1) * G]):
            out.append(None)
            continue
        ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
        out.append((ids, text) if len(ids) <= run.cfg.max_new_tokens else None)
    return out


def rounds_to_sample_next(have: int, sampled: int, batch_size: int, left: int) -> int:
    """Dynamic sampling: how many of the rounds left to sample in one call, given that `have`
    of the `sampled` groups so far have spread. Decoding costs more per step than per row,
    so the rounds the batch is expected to need (at the share with spread seen so far) cost
    less in one call than one by one; a round more than needed is a round's worth of waste."""
    if have == 0:
        return left
    prompts = -(-(batch_size - have) * sampled // have)  # ceil: integer maths, no float edge
    return min(left, -(-prompts // batch_size))


def grpo_step(run: Run, step: int) -> tuple:
    """Sample -> grade -> advantages -> update. Returns (metrics record, sample rows),
    both over all ranks."""
    cfg, G = run.cfg, run.cfg.num_generations
    start = time.perf_counter()
    torch.manual_seed(plumbing.seed_for(cfg.seed, step, run.dist.rank))
    # 1. a group of G completions per prompt, graded. Dynamic sampling (DAPO) keeps drawing
    #    rounds of new prompts until batch_size groups have rewards that differ: a group
    #    whose rewards are all equal has advantage 0 and would only dilute the batch. After
    #    the first round, the rounds it expects to need are sampled in one call.
    #    With --worked_solutions a group none of whose completions is right will train on a
    #    worked solution, so it counts as having spread.
    problems, prompts, parts, grades, solutions, non_finite = [], [], [], [], [], False
    rounds, done, take = cfg.max_sampling_rounds if cfg.dynamic_sampling else 1, 0, 1
    while done < rounds:
        round_problems = [p for r in range(done, done + take) for p in train_problems(cfg, step, run.dist, r)]
        try:
            round_prompts, rollouts, round_grades = sample_and_grade(run, round_problems)
        except engine.NonFiniteLogits:
            non_finite = True
            break
        problems += round_problems
        prompts += round_prompts
        parts.append(rollouts)
        grades += round_grades
        solutions += worked_solutions_for(run, round_problems, round_grades)
        done += take
        own_spread = has_spread(torch.tensor([g.reward for g in grades]), G)  # the policy's own samples
        spread = own_spread | torch.tensor([s is not None for s in solutions], dtype=torch.bool)
        have = int(spread.sum())
        if have >= cfg.batch_size:
            break
        take = rounds_to_sample_next(have, len(problems), cfg.batch_size, rounds - done)
    if plumbing.all_reduce_floats([float(non_finite)], run.dist, op="max")[0] > 0:  # every rank stops together
        raise engine.NonFiniteLogits(f"step {step}: the policy's logits hold NaN or infinity")
    gen_seconds = time.perf_counter() - start
    # 2. worked solutions in place of each unsolved group's last completion, advantages, and
    #    the groups to train on: all of them, or with dynamic sampling the first batch_size with spread
    rollouts, own_grades = engine.concat_rollouts(parts, run.tokenizer.pad_token_id), grades
    guided = {g * G + G - 1: solution for g, solution in enumerate(solutions) if solution is not None}
    if guided:
        rollouts = engine.with_completions(rollouts, guided, run.tokenizer.pad_token_id)
        grades = [grade_of(run, rollouts.texts[i], problems[i // G]) if i in guided else g for i, g in enumerate(grades)]
    texts = rollouts.texts
    rewards = torch.tensor([g.reward for g in grades], dtype=torch.float32)
    advantages = group_advantages(rewards, G, cfg.scale_rewards)
    trained = spread.nonzero().flatten()[:cfg.batch_size].tolist() if cfg.dynamic_sampling else range(len(problems))
    trained_advantages = advantages
    if len(trained) < len(problems):
        keep = [g * G + j for g in trained for j in range(G)]
        rollouts, trained_advantages = rollouts.rows(keep), advantages[keep]
    # 3. log-probs, the clipped loss with its KL, and the optimizer step
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate_at(cfg, step)
    update = policy_update(run, rollouts, trained_advantages.to(rollouts.input_ids.device))
    lengths = torch.cat([r.completion_mask.sum(1).float() for r in parts])
    truncated = torch.cat([r.truncated.float() for r in parts])
    prompt_lens = torch.cat([r.attention_mask[::G, :r.prompt_len].sum(1).float() for r in parts])
    own_rewards = torch.tensor([g.reward for g in own_grades], dtype=torch.float32)  # the policy's, not the solutions'
    record = plumbing.reduce_over_ranks({
        "reward_mean": float(own_rewards.mean()), "reward_sq": float((own_rewards ** 2).mean()),
        "accuracy": sum(g.correct for g in own_grades) / len(own_grades),
        "format_rate": sum(is_formatted(g, run.no_template) for g in own_grades) / len(own_grades),
        "zero_spread_frac": float(1 - own_spread.float().mean()),
        "groups_sampled": len(problems), "groups_trained": len(trained),
        "groups_guided": sum(g * G + G - 1 in guided for g in trained),
        "completion_len": float(lengths.mean()), "truncated_frac": float(truncated.mean()),
        "prompt_len": float(prompt_lens.mean()), "flops": step_flops(run, parts, rollouts),
        **update, "learning_rate": run.optimizer.param_groups[0]["lr"],
        "step_seconds": time.perf_counter() - start, "gen_seconds": gen_seconds,
        "peak_memory_gb": plumbing.peak_memory_gb(rollouts.input_ids.device),
    }, OVER_RANKS, run.dist)
    if record["groups_trained"] == 0:
        log(run.dist, f"step {step}: none of the {record['groups_sampled']:.0f} groups sampled had rewards that "
                      f"differ, so there is nothing to learn from: update skipped")
    elif record["tokens_trained"] == 0:
        log(run.dist, f"step {step}: every completion trained on was cut off at --max_new_tokens, and "
                      f"--mask_truncated_completions gives those no loss: update skipped")
    n = len(grades) * run.dist.world
    variance = max(record.pop("reward_sq") - record["reward_mean"] ** 2, 0.0) * n / max(n - 1, 1)
    record = {"step": step, **record, "reward_std": math.sqrt(variance),
              "tokens_per_second": record["completion_len"] * n / record["step_seconds"],
              "mfu": record["flops"] / record["step_seconds"] / (run.peak_flops * run.dist.world)}
    rows = [{"step": step, "question": data.problem_question(problems[i // G]), "completion": text,
             "reward": g.reward, "correct": g.correct, "advantage": float(advantages[i]),
             "worked_solution": i in guided,
             "prompt": prompts[i // G] if i % G == 0 else None}  # once per group: prompts are long
            for i, (text, g) in enumerate(zip(texts, grades))]
    return record, [row for part in plumbing.gather_objects(rows, run.dist) for row in part]


def learning_rate_at(cfg: GRPOConfig, step: int) -> float:
    """Cosine decay (nanoGPT's, without warmup) from learning_rate at step 1 to
    final_lr_ratio x learning_rate at the last: late updates, made once the policy's entropy
    has collapsed, move greedy answers less. A function of the step alone, so a resume
    continues it exactly."""
    progress = (step - 1) / max(cfg.num_iterations - 1, 1)
    return cfg.learning_rate * (cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_flops(run: Run, sampled, trained: engine.Rollouts) -> float:
    """The step's model FLOPs, as MFU counts them: 2 per matmul weight per token for each
    forward pass and 4 more for its backward, over the real tokens (a group's prompt once,
    each completion up to its end): sampling every round, then on the trained batch the
    reference and old-policy passes and the updates. Padding, recompute under gradient
    checkpointing and attention's own FLOPs (a few % at these lengths) are not counted;
    with LoRA the frozen weights' backward is half as large."""
    G, cfg = run.cfg.num_generations, run.cfg

    def tokens(r):
        return float(r.attention_mask[::G, :r.prompt_len].sum() + r.completion_mask.sum())

    forward_passes = int(cfg.beta > 0) + int(cfg.num_inner_updates > 1)
    update_passes = 2 if cfg.lora_rank else 3  # frozen weights need no weight gradients: half the backward
    per_token = 2 * run.matmul_params
    return per_token * (sum(tokens(r) for r in sampled) +
                        tokens(trained) * (forward_passes + update_passes * cfg.num_inner_updates))


def policy_update(run: Run, rollouts: engine.Rollouts, advantages) -> dict:
    """num_inner_updates optimizer steps on one batch; returns the update's statistics, this
    rank's share of each. A step whose loss or gradient norm is not finite is not applied
    (and is counted)."""
    cfg, policy, dist = run.cfg, run.policy, run.dist
    N = rollouts.input_ids.shape[0]
    rows_per_pass = cfg.micro_batch_size or max(N, 1)
    parts = [slice(i, i + rows_per_pass) for i in range(0, N, rows_per_pass)]
    if cfg.mask_truncated_completions:  # a cut-off answer is neither right nor wrong: no loss at all
        rollouts = rollouts._replace(completion_mask=rollouts.completion_mask & ~rollouts.truncated[:, None])
    mask = rollouts.completion_mask
    # Normalised by the whole batch's counts over all ranks: summed gradients equal one process's.
    # (Ranks hold the same number of sequences, except under dynamic sampling.)
    total_sequences, total_tokens = plumbing.all_reduce_floats([float(N), float(mask.sum())], dist)
    # Nothing to learn from, on any rank: dynamic sampling found no group with a signal, or
    # every completion kept was cut off and --mask_truncated_completions gives those no loss.
    if total_sequences == 0 or total_tokens == 0:
        nothing = float("nan")
        return dict(loss=nothing, kl=nothing, clip_frac=nothing, ratio_mean=nothing, entropy=nothing, kl_max=nothing,
                    grad_norm=nothing, skipped_updates=cfg.num_inner_updates, tokens_trained=total_tokens,
                    ref_seconds=0.0, train_seconds=0.0, optimizer_seconds=0.0)
    tokens_trained, total_tokens = total_tokens, torch.tensor(total_tokens, device=mask.device)
    group = engine.prompt_group_size(policy, rows_per_pass, cfg.num_generations)  # the same for every pass

    def logprobs_of(model):  # (N, L), no grad, in the same parts as the update
        if not parts:
            return mask.float()
        with torch.no_grad():
            return torch.cat([completion_logprobs(model, rollouts.rows(s), cfg.temperature, run.autocast, group,
                                                  entropy=False)[0]
                              for s in parts])

    clock = plumbing.PhaseClock(mask.device)
    ref_logp = None
    if cfg.beta > 0:
        with reference_model(run) as reference:
            ref_logp = logprobs_of(reference)
    # With one inner update the sampling policy is the current one: its log-probs, detached, serve.
    old_logp = logprobs_of(policy) if cfg.num_inner_updates > 1 else None
    seconds = {"ref_seconds": clock.lap(), "train_seconds": 0.0, "optimizer_seconds": 0.0}
    params = [p for p in policy.parameters() if p.requires_grad]
    sums = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "ratio_mean": 0.0, "entropy": 0.0}
    skipped, grad_norm, kl_max = 0, float("nan"), 0.0
    for _ in range(cfg.num_inner_updates):
        run.optimizer.zero_grad(set_to_none=True)
        loss_total = 0.0
        for s in parts:
            part = rollouts.rows(s)
            logp, entropy = completion_logprobs(policy, part, cfg.temperature, run.autocast, group)
            old = old_logp[s] if old_logp is not None else logp.detach()
            loss, stats = grpo_loss(logp, old, None if ref_logp is None else ref_logp[s], advantages[s],
                                    part.completion_mask, cfg, total_sequences, total_tokens)
            if loss.requires_grad:  # a part whose rows are all masked reaches no weight
                loss.backward()
            loss_total += loss.item()
            kl_max = max(kl_max, stats["kl_max"])
            token_share = stats["tokens"] / float(total_tokens)  # token-weighted means over the parts
            for key in ("kl", "clip_frac", "ratio_mean"):
                sums[key] += stats[key] * token_share / cfg.num_inner_updates
            sums["entropy"] += float(entropy[part.completion_mask].sum()) / float(total_tokens) / cfg.num_inner_updates
        for p in params:  # a rank with no group or no unmasked token: the all-reduce needs its (zero) share
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        seconds["train_seconds"] += clock.lap()
        plumbing.all_reduce_gradients(params, dist)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm))
        sums["loss"] += loss_total / cfg.num_inner_updates
        whole_loss = plumbing.all_reduce_floats([loss_total], dist)[0]  # every rank must take the same decision
        if math.isfinite(whole_loss) and math.isfinite(grad_norm):
            run.optimizer.step()
        else:
            skipped += 1
        run.optimizer.zero_grad(set_to_none=True)
        seconds["optimizer_seconds"] += clock.lap()
    return dict(sums, kl_max=kl_max, grad_norm=grad_norm, skipped_updates=skipped, tokens_trained=tokens_trained,
                **seconds)


def progress_line(rec: dict, total: int, eta_seconds: float) -> str:
    groups = "" if rec["groups_sampled"] == rec["groups_trained"] else \
        f"groups {rec['groups_trained']:.0f}/{rec['groups_sampled']:.0f} trained | "
    if rec["groups_guided"]:
        groups += f"guided {rec['groups_guided']:.0f}/{rec['groups_trained']:.0f} | "
    return (f"step {rec['step']}/{total} | reward {rec['reward_mean']:.3f} (acc {rec['accuracy']:.2f}, "
            f"fmt {rec['format_rate']:.2f}) | kl {rec['kl']:.4f} | clip {rec['clip_frac']:.3f} | "
            f"len {rec['completion_len']:.0f} | {groups}dt {rec['step_seconds']:.1f}s (mfu {100 * rec['mfu']:.1f}%) | "
            f"eta {eta_seconds / 60:.1f}m")


def eval_line(rec: dict) -> str:
    lo, hi = rec["accuracy_ci95"]
    parts = ", ".join(f"{c} {v['accuracy']:.2f}" for c, v in rec["by_category"].items())
    return (f"eval @ step {rec['step']}: greedy accuracy {rec['accuracy']:.3f} (95% CI {lo:.2f}-{hi:.2f}; {parts}), "
            f"format {rec['format_rate']:.3f} on {rec['n']} val problems ({rec['seconds']:.0f}s)")


def main(argv=None, preloaded=None) -> int:
    """The command line: parse, train, and turn a plumbing.UsageError into one line and exit code 2.
    `preloaded`: see load_policy_and_reference."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(usage_text())
        return 0
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # `> log.txt` shows each step as it ends
    # Read by PyTorch when CUDA's allocator starts, so set before anything touches CUDA.
    # Expandable segments stop fragmentation OOMs from generate's varying tensor shapes.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun: say things once, not once per process
    try:
        cfg = parse_args(argv)
    except plumbing.UsageError as err:
        if rank == 0:
            print(f"train_grpo.py: error: {err}", file=sys.stderr)
        return 2
    if rank == 0 and cfg.eval_size < 100:
        print(f"note: --eval_size {cfg.eval_size} < 100: val accuracy will be too noisy to compare runs")
    if rank == 0 and cfg.preset == "cpu" and "--preset" not in " ".join(argv):
        print("No CUDA device: running --preset cpu (bundled SmolLM2-135M, arithmetic). "
              "Pass --preset none for the seed config anyway.")
    try:
        train(cfg, preloaded)
    except plumbing.UsageError as err:
        print(f"train_grpo.py: error: {f'[rank {rank}] ' if rank else ''}{err}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
