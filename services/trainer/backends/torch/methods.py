"""Each training method as TRL's own trainer: dataset in TRL's shape, trainer class, config.

The torch twin of the MLX backend's `methods`. A `Method` is what `loop.train` needs to know about a
method; the loop, losses, reference model, sampling and rewards are TRL's. `loop` adds
the settings every method shares (steps, batch, optimizer, precision, logging), which a
method's `config` may override, and builds `trainer_class(model=..., args=config_class(...), processing_class=tokenizer,
peft_config=..., train_dataset=..., eval_dataset=..., callbacks=..., **trainer_kwargs)`.

Data is the canonical JSONL the validator writes for the method (backend.py):
sft {"messages": [...][, "tools"]}; dpo/orpo/cpo {"prompt", "chosen", "rejected"[, "system"]
[, "context"]}; grpo {"prompt", "answer"[, "system"][, "context"]}. Every method but SFT reads
it as TRL's conversational rows (the prompt as [system,] the earlier turns and the user message,
the answers as assistant messages), so the chat template formats them as the MLX backend does.
SFT rows with per-turn weights or tool calls are tokenized by `shared.chat.loss_mask`, as on
the MLX backend, and handed to TRL pre-tokenized.

What the methods mean is the MLX backend's (`backends/mlx/methods.py`); where TRL computes a setting
differently, the builder says so and `Method.resolved` names what was run:

- DPO: TRL's DPOTrainer; the reference is the frozen base model, through PEFT's disabled
  adapter (no second copy, no precomputed log-probs). TRL has no "dpop" (DPO-Positive) loss:
  `_DPOPositive` adds its penalty to TRL's sigmoid loss.
- CPO: TRL's CPOTrainer without its NLL term (cpo_alpha=0), as mlx-lm-lora's CPO; "dpop" as
  for DPO, on the policy alone (`_CPOPositive`).
- ORPO: TRL's ORPOTrainer (NLL on the chosen answer plus beta times the odds-ratio term).
- GRPO family: TRL's GRPOTrainer sampling with transformers' generate (no vLLM); the family
  member picks TRL's loss_type and importance-sampling level (GRPO_SWITCHES). A step takes
  `batch_size` prompts and `group_size` completions of each, as on the MLX backend (TRL counts
  completions, so its batch sizes are batch_size x group_size). Rewards are `rewards.REWARDS`, called with the user
  prompt and completion texts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from tunebus.shared.chat import loss_mask, needs_loss_mask, prompt_messages

from tunebus.services.trainer.backend import GRPO_DEFAULT_SYSTEM, TrainSpec
from tunebus.services.trainer.plan import DAPO_EPSILON_HIGH
from tunebus.services.trainer.rewards import REWARDS


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
    builders = {"sft": _sft, "dpo": _dpo, "orpo": _orpo, "cpo": _cpo, "grpo": _grpo}
    if spec.method not in builders:
        raise ValueError(f"method {spec.method!r} is not supported by the torch backend "
                         f"({', '.join(sorted(builders))})")
    return builders[spec.method](spec, tokenizer, Path(data_dir), batching)


def supported_methods() -> set[str]:
    return {"sft", "dpo", "orpo", "cpo", "grpo"}


def method_options() -> dict[str, set[str]]:
    """The method settings a worker announces besides its methods (see plan.refusal)."""
    return {"grpo_loss_types": set(GRPO_SWITCHES), "reward_functions": set(REWARDS)}


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
    masked = _needs_loss_mask(data_dir / "train.jsonl")
    read = (lambda path: read_masked_chat_jsonl(path, tokenizer, spec.mask_prompt)) if masked \
        else (lambda path: read_chat_jsonl(path, spec.mask_prompt))
    train_set, valid_set = read_splits(data_dir, spec, read)
    resolved = {"sft_loss_type": "nll", "batching": batching}
    if masked:
        resolved["loss_mask"] = "every assistant turn but weight-0 ones (tunebus's loss mask)"
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
        resolved=resolved,
    )


def _needs_loss_mask(train_file: Path) -> bool:
    return any("messages" in row and needs_loss_mask(row) for _, row in read_jsonl(train_file))


def read_masked_chat_jsonl(path: Path, tokenizer, mask_prompt: bool) -> Dataset:
    """Chat lines with per-turn weights or tool calls, tokenized by the chat template with
    `tunebus.shared.chat.loss_mask` (as the MLX backend does): TRL takes such a pre-tokenized
    dataset as it is and builds its labels from `assistant_masks`."""
    rows = []
    for number, row in read_jsonl(path):
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{path}:{number}: 'messages' must be a non-empty list")
        tokens, mask = loss_mask(tokenizer, messages, row.get("tools"), mask_prompt=mask_prompt)
        if 1 not in mask:
            raise ValueError(f"{path}:{number}: no token carries loss (every assistant turn has "
                             "weight 0)")
        rows.append({"input_ids": tokens, "assistant_masks": mask})
    return Dataset.from_list(rows)


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


# --- the canonical rows of the other methods --------------------------------------------------

PREFERENCE_LINE = '{"prompt", "chosen", "rejected"[, "system"][, "context"]}'
GRPO_LINE = '{"prompt", "answer"[, "system"][, "context"]}'


def read_preference_jsonl(path: Path, method: str) -> Dataset:
    """dpo/orpo/cpo lines as TRL's conversational preference rows: prompt = [system,] the
    earlier turns (context), the user message; chosen and rejected = one assistant message each."""
    rows = []
    for number, row in read_jsonl(path):
        where = (path, number, row, f"{method} lines are {PREFERENCE_LINE}")
        _, chosen, rejected = (_text(*where, key) for key in ("prompt", "chosen", "rejected"))
        _system(*where)  # checked here, read by prompt_messages
        rows.append({"prompt": prompt_messages(row),
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return Dataset.from_list(rows)


def read_grpo_jsonl(path: Path) -> Dataset:
    """grpo lines as TRL's conversational prompts plus the reference answer, which TRL hands to
    the reward functions. A line without a system message gets mlx-lm-lora's default one."""
    rows = []
    for number, row in read_jsonl(path):
        where = (path, number, row, f"grpo lines are {GRPO_LINE}")
        _, answer = _text(*where, "prompt"), _text(*where, "answer")
        _system(*where)  # checked here, read by prompt_messages
        rows.append({"prompt": prompt_messages(row, GRPO_DEFAULT_SYSTEM), "answer": answer})
    return Dataset.from_list(rows)


def _text(path: Path, number: int, row: dict, shape: str, name: str) -> str:
    value = row.get(name)
    if value is None:
        raise ValueError(f"{path}:{number}: field {name!r} is missing ({shape}; this line has "
                         f"{', '.join(map(repr, row)) or 'no fields'})")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path}:{number}: field {name!r} must be a non-empty string, "
                         f"not {json.dumps(value)[:60]}")
    return value


def _system(path: Path, number: int, row: dict, shape: str) -> str | None:
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"{path}:{number}: field 'system' must be a string, "
                         f"not {json.dumps(system)[:60]}")
    return system or None


# --- DPO, CPO, ORPO -------------------------------------------------------------------------

# What every preference method runs, where TRL's default differs from what the spec means.
# Dropout stays as the spec's LoRA dropout says (TRL's preference trainers turn it off), as on
# the MLX backend and in SFT; batches are padded (TRL's DPO padding-free mode is off for now).
PREFERENCE_RESOLVED = {"mask_prompt": True, "batching": "padded", "disable_dropout": False}


def _trl_loss_type(loss_type: str) -> str:
    """TRL's loss type for the spec's: "dpop" is the sigmoid loss plus a penalty (see
    _DPOPositive, _CPOPositive)."""
    return "sigmoid" if loss_type == "dpop" else loss_type


def _dpo(spec: TrainSpec, tokenizer, data_dir: Path, batching: str) -> Method:
    p = spec.preference
    train_set, valid_set = read_splits(data_dir, spec,
                                       lambda path: read_preference_jsonl(path, "dpo"))
    dpop = p.loss_type == "dpop"
    return Method(
        "dpo", _DPOPositive if dpop else DPOTrainer, DPOConfig, train_set, valid_set,
        config={
            "beta": p.beta,
            "loss_type": [_trl_loss_type(p.loss_type)],
            "max_length": spec.max_seq_length,
            "truncation_mode": "keep_start",
            "padding_free": False,
            "precompute_ref_log_probs": False,  # the reference runs beside the policy, each step
            "disable_dropout": False,
        },
        trainer_kwargs={"delta": p.delta} if dpop else {},
        resolved={**PREFERENCE_RESOLVED, "beta": p.beta, "dpo_loss_type": p.loss_type,
                  "delta": p.delta, "trl_loss_type": _trl_loss_type(p.loss_type),
                  "reference_model": "the base model, frozen (PEFT adapter disabled)",
                  "precompute_ref_log_probs": False},
    )


def _cpo(spec: TrainSpec, tokenizer, data_dir: Path, batching: str) -> Method:
    p = spec.preference
    train_set, valid_set = read_splits(data_dir, spec,
                                       lambda path: read_preference_jsonl(path, "cpo"))
    dpop = p.loss_type == "dpop"
    return Method(
        "cpo", _CPOPositive if dpop else _CPO, CPOConfig, train_set, valid_set,
        config={
            "beta": p.beta,
            "loss_type": _trl_loss_type(p.loss_type),
            "cpo_alpha": 0.0,  # mlx-lm-lora's CPO has no NLL (behaviour cloning) term
            "label_smoothing": 0.0,
            "max_length": spec.max_seq_length,
            "disable_dropout": False,
            "remove_unused_columns": False,  # the trainer's collator needs them (TRL sets it too)
        },
        trainer_kwargs={"delta": p.delta} if dpop else {},
        resolved={**PREFERENCE_RESOLVED, "beta": p.beta, "cpo_loss_type": p.loss_type,
                  "delta": p.delta, "trl_loss_type": _trl_loss_type(p.loss_type),
                  "cpo_alpha": 0.0, "reference_model": None},
    )


def _orpo(spec: TrainSpec, tokenizer, data_dir: Path, batching: str) -> Method:
    beta = spec.preference.beta
    train_set, valid_set = read_splits(data_dir, spec,
                                       lambda path: read_preference_jsonl(path, "orpo"))
    return Method(
        "orpo", _ORPO, ORPOConfig, train_set, valid_set,
        config={"beta": beta, "max_length": spec.max_seq_length, "disable_dropout": False,
                "remove_unused_columns": False},
        resolved={**PREFERENCE_RESOLVED, "beta": beta, "reference_model": None},
    )


class _DPOPositive(DPOTrainer):
    """DPO-Positive (Smaug, arXiv:2402.13228) as mlx-lm-lora computes its "dpop" loss: the
    sigmoid DPO loss plus delta * max(0, log pi_ref(chosen) - log pi(chosen)), so the chosen
    answer never grows less likely than under the base model. TRL has no such loss; the two
    sequence log-probabilities are read off TRL's own policy and reference forward passes (the
    reference is the same PEFT model with its adapter disabled), chosen rows first."""

    def __init__(self, *args, delta: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.dpop_delta = delta

    def _compute_loss(self, model, inputs, return_outputs):
        log_probs: list[torch.Tensor] = []
        hook = self.accelerator.unwrap_model(model).register_forward_hook(
            lambda module, args, output: log_probs.append(output.log_probs))
        try:
            result = super()._compute_loss(model, inputs, return_outputs)
        finally:
            hook.remove()
        if len(log_probs) != 2:
            raise RuntimeError(f"dpop expects a policy and a reference forward pass per batch; "
                               f"TRL made {len(log_probs)} (has TRL's DPOTrainer changed?)")
        policy, reference = (lp.sum(dim=1).chunk(2)[0] for lp in log_probs)
        penalty = torch.relu(reference - policy)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["dpop_penalty"].append(penalty.detach().mean().item())
        if return_outputs:
            loss, outputs = result
            return loss + self.dpop_delta * penalty.mean(), outputs
        return result + self.dpop_delta * penalty.mean()


class _TokenCount:
    """Logs `num_tokens` (chosen and rejected tokens trained on so far), which progress reports
    read; TRL's DPO, SFT and GRPO trainers log it, its CPO and ORPO trainers do not."""

    trained_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.trained_tokens += int(inputs["chosen_attention_mask"].sum()
                                   + inputs["rejected_attention_mask"].sum())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["num_tokens"] = float(self.trained_tokens)
        super().log(logs, start_time)


class _CPO(_TokenCount, CPOTrainer):
    pass


class _ORPO(_TokenCount, ORPOTrainer):
    pass


class _CPOPositive(_CPO):
    """CPO with mlx-lm-lora's "dpop" loss: the sigmoid CPO loss plus
    delta * max(0, log pi(rejected) - log pi(chosen)); TRL has no such loss type."""

    def __init__(self, *args, delta: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.dpop_delta = delta

    def cpo_loss(self, policy_chosen_logps, policy_rejected_logps):
        losses, chosen_rewards, rejected_rewards = super().cpo_loss(
            policy_chosen_logps, policy_rejected_logps)
        penalty = torch.relu(policy_rejected_logps - policy_chosen_logps)
        return losses + self.dpop_delta * penalty, chosen_rewards, rejected_rewards


# --- the GRPO family ------------------------------------------------------------------------

# The family member as TRL's two switches: loss normalisation, importance-sampling level.
# gspo is TRL's GSPO recipe (sequence-level importance weights, grpo normalisation); dapo is
# TRL's own "dapo" normalisation (over the tokens of the whole accumulated batch).
GRPO_SWITCHES = {
    "grpo": ("grpo", "token"),
    "dr_grpo": ("dr_grpo", "token"),
    "bnpo": ("bnpo", "token"),
    "gspo": ("grpo", "sequence"),
    "dapo": ("dapo", "token"),
}


def _grpo(spec: TrainSpec, tokenizer, data_dir: Path, batching: str) -> Method:
    g = spec.grpo
    unknown = [name for name in g.reward_functions if name not in REWARDS]
    if unknown:
        raise ValueError(f"reward function(s) {', '.join(map(repr, unknown))} unknown to the torch "
                         f"backend (known: {', '.join(sorted(REWARDS))})")
    if g.reward_weights is not None and len(g.reward_weights) != len(g.reward_functions):
        raise ValueError(f"{len(g.reward_weights)} reward weights for "
                         f"{len(g.reward_functions)} reward functions")
    loss_type, importance_level = GRPO_SWITCHES[g.loss_type]
    epsilon_high = g.epsilon_high
    if epsilon_high is None:  # as plan.grpo_spec resolves it
        epsilon_high = DAPO_EPSILON_HIGH if g.loss_type == "dapo" else g.epsilon
    weights = list(g.reward_weights) if g.reward_weights is not None else None
    sampling = {"temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k, "min_p": g.min_p}
    trl_sampling = sampling | {"min_p": g.min_p or None}  # None is TRL's "no min-p filtering"
    train_set, valid_set = read_splits(data_dir, spec, read_grpo_jsonl)
    return Method(
        "grpo", GRPOTrainer, GRPOConfig, train_set, valid_set,
        config={
            # TRL counts completions per batch, the spec prompts: a step takes batch_size
            # prompts x group_size completions, as an MLX step does, in whole groups.
            "per_device_train_batch_size": spec.batch_size * g.group_size,
            "per_device_eval_batch_size": spec.batch_size * g.group_size,
            "loss_type": loss_type,
            "importance_sampling_level": importance_level,
            "num_generations": g.group_size,
            "max_completion_length": g.max_completion_length,
            "beta": g.beta,
            "epsilon": g.epsilon,
            "epsilon_high": epsilon_high,
            **trl_sampling,
            "reward_weights": weights,
            "multi_objective_aggregation": "sum_then_normalize",
            "scale_rewards": "group",
            "num_iterations": 1,
            # On-policy, as the MLX backend: each sample feeds one optimizer update.
            "steps_per_generation": spec.grad_accumulation_steps,
            "mask_truncated_completions": False,
            "use_vllm": False,
            "disable_dropout": False,
            "log_completions": False,
        },
        trainer_kwargs={"reward_funcs": [trl_reward(name) for name in g.reward_functions]},
        reward_key="reward",
        resolved={
            "mask_prompt": True, "batching": "padded",
            "grpo_family": g.loss_type, "grpo_loss_type": loss_type,
            "importance_sampling_level": importance_level, "group_size": g.group_size,
            "prompts_per_step": spec.batch_size,
            "completions_per_step": spec.batch_size * g.group_size,
            "beta": g.beta, "epsilon": g.epsilon, "epsilon_high": epsilon_high,
            "max_completion_length": g.max_completion_length, **sampling,
            "reward_functions": list(g.reward_functions), "reward_weights": weights,
            "reward_aggregation": "weighted sum, then normalised within each group",
            "scale_rewards": "group", "num_iterations": 1,
            "end_answer_token": None,  # generation stops at EOS or max_completion_length only
            "generation": "transformers generate (no vLLM)",
            "reference_model": ("the base model, frozen (PEFT adapter disabled)"
                                if g.beta else None),
            "default_system_prompt": "mlx-lm-lora's GRPODataset prompt (think/answer tags), "
                                     "unless a row has a system message",
        },
    )


def trl_reward(name: str):
    """Our reward function `name` as a TRL reward function. TRL calls it with the conversational
    prompts and completions and every dataset column (`answer`) as keyword arguments; ours take
    texts: the user's prompt (as mlx-lm-lora passes it) and the completion."""
    function = REWARDS[name]

    def reward(prompts, completions, answer, **_) -> list[float]:
        return function(prompts=[_content(p) for p in prompts],
                        completions=[_content(c) for c in completions], answer=answer, types=None)

    reward.__name__ = name  # TRL logs rewards/<name>/mean
    return reward


def _content(messages: list[dict] | str) -> str:
    """The last message's text (the user's prompt, the assistant's completion)."""
    return messages if isinstance(messages, str) else messages[-1]["content"]
