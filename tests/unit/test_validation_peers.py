"""The peers' own rules and shapes (Together's and OpenAI's checks, LLaMA-Factory's converters,
TRL's dataset formats), each as a row written from their documentation: what they accept is
accepted in its canonical form, what they refuse is an error naming line and field."""

from __future__ import annotations

import pytest

from tests.helpers.validation import assistant, check, fixture, system, user


def errors(report) -> list[tuple]:
    return [(e.line, e.field, e.kind) for e in report.errors]


@pytest.mark.parametrize("name, format", [
    ("preference_llamafactory_multiturn.json", "preference"),
    ("preference_trl.jsonl", "preference"),
    ("preference_trl_implicit.jsonl", "preference"),
    ("prompt_completion_trl.jsonl", "prompt_completion"),
    ("grpo_conversational.jsonl", "grpo"),
    ("openai_chat_tools.jsonl", "messages"),
])
def test_each_peer_shape_is_valid_without_warnings(name, format):
    report, rows = fixture(name)
    assert report.valid, report.errors
    assert report.format == format and report.warning_count == 0 and len(rows) == report.rows


# -- preference ------------------------------------------------------------------------------


def test_llamafactory_multi_turn_preference_keeps_the_context():
    _, rows = fixture("preference_llamafactory_multiturn.json")
    assert {"prompt": "Another one?", "chosen": "Blue.",
            "rejected": "Green is a primary colour of paint.",
            "context": [user("Name a primary colour."), assistant("Red.")]} in rows
    assert {"prompt": "Hi, what is 2+2?", "chosen": "4.", "rejected": "It depends.",
            "system": "Be brief."} in rows


def test_trl_conversational_and_implicit_prompt_preference_share_one_canonical_form():
    _, explicit = fixture("preference_trl.jsonl")
    single = {"prompt": "What color is the sky?", "chosen": "It is blue.",
              "rejected": "It is green."}
    assert single in explicit
    assert {"prompt": "Where is Rome?", "chosen": "In Italy.", "rejected": "In Spain.",
            "system": "Answer briefly.", "context": [user("Hi"), assistant("Hello.")]} in explicit
    _, implicit = fixture("preference_trl_implicit.jsonl")
    assert single in implicit
    assert {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon.",
            "context": [user("Hi"), assistant("Hello.")]} in implicit


def test_implicit_prompt_answers_must_differ_only_in_their_last_turn():
    report, _ = check([{"chosen": [user("a"), assistant("b"), user("c"), assistant("d")],
                        "rejected": [user("a"), assistant("x")]}])
    assert errors(report) == [(1, "chosen", "invalid_value")]
    assert "implicit prompt" in report.errors[0].message


def test_llamafactory_preference_conversations_follow_its_role_order():
    report, _ = check([
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}],
         "chosen": "c", "rejected": "d"},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
         "chosen": "c", "rejected": "d"},
    ])
    assert errors(report) == [(1, "conversations[1]", "role_order"),
                              (2, "conversations[1]", "role_order")]


def test_a_preference_prompt_must_end_on_a_user_turn():
    report, _ = check([{"input": {"messages": [user("a"), assistant("b")]},
                        "preferred_output": [assistant("c")],
                        "non_preferred_output": [assistant("d")]}])
    assert errors(report) == [(1, "input.messages", "invalid_value")]


def test_tools_in_a_preference_row_are_refused_not_dropped():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    report, _ = check([{"input": {"messages": [user("q")], "tools": tools},
                        "preferred_output": [assistant("a")],
                        "non_preferred_output": [assistant("b")]},
                       {"input": {"messages": [user("q")], "tools": []},  # empty: nothing lost
                        "preferred_output": [assistant("a")],
                        "non_preferred_output": [assistant("c")]}])
    assert errors(report) == [(1, "input.tools", "invalid_value")]


# -- ShareGPT (LLaMA-Factory's rule) ---------------------------------------------------------


def share(*turns: tuple[str, str], **extra) -> dict:
    return {"conversations": [{"from": f, "value": v} for f, v in turns], **extra}


def test_sharegpt_role_order_is_an_error_naming_the_turn():
    report, _ = check([
        share(("human", "a"), ("gpt", "b"), ("human", "c")),  # ends on a human turn
        share(("human", "a"), ("human", "b"), ("gpt", "c")),  # two human turns
        share(("gpt", "a"), ("human", "b")),  # starts with gpt
        share(("system", "s"), ("human", "a"), ("gpt", "b")),  # a leading system turn is fine
        share(("human", "a"), ("function_call", '{"name": "f", "arguments": {}}'),
              ("observation", "{}"), ("gpt", "b")),
    ])
    assert errors(report) == [(1, "conversations[2]", "role_order"),
                              (2, "conversations[1].from", "role_order"),
                              (3, "conversations[0].from", "role_order")]
    assert "LLaMA-Factory" in report.errors[0].message
    report, _ = check([share(("system", "only a system prompt"))])
    assert errors(report) == [(1, "conversations", "no_assistant")]


def test_function_call_turns_must_hold_json_and_become_tool_calls():
    report, rows = check([
        share(("human", "weather?"), ("function_call", '{"name": "w", "arguments": {"c": "A"}}'),
              ("observation", "20C"), ("gpt", "20C it is.")),
        share(("human", "weather?"), ("function_call", "call w with A"),
              ("observation", "20C"), ("gpt", "20C it is.")),
        share(("human", "weather?"), ("function_call", '{"name": "w", "arguments": "not json"}'),
              ("observation", "20C"), ("gpt", "20C it is.")),
    ])
    assert errors(report) == [(2, "conversations[1].value", "invalid_json"),
                              (3, "conversations[1].value.arguments", "invalid_json")]
    assert rows[0]["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "w", "arguments": {"c": "A"}}}]}
    assert rows[0]["messages"][2] == {"role": "tool", "content": "20C"}


# -- OpenAI / Together chat ------------------------------------------------------------------


@pytest.mark.parametrize("weight", [2, 0.5, True, "1", -1])
def test_a_weight_is_the_integer_0_or_1(weight):
    report, _ = check([{"messages": [user("q"), {**assistant("a"), "weight": weight}]}])
    assert errors(report) == [(1, "messages[1].weight", "invalid_value")]


def test_a_weight_belongs_on_an_assistant_turn():
    report, _ = check([{"messages": [{**user("q"), "weight": 1}, assistant("a")]}])
    assert errors(report) == [(1, "messages[0].weight", "invalid_value")]


def test_a_row_whose_every_answer_has_weight_0_is_an_error():
    report, _ = check([{"messages": [user("q"), {**assistant("a"), "weight": 0}]}])
    assert errors(report) == [(1, "messages", "no_trained_turn")]


def test_weights_are_kept_and_null_is_no_weight():
    report, rows = check([{"messages": [user("q"), {**assistant("a"), "weight": 0}, user("r"),
                                        {**assistant("b"), "weight": None}]}])
    assert report.valid
    assert rows[0]["messages"] == [user("q"), {**assistant("a"), "weight": 0}, user("r"),
                                   assistant("b")]


def test_tool_call_arguments_must_be_json():
    def call(arguments):
        return {"messages": [user("q"), {"role": "assistant", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "1", "content": "r"}, assistant("a")]}

    report, rows = check([call('{"x": 1}'), call("{x: 1}"), call("[1]"), call({"x": 2})])
    assert errors(report) == [
        (2, "messages[1].tool_calls[0].function.arguments", "invalid_json"),
        (3, "messages[1].tool_calls[0].function.arguments", "wrong_type"),
    ]
    assert sorted(r["messages"][1]["tool_calls"][0]["function"]["arguments"]["x"]
                  for r in rows) == [1, 2]
    assert rows[0]["messages"][2] == {"role": "tool", "content": "r", "tool_call_id": "1"}


def test_tools_must_be_a_json_array_of_objects():
    row = {"messages": [user("q"), assistant("a")]}
    report, _ = check([{**row, "tools": "[{]"}, {**row, "tools": [3]}])
    assert errors(report) == [(1, "tools", "invalid_json"), (2, "tools[0]", "wrong_type")]


# -- alpaca (LLaMA-Factory's converter) ------------------------------------------------------


def test_alpaca_with_an_empty_instruction_takes_its_prompt_from_input():
    report, rows = check([{"instruction": "", "input": "Translate: hi", "output": "salut"},
                          {"instruction": " ", "input": "", "output": "x"}])
    assert errors(report) == [(2, "instruction", "empty_value")]
    assert rows == [{"messages": [user("Translate: hi"), assistant("salut")]}]


# -- conversational prompt/completion and GRPO (TRL) -----------------------------------------


def test_conversational_prompt_completion_becomes_messages():
    _, rows = fixture("prompt_completion_trl.jsonl")
    assert {"messages": [system("Be terse."), user("2+2?"), assistant("4")]} in rows


def test_conversational_grpo_prompt_keeps_system_and_context():
    _, rows = fixture("grpo_conversational.jsonl")
    assert {"prompt": "What is 6 times 7?", "answer": "42"} in rows
    assert {"prompt": "And 3+3?", "answer": "6", "system": "Give only the number.",
            "context": [user("What is 2+2?"), assistant("4")]} in rows
