"""Synthetic adapters on disk, for the conversion and artifact tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

HIDDEN, KV = 16, 8
SHAPES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.v_proj": (HIDDEN, KV)}  # (in, out)


def write_mlx_adapter(directory: Path, *, kind="lora", layers=(2, 3), rank=4, scale=2.0,
                      seed=0) -> Path:
    """An mlx-lm adapter (LoRA or DoRA) on q_proj and v_proj of `layers`, random weights."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in layers:
        for rel, (fan_in, fan_out) in SHAPES.items():
            path = f"model.layers.{layer}.{rel}"
            tensors[f"{path}.lora_a"] = rng.normal(size=(fan_in, rank)).astype(np.float32)
            tensors[f"{path}.lora_b"] = rng.normal(size=(rank, fan_out)).astype(np.float32)
            if kind == "dora":
                tensors[f"{path}.m"] = rng.uniform(0.5, 2, size=fan_out).astype(np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapters.safetensors"))
    config = {
        "fine_tune_type": kind,
        "num_layers": len(layers),
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.05,
                            "keys": sorted(SHAPES)},
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory
