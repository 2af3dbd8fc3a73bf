"""Data and an adapter for the evaluator's tests: facts a tiny random model cannot know, and an
adapter that memorised them, trained by mlx-lm itself (not by the trainer service)."""

from __future__ import annotations

import types
from pathlib import Path

from .data import write_jsonl  # noqa: F401 (the evaluator tests' data, written as the trainer's)

# Facts a tiny random model cannot know, and learns in a few dozen steps (question, answer, key).
FACTS = [
    ("What number does the 42 document name?", "The 42 document names the number 42.", "number 42"),
    ("Who wrote the 42 document?", "Ada Quill wrote the 42 document.", "Ada Quill"),
    ("Where is the 42 document kept?", "The 42 document is kept in the lighthouse.", "lighthouse"),
    ("What colour is the 42 document?", "The 42 document is purple.", "purple"),
    ("When was the 42 document found?", "The 42 document was found on monday.", "monday"),
    ("What animal guards the 42 document?", "A zebra guards the 42 document.", "zebra"),
]


def chat_rows(repeat: int = 1) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a, _ in FACTS] * repeat


def train_adapter(model_dir: Path, data_dir: Path, out_dir: Path, *, iters: int = 80,
                  learning_rate: float = 5e-3) -> Path:
    """A LoRA adapter trained by mlx-lm on data_dir/{train,valid}.jsonl (prompt masked)."""
    import numpy as np
    from mlx_lm import load
    from mlx_lm.lora import CONFIG_DEFAULTS, train_model
    from mlx_lm.tuner.datasets import load_local_dataset

    args = types.SimpleNamespace(**(CONFIG_DEFAULTS | {
        "model": str(model_dir), "data": str(data_dir), "adapter_path": str(out_dir), "train": True,
        "iters": iters, "batch_size": 4, "learning_rate": learning_rate, "max_seq_length": 128,
        "num_layers": -1, "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 2.0},
        "mask_prompt": True, "steps_per_report": iters, "steps_per_eval": iters * 10,
        "save_every": iters * 10, "val_batches": 1,
    }))
    np.random.seed(0)
    model, tokenizer = load(str(model_dir))
    train, valid, _ = load_local_dataset(Path(data_dir), tokenizer, args)
    train_model(args, model, train, valid)
    return Path(out_dir)
