"""bench.py prints measurements; these tests check that it runs and reports, never a timing."""
import importlib.util
import re

import pytest

import bench
import train_grpo

TINY_RUN = ["--", "--batch_size", "2", "--num_generations", "2", "--max_new_tokens", "6", "--optimizer", "adamw"]


def test_bench_step_reports_step_time_phases_and_memory(capsys):
    loader = train_grpo.load_model_and_tokenizer
    assert bench.main(["step", "--random", "tiny", "--steps", "2", *TINY_RUN]) == 0
    assert train_grpo.load_model_and_tokenizer is loader  # the random model was lent, not left in place
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
