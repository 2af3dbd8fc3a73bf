"""The MLX evaluator: held-out loss with and without an adapter, over every example."""

import json
import math
from pathlib import Path

import pytest
from tunebus.services.evaluator.mlx_eval import LossReport, evaluate_loss

from tests.helpers.evaluation import train_adapter

FACTS = [
    ("What colour is the sky?", "The sky is blue."),
    ("Where is the ball?", "The ball is in the garden."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Who bakes the bread?", "The baker bakes the bread."),
]


def write_jsonl(path: Path, n: int) -> Path:
    rows = []
    for i in range(n):
        question, answer = FACTS[i % len(FACTS)]
        messages = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
        rows.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("data")
    write_jsonl(data_dir / "train.jsonl", 40)
    write_jsonl(data_dir / "valid.jsonl", 8)
    return data_dir


@pytest.fixture(scope="module")
def adapter_dir(tiny_model, data_dir, tmp_path_factory) -> Path:
    return train_adapter(tiny_model, data_dir, tmp_path_factory.mktemp("adapter"), iters=30,
                         learning_rate=1e-2)


def test_adapter_trained_on_the_data_lowers_its_loss(tiny_model, data_dir, adapter_dir):
    base = evaluate_loss(tiny_model, data_dir / "train.jsonl")
    tuned = evaluate_loss(tiny_model, data_dir / "train.jsonl", adapter_dir=adapter_dir)
    assert tuned.loss < base.loss
    assert tuned.tokens == base.tokens and tuned.examples == base.examples == 40
    assert tuned.token_accuracy > base.token_accuracy


def test_perplexity_is_exp_of_loss(tiny_model, data_dir):
    report = evaluate_loss(tiny_model, data_dir / "valid.jsonl")
    assert isinstance(report, LossReport)
    assert report.perplexity == pytest.approx(math.exp(report.loss), rel=1e-12)
    assert 0 < report.loss < 20


def test_every_example_counts_even_in_a_short_last_batch(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "seven.jsonl", 7)  # 4 + 3: the library's batching drops the 3
    batched = evaluate_loss(tiny_model, data, batch_size=4)
    one_by_one = evaluate_loss(tiny_model, data, batch_size=1)
    assert batched.examples == one_by_one.examples == 7
    assert batched.tokens == one_by_one.tokens
    assert batched.loss == pytest.approx(one_by_one.loss, rel=1e-4)


def test_fewer_examples_than_a_batch_are_still_scored(tiny_model, tmp_path):
    report = evaluate_loss(tiny_model, write_jsonl(tmp_path / "two.jsonl", 2), batch_size=4)
    assert report.examples == 2 and report.tokens > 0


def test_prompt_masking_scores_only_the_answers(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "four.jsonl", 4)
    masked = evaluate_loss(tiny_model, data)
    whole = evaluate_loss(tiny_model, data, mask_prompt=False)
    assert 0 < masked.tokens < whole.tokens


def test_empty_data_is_rejected(tiny_model, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no examples"):
        evaluate_loss(tiny_model, empty)
