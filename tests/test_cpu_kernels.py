"""CPU speed without new numerics: float32 linear layers through oneDNN compute what
torch's own kernels compute, up to the order of the sums.

    python -m pytest tests/test_cpu_kernels.py -v
"""

import copy
import json

import pytest
import torch

import precision
import train_grpo
from train_grpo import parse_args

from test_train import tiny_args

needs_onednn = pytest.mark.skipif(not precision.onednn_available(), reason="this PyTorch has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_a_onednn_linear_layer_matches_torch_forward_and_backward(bias):
    torch.manual_seed(0)
    plain = torch.nn.Linear(24, 40, bias=bias)
    routed = copy.deepcopy(plain)
    precision.route_linears_to_onednn(routed)
    assert type(routed) is precision.OneDNNLinear and isinstance(routed, torch.nn.Linear)
    x = torch.randn(3, 5, 24)
    outputs = []
    for layer in (plain, routed):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * torch.arange(40.0)).sum().backward()  # a gradient that differs per output
        outputs.append([y, xi.grad, layer.weight.grad] + ([layer.bias.grad] if bias else []))
    for ours, theirs in zip(outputs[1], outputs[0]):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("optimizer", ["sgd", "fused_adamw"])
def test_without_autograd_a_layer_uses_a_packed_weight_until_the_weight_moves(optimizer):
    """Sampling, eval and the reference run without autograd on a copy of each weight in
    oneDNN's layout. It must never outlive its weight: fused AdamW writes weights without
    bumping their version, so an optimizer step retires every packed copy."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 48)
    precision.route_linears_to_onednn(layer)
    x = torch.randn(24, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        packed = layer.packed.weight
        assert packed.is_mkldnn
        layer(x)
        assert layer.packed.weight is packed  # made once, reused
    copied = copy.deepcopy(layer)  # the reference is a deepcopy: the opaque copy stays behind
    assert copied.packed.weight is None
    opt = (torch.optim.SGD(layer.parameters(), lr=0.5) if optimizer == "sgd"
           else torch.optim.AdamW(layer.parameters(), lr=0.5, fused=True))
    layer(x).pow(2).sum().backward()
    assert "packed" not in layer.__dict__  # a forward with autograd drops it: the weight is about to move
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        packed = layer.packed.weight
    opt.zero_grad()
    layer.weight.grad = torch.ones_like(layer.weight)  # a step with no forward before it
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        assert layer.packed.weight is not packed
        layer.weight.mul_(2)  # an in-place write: the version counter moves
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


@needs_onednn
def test_a_trainable_bias_beside_a_frozen_weight_still_gets_its_gradient():
    """The packed path has no backward, so any trainable parameter keeps a layer off it."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(8, 4)
    routed = copy.deepcopy(plain)
    precision.route_linears_to_onednn(routed)
    x = torch.randn(3, 8)
    for layer in (plain, routed):
        layer.weight.requires_grad_(False)
        (layer(x) * torch.arange(4.0)).sum().backward()
    assert routed.bias.grad is not None
    torch.testing.assert_close(routed.bias.grad, plain.bias.grad)


@needs_onednn
def test_a_routed_model_scores_and_learns_as_before(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    routed = copy.deepcopy(plain)
    precision.route_linears_to_onednn(routed)
    linears = [m for m in routed.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is precision.OneDNNLinear for m in linears)  # the output head too
    assert routed.state_dict().keys() == plain.state_dict().keys()
    ids = torch.arange(3, 19).view(2, 8)
    losses = [model(input_ids=ids, labels=ids).loss for model in (plain, routed)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(plain.named_parameters(), routed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    copied = copy.deepcopy(routed)  # the reference model is a deepcopy: it must stay routed, and separate
    assert type(copied.lm_head) is precision.OneDNNLinear and copied.lm_head.weight is not routed.lm_head.weight


@pytest.mark.parametrize("flag, onednn_speed, compute, expected", [
    ("auto", 500.0, torch.float32, True),     # the Zen 5 EPYC: MKL ran at under half oneDNN's rate
    ("auto", 150.0, torch.float32, False),    # a CPU where torch's BLAS is the faster
    ("onednn", 150.0, torch.float32, True),
    ("torch", 500.0, torch.float32, False),
    ("auto", 500.0, torch.bfloat16, False),   # bf16 (autocast or weights) is oneDNN's already
])
def test_cpu_linear_auto_is_decided_by_timing_both_kernels(monkeypatch, flag, onednn_speed, compute, expected):
    timed = []

    def gflops(width, dtype, linear=None, **kwargs):
        timed.append(linear)
        return onednn_speed if linear is precision.onednn_linear else 200.0

    monkeypatch.setattr(precision, "matmul_gflops", gflops)
    cfg = parse_args(["--preset", "none", "--device", "cpu", "--cpu_linear", flag])
    onednn, why = precision.choose_cpu_linear(cfg, "cpu", compute, 576)
    assert onednn is expected
    assert (len(timed) == 2 and "width 576" in why) == (flag == "auto" and compute == torch.float32)
    assert why == "" if compute != torch.float32 else why.startswith(f"float32 linear layers by "
                                                                      f"{'oneDNN' if expected else 'torch'} (")
    assert precision.choose_cpu_linear(cfg, "cuda", torch.float32, 576) == (False, "")


@needs_onednn
def test_a_run_routes_through_onednn_and_a_resume_keeps_the_choice(tiny_model_dir, tmp_path, monkeypatch):
    speeds = {"onednn": 500.0, "torch": 200.0}
    monkeypatch.setattr(precision, "matmul_gflops", lambda width, dtype, linear=None, **kw: speeds[
        "onednn" if linear is precision.onednn_linear else "torch"])
    args = tiny_args(tiny_model_dir, tmp_path, "--cpu_linear", "auto", "--num_iterations", "1")
    seen = []
    real_start = train_grpo.start_run
    monkeypatch.setattr(train_grpo, "start_run", lambda cfg, *a: seen.append(r := real_start(cfg, *a)) or r)
    assert train_grpo.main(args) == 0
    run = seen[-1][0]
    assert all(type(m) is precision.OneDNNLinear for model in (run.policy, run.ref_model)
               for m in model.modules() if isinstance(m, torch.nn.Linear))
    metrics = json.loads((tmp_path / "grpo_metrics.json").read_text())
    assert metrics["cpu_onednn"] is True and "linear layers by oneDNN" in metrics["runtime"]["device"]
    assert "by oneDNN)" in metrics["runtime"]["device"]  # and MFU is measured against oneDNN's rate
    speeds["onednn"] = 10.0  # the machine now measures differently
    assert train_grpo.main(args[:-2] + ["--num_iterations", "2", "--resume"]) == 0
    metrics = json.loads((tmp_path / "grpo_metrics.json").read_text())
    assert metrics["cpu_onednn"] is True and "as when the run started; --cpu_linear auto" in metrics["runtime"]["device"]


@needs_onednn
def test_a_routed_layer_compiles_with_inductor():
    """--compile on: inductor cannot lower the oneDNN op on a plain weight, so a routed
    layer hands it torch's own linear to compile."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    expected = layer(x)
    precision.route_linears_to_onednn(layer)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(layer)(x), expected, rtol=1e-5, atol=1e-5)
