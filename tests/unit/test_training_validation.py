"""Validation during training, on both backends: eval_every, early stopping, keep best, resume.

The data make the validation loss rise: training answers every question "yes", the held-out
rows answer it "no", so each update that makes "yes" likelier makes "no" less likely.
"""

import shutil
from pathlib import Path

import pytest
from tunebus.contracts import DatasetSummary, TrainingRequested
from tunebus.services.trainer import backends
from tunebus.services.trainer.backend import BEST_WEIGHTS, TrainingHooks, TrainSpec
from tunebus.services.trainer.plan import train_spec

from tests.helpers.data import write_rows

BACKENDS = ["mlx", "cuda"]


@pytest.fixture(scope="module")
def diverging_data(tmp_path_factory) -> Path:
    def row(i: int, answer: str) -> dict:
        return {"messages": [{"role": "user", "content": f"Is {i} a number?"},
                             {"role": "assistant", "content": answer}]}
    rows = [row(i, "no") for i in range(4)] + [row(i, "yes") for i in range(4, 20)]
    return write_rows(tmp_path_factory.mktemp("diverging"), rows, n_valid=4)


def run(backend: str, tiny_model: Path, data: Path, out: Path, resume_from: Path | None = None,
        **settings):
    reports, checkpoints = [], {}

    def keep_checkpoint(directory: Path, step: int) -> None:  # the directory goes after the call
        checkpoints[step] = shutil.copytree(directory, out.parent / f"{out.name}-ckpt-{step}")

    spec = TrainSpec(**{"iters": 8, "batch_size": 2, "learning_rate": 5e-2, "steps_per_report": 2,
                        "steps_per_eval": 2, "val_batches": -1, "lr_scheduler": "constant"}
                     | settings)
    hooks = TrainingHooks(on_progress=reports.append, on_checkpoint=keep_checkpoint)
    result = backends.load(backend).train(tiny_model, data, out, spec, hooks, resume_from)
    validations = [(r.step, r.val_loss) for r in reports if r.val_loss is not None]
    return result, validations, checkpoints


@pytest.mark.parametrize("backend", BACKENDS)
def test_early_stopping_ends_the_run_after_patience_validations_without_a_new_best(
        backend, tiny_model, diverging_data, tmp_path):
    result, validations, _ = run(backend, tiny_model, diverging_data, tmp_path / "out",
                                 iters=30, early_stopping_patience=2)
    losses = [loss for _, loss in validations]
    best = losses.index(min(losses))
    assert len(losses) - 1 - best == 2  # two validations in a row without a lower loss
    assert result.early_stopped and result.steps == validations[-1][0] < 30
    assert (result.best_step, result.best_val_loss) == validations[best]
    assert result.resolved_args["early_stopping_patience"] == 2


@pytest.fixture(scope="module", params=BACKENDS)
def kept(request, tiny_model, diverging_data, tmp_path_factory):
    backend, root = request.param, tmp_path_factory.mktemp(f"keep-{request.param}")
    return {
        "backend": backend,
        "best": run(backend, tiny_model, diverging_data, root / "best", keep="best",
                    checkpoint_every=4),
        "last": run(backend, tiny_model, diverging_data, root / "last"),
        "root": root,
    }


def test_eval_every_sets_the_steps_that_report_a_validation_loss(kept):
    last, validations, _ = kept["last"]
    steps = [step for step, _ in validations]
    # Every 2 steps and at the last; the MLX backend also validates at step 1, as mlx-lm does.
    assert steps == ([1, 2, 4, 6, 8] if kept["backend"] == "mlx" else [2, 4, 6, 8])
    assert last.final_val_loss == validations[-1][1]
    assert last.resolved_args["steps_per_eval"] == 2 and not last.early_stopped


def test_keep_best_stores_the_adapter_of_the_lowest_validation_loss(kept):
    (best, validations, _), (last, _, _) = kept["best"], kept["last"]
    assert (best.best_step, best.best_val_loss) == min(validations, key=lambda v: v[1])
    assert best.best_step < 8 and not best.early_stopped  # the loss rose: not the last step's
    weights = "adapters.safetensors"
    assert (best.adapter_dir / weights).read_bytes() != (last.adapter_dir / weights).read_bytes()
    assert best.resolved_args["keep"] == "best" and last.resolved_args["keep"] == "last"


def test_a_resumed_keep_best_run_stores_the_same_adapter(kept, tiny_model, diverging_data):
    best, _, checkpoints = kept["best"]
    checkpoint = checkpoints[4]
    assert (checkpoint / BEST_WEIGHTS).is_file()
    resumed, _, _ = run(kept["backend"], tiny_model, diverging_data, kept["root"] / "resumed",
                        resume_from=checkpoint, keep="best", checkpoint_every=4)
    assert resumed.resumed_from_step == 4 and resumed.best_step == best.best_step
    weights = "adapters.safetensors"
    assert (resumed.adapter_dir / weights).read_bytes() == (best.adapter_dir / weights).read_bytes()


def test_the_request_fields_reach_the_spec():
    request = TrainingRequested.model_validate({
        "job_id": "job-1", "adapter_name": "bot", "base_model": "m",
        "dataset": {"uri": "s3://tunebus-datasets/d.jsonl"},
        "hyperparameters": {"iters": 40, "eval_every": 5, "keep": "best",
                            "early_stopping_patience": 3}})
    dataset = DatasetSummary.model_validate({
        "format": "messages", "rows": 100, "train_rows": 90, "valid_rows": 10, "sha256": "0",
        "train_uri": "s3://bk/t", "train_sha256": "0", "valid_uri": "s3://bk/v",
        "valid_sha256": "0", "manifest_uri": "s3://bk/m"})
    spec = train_spec(request, dataset)
    assert (spec.steps_per_eval, spec.keep, spec.early_stopping_patience) == (5, "best", 3)
    default = train_spec(TrainingRequested.model_validate(
        request.model_dump() | {"hyperparameters": {"iters": 40}}), dataset)
    assert (default.steps_per_eval, default.keep, default.early_stopping_patience) == (20, "last", 0)
