"""What a checkpoint of the torch backend holds and how its state round-trips through safetensors;
that it checkpoints, stops and resumes exactly as every backend does is in
tests/unit/test_backend_contract.py."""

import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from tunebus.services.trainer.backend import CHECKPOINT_STATE
from tunebus.services.trainer.backends.torch.loop import train
from tunebus.services.trainer.backends.torch.checkpoints import (
    CHECKPOINT_FILES,
    load_optimizer_state,
    load_rng_state,
    save_optimizer_state,
    save_rng_state,
)


def test_a_checkpoint_holds_the_trainer_state_weights_optimizer_and_rng(resume_runs):
    _, recorder = resume_runs("cuda").uninterrupted
    for step in recorder.steps:
        files = {p.name for p in (recorder.keep / f"step-{step}").iterdir()}
        assert files == CHECKPOINT_FILES | {CHECKPOINT_STATE}


def test_train_itself_refuses_a_checkpoint_of_other_settings(resume_runs, tiny_model, tmp_path):
    runs = resume_runs("cuda")
    _, recorder = runs.uninterrupted
    with pytest.raises(ValueError, match="different training settings"):
        train(tiny_model, runs.data, tmp_path / "adapter",
              replace(runs.case.spec, learning_rate=1e-3),
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
