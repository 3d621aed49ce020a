"""plot_metrics.py: raw and smoothed plots, partial files, and broken files.

    python -m pytest tests/test_plot_metrics.py -v
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import plot_metrics

ROOT = Path(__file__).resolve().parent.parent


def test_moving_average_is_trailing():
    assert plot_metrics.moving_average([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    assert plot_metrics.moving_average([5], 10) == [5]


@pytest.mark.parametrize("extra", [[], ["--smooth"], ["--smooth", "--window", "2"]])
def test_redraws_both_plots_from_a_real_run(tiny_run_dir, tmp_path, extra, capsys):
    assert plot_metrics.main(["--metrics", str(tiny_run_dir / "grpo_metrics.json"), "--out", str(tmp_path), *extra]) == 0
    for name in ("grpo_training_curve.png", "grpo_kl_divergence.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "3 steps, 3 evals" in capsys.readouterr().out


def test_smoothing_changes_the_picture(tiny_run_dir, tmp_path):
    metrics = plot_metrics.load_metrics(tiny_run_dir / "grpo_metrics.json")
    metrics["steps"] = [dict(metrics["steps"][0], step=i, reward_mean=(i % 2) * 1.0) for i in range(1, 30)]
    plot_metrics.plot_all(metrics, tmp_path / "raw")
    plot_metrics.plot_all(metrics, tmp_path / "smooth", window=10)
    assert (tmp_path / "raw" / "grpo_training_curve.png").read_bytes() != \
        (tmp_path / "smooth" / "grpo_training_curve.png").read_bytes()


def test_single_step_and_mid_run_files_plot(tmp_path):
    one = {"config": {"task": "countdown"}, "steps": [{"step": 1, "reward_mean": 0.2, "accuracy": 0.1, "kl": 0.0}],
           "eval": []}
    path = tmp_path / "grpo_metrics.json"
    path.write_text(json.dumps(one))
    assert plot_metrics.main(["--metrics", str(path), "--smooth"]) == 0
    assert (tmp_path / "grpo_training_curve.png").is_file()
    # a run that has evaluated step 0 but finished no step yet
    path.write_text(json.dumps({"config": {}, "steps": [], "eval": [{"step": 0, "accuracy": 0.3}]}))
    assert plot_metrics.main(["--metrics", str(path)]) == 0


@pytest.mark.parametrize("skipped", [None, float("nan"), float("inf")])
def test_a_skipped_steps_missing_value_leaves_the_smoothed_curve_finite(tmp_path, skipped):
    steps = [{"step": i, "reward_mean": 0.5, "accuracy": 0.5, "kl": 0.1} for i in range(1, 8)]
    steps[2]["kl"] = skipped  # null in the JSON file, NaN in memory during the run
    steps_, values = plot_metrics._series(steps, "kl")
    assert steps_ == [1, 2, 4, 5, 6, 7]
    assert plot_metrics.moving_average(values, 3) == pytest.approx([0.1] * 6)
    plot_metrics.plot_all({"config": {}, "steps": steps, "eval": []}, tmp_path, window=3)
    assert (tmp_path / "grpo_kl_divergence.png").is_file()


@pytest.mark.parametrize("content, message", [
    (None, "no metrics file"),
    ("", "is empty"),
    ('{"config": {}, "steps": [{"step": 1, "rew', "not valid JSON"),
    ('[1, 2, 3]', "no 'steps' list"),
])
def test_broken_files_fail_with_one_clear_line(tmp_path, content, message):
    path = tmp_path / "grpo_metrics.json"
    if content is not None:
        path.write_text(content)
    out = subprocess.run([sys.executable, "plot_metrics.py", "--metrics", str(path), "--smooth"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr
