"""--config: a saved (or hand-written) config replays a run; flags still win; bad files
are refused in one sentence.

    python -m pytest tests/test_config.py -v
"""

import dataclasses
import json
import subprocess
import sys

import pytest

import train_grpo
from plumbing import UsageError
from train_grpo import GRPOConfig, parse_args

from test_train import ROOT, steps_of, tiny_args

SAME = ("reward_mean", "reward_std", "loss", "kl", "grad_norm", "entropy", "completion_len")


def test_replaying_a_finished_runs_config_gives_the_same_first_step(tiny_model_dir, tmp_path, varied_rewards):
    first, replay = tmp_path / "first", tmp_path / "replay"
    assert train_grpo.main(tiny_args(tiny_model_dir, first, "--num_iterations", "1", "--temperature", "0.9",
                                     "--loss_type", "dr_grpo", "--seed", "3")) == 0
    saved = first / "saved_model" / "grpo_config.json"
    assert train_grpo.main(["--config", str(saved), "--output_dir", str(replay)]) == 0
    a, b = steps_of(first)[0], steps_of(replay)[0]
    for key in SAME:
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    original = json.loads(saved.read_text())
    replayed = json.loads((replay / "saved_model" / "grpo_config.json").read_text())
    assert replayed == {**original, "output_dir": str(replay), "config": str(saved)}


def test_flags_win_over_the_file_wherever_they_stand(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"preset": "none", "learning_rate": 3e-6, "num_generations": 4, "resume": True}))
    for argv in (["--config", str(path), "--num_generations", "8"], ["--num_generations", "8", "--config", str(path)]):
        cfg = parse_args(argv)
        assert (cfg.num_generations, cfg.learning_rate, cfg.config) == (8, 3e-6, str(path))
    # resume says how the recorded run started, not what it is: a replay starts afresh
    assert parse_args(["--config", str(path)]).resume is False


def test_a_file_replays_the_preset_it_names_and_its_own_values_over_it(tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"preset": "cpu", "num_iterations": 45}))
    cfg = parse_args(["--config", str(path)])
    expected = {**train_grpo.PRESETS["cpu"], "num_iterations": 45, "preset": "cpu", "config": str(path)}
    assert cfg == GRPOConfig(**expected)


def test_a_yaml_file_works_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: none\nlearning_rate: 1.0e-5\nscale_rewards: false\ntask: arithmetic\n")
    cfg = parse_args(["--config", str(path)])
    assert (cfg.learning_rate, cfg.scale_rewards, cfg.task) == (1e-5, False, "arithmetic")


def test_a_saved_config_holds_every_field_so_a_replay_needs_nothing_else(tiny_run_dir):
    saved = json.loads((tiny_run_dir / "saved_model" / "grpo_config.json").read_text())
    assert set(saved) == {f.name for f in dataclasses.fields(GRPOConfig)}


@pytest.mark.parametrize("content,message", [
    ({"learning_rat": 1e-5, "colour": "red"}, "has unknown fields: colour, learning_rat (python train_grpo.py"),
    ({"num_iterations": True}, "num_iterations must be int, got True"),
    ({"gradient_checkpointing": "yes"}, "gradient_checkpointing must be bool, got 'yes'"),
    ({"task": ["arithmetic"]}, "task must be str, got ['arithmetic']"),
    ([1, 2], "must hold a mapping of field names to values"),
    ({"loss_type": "ppo"}, "--loss_type must be one of grpo, dr_grpo, dapo"),
])
def test_a_bad_config_file_is_refused_in_one_sentence(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UsageError) as err:
        parse_args(["--config", str(path)])
    assert message in str(err.value)


def test_unreadable_or_broken_files_are_one_line_and_exit_code_2(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"learning_rate": 1e-5,')
    for path, message in ((tmp_path / "missing.json", "cannot read it"), (broken, "is not valid JSON")):
        out = subprocess.run([sys.executable, "train_grpo.py", "--config", str(path)], cwd=ROOT,
                             capture_output=True, text=True)
        assert out.returncode == 2 and message in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
