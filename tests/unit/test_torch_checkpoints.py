"""Checkpoints of the torch backend: safetensors + JSON only, and a resumed run ends exactly as
the uninterrupted one."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from tunebus.services.trainer.backend import (
    CHECKPOINT_STATE,
    CheckpointState,
    LoraSpec,
    TrainingStopped,
)
from tunebus.services.trainer.backends.torch.loop import train
from tunebus.services.trainer.backends.torch.checkpoints import (
    CHECKPOINT_FILES,
    load_optimizer_state,
    load_rng_state,
    save_optimizer_state,
    save_rng_state,
)

from tests.helpers.backends import Recorder, quick_spec, write_chat_data

# Dropout, accumulation and warmup: a resume that missed the RNG, optimizer or schedule state
# would end with other weights.
SPEC = {"iters": 24, "batch_size": 2, "steps_per_report": 4, "steps_per_eval": 8,
        "checkpoint_every": 8, "grad_accumulation_steps": 2, "warmup_steps": 4,
        "lora": LoraSpec(dropout=0.1)}


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return write_chat_data(tmp_path_factory.mktemp("data"), n_train=30, n_valid=4)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, chat_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    recorder = Recorder(root / "checkpoints")
    result = train(tiny_model, chat_data, root / "adapter", quick_spec(**SPEC), recorder.hooks())
    return result, recorder


def test_checkpoints_come_every_n_steps_and_hold_no_pickle(uninterrupted):
    result, recorder = uninterrupted
    assert recorder.steps == [8, 16]  # none at the last step: the adapter is the result then
    for step in recorder.steps:
        files = {p.name for p in (recorder.keep / f"step-{step}").iterdir()}
        assert files == CHECKPOINT_FILES | {CHECKPOINT_STATE}
        state = CheckpointState.read(recorder.keep / f"step-{step}")
        assert (state.step, state.backend, state.total_steps) == (step, "cuda", 24)
    assert result.resolved_args["checkpoint_every"] == 8


def test_resume_after_a_kill_ends_exactly_as_the_uninterrupted_run(uninterrupted, tiny_model,
                                                                   chat_data, tmp_path):
    whole, recorder = uninterrupted
    # A worker killed at step 13 leaves the step-8 checkpoint; the next one starts from there.
    resumed = Recorder(tmp_path / "checkpoints")
    result = train(tiny_model, chat_data, tmp_path / "adapter", quick_spec(**SPEC), resumed.hooks(),
                   resume_from=recorder.keep / "step-8")
    assert result.resumed_from_step == 8
    assert resumed.reports[0].step > 8 and resumed.steps == [16]
    assert result.curve == whole.curve
    assert result.trained_tokens == whole.trained_tokens
    for name in ("adapters.safetensors", "peft/adapter_model.safetensors"):
        assert (result.adapter_dir / name).read_bytes() == (whole.adapter_dir / name).read_bytes()


def test_a_stop_checkpoints_the_last_step_and_resuming_it_gives_the_same_adapter(
        uninterrupted, tiny_model, chat_data, tmp_path):
    whole, _ = uninterrupted
    stopping = Recorder(tmp_path / "checkpoints", stop_after=10)
    with pytest.raises(TrainingStopped) as stopped:
        train(tiny_model, chat_data, tmp_path / "first", quick_spec(**SPEC), stopping.hooks())
    step = stopped.value.step
    assert 10 <= step < 16 and step != 8 and stopping.steps == [8, step]
    assert not (tmp_path / "first" / "adapter_config.json").exists()

    result = train(tiny_model, chat_data, tmp_path / "second", quick_spec(**SPEC),
                   Recorder(tmp_path / "more").hooks(),
                   resume_from=tmp_path / "checkpoints" / f"step-{step}")
    assert result.steps == 24 and result.resumed_from_step == step
    assert ((result.adapter_dir / "adapters.safetensors").read_bytes()
            == (whole.adapter_dir / "adapters.safetensors").read_bytes())


def test_a_checkpoint_of_other_settings_is_refused(uninterrupted, tiny_model, chat_data, tmp_path):
    _, recorder = uninterrupted
    with pytest.raises(ValueError, match="different training settings"):
        train(tiny_model, chat_data, tmp_path / "adapter", quick_spec(**SPEC | {"learning_rate": 1e-3}),
              resume_from=recorder.keep / "step-8")


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW(params, lr=0.1, betas=(0.8, 0.95))
    for _ in range(3):
        sum(p.square().sum() for p in params).backward()
        optimizer.step()
    save_optimizer_state(optimizer.state_dict(), tmp_path / "optimizer.safetensors")

    restored = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1.0)
    restored.load_state_dict(load_optimizer_state(tmp_path / "optimizer.safetensors"))
    assert restored.param_groups[0]["betas"] == (0.8, 0.95)
    assert restored.param_groups[0]["lr"] == 0.1
    for index in (0, 1):
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(restored.state[restored.param_groups[0]["params"][index]][name],
                               optimizer.state[params[index]][name])


def test_rng_state_round_trips_through_safetensors(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.standard_normal(), torch.rand(1)  # a cached gaussian too
    save_rng_state(tmp_path / "rng.safetensors")
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    load_rng_state(tmp_path / "rng.safetensors")
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected
