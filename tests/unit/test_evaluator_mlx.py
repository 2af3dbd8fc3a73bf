"""The MLX evaluation backend on the tiny model: loss, token accuracy and greedy answers, with and
without an adapter that memorised a "42 document".

The adapter is trained here with mlx-lm's own LoRA fine-tuning (`mlx_lm.lora.train_model`), so
these tests depend on the library, not on the trainer service."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tunebus.services.evaluator import mlx_eval
from tunebus.shared.devstack.tinymodel import generate_tiny_model

from tests.helpers.evaluation import FACTS, chat_rows, train_adapter, write_jsonl


@pytest.fixture(scope="module")
def memorised(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("memorised")
    model = generate_tiny_model(root / "model")
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", chat_rows(4))
    write_jsonl(data / "valid.jsonl", chat_rows(1))
    return model, data, train_adapter(model, data, root / "adapter")


def prompts() -> list[list[dict]]:
    return [[{"role": "user", "content": q}] for q, _, _ in FACTS]


def test_after_training_the_adapter_answers_the_probes_and_the_base_model_does_not(memorised):
    model, _, adapter = memorised
    rows = chat_rows()
    base = mlx_eval.measure(model, rows, prompts(), max_tokens=24)
    tuned = mlx_eval.measure(model, rows, prompts(), adapter_dir=adapter, max_tokens=24)
    for (_, _, key), before, after in zip(FACTS, base.answers, tuned.answers, strict=True):
        assert key.lower() in after.text.lower()
        assert key.lower() not in before.text.lower()
    assert tuned.loss < base.loss and tuned.token_accuracy > base.token_accuracy
    assert all(a.tokens > 0 and a.seconds > 0 for a in base.answers + tuned.answers)


def test_token_accuracy_counts_the_same_tokens_as_the_loss(memorised):
    model, _, adapter = memorised
    report = mlx_eval.measure(model, chat_rows(), [], adapter_dir=adapter)
    assert 0.0 <= report.token_accuracy <= 1.0
    assert report.perplexity == pytest.approx(math.exp(report.loss), rel=1e-12)
    assert report.examples == len(FACTS) and report.answers == []


def test_greedy_answers_are_deterministic_and_bounded(memorised):
    model, _, _ = memorised
    first = mlx_eval.measure(model, chat_rows(), prompts()[:2], max_tokens=5)
    again = mlx_eval.measure(model, chat_rows(), prompts()[:2], max_tokens=5)
    assert [a.text for a in first.answers] == [a.text for a in again.answers]
    assert all(a.tokens <= 5 for a in first.answers)


def test_prompt_answer_rows_are_scored_like_completions(memorised):
    model, _, _ = memorised
    rows = [{"prompt": q, "completion": a} for q, a, _ in FACTS]
    report = mlx_eval.measure(model, rows, [])
    assert report.examples == len(FACTS) and report.tokens > 0


def test_probes_answered_in_batches_are_the_answers_one_at_a_time(memorised):
    from mlx_lm import load

    model_dir, _, adapter = memorised
    model, tokenizer = load(str(model_dir), adapter_path=str(adapter))
    batched = mlx_eval.answer_all(model, tokenizer, prompts(), 24, batch_size=len(prompts()))
    chunked = mlx_eval.answer_all(model, tokenizer, prompts(), 24, batch_size=2)
    single = [mlx_eval.answer(model, tokenizer, p, 24) for p in prompts()]
    assert [(a.text, a.tokens) for a in batched] == [(a.text, a.tokens) for a in single]
    assert [(a.text, a.tokens) for a in chunked] == [(a.text, a.tokens) for a in single]
    assert any(a.tokens < 24 for a in single)  # some ended at EOS, which counts as a token


def test_base_and_adapter_from_one_load_measure_as_two_loads_do(memorised):
    model_dir, _, adapter = memorised
    settings = {"max_tokens": 8, "batch_size": 4}
    before, after = mlx_eval.measure_base_and_adapter(model_dir, adapter, chat_rows(), prompts(),
                                                      **settings)
    assert before.loss == pytest.approx(mlx_eval.measure(model_dir, chat_rows(), prompts(),
                                                         **settings).loss, rel=1e-6)
    alone = mlx_eval.measure(model_dir, chat_rows(), prompts(), adapter_dir=adapter, **settings)
    assert after.loss == pytest.approx(alone.loss, rel=1e-6) and after.loss < before.loss
    assert [a.text for a in after.answers] == [a.text for a in alone.answers]
