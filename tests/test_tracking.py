"""--report_to: TensorBoard and W&B (offline) get every step and eval, and a resumed run
continues the same curves.

    python -m pytest tests/test_tracking.py -v
"""

import json
import shutil
import sys
from pathlib import Path

import pytest

import plumbing
import tracking
import train_grpo

from test_train import steps_of, tiny_args


def event_scalars(log_dir: Path) -> dict:
    """tag -> [(step, value)] as TensorBoard shows them (orphaned events purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def event_texts(log_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(tag)]
            for tag in events.Tags()["tensors"]}


def test_tensorboard_gets_every_step_number_and_each_eval_at_its_step(tiny_model_dir, tmp_path, varied_rewards):
    assert train_grpo.main(tiny_args(tiny_model_dir, tmp_path, "--report_to", "tensorboard")) == 0
    metrics = json.loads((tmp_path / "grpo_metrics.json").read_text())
    [log_dir] = (tmp_path / "runs").iterdir()
    assert log_dir.name == metrics["tracking"]["run_name"] and log_dir.name.startswith(tmp_path.name)
    scalars = event_scalars(log_dir)
    for record in metrics["steps"]:
        for key, value in record.items():
            if key != "step":
                assert (record["step"], pytest.approx(value, rel=1e-6)) in scalars[f"train/{key}"], key
    assert [s for s, _ in scalars["train/loss"]] == [1, 2]
    for rec in metrics["eval"]:  # evals at steps 0, 1, 2
        assert (rec["step"], pytest.approx(rec["accuracy"])) in scalars["eval/accuracy"]
        assert (rec["step"], pytest.approx(rec["accuracy_ci95"][1])) in scalars["eval/accuracy_ci95_high"]
        for category, v in rec["by_category"].items():
            assert (rec["step"], pytest.approx(v["accuracy"])) in scalars[f"eval/accuracy_{category}"]
    texts = event_texts(log_dir)
    assert [s for s, _ in texts["eval/samples/text_summary"]] == [0, 1, 2]
    question = metrics["eval"][0]["samples"][0]["question"]
    assert question.replace("|", "\\|") in texts["eval/samples/text_summary"][0][1]
    assert '"report_to": "tensorboard"' in texts["config/text_summary"][0][1]


def test_a_resumed_run_continues_the_same_tensorboard_curve_without_repeats(tiny_model_dir, tmp_path,
                                                                            varied_rewards, monkeypatch):
    args = ("--save_every", "2", "--num_iterations", "3", "--report_to", "tensorboard", "--eval_every", "10")
    assert train_grpo.main(tiny_args(tiny_model_dir, tmp_path, *args)) == 0
    straight = steps_of(tmp_path)
    # as if the run had died after logging step 3: its last checkpoint is step 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000002"]
    shutil.rmtree(tmp_path / "saved_model")
    monkeypatch.setattr(tracking.time, "strftime", lambda *a: "a-later-start")  # a new default name
    assert train_grpo.main(tiny_args(tiny_model_dir, tmp_path, *args, "--resume")) == 0
    [log_dir] = (tmp_path / "runs").iterdir()  # the same run, not a second one
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2
    losses = event_scalars(log_dir)["train/loss"]
    assert [s for s, _ in losses] == [1, 2, 3]  # step 3 once: the first run's copy is purged
    assert [v for _, v in losses] == pytest.approx([s["loss"] for s in straight], rel=1e-5, abs=1e-7)


def test_wandb_works_offline_and_a_resume_keeps_the_run_id(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = ("--num_iterations", "1", "--report_to", "wandb", "--run_name", "tiny-wandb")
    assert train_grpo.main(tiny_args(tiny_model_dir, tmp_path, *args)) == 0
    tracking = json.loads((tmp_path / "grpo_metrics.json").read_text())["tracking"]
    assert tracking["run_name"] == "tiny-wandb"
    [first] = (tmp_path / "wandb").glob(f"offline-run-*-{tracking['wandb_id']}/run-*.wandb")
    logged = first.read_bytes()
    for key in (b"train/loss", b"train/kl", b"train/reward_mean", b"eval/accuracy", b"eval/accuracy_ci95_low"):
        assert key in logged, key
    shutil.rmtree(tmp_path / "saved_model")
    assert train_grpo.main(tiny_args(tiny_model_dir, tmp_path, *args[2:], "--num_iterations", "2",
                                     "--resume")) == 0
    runs = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and all(r.name == f"run-{tracking['wandb_id']}.wandb" for r in runs)


@pytest.mark.parametrize("backend,module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_missing_tracking_package_is_one_sentence_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch,
                                                                           capsys, backend, module):
    monkeypatch.setitem(sys.modules, module, None)  # what `import` sees when the package is absent

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the missing package was reported")

    monkeypatch.setattr(plumbing, "load_model_and_tokenizer", no_loading)
    assert train_grpo.main(tiny_args(tiny_model_dir, tmp_path, "--report_to", backend)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"train_grpo.py: error: --report_to {backend} needs the {backend} package: pip install {backend} "
                   f"(or pip install -r requirements-extras.txt)")
