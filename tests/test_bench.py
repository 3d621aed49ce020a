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


def test_bench_gpu_without_cuda_is_one_line_and_a_failure(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "bench.py gpu: this PyTorch sees no CUDA device; run it on a GPU machine"
