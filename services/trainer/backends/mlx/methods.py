"""Each training method as mlx-lm-lora's own pieces: dataset, batch iterator, loss, evaluation.

An `Objective` is what the training loop (`loop`) needs to know about a method, and nothing
here is written anew: the datasets, batch iterators, losses, evaluators, GRPO's sampling and its
reward/advantage computation all come from mlx-lm-lora. What the library keeps inside its
`train_*` loops (putting a reference model beside the policy for DPO) is the only glue.

    loss(model, *inputs) -> (loss, tokens, metrics)     differentiable in model
    prepare(model, batch) -> inputs                    GRPO samples completions here
    evaluate(model, dataset) -> (loss, metrics)
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.utils import load
from mlx_lm_lora.trainer import cpo_trainer, dpo_trainer, grpo_trainer, orpo_trainer, sft_trainer
from mlx_lm_lora.trainer.datasets import CacheDataset, load_local_dataset
from mlx_lm_lora.trainer.grpo_reward_functions import (
    get_reward_function,
    register_reward_function,
)

from tunebus.shared.chat import loss_mask, needs_loss_mask, prompt_messages

from tunebus.services.trainer.backend import GRPO_DEFAULT_SYSTEM, TrainSpec
from tunebus.services.trainer.rewards import REWARDS

# Ours join the library's registry, so a request can name either kind.
for _name, _function in REWARDS.items():
    register_reward_function(_name)(_function)

# mlx-lm-lora's default for train_grpo: generation also stops after a closing answer tag.
GRPO_END_TOKEN = "</answer>"


@dataclass
class Objective:
    method: str
    train_set: Any
    valid_set: Any | None
    iterate: Callable  # (dataset, batch_size, max_seq_length, train) -> batches
    loss: Callable
    evaluate: Callable
    prepare: Callable = lambda model, batch: batch
    # The library compiles the step of every method whose batch has fixed array inputs.
    compiled: bool = True
    resolved: dict = field(default_factory=dict)  # the method's settings, for resolved_args
    reward_key: str | None = None  # the metric that is this method's reward, if it has one


def build_objective(spec: TrainSpec, model_dir: Path, tokenizer, data_dir: Path,
                    make_reference: Callable[[], nn.Module]) -> Objective:
    """The objective for spec.method on data_dir/{train,valid}.jsonl. `make_reference` loads a
    frozen copy of the base model, for methods that measure against it."""
    # The other methods never score prompt tokens; SFT does unless masked (and maskable).
    mask_prompt = spec.method != "sft" or (spec.mask_prompt and _maskable(data_dir / "train.jsonl"))
    config = types.SimpleNamespace(train_mode=spec.method, mask_prompt=mask_prompt and spec.method == "sft")
    tunebus_rows = _tunebus_rows(spec.method, Path(data_dir) / "train.jsonl")
    if tunebus_rows is not None:  # rows mlx-lm-lora's datasets cannot express (see there)
        train_set, valid_set = (tunebus_rows(_read_rows(Path(data_dir) / f"{name}.jsonl"),
                                             tokenizer, mask_prompt)
                                for name in ("train", "valid"))
    else:
        train_set, valid_set, _ = load_local_dataset(Path(data_dir), tokenizer, config)
    if len(train_set) == 0:
        raise ValueError(f"no training examples in {Path(data_dir) / 'train.jsonl'}")
    train_set = CacheDataset(train_set)
    valid_set = CacheDataset(valid_set) if len(valid_set) else None
    build = {"sft": _sft, "dpo": _dpo, "cpo": _cpo, "orpo": _orpo, "grpo": _grpo}[spec.method]
    objective = build(spec, train_set, valid_set, tokenizer, make_reference)
    objective.resolved.setdefault("mask_prompt", mask_prompt)
    return objective


def _maskable(train_file: Path) -> bool:
    """Prompt masking needs a prompt: chat or prompt/completion rows, not plain text."""
    with train_file.open() as f:
        first = json.loads(f.readline() or "{}")
    return "messages" in first or ("prompt" in first and "completion" in first)


# -- rows beyond mlx-lm-lora's datasets ---------------------------------------------------------
#
# mlx-lm-lora masks a chat row from one offset (the last turn is trained) and builds preference
# and GRPO prompts from one user turn. Rows with per-turn weights or tool calls, and prompts with
# earlier turns (`context`), are tokenized here instead, by the tokenizer's chat template, into
# the items the library's batch iterators and losses take.


def _tunebus_rows(method: str, train_file: Path):
    """The dataset class for train_file's rows, or None when mlx-lm-lora's own reads them."""
    rows = _read_rows(train_file)
    if method == "sft":
        return MaskedChat if any("messages" in r and needs_loss_mask(r) for r in rows) else None
    if any("context" in r for r in rows):
        return {"grpo": ContextPrompts, "orpo": ContextPairs.scored}.get(method, ContextPairs)
    return None


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


class _Prepared:
    """Items made up front, offered as mlx-lm-lora's dataset classes offer theirs (its batch
    iterators call `process` on each; ours are ready)."""

    _items: list

    def __getitem__(self, idx: int):
        return self._items[idx]

    def __len__(self) -> int:
        return len(self._items)

    def process(self, item):
        return item


class MaskedChat(_Prepared):
    """Chat rows as (tokens, loss mask) by `tunebus.shared.chat.loss_mask`: every assistant turn
    trained but those with weight 0 (with mask_prompt; without, everything but those)."""

    def __init__(self, rows: list[dict], tokenizer, mask_prompt: bool):
        self._items = [loss_mask(tokenizer._tokenizer, r["messages"], r.get("tools"),
                                 mask_prompt=mask_prompt) for r in rows]


class ContextPairs(_Prepared):
    """Preference rows whose prompt has earlier turns, as the items of mlx-lm-lora's DPODataset
    (and, `scored`, its ORPODataset): the prompt messages (shared.chat.prompt_messages) rendered
    with the generation prompt, each answer after them."""

    def __init__(self, rows: list[dict], tokenizer, mask_prompt: bool = True,
                 scores: bool = False):
        self._items = []
        # As ORPODataset renders (its masks need the prompt to be an exact token prefix).
        thinking = {"enable_thinking": False} \
            if scores and getattr(tokenizer, "has_thinking", False) else {}
        for row in rows:
            prompt = prompt_messages(row)
            length = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                                       **thinking))
            item = {key: tokenizer.apply_chat_template(
                        [*prompt, {"role": "assistant", "content": row[key]}], **thinking)
                    for key in ("chosen", "rejected")}
            item |= {"chosen_prompt_length": length, "rejected_prompt_length": length}
            if scores:
                item["preference_score"] = float(row.get("preference_score", 1.0))
            self._items.append(item)

    @classmethod
    def scored(cls, rows, tokenizer, mask_prompt: bool = True):
        return cls(rows, tokenizer, mask_prompt, scores=True)


class ContextPrompts(_Prepared):
    """GRPO rows whose prompt has earlier turns, as GRPODataset's items: (prompt tokens, answer
    tokens, the user's prompt, the answer, None); the default system prompt as the library's."""

    def __init__(self, rows: list[dict], tokenizer, mask_prompt: bool = True):
        self._items = [(tokenizer.apply_chat_template(prompt_messages(r, GRPO_DEFAULT_SYSTEM),
                                                      add_generation_prompt=True),
                        tokenizer.encode(r["answer"]), r["prompt"], r["answer"], None)
                       for r in rows]


def iterate_masked_batches(dataset, batch_size: int, max_seq_length: int, train: bool = False):
    """mlx-lm-lora's iterate_batches for (tokens, mask) items: batches of similar length,
    padded and truncated alike, yielding (tokens, mask) arrays."""
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i][0]))
    if len(dataset) < batch_size:
        raise ValueError(f"Dataset must have at least batch_size={batch_size} examples but only "
                         f"has {len(dataset)}.")
    batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    while True:
        for b in np.random.permutation(len(batches)):
            items = [dataset[j] for j in batches[b]]
            longest = max(len(tokens) for tokens, _ in items)
            width = min(1 + 32 * ((longest + 31) // 32), max_seq_length)
            tokens, mask = np.zeros((len(items), width), np.int32), np.zeros((len(items), width),
                                                                              np.float32)
            for row, (t, m) in enumerate(items):
                n = min(len(t), width)
                tokens[row, :n], mask[row, :n] = t[:n], m[:n]
            yield mx.array(tokens), mx.array(mask)
        if not train:
            break


def masked_loss(model, tokens, mask):
    """Mean next-token NLL over the tokens the mask trains (a token's mask says whether
    predicting it is trained), as mlx-lm-lora's default_loss over its offset/length mask."""
    logits = model(tokens[:, :-1])
    weights = mask[:, 1:]
    count = weights.sum()
    losses = nn.losses.cross_entropy(logits, tokens[:, 1:]) * weights
    return losses.astype(mx.float32).sum() / count, count


def _val_batch_size(spec: TrainSpec, dataset) -> int:
    # A validation split smaller than a batch (common with small datasets) is one smaller batch:
    # the library's iterators would yield nothing, or raise.
    return min(spec.batch_size, len(dataset))


def _sft(spec, train_set, valid_set, tokenizer, make_reference) -> Objective:
    loss_type = "nll"
    token_loss = sft_trainer.get_sft_loss(loss_type)
    iterate = sft_trainer.iterate_batches
    if isinstance(train_set._data, MaskedChat):
        token_loss, iterate = masked_loss, iterate_masked_batches

    def loss(model, batch, lengths):
        value, tokens = token_loss(model, batch, lengths)
        return value, tokens, {}

    def evaluate(model, dataset):
        value, _ = sft_trainer.evaluate_sft(
            model=model, dataset=dataset, batch_size=_val_batch_size(spec, dataset),
            num_batches=spec.val_batches, max_seq_length=spec.max_seq_length, loss=token_loss,
            iterate_batches=iterate)
        return value, {}

    resolved = {"sft_loss_type": loss_type}
    if iterate is iterate_masked_batches:
        resolved["loss_mask"] = "every assistant turn but weight-0 ones (tunebus's loss mask)"
    return Objective("sft", train_set, valid_set, iterate, loss, evaluate, resolved=resolved)


def _preference_metrics(reward, metrics: dict) -> dict:
    return {**metrics, "chosen_reward": reward[0], "rejected_reward": reward[1]}


def _dpo(spec, train_set, valid_set, tokenizer, make_reference) -> Objective:
    p = spec.preference
    reference = make_reference()

    def scores(model, tokens, masks):
        return dpo_trainer.compute_score(
            dpo_trainer.get_token_scores(model, tokens, masks), masks, p.loss_type)

    def loss(model, chosen, rejected, chosen_masks, rejected_masks):
        # What train_dpo's inner loss_wrapper computes, with the reference model always there.
        value, reward, tokens, metrics = dpo_trainer.dpo_loss(
            policy_chosen_score=scores(model, chosen, chosen_masks),
            policy_rejected_score=scores(model, rejected, rejected_masks),
            reference_chosen_score=mx.stop_gradient(scores(reference, chosen, chosen_masks)),
            reference_rejected_score=mx.stop_gradient(scores(reference, rejected, rejected_masks)),
            chosen_masks=chosen_masks, rejected_masks=rejected_masks,
            beta=p.beta, delta=p.delta, loss_type=p.loss_type)
        return value, tokens, _preference_metrics(reward, metrics)

    def evaluate(model, dataset):
        value, _, _, metrics = dpo_trainer.evaluate_dpo(
            model=model, ref_model=reference, dataset=dataset,
            batch_size=_val_batch_size(spec, dataset), num_batches=spec.val_batches,
            beta=p.beta, delta=p.delta, max_seq_length=spec.max_seq_length, loss_type=p.loss_type)
        return value, metrics

    return Objective("dpo", train_set, valid_set, dpo_trainer.iterate_dpo_batches, loss, evaluate,
                     resolved={"beta": p.beta, "dpo_loss_type": p.loss_type, "delta": p.delta,
                               "reference_model": "the base model, frozen"})


def _cpo(spec, train_set, valid_set, tokenizer, make_reference) -> Objective:
    p = spec.preference

    def loss(model, chosen, rejected, chosen_masks, rejected_masks):
        value, reward, tokens, metrics = cpo_trainer.cpo_loss_from_model(
            model, chosen, rejected, chosen_masks, rejected_masks,
            beta=p.beta, delta=p.delta, loss_type=p.loss_type)
        return value, tokens, _preference_metrics(reward, metrics)

    def evaluate(model, dataset):
        value, _, _, metrics = cpo_trainer.evaluate_cpo(
            model=model, dataset=dataset, batch_size=_val_batch_size(spec, dataset),
            num_batches=spec.val_batches, beta=p.beta, delta=p.delta,
            max_seq_length=spec.max_seq_length, loss_type=p.loss_type)
        return value, metrics

    # Uncompiled: mlx 0.32's compile fails on CPO's outputs (IndexError "_Map_base::at", in the
    # library's own train_cpo as well), as soon as the loss and its metrics are returned together.
    return Objective("cpo", train_set, valid_set, cpo_trainer.iterate_cpo_batches, loss, evaluate,
                     compiled=False,
                     resolved={"beta": p.beta, "cpo_loss_type": p.loss_type, "delta": p.delta})


def _orpo(spec, train_set, valid_set, tokenizer, make_reference) -> Objective:
    beta = spec.preference.beta

    def loss(model, chosen, rejected, chosen_masks, rejected_masks, preference_scores):
        value, reward, tokens, metrics = orpo_trainer.orpo_loss_from_model(
            model, chosen, rejected, chosen_masks, rejected_masks, preference_scores, beta=beta)
        return value, tokens, _preference_metrics(reward, metrics)

    def evaluate(model, dataset):
        value, _, _, metrics = orpo_trainer.evaluate_orpo(
            model=model, dataset=dataset, batch_size=_val_batch_size(spec, dataset),
            num_batches=spec.val_batches, beta=beta, max_seq_length=spec.max_seq_length)
        return value, metrics

    return Objective("orpo", train_set, valid_set, orpo_trainer.iterate_orpo_batches, loss,
                     evaluate, resolved={"beta": beta})


# The family member as mlx-lm-lora's two switches: loss normalisation, importance level.
GRPO_SWITCHES = {
    "grpo": ("grpo", "token"),
    "dr_grpo": ("dr_grpo", "token"),
    "bnpo": ("bnpo", "token"),
    "gspo": ("grpo", "sequence"),
    "dapo": ("bnpo", "token"),
}


def _grpo(spec, train_set, valid_set, tokenizer, make_reference) -> Objective:
    g = spec.grpo
    loss_type, importance_level = GRPO_SWITCHES[g.loss_type]
    reference = make_reference() if g.beta else None
    reward_functions = [get_reward_function(name) for name in g.reward_functions]
    weights = list(g.reward_weights) if g.reward_weights is not None else None
    sampling = dict(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, min_p=g.min_p)
    objective_args = dict(beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon_high,
                          max_tokens=g.max_completion_length, grpo_loss_type=loss_type,
                          importance_sampling_level=importance_level)

    def prepare(model, batch):
        """Sample a group of completions per prompt and score them (no gradient)."""
        prompt_tokens, _, prompts, answers, kinds = batch
        completions, texts, indices = grpo_trainer.generate_grpo(
            model=model, tokenizer=tokenizer, prompt_tokens=prompt_tokens,
            max_tokens=g.max_completion_length, group_size=g.group_size,
            batch_size=spec.batch_size, end_token=GRPO_END_TOKEN, **sampling)
        advantages, reward_metrics = grpo_trainer.calculate_rewards_and_advantages(
            reward_funcs=reward_functions,
            expanded_prompts=[prompts[i] for i in indices],
            all_completion_texts=texts,
            expanded_answers=[answers[i] for i in indices],
            expanded_types=[kinds[i] if kinds is not None else None for i in indices],
            batch_indices=indices,
            unique_prompt_indices=sorted(set(indices)),
            reward_weights=weights,
        )
        return batch, completions, texts, indices, advantages, reward_metrics

    def loss(model, batch, completions, texts, indices, advantages, reward_metrics):
        return grpo_trainer.grpo_loss(
            model, reference, batch, completions=completions, completion_texts=texts,
            batch_indices=indices, advantages=advantages, reward_metrics=reward_metrics,
            **objective_args)

    def evaluate(model, dataset):
        value, _, metrics = grpo_trainer.evaluate_grpo(
            model=model, ref_model=reference, dataset=dataset, tokenizer=tokenizer,
            batch_size=_val_batch_size(spec, dataset), num_batches=spec.val_batches,
            group_size=g.group_size, max_seq_length=spec.max_seq_length,
            reward_funcs=reward_functions, reward_weights=weights,
            end_answer_token=GRPO_END_TOKEN,
            **sampling, **objective_args)
        return value, metrics

    return Objective(
        "grpo", train_set, valid_set, grpo_trainer.iterate_grpo_batches, loss, evaluate,
        prepare=prepare, compiled=False, reward_key="total_rewards_mean",
        resolved={
            "grpo_family": g.loss_type, "grpo_loss_type": loss_type,
            "importance_sampling_level": importance_level, "group_size": g.group_size,
            "beta": g.beta, "epsilon": g.epsilon, "epsilon_high": g.epsilon_high,
            "max_completion_length": g.max_completion_length, **sampling,
            "reward_functions": list(g.reward_functions), "reward_weights": weights,
            "end_answer_token": GRPO_END_TOKEN,
            "reference_model": "the base model, frozen" if reference is not None else None,
            "default_system_prompt": "mlx-lm-lora's GRPODataset prompt (think/answer tags), "
                                     "unless a row has a system message",
        },
    )


def load_reference(model_dir: Path, quantize: Callable[[nn.Module], Any]) -> nn.Module:
    """A frozen copy of the base model, quantized as the policy's base is."""
    reference, _ = load(str(model_dir))
    quantize(reference)
    reference.freeze()
    reference.eval()
    return reference
