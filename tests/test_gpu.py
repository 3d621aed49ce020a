"""The CUDA path, for whoever has a GPU: python -m pytest -m gpu (python bench.py gpu runs it).

Skipped, with the reason, on machines without CUDA. Each check runs the real loop on a
randomly initialised model of Qwen2.5-1.5B's shape (bench.py's), so no model hub is needed.
"""

import tempfile

import pytest
import torch

import bench
import data
import engine
import precision
import train_grpo
from train_grpo import parse_args

pytestmark = pytest.mark.gpu

CARD_GB = 24  # the card a 1.5B run should fit: an RTX 3090/4090 or an A10


def seed_config_run(shape, device, *extra):
    """The seed config's Run on a random model of `shape` on `device`."""
    cfg = parse_args(["--preset", "none", "--device", device, "--model", f"random-{shape}", "--output_dir",
                      tempfile.mkdtemp(), *extra])
    run, _, _ = train_grpo.start_run(cfg, preloaded=bench.random_model(shape, device))
    return run


def test_a_seed_config_step_at_1_5b_shape_fits_a_24_gb_card():
    torch.cuda.reset_peak_memory_stats()
    run = seed_config_run("qwen2.5-1.5b", "cuda")
    record, _ = train_grpo.grpo_step(run, 1)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"seed config step at 1.5B shape: {record['step_seconds']:.2f} s, peak {peak:.1f} GiB allocated")
    assert record["peak_memory_gb"] > 0
    assert peak <= CARD_GB, f"peak {peak:.1f} GiB is {peak - CARD_GB:.1f} GiB over a {CARD_GB} GB card"


def objective_over_updates(run, updates: int) -> list:
    """GRPO's objective on one fixed batch, mean over tokens of A * log p, before and after
    each of `updates` updates on that batch (the same rollouts and advantages each time)."""
    torch.manual_seed(0)
    prompts = train_grpo.prompts_for(run.tokenizer, train_grpo.train_problems(run.cfg, 1))
    rollouts = train_grpo.engine.generate_rollouts(run.policy, run.tokenizer, prompts, run.cfg.num_generations,
                                                   run.cfg.max_new_tokens, run.cfg.temperature, run.end_ids)
    advantages = torch.linspace(-1, 1, rollouts.input_ids.shape[0], device=rollouts.input_ids.device)
    mask = rollouts.completion_mask

    def objective():
        with torch.no_grad():
            logp, _ = train_grpo.completion_logprobs(run.policy, rollouts, run.cfg.temperature, run.autocast)
        return float((advantages[:, None] * logp * mask).sum() / mask.sum())

    values = [objective()]
    for _ in range(updates):
        train_grpo.policy_update(run, rollouts, advantages)
        values.append(objective())
    return values


def test_bf16_with_master_weights_raises_the_objective_as_float32_does(shape="qwen2.5-1.5b", device="cuda"):
    small = ("--batch_size", "1", "--num_generations", "8", "--max_new_tokens", "32", "--learning_rate", "1e-5",
             "--beta", "0")
    bf16 = objective_over_updates(seed_config_run(shape, device, "--dtype", "bfloat16", *small), 4)
    fp32 = objective_over_updates(seed_config_run(shape, device, "--dtype", "float32", *small), 4)
    print(f"objective over 4 updates: bf16 + masters {bf16}, float32 {fp32}")
    gain_bf16, gain_fp32 = bf16[-1] - bf16[0], fp32[-1] - fp32[0]
    assert gain_fp32 > 0 and gain_bf16 == pytest.approx(gain_fp32, rel=0.5)


def test_cuda_graphs_read_the_weights_after_updates_and_after_the_master_swap(tiny_model_dir, varied_rewards):
    """A CUDA graph replays the weight addresses it captured: bf16 weights updated in place
    through float32 masters, and swapped for the masters while saving, must still be what
    the compiled sampler reads."""
    torch._dynamo.reset()
    cfg = parse_args(["--model", tiny_model_dir, "--preset", "none", "--task", "arithmetic", "--device", "cuda",
                      "--batch_size", "3", "--num_generations", "4", "--max_new_tokens", "12", "--learning_rate",
                      "1e-2", "--optimizer", "adamw", "--beta", "0", "--compile", "on"])
    policy, _, tok = train_grpo.load_policy_and_reference(cfg, "cuda", torch.bfloat16)
    run = train_grpo.Run(cfg, policy, tok, engine.end_token_ids(tok, policy),
                         optimizer=precision.make_optimizer(cfg, policy), peak_flops=1e12, compiled=True)
    prompts = train_grpo.prompts_for(tok, data.generate_arithmetic_problems(3, seed=2))

    def sample(compiled):
        torch.manual_seed(3)
        return engine.generate_rollouts(policy, tok, prompts, 4, 12, 1.2, run.end_ids, compiled=compiled).input_ids

    before = sample(True)
    for step in (1, 2):
        train_grpo.grpo_step(run, step)
    with precision.masters_in_model(run.optimizer):
        pass
    assert torch.equal(sample(True), sample(False))
    assert not torch.equal(sample(True), before)


def test_cuda_graph_recordings_stay_constant_over_20_steps(tiny_model_dir, tmp_path, monkeypatch, varied_rewards):
    torch._dynamo.reset()
    counts, real = [], train_grpo.grpo_step
    argv = ["--model", tiny_model_dir, "--preset", "none", "--task", "arithmetic", "--device", "cuda",
            "--num_iterations", "20", "--batch_size", "2", "--num_generations", "4", "--max_new_tokens", "16",
            "--eval_size", "104", "--eval_batch_size", "8", "--eval_every", "5", "--save_every", "10",
            "--compile", "on", "--output_dir", str(tmp_path)]
    with bench.cuda_graph_recordings() as recorded:
        monkeypatch.setattr(train_grpo, "grpo_step", lambda *a: (r := real(*a), counts.append(len(recorded)))[0])
        assert train_grpo.main(argv) == 0
    print(f"CUDA-graph recordings after each of 20 steps: {counts}")
    assert counts[0] > 0 and counts[-1] == counts[1], counts  # after step 1 and the first eval: no more
