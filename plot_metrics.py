"""Draw a run's curves from grpo_metrics.json.

    python plot_metrics.py                   # raw curves
    python plot_metrics.py --smooth          # moving average (window 10), raw values faint behind
    python plot_metrics.py --smooth --window 25 --metrics runs/a/grpo_metrics.json --out runs/a

train_grpo.py calls `plot_all` every few steps, so the PNGs are live during a run; this
script redraws them at any time, also while the run is still writing the file.
"""

import argparse
import json
import math
import sys
from pathlib import Path

CURVE_FILE = "grpo_training_curve.png"
KL_FILE = "grpo_kl_divergence.png"


class MetricsError(Exception):
    """A metrics file that cannot be plotted; the message says why and what to do."""


def load_metrics(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"no metrics file at {path}; train first (python train_grpo.py) or pass --metrics PATH")
    text = path.read_text()
    if not text.strip():
        raise MetricsError(f"{path} is empty; it is written after the first training step, so wait a step and retry")
    try:
        metrics = json.loads(text)
    except json.JSONDecodeError as err:
        raise MetricsError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); "
                           f"it may be truncated: rerun the training or restore it from a checkpoint") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("steps"), list):
        raise MetricsError(f"{path} has no 'steps' list; is it a grpo_metrics.json written by train_grpo.py?")
    return metrics


def moving_average(values, window: int) -> list:
    """Trailing mean over the last `window` points (fewer at the start), so the smoothed
    curve has a value at every step and never looks into the future."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _series(records, key):
    """(steps, values) of the finite values only: a skipped step's NaN (null in the JSON)
    would otherwise poison every later point of the moving average."""
    pairs = [(r["step"], r[key]) for r in records
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _draw(ax, steps, values, label, color, window):
    if not steps:
        return
    if window and window > 1:
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
        ax.plot(steps, moving_average(values, window), color=color, linewidth=2,
                label=f"{label} (avg {window})")
    else:
        ax.plot(steps, values, color=color, linewidth=1.5, label=label, marker="o" if len(steps) < 3 else None)


def _title(metrics, what):
    cfg = metrics.get("config", {})
    model, task = cfg.get("model", "?"), cfg.get("task", "?")
    return f"GRPO {what}: {task}, {model}"


def plot_training_curve(metrics: dict, path, window: int = 0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    steps = metrics.get("steps", [])
    _draw(ax, *_series(steps, "reward_mean"), "train reward (mean)", "tab:blue", window)
    _draw(ax, *_series(steps, "accuracy"), "train accuracy (sampled)", "tab:orange", window)
    ev_steps, ev_acc = _series(metrics.get("eval", []), "accuracy")
    if ev_steps:
        ax.plot(ev_steps, ev_acc, color="tab:green", marker="s", linewidth=2, label="val accuracy (greedy)")
    fmt_steps, fmt = _series(metrics.get("eval", []), "format_rate")
    if fmt_steps:
        ax.plot(fmt_steps, fmt, color="tab:green", marker="^", linestyle="--", linewidth=1.5,
                label="val format rate (greedy)")
    ax.set_xlabel("training step")
    ax.set_ylabel("reward / accuracy")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(_title(metrics, "training curve"))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kl(metrics: dict, path, window: int = 0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    _draw(ax, *_series(metrics.get("steps", []), "kl"), "KL(policy || reference), k3 capped per token", "tab:red", window)
    ax.set_xlabel("training step")
    ax.set_ylabel("mean KL per token (nats)")
    ax.set_title(_title(metrics, "KL to the reference"))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(metrics: dict, out_dir=".", window: int = 0) -> list:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / CURVE_FILE, out / KL_FILE]
    plot_training_curve(metrics, paths[0], window)
    plot_kl(metrics, paths[1], window)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Redraw the training plots from grpo_metrics.json.")
    parser.add_argument("--metrics", default="grpo_metrics.json", help="metrics file written by train_grpo.py")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: the metrics file's folder)")
    parser.add_argument("--smooth", action="store_true", help="draw a moving average over the raw values")
    parser.add_argument("--window", type=int, default=10, help="moving-average window in steps (with --smooth)")
    args = parser.parse_args(argv)
    if args.window < 1:
        parser.error("--window must be at least 1")
    try:
        metrics = load_metrics(args.metrics)
    except MetricsError as err:
        print(f"plot_metrics.py: error: {err}", file=sys.stderr)
        return 1
    out = args.out if args.out is not None else str(Path(args.metrics).parent)
    paths = plot_all(metrics, out, args.window if args.smooth else 0)
    n_steps, n_eval = len(metrics["steps"]), len(metrics.get("eval", []))
    print(f"{n_steps} steps, {n_eval} evals -> " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
