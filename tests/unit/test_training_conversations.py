"""Multi-turn preference, conversational GRPO prompts, per-turn weights and tool calls, from the
validator's canonical rows into training, on both backends alike: the loss mask is checked token
by token, and each backend trains each kind of dataset on the tiny model."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from tunebus.services.dataset_validator.validation import validate
from tunebus.services.trainer.backend import GRPOSpec, TrainSpec

BACKENDS = ["mlx", "torch"]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def canonical(data_dir: Path, rows: list[dict], method: str) -> Path:
    """`rows` through the validator, its canonical train.jsonl and valid.jsonl in data_dir."""
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "train.jsonl").open("wb") as train, \
            (data_dir / "valid.jsonl").open("wb") as valid:
        report = validate([("data.jsonl", io.BytesIO(data))], method=method, train_sink=train,
                          valid_sink=valid, valid_fraction=0.25, seed=1)
    assert report.valid, report.errors
    return data_dir


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def answer(text: str, weight: int | None = None) -> dict:
    turn = {"role": "assistant", "content": text}
    return turn if weight is None else {**turn, "weight": weight}


def weighted_chat(i: int) -> dict:
    return {"messages": [user(f"Say hi {i}"), answer(f"Hello {i}", weight=0), user("Again"),
                         answer(f"Bye {i}", weight=1)]}


def tool_chat(i: int) -> dict:
    return {"messages": [
        user(f"Weather in city {i}?"),
        {"role": "assistant", "content": None, "tool_calls": [{"id": f"c{i}", "type": "function",
         "function": {"name": "get_weather", "arguments": f'{{"city": "c{i}"}}'}}]},
        {"role": "tool", "tool_call_id": f"c{i}", "content": f"{i} degrees"},
        answer(f"It is {i} degrees.")], "tools": TOOLS}


def multi_turn_dpo(i: int) -> dict:  # LLaMA-Factory's DPO demo shape: human, gpt, human
    return {"conversations": [{"from": "human", "value": f"Pick a number near {i}."},
                              {"from": "gpt", "value": f"{i + 1}."},
                              {"from": "human", "value": "Now add one."}],
            "chosen": {"from": "gpt", "value": f"{i + 2}."},
            "rejected": {"from": "gpt", "value": f"I cannot count past {i}."}}


def conversational_grpo(i: int) -> dict:  # TRL's conversational prompt
    return {"prompt": [{"role": "system", "content": "Reply."}, user(f"Hi {i}"), answer("Hello."),
                       user("Say a word with the letter a.")], "answer": "a"}


# -- the loss mask, token by token -----------------------------------------------------------


def trained_spans(text: str, answers: list[str]) -> list[tuple[int, int]]:
    """Where each answer and the end-of-turn after it lie in the rendered text."""
    spans, start = [], 0
    for a in answers:
        begin = text.index(a + "<|im_end|>\n", start)
        start = begin + len(a + "<|im_end|>\n")
        spans.append((begin, start))
    return spans


def masks(backend: str, tiny_model: Path, data_dir: Path) -> tuple[list, list[list[int]]]:
    """Each training row's (tokens, mask) as the backend trains it: the MLX objective's dataset;
    on torch, the labels TRL's SFTTrainer prepares from the method's dataset."""
    spec = TrainSpec(iters=1, method="sft", batch_size=1)
    if backend == "mlx":
        from mlx_lm import load
        from tunebus.services.trainer.backends.mlx.methods import build_objective

        _, tokenizer = load(str(tiny_model))
        objective = build_objective(spec, tiny_model, tokenizer, data_dir, lambda: None)
        items = [objective.train_set[i] for i in range(len(objective.train_set))]
        return tokenizer._tokenizer, items
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from tunebus.services.trainer.backends.torch.methods import build_method

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    method = build_method(spec, tokenizer, data_dir, "padded")
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model),
                         args=SFTConfig(output_dir=str(data_dir / "out"), use_cpu=True,
                                        report_to=[], **method.config),
                         train_dataset=method.train_set, processing_class=tokenizer)
    prepared = trainer.train_dataset
    return tokenizer, [(ids, [int(label != -100) for label in labels])
                       for ids, labels in zip(prepared["input_ids"], prepared["labels"])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_0_turns_and_prompts_carry_no_loss_token_by_token(backend, tiny_model, tmp_path):
    rows = [weighted_chat(i) for i in range(6)] + [tool_chat(i) for i in range(6)]
    data_dir = canonical(tmp_path / "data", rows, "sft")
    tokenizer, items = masks(backend, tiny_model, data_dir)
    assert len(items) >= 6
    for tokens, mask in items:
        text = tokenizer.decode(tokens)
        last = text.split("assistant\n")[-1][:-len("<|im_end|>\n")]  # the last answer
        if "<tool_call>" in text:
            start = text.index("<tool_call>")
            expected = trained_spans(text, [text[start:text.index("<|im_end|>", start)], last])
        else:
            assert last.startswith("Bye")
            expected = trained_spans(text, [last])  # "Hello ..." has weight 0: not trained
        position = 0
        for token, bit in zip(tokens, mask):
            inside = any(begin <= position < end for begin, end in expected)
            assert bit == inside, (text, position, tokenizer.decode([token]))
            position += len(tokenizer.decode([token]))
        assert position == len(text)


def test_the_tiny_models_template_renders_tools_and_tool_calls(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    row = tool_chat(3)
    row["messages"][1] = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "c3"}}}]}
    text = tokenizer.apply_chat_template(row["messages"], tools=TOOLS, tokenize=False)
    assert text.startswith("<|im_start|>system\n# Tools\n{\"type\": \"function\"")
    assert ('<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": '
            '{"city": "c3"}}</tool_call><|im_end|>\n'
            '<|im_start|>tool\n3 degrees<|im_end|>\n') in text


def test_a_context_prompt_renders_as_mlx_lm_loras_own_for_a_single_turn(tiny_model):
    from mlx_lm import load
    from mlx_lm_lora.trainer.datasets import DPODataset
    from tunebus.services.trainer.backends.mlx.methods import ContextPairs

    _, tokenizer = load(str(tiny_model))
    row = {"prompt": "p", "chosen": "c", "rejected": "r", "system": "s"}
    assert ContextPairs([row], tokenizer)[0] == DPODataset([row], tokenizer)[0]
    item = ContextPairs([{**row, "context": [user("a"), answer("b")]}], tokenizer)[0]
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "s"}, user("a"), answer("b"), user("p")],
        add_generation_prompt=True)
    assert item["chosen"][:len(prompt)] == prompt and item["chosen_prompt_length"] == len(prompt)


# -- training --------------------------------------------------------------------------------


def train(backend: str, tiny_model: Path, data_dir: Path, out: Path, spec: TrainSpec):
    if backend == "mlx":
        from tunebus.services.trainer.backends.mlx.loop import train as run
    else:
        from tunebus.services.trainer.backends.torch.loop import train as run
    return run(tiny_model, data_dir, out, spec)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_weighted_tool_calling_chat_dataset_trains(backend, tiny_model, tmp_path):
    rows = [weighted_chat(i) for i in range(8)] + [tool_chat(i) for i in range(8)]
    data_dir = canonical(tmp_path / "data", rows, "sft")
    spec = TrainSpec(iters=6, method="sft", batch_size=2, learning_rate=1e-2, steps_per_report=3,
                     steps_per_eval=100, val_batches=1)
    result = train(backend, tiny_model, data_dir, tmp_path / "out", spec)
    assert result.final_loss < result.first_loss
    args = result.resolved_args
    assert "weight-0" in args["method_args"]["loss_mask"]


@pytest.mark.parametrize("method", ["dpo", "orpo"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_multi_turn_preference_dataset_trains(backend, method, tiny_model, tmp_path):
    data_dir = canonical(tmp_path / "data", [multi_turn_dpo(i) for i in range(12)], method)
    assert '"context"' in (data_dir / "train.jsonl").read_text()
    spec = TrainSpec(iters=6, method=method, batch_size=2, learning_rate=1e-2, steps_per_report=3,
                     steps_per_eval=100, val_batches=1)
    result = train(backend, tiny_model, data_dir, tmp_path / "out", spec)
    assert result.final_loss < result.first_loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_conversational_grpo_dataset_trains(backend, tiny_model, tmp_path):
    data_dir = canonical(tmp_path / "data", [conversational_grpo(i) for i in range(8)], "grpo")
    assert '"context"' in (data_dir / "train.jsonl").read_text()
    grpo = GRPOSpec(group_size=2, max_completion_length=2, reward_functions=("contains",))
    spec = TrainSpec(iters=2, method="grpo", batch_size=2, learning_rate=1e-3, steps_per_report=1,
                     steps_per_eval=100, val_batches=1, grpo=grpo)
    result = train(backend, tiny_model, data_dir, tmp_path / "out", spec)
    assert result.steps == 2 and math.isfinite(result.final_loss)
