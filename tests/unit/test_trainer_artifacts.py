"""The files that explain a run beside its adapter, and how `tunebus watch` shows progress."""

from __future__ import annotations

import json

from tunebus.contracts import TrainingMetrics, TrainingProgress
from tunebus.services.trainer.artifacts import write_run_files
from tunebus.shared.cli.watching import eta_text, progress_stats

CURVE = [
    {"step": 1, "val_loss": 3.0},
    {"step": 5, "train_loss": 2.5, "learning_rate": 1e-3, "reward": 0.1},
    {"step": 10, "train_loss": 2.0, "learning_rate": 1e-3, "reward": 0.4},
    {"step": 10, "val_loss": 2.2},
]


def test_arguments_metrics_and_the_loss_curve_are_written_as_json_and_a_png(tmp_path):
    metrics = TrainingMetrics(first_loss=2.5, final_loss=2.0, steps=10, trained_tokens=100,
                              seconds=1.0, tokens_per_second=100.0)
    write_run_files(tmp_path, {"learning_rate": 1e-3}, metrics, CURVE, title="adder · job-1")
    assert json.loads((tmp_path / "loss_curve.json").read_text()) == CURVE
    assert json.loads((tmp_path / "training_args.json").read_text()) == {"learning_rate": 1e-3}
    assert TrainingMetrics.model_validate_json((tmp_path / "metrics.json").read_text()) == metrics
    png = (tmp_path / "loss_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_the_progress_line_shows_what_the_event_carries():
    event = TrainingProgress(job_id="j", step=5, total_steps=10, epoch=0.5, train_loss=2.3456,
                             val_loss=2.5, learning_rate=2e-4, tokens_per_second=1234.5,
                             peak_memory_gb=0.123, eta_seconds=83.4)
    assert progress_stats(event) == (
        "loss 2.346 · val 2.500 · lr 2.0e-04 · 1,234 tok/s · 0.12 GB · epoch 0.50")
    assert eta_text(event.eta_seconds) == "ETA 0:01:23"
    grpo = TrainingProgress(job_id="j", step=1, total_steps=10, reward=0.75)
    assert progress_stats(grpo) == "reward 0.750" and eta_text(None) == ""
