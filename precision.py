"""Device, numerics and the optimizer: which dtype a run computes in, and updates that survive it.

What it buys: a bf16 model trains through float32 master weights with stochastic
rounding, so steps far below bf16 precision still add up; CPU bf16 autocast, and the
kernels of float32 linear layers on CPU, are chosen by timing, since capability flags do
not predict speed. What it costs: 4 bytes per parameter for the masters and one rounding
pass per step (--master_weights false turns them off), and a fraction of a second at
start for the timing.
"""

import contextlib
import logging
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import plumbing

# On CPUs with AVX512-BF16 bitsandbytes warns at import (ours, or peft's) that a 4-bit
# kernel package is missing; we use no 4-bit kernels, so that line would only be noise.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# -----------------------------------------------------------------------------
# Device and dtype, chosen once and said once.

def cpu_has_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX). Asked of oneDNN,
    which reads CPUID itself, because /proc/cpuinfo in a VM may hide the flags. Without
    those units bf16 matmuls are emulated, orders of magnitude slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def weights_note(cfg, dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "float32 weights"
    if cfg.lora_rank:
        return f"{dtype_name(dtype)} frozen weights, float32 LoRA adapters"
    if cfg.master_weights:
        return f"{dtype_name(dtype)} weights, float32 master copy in the optimizer"
    return f"{dtype_name(dtype)} weights, no master copy (--master_weights false: steps below bf16 precision are lost)"


def choose_runtime(cfg):
    """-> (device, weight dtype, one-line reason). Raises UsageError. CPU autocast is
    decided once the model's width is known (choose_cpu_autocast)."""
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise plumbing.UsageError("--device cuda but this PyTorch sees no CUDA device; use --device cpu or --preset cpu")
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and cuda) else "cpu"
    if device == "cuda":
        name, cap = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
        if cfg.dtype in ("auto", "bfloat16") and not torch.cuda.is_bf16_supported():
            raise plumbing.UsageError(f"{name} has no bfloat16 support; pass --dtype float32")
        dtype = torch.float32 if cfg.dtype == "float32" else torch.bfloat16
        tf32 = ""
        if dtype == torch.float32 and cap >= (8, 0):
            # float32 matmuls on tensor cores with 10-bit mantissa inputs, float32 sums: several
            # times faster on Ampere and later; the sampler's softmax stays full float32
            torch.set_float32_matmul_precision("high")
            tf32 = ", TF32 matmuls"
        return device, dtype, f"cuda ({name}, SM {cap[0]}.{cap[1]}), {weights_note(cfg, dtype)}{tf32}"
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    return device, dtype, f"cpu ({weights_note(cfg, dtype)})"


def matmul_gflops(width: int, dtype: torch.dtype, rows: int = 256, reps: int = 5, device: str = "cpu",
                  linear=torch.nn.functional.linear) -> float:
    """Throughput of a linear layer from `width` to 4 * width (an MLP up-projection) on
    `rows` inputs, by `linear`, from the fastest of `reps` calls: a VM's noise only ever
    makes a call slower."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(rows, width, generator=gen).to(device, dtype)
    w = torch.randn(4 * width, width, generator=gen).to(device, dtype)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    linear(a, w)  # warm-up: first calls pick kernels
    fastest = float("inf")
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        linear(a, w)
        sync()
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * rows * width * 4 * width / fastest / 1e9


# Dense bf16 datasheet peaks (TFLOP/s); TF32 float32 matmuls peak at half. First match wins.
GPU_PEAK_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "H20": 148, "A100": 312, "L40S": 362,
                   "RTX 4090": 165, "A10G": 70, "L4": 121}


def peak_flops(device, dtype: torch.dtype, width: int, onednn: bool = False) -> tuple:
    """-> (FLOP/s, where the figure comes from): the rate MFU is reported against. A known
    GPU's datasheet peak; otherwise, and on every CPU, the measured rate of a matmul of the
    model's width in the dtype it computes in, by the kernels the run uses (`onednn`: see
    choose_cpu_linear). A CPU has no honest datasheet figure: its clock and the VM's share
    of it vary."""
    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                scale = 1.0 if dtype == torch.bfloat16 else 0.5
                return tflops * scale * 1e12, f"{name} datasheet {dtype_name(dtype)} peak"
        return matmul_gflops(width, dtype, device="cuda", rows=4096) * 1e9, f"measured {dtype_name(dtype)} matmul"
    # 2048 rows and the best of 10: a call long enough for the clock, enough calls to find a quiet one
    linear, by = (onednn_linear, " by oneDNN") if onednn else (torch.nn.functional.linear, "")
    return matmul_gflops(width, dtype, rows=2048, reps=10, linear=linear) * 1e9, f"measured {dtype_name(dtype)} matmul{by}"


def choose_cpu_autocast(cfg, device, dtype, width: int, resumed=None) -> tuple:
    """-> (torch.bfloat16 or None, what was chosen and why: "" where autocast does not apply).

    On CPU, bf16 autocast over float32 weights is faster on some machines with bf16 units
    and slower on others with the same flags, so `auto` times a float32 and a bf16 matmul
    of the model's width. Only where oneDNN reports bf16 units: emulated bf16 is never
    faster, and even timing it takes seconds. A resumed run (`resumed`: the choice it
    started with) keeps its numerics."""
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


def autocast(device, autocast_dtype):
    """torch.autocast to `autocast_dtype`, or nothing when it is None."""
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=str(device).split(":")[0], dtype=autocast_dtype)


# -----------------------------------------------------------------------------
# Float32 linear layers on CPU through oneDNN.
#
# What it buys: torch sends a float32 matmul on CPU to its BLAS (MKL in the x86 wheels),
# and MKL is known to pick its AVX2 code on CPUs not Intel's, where oneDNN uses AVX-512:
# on an AMD EPYC, MKL ran at less than half oneDNN's rate. With autograd off (sampling,
# eval, the reference model) a layer also keeps its weight reordered into oneDNN's
# blocked layout, which a plain weight is reordered into on every call: decoding one
# token a step over a few dozen rows is mostly that. What it costs: an autograd function
# of our own for the backward, sums in another order (float32 all the same, so results
# move by rounding only), and a second copy of each weight while its packed copy lives.

def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """x W^T + b by oneDNN's float32 GEMM (the op torch.compile's CPU backend calls)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


# oneDNN picks the blocked layout for a number of rows; a one-row hint picks a slow one
# for batches, while any batch-sized hint served decode steps and scoring passes alike.
PACK_ROWS = 64
_optimizer_steps = 0  # a packed weight is kept for one value of this, see OneDNNLinear


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    # fused AdamW writes weights without bumping their version counter, so a packed copy
    # cannot tell by itself that its weight moved: every optimizer step retires them all
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class _Packed:
    """A layer's weight in oneDNN's layout and what it was made from. A deepcopy of the
    layer starts without one: torch cannot copy the opaque tensor."""
    key, weight = None, None

    def __deepcopy__(self, memo):
        return _Packed()


class _OneDNNLinearFunction(torch.autograd.Function):
    """y = x W^T + b and its gradients, dx = dy W, dW = dy^T x, db = sum dy, each by oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = onednn_linear(grad, weight.t()) if ctx.needs_input_grad[0] else None
        grad_w = onednn_linear(rows.t(), x.reshape(-1, x.shape[-1]).t()) if ctx.needs_input_grad[1] else None
        grad_b = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class OneDNNLinear(torch.nn.Linear):
    """An nn.Linear whose products, forward and backward, run through oneDNN. Where no
    gradient is needed it computes with a packed copy of its weight, made on first use
    and kept while the weight's storage, version and the count of optimizer steps stay
    as they were; a forward that needs gradients drops it (the weight is about to move)."""

    def forward(self, x):
        if torch.compiler.is_compiling():  # inductor picks its own kernels, and cannot lower this op on a plain weight
            return super().forward(x)
        trainable = self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
        if torch.is_grad_enabled() and (x.requires_grad or trainable):  # the packed op has no backward
            self.__dict__.pop("packed", None)
            return _OneDNNLinearFunction.apply(x, self.weight, self.bias)
        return onednn_linear(x, self.packed_weight(), self.bias)

    def packed_weight(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, _optimizer_steps)
        packed = self.__dict__.setdefault("packed", _Packed())
        if packed.key != key:
            packed.weight, packed.key = torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_ROWS), key
        return packed.weight


def route_linears_to_onednn(model) -> None:
    """Every plain nn.Linear of `model` becomes a OneDNNLinear, in place. It keeps its
    parameters and state dict, and is still an nn.Linear to LoRA, saving and deepcopy."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = OneDNNLinear


def choose_cpu_linear(cfg, device, compute_dtype: torch.dtype, width: int, resumed=None) -> tuple:
    """-> (True to route linear layers through oneDNN, what was chosen and why: "" where
    it does not apply). Only float32 compute on CPU: bf16 already goes to oneDNN. `auto`
    times both at the model's width, as choose_cpu_autocast does; a resumed run (`resumed`:
    the choice it started with) keeps its kernels, and so its order of sums."""
    if device != "cpu" or compute_dtype != torch.float32:
        return False, ""
    if cfg.cpu_linear == "onednn" and not onednn_available():
        raise plumbing.UsageError("--cpu_linear onednn but this PyTorch was built without oneDNN; "
                                  "pass --cpu_linear torch")
    if cfg.cpu_linear != "auto":
        on, why = cfg.cpu_linear == "onednn", f"--cpu_linear {cfg.cpu_linear}"
    elif resumed is not None:
        on, why = resumed and onednn_available(), "as when the run started; --cpu_linear auto"
    elif not onednn_available():
        on, why = False, "PyTorch built without oneDNN; --cpu_linear auto"
    else:
        blas = matmul_gflops(width, torch.float32)
        onednn = matmul_gflops(width, torch.float32, linear=onednn_linear)
        on = onednn > blas
        why = f"width {width}: oneDNN {onednn:.0f} vs torch {blas:.0f} GFLOP/s; --cpu_linear auto"
    return on, f"float32 linear layers by {'oneDNN' if on else 'torch'} ({why})"


# -----------------------------------------------------------------------------
# The optimizer, over float32 masters when the model is bf16.

def make_optimizer(cfg, model):
    """AdamW over the model's trainable weights; for a bf16 model (and --master_weights
    true) it steps float32 master copies instead, see MasterWeights."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.master_weights and any(p.dtype != torch.float32 for p in params):
        return MasterWeights(params, lambda masters: make_adamw(cfg, masters), seed=cfg.seed)
    return make_adamw(cfg, params)


def make_adamw(cfg, params):
    if cfg.optimizer == "adamw":
        # fused: one kernel over all tensors instead of a dozen elementwise passes over each
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0, fused=True)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise plumbing.UsageError("--optimizer adamw8bit needs bitsandbytes: pip install 'bitsandbytes>=0.50' "
                                  "(or pass --optimizer adamw)") from None
    # 8-bit moments: 2 bytes/param of optimizer state instead of 8.
    return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=0.0)


class MasterWeights:
    """An optimizer over float32 copies of a bf16 model's weights.

    bf16 keeps 8 significant bits, so half an ulp of a typical weight (|w| ~ 0.02) is 6e-5,
    while an Adam step moves each weight by about the learning rate (2e-6 in the seed
    config): written straight into bf16, almost every step rounds away. Here AdamW updates
    float32 masters, where small steps add up, and the model stays bf16 for generation,
    forward and backward.

    The model gets the masters *stochastically* rounded, up or down at random in
    proportion to the distance, so its weights equal the masters on average; rounding to
    nearest would leave a weight where it started until its master has moved half an ulp.
    The noise is seeded by (seed, number of steps), so a resumed run rounds exactly as the
    uninterrupted one did.

    The inner optimizer steps groups of tensors holding up to `group_bytes` of float32
    gradients, so only a group's float32 gradients exist at once, not all of them, in a
    few calls rather than one per tensor (each call loops over every master). AdamW is
    elementwise, so this is the same update as one step over all of them.
    """

    def __init__(self, params, make_inner, seed: int = 0, group_bytes: int = 256 * 2**20):
        self.params = list(params)  # the model's bf16 weights; backward writes their .grad
        self.masters = [torch.nn.Parameter(p.detach().to(torch.float32, copy=True)) for p in self.params]
        self.inner = make_inner(self.masters)
        self.param_groups = self.inner.param_groups
        self.seed, self.steps, self.group_bytes = seed, 0, group_bytes

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        group, size = [], 0
        for p, master in zip(self.params, self.masters):
            if p.grad is None:
                continue
            master.grad = p.grad.to(torch.float32)
            group.append(master)
            size += 4 * master.numel()
            if size >= self.group_bytes:
                self.step_group(group)
                group, size = [], 0
        if group:
            self.step_group(group)
        self.round_into_model()

    def step_group(self, group: list) -> None:
        self.inner.step()  # only this group's masters have gradients, so only they move
        for master in group:
            master.grad = None

    @torch.no_grad()
    def round_into_model(self) -> None:
        """The model's weights from the masters, with the same noise as the last step."""
        noise = torch.Generator(device=self.masters[0].device).manual_seed(plumbing.seed_for(self.seed, self.steps))
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
    chunks, so the int32 noise for a large embedding never exists at once.
    """
    flat_dst, flat_src = dst.view(-1), src.detach().view(-1)
    for i in range(0, flat_src.numel(), chunk):
        bits = flat_src[i:i + chunk].view(torch.int32)
        noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
        flat_dst[i:i + chunk].copy_(((bits + noise) & -65536).view(torch.float32))


@contextlib.contextmanager
def masters_in_model(optimizer):
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
