"""What a checkpoint of the MLX backend holds; that it checkpoints, stops and resumes exactly as
every backend does is in tests/unit/test_backend_contract.py."""

from __future__ import annotations

import json

import mlx.core as mx


def test_a_checkpoint_holds_weights_optimizer_rng_and_data_position_as_safetensors_and_json(resume_runs):
    _, stopping, _ = resume_runs("mlx").stopped
    directory = stopping.keep / "step-10"
    assert {p.name for p in directory.iterdir()} == {
        "adapters.safetensors", "adapter_config.json", "optimizer.safetensors", "rng.safetensors",
        "state.json"}
    # The weights and their config are an mlx-lm adapter: a later job continues from it.
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["rank"] == 8
    optimizer = mx.load(str(directory / "optimizer.safetensors"))
    assert optimizer["step"].item() == 5  # 10 batches, an update every 2
    assert any(name.endswith(".lora_a.m") for name in optimizer)
    assert set(mx.load(str(directory / "rng.safetensors"))) == {"mlx_key", "numpy_keys"}
    state = json.loads((directory / "state.json").read_text())
    assert (state["step"], state["total_steps"], state["backend"], state["seed"]) == (10, 30, "mlx", 0)
    assert state["adapter"] == {"kind": "lora", "rank": 8, "alpha": 16.0, "dropout": 0.0,
                                "target_modules": None, "num_layers": None}
    assert state["init_from"] is None
    assert state["rng"]["numpy"]["bit_generator"] == "MT19937"
    assert state["data_position"]["batches_drawn"] == 10
    assert [p["step"] for p in state["curve"] if "train_loss" in p] == [5, 10]
