"""The trainer's up-front decisions: which worker can run a request, and how it becomes a TrainSpec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tunebus.contracts import DatasetSummary, TrainingRequested
from tunebus.contracts.training import TrainerCapabilities
from tunebus.services.trainer import backends
from tunebus.contracts.training import AdapterSettings
from tunebus.services.trainer.plan import (
    DAPO_EPSILON_HIGH,
    Parent,
    init_from_refusal,
    refusal,
    train_spec,
    unserved_reason,
)

EXAMPLES = Path(__file__).parents[2] / "contracts" / "examples" / "v1"
MLX = backends.capabilities("mlx")
# A worker that can do less, as a CUDA box without bitsandbytes might announce itself.
SMALL_CUDA = TrainerCapabilities(backend="cuda", methods=["sft"], adapters=["lora"],
                                 quantization=["none"], optimizers=["adamw"])


def request(**changes) -> TrainingRequested:
    data = json.loads((EXAMPLES / "tunebus.training.requested.v1.json").read_text())["data"]
    for key, value in changes.items():
        data[key] = value if not isinstance(value, dict) else data.get(key, {}) | value
    return TrainingRequested.model_validate(data)


def dataset(train_rows: int = 100) -> DatasetSummary:
    data = json.loads((EXAMPLES / "tunebus.dataset.validated.v1.json").read_text())["data"]["dataset"]
    return DatasetSummary.model_validate(data | {"train_rows": train_rows})


def test_a_plain_lora_request_is_accepted():
    assert refusal(request(), MLX) is None


@pytest.mark.parametrize("changes, reason", [
    ({"backend": "cuda"}, "backend 'cuda' was requested; the mlx worker runs 'mlx'"),
    ({"method": "dpo"}, "method 'dpo' is not supported by the cuda worker"),
    ({"adapter": {"quantization": "4bit"}}, "quantization '4bit' is not supported by the cuda worker"),
    ({"adapter": {"type": "dora"}}, "adapter type 'dora' is not supported by the cuda worker"),
])
def test_unsupported_requests_are_refused_with_the_reason(changes, reason):
    caps = MLX if changes.get("backend") == "cuda" else SMALL_CUDA
    assert refusal(request(**changes), caps).startswith(reason)


def test_the_mlx_worker_runs_every_method_and_qlora():
    for method in ("sft", "dpo", "orpo", "cpo", "grpo"):
        assert refusal(request(method=method, adapter={"quantization": "4bit"}), MLX) is None


def test_an_unknown_reward_function_is_refused_with_the_known_ones():
    reason = refusal(request(method="grpo", grpo={"reward_functions": ["vibes"]}), MLX)
    assert reason.startswith("reward function(s) 'vibes' unknown to the mlx worker")
    assert "exact_match" in reason and "r1_accuracy_reward_func" in reason


def test_a_request_another_running_worker_can_serve_is_not_unserved():
    assert unserved_reason(request(backend="cuda"), [MLX, SMALL_CUDA]) is None
    assert unserved_reason(request(method="grpo"), [SMALL_CUDA, MLX]) is None


def test_a_request_no_running_worker_can_serve_says_why_for_each():
    reason = unserved_reason(request(method="grpo", backend="cuda"), [MLX, SMALL_CUDA])
    assert reason == ("no running trainer can serve this request: backend 'cuda' was requested; "
                      "the mlx worker runs 'mlx'; method 'grpo' is not supported by the cuda worker")


def test_a_backend_without_a_running_worker_is_named():
    reason = unserved_reason(request(backend="cuda"), [MLX])
    assert reason.startswith("no running trainer can serve this request: no cuda worker is running")


def test_epochs_become_iterations_over_the_training_rows():
    spec = train_spec(request(hyperparameters={"iters": None, "epochs": 3, "batch_size": 4}), dataset(100))
    assert spec.iters == 75


def test_batch_never_exceeds_the_training_rows():
    spec = train_spec(request(hyperparameters={"batch_size": 16}), dataset(5))
    assert spec.batch_size == 5


def test_adapter_settings_pass_through():
    spec = train_spec(request(adapter={"type": "dora", "rank": 4, "alpha": 8.0, "quantization": "8bit"}),
                      dataset())
    assert (spec.lora.kind, spec.lora.rank, spec.lora.alpha, spec.quantization) == ("dora", 4, 8.0, "8bit")


def test_checkpoints_fall_between_optimizer_updates():
    hp = {"grad_accumulation_steps": 4, "checkpoint_every": 10}
    assert train_spec(request(hyperparameters=hp), dataset()).checkpoint_every == 12
    assert train_spec(request(), dataset(), checkpoint_every=25).checkpoint_every == 25
    assert train_spec(request(hyperparameters={"checkpoint_every": 0}), dataset(),
                      checkpoint_every=25).checkpoint_every == 0


@pytest.mark.parametrize("loss_type, epsilon_high", [("dapo", DAPO_EPSILON_HIGH), ("gspo", 0.2)])
def test_grpo_family_settings_are_resolved_explicitly(loss_type, epsilon_high):
    spec = train_spec(request(method="grpo", grpo={"loss_type": loss_type}), dataset())
    assert spec.grpo.loss_type == loss_type and spec.grpo.epsilon_high == epsilon_high
    assert (spec.grpo.top_p, spec.grpo.top_k, spec.grpo.min_p) == (1.0, 0, 0.0)


def test_reward_weights_must_match_the_reward_functions():
    with pytest.raises(ValueError, match="reward_weights has 1 entries for 2 reward functions"):
        request(method="grpo", grpo={"reward_functions": ["exact_match", "format"], "reward_weights": [1.0]})


def test_observing_settings_do_not_change_what_a_checkpoint_resumes():
    base = train_spec(request(), dataset())
    observed = train_spec(request(), dataset(), checkpoint_every=7, report_interval_s=1.0)
    changed = train_spec(request(hyperparameters={"learning_rate": 0.1}), dataset())
    assert base.fingerprint() == observed.fingerprint() != changed.fingerprint()


def parent(**changes) -> Parent:
    base = request()
    settings = dict(ref="tiny:3", base_model=base.base_model, base_model_revision=None,
                    adapter=AdapterSettings(type="dora", rank=16, alpha=32.0, num_layers=2),
                    files={"mlx": {"adapters.safetensors": "s3://a/x", "adapter_config.json": "s3://a/y"}})
    return Parent(**settings | changes)


def continued(**adapter) -> TrainingRequested:
    return request(init_from="tiny@production", base_model_revision=None,
                   adapter=AdapterSettings(**adapter).model_dump())


def test_a_continued_run_takes_the_parents_shape_and_its_own_dropout_and_names_the_parent():
    ask = continued(dropout=0.1)
    assert init_from_refusal(ask, parent()) is None
    spec = train_spec(ask, dataset(), parent=parent())
    assert (spec.lora.kind, spec.lora.rank, spec.lora.alpha, spec.lora.num_layers) == ("dora", 16, 32.0, 2)
    assert spec.lora.dropout == 0.1 and spec.init_from == "tiny:3"
    assert spec.base_model == ask.base_model
    assert spec.fingerprint() != train_spec(ask, dataset(), parent=parent(ref="tiny:4")).fingerprint()


def test_a_request_giving_the_parents_shape_is_accepted():
    assert init_from_refusal(continued(type="dora", rank=16, alpha=32.0, num_layers=2), parent()) is None


def test_a_request_contradicting_the_parents_shape_is_refused_naming_each_field():
    reason = init_from_refusal(continued(rank=4, num_layers=1), parent())
    assert reason.startswith("init_from 'tiny@production' (tiny:3)")
    assert "adapter.rank is 4, the parent's 16" in reason
    assert "adapter.num_layers is 1, the parent's 2" in reason and "alpha" not in reason


def test_a_parent_of_another_base_model_is_refused_naming_both():
    reason = init_from_refusal(continued(), parent(base_model="s3://models/other"))
    assert "init_from 'tiny@production'" in reason
    assert "'s3://models/other'" in reason and repr(continued().base_model) in reason


def test_a_parent_of_another_revision_of_the_base_is_refused():
    reason = init_from_refusal(continued(), parent(base_model_revision="abc123"))
    assert "revision 'abc123'" in reason and "base model must match" in reason


def test_a_full_model_parent_is_refused_saying_why():
    full = parent(adapter=AdapterSettings.model_construct(type="full", rank=8, alpha=16.0))
    assert "not a LoRA or DoRA adapter" in init_from_refusal(continued(), full)


def test_a_parent_stored_in_no_trainable_layout_is_refused():
    assert "no adapter layout" in init_from_refusal(continued(), parent(files={}))


class RefusingStore:
    """An object store that answers every download with `error`."""

    def __init__(self, error: Exception):
        self.error = error

    def get_file(self, uri, path):
        raise self.error


def fetch_from(store, tmp_path):
    from tunebus.services.trainer.parents import fetch_parent

    files = {"adapters.safetensors": "s3://adapters/a/j/adapters.safetensors",
             "adapter_config.json": "s3://adapters/a/j/adapter_config.json"}
    parent = Parent(ref="a:1", base_model="m", base_model_revision=None,
                    adapter=AdapterSettings(), files={"mlx": files})
    return fetch_parent(store, parent, "mlx", tmp_path / "p", base_model="m", model_dir=tmp_path)


def test_a_parent_the_store_refuses_to_read_is_refused_naming_init_from_not_retried(tmp_path):
    from minio.error import S3Error
    from tunebus.services.trainer.parents import InitFromRefused

    denied = S3Error(None, "AccessDenied", "Access Denied.", "/adapters/a", "r", "h")
    with pytest.raises(InitFromRefused, match=r"^init_from 'a:1': the object store refused .*AccessDenied"):
        fetch_from(RefusingStore(denied), tmp_path)


def test_a_parent_on_a_store_that_is_down_is_left_for_a_retry(tmp_path):
    from tunebus.shared.objectstore import StoreUnavailable

    with pytest.raises(StoreUnavailable):
        fetch_from(RefusingStore(StoreUnavailable("S3 down")), tmp_path)
