"""Held-out loss of a model, with or without a LoRA adapter, using mlx-lm-lora's own SFT eval.

Loading is mlx_lm.load (which applies the adapter exactly as it was trained), examples go through
the library's chat dataset with the same prompt masking the trainer uses, and the loss is the
library's `evaluate_sft`: mean next-token NLL over the unmasked (answer) tokens of every example.
"""

from __future__ import annotations

import json
import math
import types
from dataclasses import dataclass
from pathlib import Path

from mlx_lm import load
from mlx_lm_lora.chat_template import ensure_chat_template
from mlx_lm_lora.trainer.datasets import CacheDataset, create_dataset
from mlx_lm_lora.trainer.sft_trainer import evaluate_sft, iterate_batches


@dataclass(frozen=True)
class LossReport:
    loss: float  # mean NLL per scored token, in nats
    perplexity: float  # exp(loss)
    tokens: int  # scored tokens: answers only when the prompt is masked
    examples: int


def evaluate_loss(
    model_dir: Path,
    data_path: Path,
    *,
    adapter_dir: Path | None = None,
    max_seq_length: int = 512,
    batch_size: int = 4,
    mask_prompt: bool = True,
) -> LossReport:
    """Score every example in data_path (JSONL; chat "messages" rows, like the training data).

    Keep mask_prompt as the adapter was trained (the trainer's default is True), or the number
    measures something else than the training loss did.
    """
    model, tokenizer = load(str(model_dir), adapter_path=str(adapter_dir) if adapter_dir else None)
    ensure_chat_template(tokenizer)  # as the trainer does, so a template-less model scores the same

    rows = [json.loads(line) for line in Path(data_path).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"no examples in {data_path}")
    config = types.SimpleNamespace(train_mode="sft", mask_prompt=mask_prompt)
    dataset = CacheDataset(create_dataset(rows, tokenizer, config))

    loss, tokens = evaluate_sft(
        model=model,
        dataset=dataset,
        batch_size=batch_size,
        num_batches=-1,
        max_seq_length=max_seq_length,
        iterate_batches=every_example_batches,
    )
    if tokens == 0:
        raise ValueError(f"nothing to score in {data_path}: every token is prompt or truncated")
    return LossReport(loss=loss, perplexity=math.exp(loss), tokens=tokens, examples=len(rows))


def every_example_batches(dataset, batch_size, max_seq_length, train=False):
    """The library's batches, including the final short one it would drop.

    `iterate_batches` yields only full batches (and refuses a dataset smaller than one batch):
    right for training, but it would leave up to batch_size - 1 examples unscored. Here each run
    of batch_size examples is handed to it as a dataset of its own, so padding, truncation and
    prompt offsets stay exactly the library's.
    """
    for start in range(0, len(dataset), batch_size):
        chunk = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        yield from iterate_batches(chunk, len(chunk), max_seq_length)
