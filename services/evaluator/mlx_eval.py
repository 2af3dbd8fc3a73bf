"""The MLX evaluation backend: held-out loss, token accuracy and greedy answers with mlx-lm.

Loading is mlx_lm.load (which applies the adapter exactly as it was trained), examples go through
mlx-lm-lora's SFT dataset with the same prompt masking the trainer uses, and the loss is the
library's `evaluate_sft`: mean next-token NLL over the unmasked (answer) tokens of every example.
Answers come from mlx-lm's `batch_generate` (batch_size probes of a model at a time) with its default
(greedy) sampler.
"""

from __future__ import annotations

import json
import math
import time
import types
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm import batch_generate, load, stream_generate
from mlx_lm.utils import load_adapters
from mlx_lm_lora.chat_template import ensure_chat_template
from mlx_lm_lora.trainer.datasets import CacheDataset, create_dataset
from mlx_lm_lora.trainer.sft_trainer import evaluate_sft, iterate_batches

from tunebus.shared.adapter_layouts import MLX

from .backend import Answer, Measurement

NAME = "mlx"
ADAPTER_FORMAT = MLX


def measure(
    model_dir: Path,
    rows: list[dict],
    prompts: list[list[dict]],
    *,
    adapter_dir: Path | None = None,
    max_seq_length: int = 512,
    batch_size: int = 4,
    mask_prompt: bool = True,
    max_tokens: int = 64,
) -> Measurement:
    """Score `rows` and answer `prompts` with the model (and the adapter, when given), as
    backend.py says."""
    if not rows:
        raise ValueError("no examples to score")
    model, tokenizer = load(str(model_dir), adapter_path=str(adapter_dir) if adapter_dir else None)
    ensure_chat_template(tokenizer)  # as the trainer does, so a template-less model scores the same
    return _measure_loaded(model, tokenizer, rows, prompts, max_seq_length=max_seq_length,
                           batch_size=batch_size, mask_prompt=mask_prompt, max_tokens=max_tokens)


def measure_base_and_adapter(model_dir: Path, adapter_dir: Path, rows: list[dict],
                             prompts: list[list[dict]], **settings) -> tuple[Measurement, Measurement]:
    """`measure` of the base model, then of base+adapter, loading the model once: the adapter's
    LoRA layers go into the loaded base (`load_adapters`, what mlx_lm.load does with an
    adapter_path), so both measurements read the same weights from one load."""
    if not rows:
        raise ValueError("no examples to score")
    model, tokenizer = load(str(model_dir))
    ensure_chat_template(tokenizer)
    before = _measure_loaded(model, tokenizer, rows, prompts, **settings)
    load_adapters(model, str(adapter_dir)).eval()
    return before, _measure_loaded(model, tokenizer, rows, prompts, **settings)


def _measure_loaded(model, tokenizer, rows: list[dict], prompts: list[list[dict]], *,
                    max_seq_length: int = 512, batch_size: int = 4, mask_prompt: bool = True,
                    max_tokens: int = 64) -> Measurement:
    config = types.SimpleNamespace(train_mode="sft", mask_prompt=mask_prompt and "text" not in rows[0])
    dataset = CacheDataset(create_dataset(rows, tokenizer, config))

    counts = _Counts()
    loss, tokens = evaluate_sft(
        model=model,
        dataset=dataset,
        batch_size=batch_size,
        num_batches=-1,
        max_seq_length=max_seq_length,
        loss=counts.loss,
        iterate_batches=every_example_batches,
    )
    if tokens == 0:
        raise ValueError("nothing to score: every token is prompt or truncated")
    answers = answer_all(model, tokenizer, prompts, max_tokens, batch_size)
    return Measurement(
        loss=loss, perplexity=math.exp(loss), token_accuracy=counts.accuracy(), tokens=tokens,
        examples=len(rows), answers=answers,
    )


def answer_all(model, tokenizer, prompts: list[list[dict]], max_tokens: int,
               batch_size: int = 4) -> list[Answer]:
    """The greedy answers to every prompt (mlx-lm's batch_generate), at most `batch_size` at a
    time (the evaluator's batch_size, as for scoring; the library's prefill and completion
    batches): a request may bring up to 64 probes of up to 8000 characters each. The same
    tokens as `answer` gives one prompt at a time, in a fraction of the time. Each answer's
    `seconds` is the whole run's, the same for base and adapter alike."""
    if not prompts:
        return []
    encoded = [tokenizer.apply_chat_template(messages, add_generation_prompt=True)
               for messages in prompts]
    started = time.perf_counter()
    response = batch_generate(model, tokenizer, encoded, max_tokens=max_tokens,
                              return_token_ids=True, prefill_batch_size=batch_size,
                              completion_batch_size=batch_size)
    seconds = time.perf_counter() - started
    # batch_generate leaves out the EOS that ended an answer; stream_generate counts it (an
    # answer shorter than max_tokens ended so).
    return [Answer(_text(tokenizer, ids), seconds, len(ids) + (len(ids) < max_tokens))
            for ids in response.token_ids]


def _text(tokenizer, ids: list[int]) -> str:
    """What stream_generate's text would be: its detokenizer over the tokens, the EOS that
    ended the answer left out."""
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token in ids:
        if token in tokenizer.eos_token_ids:
            break
        detokenizer.add_token(token)
    detokenizer.finalize()
    return detokenizer.text.strip()


def answer(model, tokenizer, messages: list[dict], max_tokens: int) -> Answer:
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    started = time.perf_counter()
    text, generated = [], 0
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        text.append(response.text)
        generated = response.generation_tokens
    return Answer("".join(text).strip(), time.perf_counter() - started, generated)


class _Counts:
    """`evaluate_sft`'s loss function, also counting the tokens predicted exactly.

    The loss and the mask are mlx-lm-lora's `default_loss` (tokens from the prompt offset to the
    example's end); the same logits give the greedy predictions, so accuracy costs no extra pass.
    """

    def __init__(self) -> None:
        self.correct = mx.array(0)
        self.scored = mx.array(0)

    def loss(self, model, batch, lengths, cache=None):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs, cache=cache)
        steps = mx.arange(1, targets.shape[1] + 1)
        mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
        ntoks = mask.sum()
        loss = (nn.losses.cross_entropy(logits, targets) * mask).astype(mx.float32).sum() / ntoks
        self.correct = self.correct + ((mx.argmax(logits, axis=-1) == targets) * mask).sum()
        self.scored = self.scored + ntoks
        return loss, ntoks

    def accuracy(self) -> float:
        scored = self.scored.item()
        return self.correct.item() / scored if scored else 0.0


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


# -- held-out loss of a JSONL file (the measurement without probes)


@dataclass(frozen=True)
class LossReport:
    loss: float  # mean NLL per scored token, in nats
    perplexity: float  # exp(loss)
    tokens: int  # scored tokens: answers only when the prompt is masked
    examples: int
    token_accuracy: float | None = None


def evaluate_loss(
    model_dir: Path,
    data_path: Path,
    *,
    adapter_dir: Path | None = None,
    max_seq_length: int = 512,
    batch_size: int = 4,
    mask_prompt: bool = True,
) -> LossReport:
    """Score every example in data_path (JSONL rows in an SFT shape, like the training data)."""
    rows = [json.loads(line) for line in Path(data_path).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"no examples in {data_path}")
    try:
        m = measure(model_dir, rows, [], adapter_dir=adapter_dir, max_seq_length=max_seq_length,
                    batch_size=batch_size, mask_prompt=mask_prompt)
    except ValueError as e:
        raise ValueError(f"{data_path}: {e}") from None
    return LossReport(m.loss, m.perplexity, m.tokens, m.examples, m.token_accuracy)


def warm_up() -> None:
    """Load a throwaway model as `measure` does, score and answer with it: mlx-lm's imports and
    first-use costs are paid at start-up, not by the first evaluation (tunebus.shared.warmup)."""
    import tempfile

    from tunebus.shared.warmup import MESSAGES, write_warm_up_model

    with tempfile.TemporaryDirectory(prefix="tunebus-warm-up-") as tmp:
        measure(write_warm_up_model(Path(tmp)), [{"messages": MESSAGES}], [MESSAGES[:1]],
                max_tokens=2)
