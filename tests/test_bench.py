"""bench.py prints measurements; these tests check that it runs and reports, never a timing."""
import importlib.util
import re

import pytest

import bench
import plumbing

TINY_RUN = ["--", "--batch_size", "2", "--num_generations", "2", "--max_new_tokens", "6", "--optimizer", "adamw"]


def test_bench_step_reports_step_time_phases_and_memory(capsys, monkeypatch):
    def no_loading(*args):
        raise AssertionError("bench.py step --random must hand its model to the loop, not load one")

    monkeypatch.setattr(plumbing, "load_model_and_tokenizer", no_loading)
    assert bench.main(["step", "--random", "tiny", "--steps", "2", *TINY_RUN]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("ours: 2 steps"))
    for part in ("s/step = generation", "reference/old log-probs", "policy forward/backward", "optimizer",
                 "mean completion", "peak memory"):
        assert part in line


@pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                    reason="TRL is for benchmarking only: pip install -r requirements-bench.txt")
def test_bench_against_trl_prints_both_runs_side_by_side(capsys):
    assert bench.main(["step", "--random", "tiny", "--steps", "2", "--against", "trl", *TINY_RUN]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ours\s+[\d.]+\s+[\d.]+\s+\d+\s+[\d.]+$", out, re.MULTILINE)
    assert re.search(r"^TRL\s+[\d.]+\s+[\d.]+\s+\d+\s+[\d.]+$", out, re.MULTILINE)
    assert re.search(r"TRL / ours step time: [\d.]+x", out)


def test_bench_against_trl_compares_one_sampling_round_on_both_sides(capsys, monkeypatch):
    # TRL has no dynamic sampling, so ours must not sample extra rounds while TRL samples one.
    import json
    import subprocess

    import train_grpo

    ours, trl_argv, real_main = [], [], train_grpo.main
    monkeypatch.setattr(train_grpo, "main", lambda argv, preloaded=None:
                        ours.append(train_grpo.parse_args(argv).dynamic_sampling) or real_main(argv, preloaded))

    real_run = subprocess.run

    def fake_trl(cmd, **kwargs):
        if "trl-step" not in cmd:
            return real_run(cmd, **kwargs)  # git, for the run's provenance
        trl_argv.append(cmd[cmd.index("--") + 1:])
        result = {"step": 1.0, "warmup": 1.0, "peak": 1.0, "completion": 4.0, "version": "x", "transformers": "y"}
        return subprocess.CompletedProcess(cmd, 0, "TRL_RESULT " + json.dumps(result), "")

    monkeypatch.setattr(subprocess, "run", fake_trl)
    assert bench.main(["step", "--random", "tiny", "--steps", "2", "--against", "trl", *TINY_RUN,
                       "--dynamic_sampling", "--mask_truncated_completions"]) == 0
    assert ours == [False]
    assert train_grpo.parse_args(trl_argv[0]).dynamic_sampling is False
    assert train_grpo.parse_args(trl_argv[0]).mask_truncated_completions is True
    assert "--dynamic_sampling off on our side too" in capsys.readouterr().out


def test_bench_gpu_without_cuda_is_one_line_and_a_failure(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "bench.py gpu: this PyTorch sees no CUDA device; run it on a GPU machine"
