"""Experiment tracking: each step's record and each eval, sent to TensorBoard or W&B.

What it buys: the curves a researcher watches (reward, KL, entropy, accuracy), live and
beside other runs, with one flag (--report_to). What it costs: nothing unless asked.
Each backend is imported only when named, and only rank 0 talks to it.

A resumed run writes to the same run. Its name and W&B id live in the metrics, and so
in every checkpoint. Steps after the checkpoint run again: TensorBoard is told to drop
what the interrupted run logged past it; W&B drops steps it already holds, and since a
resume is exact their values are the same.
"""

import dataclasses
import json
import secrets
import time
from pathlib import Path

import plumbing

BACKENDS = ("none", "tensorboard", "wandb")
CATEGORY_TAGS = {"+": "add", "-": "subtract", "*": "multiply"}  # countdown's target ranges stay as they are


def require(backend: str):
    """The backend's module, imported now, so a missing package fails before the model loads."""
    try:
        if backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            return SummaryWriter
        if backend == "wandb":
            import wandb
            return wandb
    except ImportError:
        raise plumbing.UsageError(f"--report_to {backend} needs the {backend} package: pip install {backend} "
                                  f"(or pip install -r requirements-extras.txt)") from None
    return None


def samples_markdown(samples: list) -> str:
    """A few completions as a table TensorBoard's text tab renders."""
    def cell(text):
        return str(text).replace("|", "\\|").replace("\n", " ")
    rows = [f"| {cell(s['question'])} | {cell(s['completion'])} | {s['reward']:.2f} |" for s in samples]
    return "\n".join(["| question | completion | reward |", "|---|---|---|", *rows])


class Tracker:
    """Scalars and text for one run; a no-op for --report_to none and on ranks other than 0."""

    def __init__(self, cfg, metrics: dict, start_step: int, dist: plumbing.Dist):
        self.backend = cfg.report_to if dist.is_main else "none"
        if self.backend == "none":
            return
        info = metrics.setdefault("tracking", {})  # saved with the metrics, so a resume finds it
        default_name = f"{Path(cfg.output_dir).resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}"
        info.setdefault("run_name", cfg.run_name or default_name)
        module = require(self.backend)
        if self.backend == "tensorboard":
            self.log_dir = Path(cfg.output_dir) / "runs" / info["run_name"]
            # purge_step hides what an interrupted run logged after its last checkpoint
            self.writer = module(log_dir=str(self.log_dir), purge_step=start_step + 1 if start_step else None,
                                 flush_secs=30)
            if start_step == 0:
                self.writer.add_text("config", f"```\n{json.dumps(dataclasses.asdict(cfg), indent=1)}\n```", 0)
        else:
            self.wandb = module
            info.setdefault("wandb_id", secrets.token_hex(4))  # not `random`: it is seeded
            self.run = module.init(project=cfg.wandb_project, name=info["run_name"], id=info["wandb_id"],
                                   resume="allow", dir=cfg.output_dir, config=dataclasses.asdict(cfg))

    def log(self, step: int, scalars: dict, texts: dict | None = None) -> None:
        if self.backend == "tensorboard":
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            for key, samples in (texts or {}).items():
                self.writer.add_text(key, samples_markdown(samples), step)
        elif self.backend == "wandb" and step >= self.run.step:  # W&B refuses steps it has passed
            tables = {key: self.wandb.Table(columns=["question", "completion", "reward"],
                                            data=[[s["question"], s["completion"], s["reward"]] for s in samples])
                      for key, samples in (texts or {}).items()}
            self.run.log({**scalars, **tables}, step=step)

    def log_step(self, record: dict, samples: list | None = None) -> None:
        """Every number of the step record, as train/<key>; a few completions when given."""
        scalars = {f"train/{k}": float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        self.log(record["step"], scalars, {"train/samples": samples} if samples else None)

    def log_eval(self, rec: dict) -> None:
        """Accuracy with its 95% interval, per category, format rate, and the eval's samples."""
        lo, hi = rec["accuracy_ci95"]
        scalars = {"eval/accuracy": rec["accuracy"], "eval/accuracy_ci95_low": lo, "eval/accuracy_ci95_high": hi,
                   "eval/format_rate": rec["format_rate"], "eval/reward_mean": rec["reward_mean"],
                   **{f"eval/accuracy_{CATEGORY_TAGS.get(c, c)}": v["accuracy"] for c, v in rec["by_category"].items()}}
        self.log(rec["step"], scalars, {"eval/samples": rec["samples"]})

    def close(self) -> None:
        if self.backend == "tensorboard":
            self.writer.close()
        elif self.backend == "wandb":
            self.run.finish()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
