"""Every method of the job contract trains on the MLX backend: SFT (LoRA, DoRA, QLoRA), DPO, ORPO,
CPO and the GRPO family, each moving its objective the right way on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlx_lm import load
from tunebus.services.trainer.backend import GRPOSpec, TrainingHooks, TrainSpec
from tunebus.services.trainer.backends.mlx.loop import train

from tests.helpers.backends import quick_spec, write_chat_data
from tests.helpers.data import write_rows


@pytest.fixture(scope="module")
def preference_data(tmp_path_factory) -> Path:
    rows = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}.",
             "rejected": f"I think it is {a * b + 1}, maybe."}
            for a in range(1, 7) for b in range(1, 5)]
    return write_rows(tmp_path_factory.mktemp("preference"), rows)


def test_dpo_lowers_its_loss_and_reports_preference_accuracy(tiny_model, preference_data, tmp_path):
    reports = []
    spec = TrainSpec(iters=20, method="dpo", batch_size=2, learning_rate=1e-2, steps_per_report=5,
                     steps_per_eval=10, val_batches=2)
    result = train(tiny_model, preference_data, tmp_path / "dpo", spec,
                   TrainingHooks(on_progress=reports.append))
    assert result.final_loss < result.first_loss
    assert reports[-1].metrics["accuracies"] > reports[0].metrics["accuracies"]
    method = result.resolved_args["method_args"]
    assert (method["beta"], method["dpo_loss_type"], method["delta"]) == (0.1, "sigmoid", 50.0)


@pytest.mark.parametrize("method", ["orpo", "cpo"])
def test_orpo_and_cpo_lower_their_loss(method, tiny_model, preference_data, tmp_path):
    spec = TrainSpec(iters=10, method=method, batch_size=2, learning_rate=1e-2,
                     steps_per_report=5, steps_per_eval=100, val_batches=1)
    result = train(tiny_model, preference_data, tmp_path / method, spec)
    assert result.final_loss < result.first_loss
    load(str(tiny_model), adapter_path=str(result.adapter_dir))


def test_a_grpo_family_method_raises_the_reward(tiny_model, tmp_path):
    # One sampled token per completion, rewarded when it contains an "a": the group-relative
    # advantage soon favours such tokens.
    rows = [{"prompt": f"Say a word with the letter a ({i}).", "answer": "a", "system": "Reply."}
            for i in range(24)]
    data = write_rows(tmp_path / "grpo-data", rows)
    grpo = GRPOSpec(loss_type="dapo", group_size=8, max_completion_length=1, epsilon_high=0.28,
                    reward_functions=("contains",))
    spec = TrainSpec(iters=30, method="grpo", batch_size=2, learning_rate=1e-2, seed=0,
                     steps_per_report=5, steps_per_eval=100, val_batches=1, grpo=grpo,
                     # a constant rate, unclipped: the reward's rise, not the schedule, is tested
                     lr_scheduler="constant", max_grad_norm=0.0)
    reports = []
    result = train(tiny_model, data, tmp_path / "grpo", spec, TrainingHooks(on_progress=reports.append))
    assert result.final_reward > result.first_reward + 0.3
    assert reports[-1].reward == result.final_reward
    method = result.resolved_args["method_args"]
    assert (method["grpo_loss_type"], method["epsilon_high"], method["reward_functions"]) == (
        "bnpo", 0.28, ["contains"])


def test_qlora_trains_on_a_4bit_base_and_loads_back(tiny_model, tmp_path):
    data = write_chat_data(tmp_path / "chat")
    result = train(tiny_model, data, tmp_path / "qlora", quick_spec(iters=10, quantization="4bit"))
    assert result.final_loss < result.first_loss
    assert result.resolved_args["base_quantization"] == {"bits": 4, "group_size": 64, "mode": "affine"}
    load(str(tiny_model), adapter_path=str(result.adapter_dir))
