"""Each training method as TRL's own trainer: dataset in TRL's shape, trainer class, config.

The torch twin of `mlx_methods`. A `Method` is what `torch_backend.train` needs to know about a
method; the loop, losses, reference model, sampling and rewards are TRL's. `torch_backend` adds
the settings every method shares (steps, batch, optimizer, precision, logging) to `config` and
builds `trainer_class(model=..., args=config_class(...), processing_class=tokenizer,
peft_config=..., train_dataset=..., eval_dataset=..., callbacks=..., **trainer_kwargs)`.

Data is the canonical JSONL the validator writes for the method (backend.py):
sft {"messages": [...]}; dpo/orpo/cpo {"prompt", "chosen", "rejected"[, "system"]};
grpo {"prompt", "answer"[, "system"]}.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from .backend import TrainSpec


@dataclass
class Method:
    name: str
    trainer_class: type
    config_class: type
    train_set: Dataset
    valid_set: Dataset | None
    config: dict[str, Any] = field(default_factory=dict)  # the method's own config fields
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    resolved: dict[str, Any] = field(default_factory=dict)  # the method's settings, for resolved_args
    reward_key: str | None = None  # the logged metric that is this method's reward, if it has one


def build_method(spec: TrainSpec, tokenizer, data_dir: Path, batching: str) -> Method:
    """The method of `spec` on data_dir/{train,valid}.jsonl. `batching` is TorchOptions.batching
    ("padding_free", "packed" or "padded"); only SFT batches differently."""
    builders = {"sft": _sft}
    if spec.method not in builders:
        raise ValueError(f"method {spec.method!r} is not supported by the torch backend "
                         f"({', '.join(sorted(builders))})")
    return builders[spec.method](spec, tokenizer, Path(data_dir), batching)


def supported_methods() -> set[str]:
    return {"sft"}


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is an
    error naming the file and line."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: a line must be a JSON object")  # noqa: TRY004
            yield number, row


def read_splits(data_dir: Path, spec: TrainSpec, read) -> tuple[Dataset, Dataset | None]:
    """train.jsonl and valid.jsonl (when there) through `read(path) -> Dataset`; the validation
    set cut to val_batches batches, as the MLX backend evaluates."""
    train_set = read(data_dir / "train.jsonl")
    if len(train_set) == 0:
        raise ValueError(f"no training examples in {data_dir / 'train.jsonl'}")
    valid_set = None
    if (data_dir / "valid.jsonl").is_file():
        valid_set = read(data_dir / "valid.jsonl")
        if spec.val_batches > 0:
            valid_set = valid_set.select(range(min(len(valid_set), spec.val_batches * spec.batch_size)))
        valid_set = valid_set if len(valid_set) else None
    return train_set, valid_set


# --- SFT ------------------------------------------------------------------------------------


def _sft(spec: TrainSpec, tokenizer, data_dir: Path, batching: str) -> Method:
    train_set, valid_set = read_splits(data_dir, spec,
                                       lambda path: read_chat_jsonl(path, spec.mask_prompt))
    return Method(
        "sft", SFTTrainer, SFTConfig, train_set, valid_set,
        config={
            "max_length": spec.max_seq_length,
            "packing": batching == "packed",
            "packing_strategy": "bfd",
            "padding_free": False,  # padding-free batches come from _sft_collator (see there)
            "completion_only_loss": spec.mask_prompt,
        },
        trainer_kwargs={"data_collator": _sft_collator(batching, tokenizer)},
        resolved={"sft_loss_type": "nll", "batching": batching},
    )


def read_chat_jsonl(path: Path, mask_prompt: bool) -> Dataset:
    """Chat "messages" lines as TRL's conversational datasets.

    With mask_prompt, each line becomes prompt (every message but the last) and completion (the
    last, an assistant message), and TRL computes the loss on the completion only; otherwise the
    whole conversation is trained on.
    """
    rows = []
    for number, row in read_jsonl(path):
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{path}:{number}: 'messages' must be a non-empty list")
        if mask_prompt:
            if not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant" \
                    or len(messages) < 2:
                raise ValueError(f"{path}:{number}: messages[-1].role must be 'assistant' "
                                 "after at least one prompt message (mask_prompt)")
            rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
        else:
            rows.append({"messages": messages})
    return Dataset.from_list(rows)


def _sft_collator(batching: str, tokenizer):
    """TRL's padding-free collator for the default batching, else TRL's own choice (None).

    TRL refuses padding_free=True without packing when max_length is set, on the grounds that
    the collator then cannot enforce it; but TRL truncates every example to max_length while it
    prepares the dataset, before any collator runs, so passing the collator itself is sound.
    """
    if batching != "padding_free":
        return None
    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
