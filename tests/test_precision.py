"""bf16 models keep their updates: float32 master weights, saved and restored exactly.

    python -m pytest tests/test_precision.py -v

At the seed's learning rate (2e-6) an Adam step is far below half a bf16 ulp of a typical
weight, so written straight into bf16 weights almost every update rounds away.
"""

import json

import pytest
import torch

import precision
import train_grpo
from train_grpo import load_policy_and_reference, parse_args


def tiny_cfg(model_dir, *extra):
    return parse_args(["--model", model_dir, "--preset", "none", "--dtype", "bfloat16", *extra])


def backward_something(model):
    """A non-zero gradient for every weight: next-token loss on a few fixed tokens."""
    ids = torch.arange(3, 19).view(2, 8)
    model(input_ids=ids, labels=ids).loss.backward()


def changed_fraction(before: dict, after: dict) -> float:
    changed = sum(int((before[k] != after[k]).sum()) for k in before)
    return changed / sum(t.numel() for t in before.values())


def float32_weights(model, optimizer) -> dict:
    with precision.masters_in_model(optimizer):
        return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adamw"])
def test_one_step_at_the_seed_learning_rate_moves_the_weights_of_a_bf16_model(tiny_model_dir, optimizer):
    cfg = tiny_cfg(tiny_model_dir, "--optimizer", optimizer)
    assert cfg.learning_rate == 2e-6  # the seed's
    policy, _, _ = load_policy_and_reference(cfg, "cpu", torch.bfloat16)
    assert next(policy.parameters()).dtype == torch.bfloat16
    opt = precision.make_optimizer(cfg, policy)
    before = float32_weights(policy, opt)
    backward_something(policy)
    opt.step()
    after = float32_weights(policy, opt)
    assert changed_fraction(before, after) >= 0.9
    # the bf16 model is its masters rounded down or up, never further off
    for name, w in policy.state_dict().items():
        down = truncate_to_bf16(after[name])
        up = torch.nextafter(down.to(torch.bfloat16), down.sign().to(torch.bfloat16) * float("inf")).float()
        assert ((w.float() == down) | (w.float() == up)).all(), name


def truncate_to_bf16(x: torch.Tensor) -> torch.Tensor:
    return (x.contiguous().view(torch.int32) & -65536).view(torch.float32)


def test_stochastic_rounding_is_unbiased_and_exact_on_representable_values():
    ulp = 2.0 ** -7  # bf16 spacing in [1, 2)
    src = torch.cat([torch.full((100_000,), 1 + ulp / 4), torch.full((100_000,), -(1 + 3 * ulp / 4)),
                     torch.tensor([1.0, -2.5, 0.0, 3.140625])])
    dst = torch.empty_like(src, dtype=torch.bfloat16)
    precision.copy_rounded_stochastically(dst, src, torch.Generator().manual_seed(0), chunk=4096)
    up = dst[:100_000].float() == 1 + ulp
    assert set(dst[:100_000].float().unique().tolist()) == {1.0, 1 + ulp}
    assert up.float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert dst[100_000:200_000].float().mean().item() == pytest.approx(-(1 + 3 * ulp / 4), abs=1e-4)
    assert dst[-4:].float().tolist() == [1.0, -2.5, 0.0, 3.140625]  # representable: unchanged
    again = torch.empty_like(dst)
    precision.copy_rounded_stochastically(again, src, torch.Generator().manual_seed(0), chunk=4096)
    assert torch.equal(dst, again)  # seeded: a resumed run rounds the same way


def test_without_master_weights_bf16_loses_most_updates(tiny_model_dir):
    """The failure the masters fix, kept visible: --master_weights false is plain bf16."""
    cfg = tiny_cfg(tiny_model_dir, "--optimizer", "adamw", "--master_weights", "false")
    policy, _, _ = load_policy_and_reference(cfg, "cpu", torch.bfloat16)
    opt = precision.make_optimizer(cfg, policy)
    assert not isinstance(opt, precision.MasterWeights)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    backward_something(policy)
    opt.step()
    assert changed_fraction(before, policy.state_dict()) < 0.2


@pytest.mark.parametrize("group_bytes", [1, 20_000, 256 * 2**20])  # a tensor per call, a few, all at once
def test_master_step_is_exactly_a_float32_adamw_step(tiny_model_dir, group_bytes):
    """Stepping groups of tensors is the same update as one step over all of them."""
    cfg = tiny_cfg(tiny_model_dir, "--optimizer", "adamw", "--learning_rate", "1e-3")
    policy, _, _ = load_policy_and_reference(cfg, "cpu", torch.bfloat16)
    opt = precision.MasterWeights(list(policy.parameters()), lambda m: precision.make_adamw(cfg, m),
                                  group_bytes=group_bytes)
    calls = []
    inner_step = opt.inner.step
    opt.inner.step = lambda: (calls.append(1), inner_step())
    reference = [p.detach().float().clone().requires_grad_(True) for p in policy.parameters()]
    plain = precision.make_adamw(cfg, reference)  # torch AdamW, stepping every tensor in one call
    for _ in range(3):
        backward_something(policy)
        for r, p in zip(reference, policy.parameters()):
            r.grad = p.grad.float()
        opt.step()
        plain.step()
        opt.zero_grad()
    assert all(torch.equal(m, r) for m, r in zip(opt.masters, reference))
    sizes = [4 * p.numel() for p in policy.parameters()]
    expected = {1: len(sizes), 256 * 2**20: 1}.get(group_bytes)
    if expected is None:  # greedy groups of at least group_bytes, the last one maybe smaller
        expected, total = 0, 0
        for size in sizes:
            total += size
            if total >= group_bytes:
                expected, total = expected + 1, 0
        expected += total > 0
    assert 1 < expected < len(sizes) or group_bytes != 20_000
    assert len(calls) == 3 * expected


def test_float32_models_need_no_masters(tiny_model_dir):
    cfg = parse_args(["--model", tiny_model_dir, "--preset", "none", "--dtype", "float32", "--optimizer", "adamw"])
    policy, _, _ = load_policy_and_reference(cfg, "cpu", torch.float32)
    assert isinstance(precision.make_optimizer(cfg, policy), torch.optim.AdamW)


def tiny_run(model_dir, out, *extra):
    return ["--model", model_dir, "--preset", "none", "--task", "countdown", "--batch_size", "2",
            "--num_generations", "3", "--max_new_tokens", "8", "--eval_size", "2", "--eval_every", "100",
            "--dtype", "bfloat16", "--output_dir", str(out), *extra]


def test_a_bf16_run_saves_float32_weights_that_kept_the_update(tiny_model_dir, tmp_path, varied_rewards):
    """One trainer step at lr 2e-6, end to end: saved_model/ must hold what was learned."""
    from transformers import AutoModelForCausalLM
    assert train_grpo.main(tiny_run(tiny_model_dir, tmp_path, "--num_iterations", "1", "--save_every", "0")) == 0
    assert json.loads((tmp_path / "grpo_metrics.json").read_text())["steps"][0]["grad_norm"] > 0
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved_model", dtype=torch.float32)
    assert next(saved.parameters()).dtype == torch.float32
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).float()
    assert changed_fraction(start.state_dict(), saved.state_dict()) >= 0.9


def test_bf16_resume_restores_the_float32_masters_exactly(tiny_model_dir, tmp_path, varied_rewards):
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = ("--learning_rate", "1e-4", "--save_every", "2")
    assert train_grpo.main(tiny_run(tiny_model_dir, straight, "--num_iterations", "4", *args)) == 0
    assert train_grpo.main(tiny_run(tiny_model_dir, split, "--num_iterations", "2", *args)) == 0
    assert train_grpo.main(tiny_run(tiny_model_dir, split, "--num_iterations", "4", "--resume", *args)) == 0
    from safetensors.torch import load_file
    a = load_file(straight / "saved_model" / "model.safetensors")
    b = load_file(split / "saved_model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype,capability,tf32", [("float32", (9, 0), True), ("float32", (7, 0), False),
                                                   ("bfloat16", (9, 0), False)])
def test_float32_cuda_runs_use_tf32_matmuls_and_say_so(monkeypatch, dtype, capability, tf32):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    previous = torch.get_float32_matmul_precision()
    try:
        _, _, line = precision.choose_runtime(parse_args(["--preset", "none", "--device", "cuda", "--dtype", dtype]))
        assert ("TF32 matmuls" in line) == tf32
        assert (torch.get_float32_matmul_precision() == "high") == tf32
    finally:
        torch.set_float32_matmul_precision(previous)
