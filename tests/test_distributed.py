"""Data parallelism on CPU (gloo): two processes train exactly like one on the same prompts.

    python -m pytest tests/test_distributed.py -v

Each process is started the way torchrun starts it (RANK, WORLD_SIZE, LOCAL_RANK and a
rendezvous address in the environment), with torch.multiprocessing. Sampling is replaced
by completions that depend on the prompt alone, so that one process with batch 2 and two
processes with batch 1 score the very same sequences and the comparison is exact.
"""

import gc
import glob
import json
import os
import signal
import socket
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import engine
import train_grpo

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")

COMPARED = ("reward_mean", "reward_std", "accuracy", "format_rate", "zero_spread_frac", "loss", "kl", "clip_frac",
            "ratio_mean", "entropy", "completion_len", "truncated_frac", "grad_norm", "skipped_updates")


def fixed_rollouts(model, tokenizer, prompts, num_generations, max_new_tokens, temperature, end_ids,
                   greedy=False, sampler="auto", compiled=False):
    """Random completions seeded by the prompt's text: the same whichever process draws
    them and whatever else is in its batch. Rows end at different lengths, some never."""
    tokenizer.padding_side = "left"
    enc = tokenizer([p for p in prompts for _ in range(num_generations)], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    groups = []
    for prompt in prompts:
        gen = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
        ids = torch.randint(3, len(tokenizer), (num_generations, max_new_tokens), generator=gen)
        ends = torch.randint(1, max_new_tokens + 3, (num_generations,), generator=gen)
        for row, end in enumerate(ends.tolist()):
            if end < max_new_tokens:
                ids[row, end] = end_ids[0]
        groups.append(ids)
    completion = torch.cat(groups)
    mask, truncated = engine.completion_mask_from_ends(completion, end_ids)
    texts = [tokenizer.decode(c[m], skip_special_tokens=True) for c, m in zip(completion, mask)]
    return engine.Rollouts(torch.cat([enc["input_ids"], completion], 1),
                               torch.cat([enc["attention_mask"], torch.ones_like(completion)], 1),
                               mask, enc["input_ids"].shape[1], texts, truncated)


def checksum_grade(completion, problem, plain=False):
    reward = (sum(map(ord, completion)) % 3) / 2
    return train_grpo.Grade(reward, reward == 1.0, reward > 0, reward > 0)


def flat_grade(completion, problem, plain=False):
    return train_grpo.Grade(0.1, False, True, False)


def worker(rank, world, port, argv, slow, flat_rank):
    """One process of a torchrun-style launch. Rank `flat_rank` grades every completion alike."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import engine as worker_engine
    import train_grpo as tg

    def rollouts(*args, **kwargs):
        if slow:
            time.sleep(0.5)  # leaves time for a signal to land mid-run
        return fixed_rollouts(*args, **kwargs)

    worker_engine.generate_rollouts, tg.grade = rollouts, flat_grade if rank == flat_rank else checksum_grade
    code = tg.main(argv)
    if code:
        sys.exit(code)
    # A process group that outlives main is torn down at interpreter exit, where its gloo
    # threads can abort the process: a rare crash, made certain here.
    gc.collect()
    left = gloo_threads()
    if left:
        sys.exit(f"rank {rank}: gloo threads outlive main: {left}")


def gloo_threads() -> list:
    """This process's gloo threads, by the names Linux gives them (none elsewhere)."""
    names = (Path(p).read_text().strip() for p in glob.glob("/proc/self/task/*/comm"))
    return [name for name in names if "gloo" in name]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world, argv, slow=False, join=True, flat_rank=None):
    return mp.start_processes(worker, args=(world, free_port(), argv, slow, flat_rank), nprocs=world, join=join,
                              start_method="spawn")


def run_args(model_dir, out, batch_size, *extra):
    return ["--model", model_dir, "--preset", "none", "--task", "arithmetic", "--batch_size", str(batch_size),
            "--num_generations", "3", "--max_new_tokens", "8", "--num_iterations", "2", "--eval_size", "5",
            "--eval_every", "2", "--sample_every", "1", "--plot_every", "1", "--save_every", "0",
            "--optimizer", "adamw", "--learning_rate", "1e-3", "--num_inner_updates", "2", "--dtype", "float32",
            "--cpu_autocast", "off", "--cpu_linear", "torch",  # exact float32 sums, whatever the batch layout
            "--output_dir", str(out), *extra]


def metrics_of(out):
    return json.loads((Path(out) / "grpo_metrics.json").read_text())


def weights_of(out):
    from safetensors.torch import load_file
    return load_file(Path(out) / "saved_model" / "model.safetensors")


def assert_same_training(a, b):
    ma, mb = metrics_of(a), metrics_of(b)
    assert [s["step"] for s in ma["steps"]] == [s["step"] for s in mb["steps"]]
    for sa, sb in zip(ma["steps"], mb["steps"]):
        for key in COMPARED:
            assert sb[key] == pytest.approx(sa[key], rel=1e-4, abs=1e-6), (sa["step"], key)
    for ea, eb in zip(ma["eval"], mb["eval"]):
        assert (ea["accuracy"], ea["format_rate"], ea["n"], ea["samples"]) == \
               (eb["accuracy"], eb["format_rate"], eb["n"], eb["samples"])
    wa, wb = weights_of(a), weights_of(b)
    assert wa.keys() == wb.keys()
    for k in wa:  # equal weights after two updates: the gradients were equal
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)


def test_gradients_are_summed_in_buckets_of_one_dtype(monkeypatch):
    """Each rank's gradients, as if the other rank held the same: every one doubles exactly,
    in a few flat collectives (a tensor over the bucket size goes alone)."""
    import plumbing

    calls = []

    def doubling_all_reduce(t):
        calls.append((t.dtype, t.numel()))
        t.mul_(2)

    monkeypatch.setattr(torch.distributed, "all_reduce", doubling_all_reduce)
    gen = torch.Generator().manual_seed(0)
    shapes = [((3, 4), torch.float32), ((5,), torch.float32), ((2, 2), torch.bfloat16), ((40,), torch.bfloat16),
              ((7,), torch.float32), ((1,), torch.float32)]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=d)) for s, d in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    params.append(torch.nn.Parameter(torch.zeros(3)))  # no gradient: skipped
    before = [p.grad.clone() if p.grad is not None else None for p in params]
    plumbing.all_reduce_gradients(params, plumbing.Dist(0, 2), bucket_bytes=64)
    for p, g in zip(params, before):
        if g is not None:
            assert torch.equal(p.grad, 2 * g)
    # 12+5 float32 (68 B > 64: split), 4 bf16 then 40 bf16 (80 B: alone), 7+1 float32
    assert calls == [(torch.float32, 12), (torch.float32, 5), (torch.bfloat16, 4), (torch.bfloat16, 40),
                     (torch.float32, 8)]


@pytest.fixture
def one_process(monkeypatch):
    monkeypatch.setattr(engine, "generate_rollouts", fixed_rollouts)
    monkeypatch.setattr(train_grpo, "grade", checksum_grade)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_two_processes_update_exactly_like_one_over_the_same_prompts(tiny_model_dir, tmp_path, one_process,
                                                                     loss_type):
    single, double = tmp_path / "single", tmp_path / "double"
    assert train_grpo.main(run_args(tiny_model_dir, single, 2, "--loss_type", loss_type)) == 0
    launch(2, run_args(tiny_model_dir, double, 1, "--loss_type", loss_type))
    assert metrics_of(single)["steps"][0]["grad_norm"] > 0
    assert_same_training(single, double)
    # one copy of every output, written by rank 0, holding every rank's completions
    assert sorted(p.name for p in double.iterdir()) == sorted(p.name for p in single.iterdir())
    rows = [json.loads(line) for line in (double / "grpo_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 3  # 2 steps x 2 prompts (one per rank) x 3 completions
    step1 = [r["reward"] for r in rows if r["step"] == 1]
    assert metrics_of(double)["steps"][0]["reward_mean"] == pytest.approx(sum(step1) / len(step1))
    assert "2 processes (gloo)" in metrics_of(double)["runtime"]["device"]


def test_dynamic_sampling_with_a_rank_that_keeps_no_group_updates_like_one_process_on_the_kept_ones(
        tiny_model_dir, tmp_path, one_process):
    """Rank 1's groups never have spread, so under dynamic sampling it trains on nothing and
    sends zero gradients; the update is one process's on rank 0's groups (the same prompts:
    rank 0 of two takes the first problem of each step's draw, as one process with batch 1 does)."""
    single, double = tmp_path / "single", tmp_path / "double"
    dynamic = ("--dynamic_sampling", "--max_sampling_rounds", "1")
    assert train_grpo.main(run_args(tiny_model_dir, single, 1, *dynamic)) == 0
    launch(2, run_args(tiny_model_dir, double, 1, *dynamic), flat_rank=1)
    assert [(s["groups_sampled"], s["groups_trained"]) for s in metrics_of(single)["steps"]] == [(1, 1)] * 2
    assert [(s["groups_sampled"], s["groups_trained"]) for s in metrics_of(double)["steps"]] == [(2, 1)] * 2
    wa, wb = weights_of(single), weights_of(double)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)


def test_two_processes_stopped_by_sigterm_resume_like_an_uninterrupted_run(tiny_model_dir, tmp_path, capsys):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = ("--num_iterations", "4", "--eval_every", "100")
    launch(2, run_args(tiny_model_dir, straight, 1, *args))
    ctx = launch(2, run_args(tiny_model_dir, stopped, 1, *args), slow=True, join=False)
    metrics, deadline = stopped / "grpo_metrics.json", time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics_of(stopped)["steps"]):
        time.sleep(0.05)
    os.kill(ctx.processes[1].pid, signal.SIGTERM)  # rank 1 only: rank 0 must stop with it
    while not ctx.join():
        pass
    assert all(p.exitcode == 0 for p in ctx.processes)
    done = [s["step"] for s in metrics_of(stopped)["steps"]]
    assert 1 <= len(done) < 4 and not (stopped / "saved_model").exists()
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == [f"step_{done[-1]:06d}"]
    launch(2, run_args(tiny_model_dir, stopped, 1, *args, "--resume"))
    assert_same_training(straight, stopped)
    # another number of processes is refused in one sentence
    assert train_grpo.main(run_args(tiny_model_dir, stopped, 1, *args, "--resume")) == 2
    assert "written by 2 process(es) and this run has 1" in capsys.readouterr().err
