"""What goes beside the adapter weights: the adapter in both layouts, and the files that explain
the run (its arguments, metrics and loss curve).

Backend-neutral: whichever library trained, the adapter directory ends up holding mlx-lm's layout
at its root and PEFT's under `peft/`, so anyone with an S3 client can load either with the
library's own loader, and the run files are written from a `TrainResult`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import structlog
from tunebus.contracts import TrainingMetrics

from tunebus.shared.adapter_layouts import (
    LOSS_CURVE,
    LOSS_PLOT,
    METRICS,
    MLX_CONFIG,
    PEFT_CONFIG,
    PEFT_DIR,
    TRAINING_ARGS,
    mlx_to_peft,
)

# Settings that name places on the worker (its model cache, dataset and output directories):
# meaningless to whoever downloads the adapter, so they never leave the worker.
WORKER_PATHS = ("model", "data", "adapter_path", "peft_adapter_path")

log = structlog.get_logger()


def without_worker_paths(args: dict, base_model: str, revision: str | None = None) -> dict:
    """`args` as they ship with the adapter: `model` is the base model as the request named it
    (hub id or s3:// URI), with its revision; no path of the worker is left."""
    shipped = {key: value for key, value in args.items() if key not in WORKER_PATHS}
    shipped["model"] = base_model
    if revision is not None:
        shipped["base_model_revision"] = revision
    return shipped


def applied_mask_prompt(resolved_args: dict, requested: bool) -> bool:
    """Whether the loss was on the completions only: as the backend resolved it for this data
    (a dataset without prompts has nothing to mask), else as the request asked."""
    return bool(resolved_args.get("mask_prompt", requested))


def ship_mlx_config(adapter_dir: Path, base_model: str, revision: str | None = None) -> None:
    """Rewrite the mlx-lm adapter_config.json without the worker's paths. mlx-lm's loader reads
    only the adapter's shape from it (fine_tune_type, num_layers, lora_parameters), so
    `mlx_lm.load(model, adapter_path=)` loads it as before, wherever it was downloaded."""
    path = adapter_dir / MLX_CONFIG
    if not path.is_file():
        return
    config = without_worker_paths(json.loads(path.read_text(encoding="utf-8")), base_model, revision)
    path.write_text(json.dumps(config, indent=4, sort_keys=True) + "\n", encoding="utf-8")


def add_peft_layout(adapter_dir: Path, base_model: str, revision: str | None = None) -> bool:
    """Make `adapter_dir` hold the PEFT layout in `peft/` beside the mlx-lm layout at its root.

    A backend that wrote `peft/` itself (torch) keeps its copy; otherwise it is converted from the
    mlx-lm adapter, exactly (tunebus.shared.adapter_layouts). Either way its adapter_config.json
    names the base model as the request did (hub id, s3:// URI or path), not the worker's cache
    directory, and the requested revision. An adapter PEFT cannot express stays MLX-only, with a
    warning: that never fails the job. True when `peft/` is there.
    """
    peft_dir = adapter_dir / PEFT_DIR
    if not (peft_dir / PEFT_CONFIG).is_file():
        try:
            mlx_to_peft(adapter_dir, peft_dir, base_model=base_model)
        except ValueError as e:  # AdapterFormatError: a layout PEFT cannot express, and why
            shutil.rmtree(peft_dir, ignore_errors=True)
            log.warning("adapter stored in the MLX layout only: no PEFT copy", reason=str(e))
            return False
    config_path = peft_dir / PEFT_CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_model
    if revision is not None:
        config["revision"] = revision
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return True


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
