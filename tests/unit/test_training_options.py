"""Optimizers, learning-rate schedules, weight decay and clipping: one contract, both backends.

Each test runs both trainer backends on the tiny model for a few steps and checks what the
request promised against a formula or an exact consequence: the learning rate of every update
is backend.lr_schedule's; with LoRA's B factor starting at zero the first update leaves A's
gradient at zero, so SGD moves B by exactly lr x the clipped gradient norm, and AdamW shrinks A
by exactly (1 - lr x weight_decay).
"""

import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from tunebus.contracts import DatasetSummary, TrainingRequested
from tunebus.services.trainer import backends
from tunebus.services.trainer.backend import ResolvedArgs, TrainingHooks, TrainSpec
from tunebus.services.trainer.plan import refusal, train_spec

from tests.helpers.data import write_rows

BACKENDS = ["mlx", "cuda"]
QA = [("What colour is the sky?", "The sky is blue."), ("Where is the ball?", "In the garden.")]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    rows = [{"messages": [{"role": "user", "content": QA[i % 2][0]},
                          {"role": "assistant", "content": QA[i % 2][1]}]} for i in range(16)]
    return write_rows(tmp_path_factory.mktemp("chat"), rows)


def run(backend: str, tiny_model: Path, data: Path, out: Path, **settings):
    reports, started = [], []
    spec = TrainSpec(**{"iters": 8, "batch_size": 2, "learning_rate": 1e-2, "steps_per_report": 1,
                        "steps_per_eval": 100, "val_batches": 1} | settings)
    hooks = TrainingHooks(on_progress=reports.append,
                          on_start=lambda args, _: started.append(args))
    result = backends.load(backend).train(tiny_model, data, out, spec, hooks)
    return result, reports, started


def expected_rate(update: int, *, lr: float, schedule: str, warmup: int, updates: int,
                  min_lr_ratio: float) -> float:
    """The rate of update `update` (0-based), written out from the request's documentation."""
    start = 0.0 if schedule == "constant" else min_lr_ratio
    if update < warmup:
        return lr * (start + (1 - start) * update / warmup)
    if schedule == "constant":
        return lr
    progress = min(1.0, (update - warmup) / max(1, updates - warmup))
    shape = 1 - progress if schedule == "linear" else (1 + math.cos(math.pi * progress)) / 2
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("schedule", "warmup", "min_lr_ratio"), [
    ("cosine", 2, 0.1), ("linear", 3, 0.0), ("constant", 2, 0.0)])
def test_the_learning_rate_of_every_update_follows_the_schedule(
        backend, schedule, warmup, min_lr_ratio, tiny_model, chat_data, tmp_path):
    result, reports, started = run(backend, tiny_model, chat_data, tmp_path / "out",
                                   lr_scheduler=schedule, warmup_steps=warmup,
                                   min_lr_ratio=min_lr_ratio)
    rates = [r.learning_rate for r in reports]
    assert [r.step for r in reports] == list(range(1, 9))
    # A report at step s follows update s - 1 (one update per batch here).
    assert rates == pytest.approx([
        expected_rate(s - 1, lr=1e-2, schedule=schedule, warmup=warmup, updates=8,
                      min_lr_ratio=min_lr_ratio) for s in range(1, 9)], rel=1e-5, abs=1e-9)
    assert result.resolved_args["lr_schedule"] == {
        "name": schedule, "learning_rate": 1e-2, "warmup_steps": warmup,
        "warmup_start": min_lr_ratio, "decay_steps": 0 if schedule == "constant" else 8 - warmup,
        "min_lr_ratio": min_lr_ratio, "optimizer_updates": 8}
    assert started == [result.resolved_args]


def test_resolved_args_have_one_key_set_on_both_backends(tiny_model, chat_data, tmp_path):
    args = {b: run(b, tiny_model, chat_data, tmp_path / b, iters=1)[0].resolved_args
            for b in BACKENDS}
    assert list(args["mlx"]) == list(args["cuda"]) == ResolvedArgs.keys()
    shared = ["optimizer", "optimizer_config", "weight_decay", "max_grad_norm", "merge",
              "mask_prompt", "world_size", "distributed", "lora_parameters", "num_layers"]
    mlx, cuda = ({k: a[k] for k in shared} for a in args.values())
    assert mlx["optimizer_config"].pop("class") == "mlx.optimizers.AdamW"
    assert cuda["optimizer_config"].pop("class") == "torch.optim.AdamW"
    assert mlx == cuda


def lora_factors(adapter_dir: Path, factor: str) -> dict[str, np.ndarray]:
    weights = load_file(adapter_dir / "adapters.safetensors")  # mlx-lm's layout, both backends
    return {name: value for name, value in weights.items() if name.endswith(f".lora_{factor}")}


def norm(tensors: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float((t.astype(np.float64) ** 2).sum()) for t in tensors.values()))


@pytest.fixture(scope="module", params=BACKENDS)
def one_update(request, tiny_model, chat_data, tmp_path_factory):
    """One SGD update at lr 1 with the gradient clipped to 1e-3 and without clipping, and one
    AdamW update with weight decay, on the same seed (so the same initial A)."""
    backend, root = request.param, tmp_path_factory.mktemp(f"update-{request.param}")
    common = {"iters": 1, "lr_scheduler": "constant"}
    runs = {
        "clipped": run(backend, tiny_model, chat_data, root / "clipped", optimizer="sgd",
                       learning_rate=1.0, max_grad_norm=1e-3, **common),
        "unclipped": run(backend, tiny_model, chat_data, root / "unclipped", optimizer="sgd",
                         learning_rate=1.0, max_grad_norm=0.0, **common),
        "decayed": run(backend, tiny_model, chat_data, root / "decayed", optimizer="adamw",
                       learning_rate=0.1, weight_decay=0.5, **common),
    }
    return {name: result.adapter_dir for name, (result, _, _) in runs.items()}


def test_clipping_bounds_the_global_gradient_norm_of_an_update(one_update):
    # B started at 0, so after one SGD step at lr 1 it is minus the (clipped) gradient.
    assert norm(lora_factors(one_update["clipped"], "b")) == pytest.approx(1e-3, rel=1e-3)
    assert norm(lora_factors(one_update["unclipped"], "b")) > 1e-2


def test_weight_decay_shrinks_weights_that_got_no_gradient(one_update):
    initial = lora_factors(one_update["unclipped"], "a")  # SGD left A alone: zero gradient
    decayed = lora_factors(one_update["decayed"], "a")
    assert initial.keys() == decayed.keys() and initial
    for name, a in initial.items():
        np.testing.assert_allclose(decayed[name], a * (1 - 0.1 * 0.5), rtol=1e-5, atol=1e-8)


def request(**hyperparameters) -> TrainingRequested:
    return TrainingRequested.model_validate({
        "job_id": "job-1", "adapter_name": "bot", "base_model": "m",
        "dataset": {"uri": "s3://tunebus-datasets/d.jsonl"}, "hyperparameters": hyperparameters})


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_worker_without_bitsandbytes_refuses_its_optimizers_naming_the_field(backend):
    reason = refusal(request(optimizer="paged_adamw_8bit"), backends.capabilities(backend))
    assert reason.startswith(f"optimizer 'paged_adamw_8bit' is not supported by the {backend} "
                             "worker (supported: adafactor, adam, adamw, sgd): ")
    assert ("CUDA" in reason) and refusal(request(optimizer="adafactor"),
                                          backends.capabilities(backend)) is None


def test_the_torch_backend_itself_refuses_a_bitsandbytes_optimizer_on_the_cpu(
        tiny_model, chat_data, tmp_path):
    with pytest.raises(ValueError,
                       match=r"optimizer 'adamw_8bit' needs a CUDA GPU \(bitsandbytes\)"):
        run("cuda", tiny_model, chat_data, tmp_path / "out", optimizer="adamw_8bit")


@pytest.mark.parametrize(("hyperparameters", "message"), [
    ({"warmup_steps": 2, "warmup_ratio": 0.1}, "either warmup_steps or warmup_ratio"),
    ({"lr_scheduler": "constant", "min_lr_ratio": 0.1}, "min_lr_ratio applies to"),
    ({"optimizer": "adam", "weight_decay": 0.1}, "optimizer 'adam' has no weight decay"),
    ({"optimizer": "lion"}, "hyperparameters.optimizer"),
])
def test_contradictory_or_unknown_settings_are_rejected_by_the_contract(hyperparameters, message):
    with pytest.raises(ValueError, match=message):
        request(**hyperparameters)


def test_warmup_ratio_counts_optimizer_updates_rounded_up():
    dataset = DatasetSummary.model_validate({
        "format": "messages", "rows": 100, "train_rows": 90, "valid_rows": 10, "sha256": "0",
        "train_uri": "s3://bk/t", "train_sha256": "0", "valid_uri": "s3://bk/v",
        "valid_sha256": "0", "manifest_uri": "s3://bk/m"})
    spec = train_spec(request(iters=50, grad_accumulation_steps=4, warmup_ratio=0.1), dataset)
    assert (spec.warmup_steps, spec.optimizer, spec.lr_scheduler, spec.max_grad_norm) == (
        2, "adamw", "cosine", 1.0)  # ceil(0.1 * ceil(50 / 4)) = 2
