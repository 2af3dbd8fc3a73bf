"""The torch evaluation backend agrees with the MLX one: same scored tokens, same loss, same
greedy answers, for the base model and for an MLX-trained adapter converted to PEFT.

The MLX backend is the reference (it is mlx-lm-lora's own evaluate_sft and mask); on the tiny
model both run in float32 on the CPU, so the two losses agree to float rounding."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tunebus.services.evaluator import backend, mlx_eval, torch_eval
from tunebus.services.trainer.backends.mlx import loop as mlx_backend
from tunebus.services.trainer.backend import LoraSpec, TrainSpec
from tunebus.shared import chat
from tunebus.shared.adapter_layouts import mlx_to_peft
from tunebus.shared.devstack.tinymodel import generate_tiny_model

from tests.helpers.evaluation import FACTS, chat_rows, write_jsonl

LOSS_TOLERANCE = 1e-4  # relative; float32 on both sides, summed in a different order


def prompts() -> list[list[dict]]:
    return [[{"role": "user", "content": q}] for q, _, _ in FACTS]


def rows_of(shape: str) -> list[dict]:
    if shape == "messages":
        return chat_rows()
    if shape == "prompt_completion":
        return [{"prompt": q, "completion": a} for q, a, _ in FACTS]
    return [{"text": f"{q} {a}"} for q, a, _ in FACTS]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return generate_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory) -> tuple[Path, Path]:
    """An adapter trained by the MLX trainer (mlx layout) and its PEFT conversion."""
    root = tmp_path_factory.mktemp("adapters")
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", chat_rows(4))
    spec = TrainSpec(iters=30, batch_size=4, learning_rate=5e-3, max_seq_length=128,
                     steps_per_report=30, steps_per_eval=1000, lora=LoraSpec(rank=8, alpha=16.0))
    mlx_dir = mlx_backend.train(tiny, data, root / "mlx", spec).adapter_dir
    return mlx_dir, mlx_to_peft(mlx_dir, root / "peft", base_model=str(tiny))


# 44 tokens truncates three of the six chat examples (38 to 52 tokens) and leaves three whole.
@pytest.mark.parametrize(("shape", "mask_prompt", "max_seq_length"), [
    ("messages", True, 512),
    ("messages", True, 44),
    ("messages", False, 512),
    ("prompt_completion", True, 512),
    ("text", True, 512),
])
def test_the_base_model_scores_the_same_tokens_and_loss_as_mlx(tiny, shape, mask_prompt,
                                                               max_seq_length):
    rows = rows_of(shape)
    settings = {"max_seq_length": max_seq_length, "mask_prompt": mask_prompt, "batch_size": 4}
    mlx = mlx_eval.measure(tiny, rows, [], **settings)
    torch = torch_eval.measure(tiny, rows, [], **settings)
    assert torch.tokens == mlx.tokens
    assert torch.examples == mlx.examples == len(rows)
    assert torch.loss == pytest.approx(mlx.loss, rel=LOSS_TOLERANCE)
    assert torch.token_accuracy == pytest.approx(mlx.token_accuracy, abs=1e-9)


def test_mask_scores_the_answer_header_and_one_token_past_each_untruncated_end(tiny):
    """mlx-lm-lora's mask, made explicit: from the end of the prompt messages (no generation
    prompt) to the example's length inclusive, the last target being the zero padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    row = chat_rows()[0]
    full = tokenizer.encode(tokenizer.apply_chat_template(row["messages"], tokenize=False))
    prompt = tokenizer.encode(tokenizer.apply_chat_template(row["messages"][:1], tokenize=False))
    whole = torch_eval.scored_example(row, tokenizer, True, 512)
    scored = [t for t in whole.labels if t != torch_eval.IGNORE]
    assert scored == full[len(prompt):] + [torch_eval.PAST_THE_END]
    assert whole.ids == full

    cut = torch_eval.scored_example(row, tokenizer, True, len(full) - 1)
    assert [t for t in cut.labels if t != torch_eval.IGNORE] == full[len(prompt):len(full) - 1]


def test_an_adapter_converted_to_peft_scores_as_the_mlx_adapter_does(tiny, adapters):
    mlx_adapter, peft_adapter = adapters
    rows = chat_rows()
    mlx_base = mlx_eval.measure(tiny, rows, [])
    mlx = mlx_eval.measure(tiny, rows, prompts(), adapter_dir=mlx_adapter, max_tokens=16)
    torch = torch_eval.measure(tiny, rows, prompts(), adapter_dir=peft_adapter, max_tokens=16)
    assert mlx.loss < mlx_base.loss * 0.8  # the adapter changed the model: a test that can fail
    assert torch.tokens == mlx.tokens
    assert torch.loss == pytest.approx(mlx.loss, rel=LOSS_TOLERANCE)
    assert torch.token_accuracy == pytest.approx(mlx.token_accuracy, abs=1e-9)
    assert [a.text for a in torch.answers] == [a.text for a in mlx.answers]
    assert [a.tokens for a in torch.answers] == [a.tokens for a in mlx.answers]


def test_greedy_answers_come_for_every_prompt_within_max_tokens(tiny):
    result = torch_eval.measure(tiny, chat_rows(), prompts(), max_tokens=5)
    reference = mlx_eval.measure(tiny, chat_rows(), prompts(), max_tokens=5)
    assert len(result.answers) == len(prompts())
    assert all(0 < a.tokens <= 5 and a.seconds > 0 for a in result.answers)
    # The same greedy tokens; the texts are not compared here, because on this random model the
    # answers hold raw byte tokens, which mlx-lm's streaming detokenizer renders differently
    # (a 0x00 byte as "Ā" where the tokenizer's decode gives "\x00").
    assert [a.tokens for a in result.answers] == [a.tokens for a in reference.answers]


def test_probes_answered_in_batches_are_the_answers_one_at_a_time(tiny, adapters):
    _, peft_adapter = adapters
    model, tokenizer = torch_eval.load(tiny, peft_adapter)
    batched = torch_eval.answer_all(model, tokenizer, prompts(), 24, batch_size=len(prompts()))
    chunked = torch_eval.answer_all(model, tokenizer, prompts(), 24, batch_size=2)
    single = [torch_eval.answer(model, tokenizer, p, 24) for p in prompts()]
    assert [(a.text, a.tokens) for a in batched] == [(a.text, a.tokens) for a in single]
    assert [(a.text, a.tokens) for a in chunked] == [(a.text, a.tokens) for a in single]
    # Prompts of different lengths (so some rows are left-padded), and answers that ended at
    # EOS before others (so some rows are padded after it).
    assert len({len(p[0]["content"]) for p in prompts()}) > 1
    assert any(a.tokens < 24 for a in single) and any(a.tokens > 1 for a in single)
    assert len({a.tokens for a in single}) > 1


def test_an_unreadable_row_is_named_by_its_index(tiny):
    with pytest.raises(ValueError, match=r"row 1: none of the SFT fields"):
        torch_eval.measure(tiny, [chat_rows()[0], {"question": "?"}], [])


def test_the_fallback_chat_template_is_mlx_lm_loras():
    from mlx_lm_lora.chat_template import DEFAULT_CHAT_TEMPLATE
    from tunebus.services.trainer.backends.torch.loop import FALLBACK_CHAT_TEMPLATE as trainers

    assert chat.FALLBACK_CHAT_TEMPLATE == DEFAULT_CHAT_TEMPLATE
    assert torch_eval.FALLBACK_CHAT_TEMPLATE == trainers == DEFAULT_CHAT_TEMPLATE


@pytest.mark.parametrize("library", ["torch", "transformers", "peft"])
def test_the_cuda_backend_needs_torch_transformers_and_peft(monkeypatch, library):
    assert "cuda" in backend.available()  # all three are installed here
    monkeypatch.setitem(sys.modules, library, None)  # now `import <library>` fails
    assert "cuda" not in backend.available()
    with pytest.raises(backend.BackendUnavailable, match=rf"not installed here: {library} "):
        backend.load_backend("cuda")


def test_without_a_complete_backend_the_error_names_what_each_lacks(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx_lm", None)
    monkeypatch.setitem(sys.modules, "peft", None)
    assert backend.available() == []
    with pytest.raises(backend.BackendUnavailable,
                       match=r"no evaluation backend is installed.*mlx lacks mlx_lm; cuda lacks peft"):
        backend.load_backend("auto")


def test_the_old_setting_torch_still_selects_the_cuda_backend_with_a_warning():
    from tunebus.shared.settings import EvaluatorSettings

    with pytest.warns(DeprecationWarning, match="'torch' is deprecated: it is called 'cuda'"):
        assert EvaluatorSettings(backend="torch").backend == "cuda"
    assert EvaluatorSettings(backend="cuda").backend == "cuda"
    with pytest.raises(ValueError, match="backend"):
        EvaluatorSettings(backend="rocm")
