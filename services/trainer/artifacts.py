"""The files beside the adapter weights that explain a run: its arguments, metrics and loss curve.

Backend-neutral: they are written from a `TrainResult`, whichever library trained.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunebus.contracts import TrainingMetrics

TRAINING_ARGS = "training_args.json"
METRICS = "metrics.json"
LOSS_CURVE = "loss_curve.json"
LOSS_PLOT = "loss_curve.png"


def write_run_files(out_dir: Path, resolved_args: dict, metrics: TrainingMetrics,
                    curve: list[dict], title: str) -> None:
    (out_dir / TRAINING_ARGS).write_text(json.dumps(resolved_args, indent=2, default=str))
    (out_dir / METRICS).write_text(metrics.model_dump_json(indent=2))
    (out_dir / LOSS_CURVE).write_text(json.dumps(curve, indent=2))
    plot_loss_curve(curve, out_dir / LOSS_PLOT, title)


def plot_loss_curve(curve: list[dict], path: Path, title: str) -> None:
    """Training loss per report window and validation loss per evaluation, against the step;
    the mean reward on a second axis when the run has one (GRPO family)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list, list]:
        points = [(p["step"], p[key]) for p in curve if p.get(key) is not None]
        return [s for s, _ in points], [v for _, v in points]

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        ax.plot(*series("train_loss"), label="train loss", color="tab:blue")
        steps, values = series("val_loss")
        ax.plot(steps, values, "o--", label="validation loss", color="tab:orange")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        steps, values = series("reward")
        if steps:
            reward_axis = ax.twinx()
            reward_axis.plot(steps, values, label="reward", color="tab:green")
            reward_axis.set_ylabel("reward")
            more_handles, more_labels = reward_axis.get_legend_handles_labels()
            handles, labels = handles + more_handles, labels + more_labels
        ax.legend(handles, labels, loc="best")
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
