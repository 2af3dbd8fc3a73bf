"""Every accepted dataset format, in the shapes LLaMA-Factory and OpenAI document, becomes the
canonical rows the trainer reads; the training method decides which formats it accepts."""

from __future__ import annotations

import pytest

from tests.helpers.validation import assistant, check, fixture, system, user


@pytest.mark.parametrize("name, format, methods", [
    ("alpaca_llamafactory.json", "alpaca", ["sft"]),
    ("alpaca_stanford.jsonl", "alpaca", ["sft"]),
    ("sharegpt_llamafactory.json", "sharegpt", ["sft"]),
    ("sharegpt_role_content.jsonl", "sharegpt", ["sft"]),
    ("openai_chat.jsonl", "messages", ["sft"]),
    ("prompt_completion.jsonl", "prompt_completion", ["sft"]),
    ("text.jsonl", "text", ["sft"]),
    ("preference.jsonl", "preference", ["dpo", "orpo", "cpo"]),
    ("preference_llamafactory.json", "preference", ["dpo", "orpo", "cpo"]),
    ("preference_openai.jsonl", "preference", ["dpo", "orpo", "cpo"]),
    ("grpo.jsonl", "grpo", ["grpo"]),
])
def test_each_documented_shape_is_detected_and_valid(name, format, methods):
    report, rows = fixture(name)
    assert report.valid, report.errors
    assert (report.format, report.methods) == (format, methods)
    assert report.warning_count == 0 and len(rows) == report.rows
    report, _ = fixture(name, method=methods[0])
    assert report.valid


def test_alpaca_history_and_system_become_turns():
    _, rows = fixture("alpaca_llamafactory.json")
    assert {"messages": [
        system("You are a translator."),
        user("Translate to French: thank you"), assistant("Merci"),
        user("Translate to French: goodbye"), assistant("Au revoir"),
        user("Translate to French.\n\nGood morning"), assistant("Bonjour"),
    ]} in rows
    assert {"messages": [user("Name the capital of Italy."), assistant("Rome")]} in rows


def test_alpaca_with_a_text_column_stays_alpaca():
    _, rows = fixture("alpaca_stanford.jsonl")
    assert {"messages": [user("Identify the odd one out.\n\nTwitter, Instagram, Telegram"),
                         assistant("Telegram")]} in rows


def test_sharegpt_roles_map_to_chat_roles_and_tools_are_parsed():
    _, rows = fixture("sharegpt_llamafactory.json")
    [weather] = [r for r in rows if "tools" in r]
    assert [m["role"] for m in weather["messages"]] == ["system", "user", "assistant", "tool",
                                                       "assistant"]
    assert weather["tools"][0]["name"] == "get_weather"
    assert {"messages": [user("Hi!"), assistant("Hello! How can I help?"),
                         user("Tell me a fact."), assistant("Honey never spoils.")]} in rows


def test_sharegpt_role_content_variant():
    _, rows = fixture("sharegpt_role_content.jsonl")
    assert {"messages": [system("Be terse."), user("2+2?"), assistant("4")]} in rows


def test_openai_chat_keeps_tool_calls_tools_and_weights():
    # Since issue 12 weights are kept (they were dropped, and weight-0 turns trained) and tool
    # call arguments are parsed from their JSON string.
    _, rows = fixture("openai_chat.jsonl")
    [tool_row] = [r for r in rows if "tools" in r]
    call = tool_row["messages"][1]
    assert call["role"] == "assistant" and call["content"] == ""
    assert call["tool_calls"] == [{"id": "call_id", "type": "function", "function": {
        "name": "get_current_weather",
        "arguments": {"location": "San Francisco, USA", "format": "celsius"}}}]
    assert tool_row["tools"][0]["function"]["name"] == "get_current_weather"
    [weighted] = [r for r in rows if len(r["messages"]) == 5]
    assert [m.get("weight") for m in weighted["messages"]] == [None, None, 0, None, 1]


def test_openai_content_parts_and_developer_role():
    report, rows = check([{"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hi."},
    ]}])
    assert report.valid
    assert rows == [{"messages": [system("Be brief."), user("Hello there"), assistant("Hi.")]}]
    report, _ = check([{"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": "A cat."},
    ]}])
    assert [(e.field, e.kind) for e in report.errors] == [("messages[0].content[0]", "invalid_value")]


def test_sharegpt_turns_under_messages_get_a_hint():
    report, _ = check([{"messages": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}])
    assert report.errors[0].field == "messages[0].role"
    assert "'conversations'" in report.errors[0].message


def test_prompt_completion_and_text():
    _, rows = fixture("prompt_completion.jsonl")
    assert {"messages": [system("Complete the sentence."), user("Water boils at"),
                         assistant(" 100 degrees Celsius at sea level.")]} in rows
    _, rows = fixture("text.jsonl")
    assert {"text": "Pack my box with five dozen liquor jugs."} in rows


def test_preference_shapes_become_prompt_chosen_rejected():
    _, rows = fixture("preference.jsonl")
    assert {"prompt": "Say hello politely.", "chosen": "Hello, nice to meet you!",
            "rejected": "What do you want?"} in rows
    assert all(r.get("system") in (None, "You explain things simply.") for r in rows)
    _, rows = fixture("preference_llamafactory.json")
    assert {"prompt": "Summarise the text.\n\nThe cat sat on the mat all day.",
            "chosen": "A cat spent the day on a mat.", "rejected": "Dogs are loyal animals."} in rows
    assert {"prompt": "Rate my poem.", "chosen": "It has lovely imagery.", "rejected": "It is bad.",
            "system": "Be kind."} in rows
    _, rows = fixture("preference_openai.jsonl")
    assert {"prompt": "What color is the sky?", "chosen": "Blue.",
            "rejected": "The sky can appear in many colors depending on the time of day.",
            "system": "Answer in one word."} in rows


def test_openai_preference_with_several_turns_keeps_them_as_context():
    # Refused before issue 12 ("only ... one user turn"); OpenAI's input.messages may hold more.
    report, rows = check([{
        "input": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                               {"role": "user", "content": "c"}]},
        "preferred_output": [{"role": "assistant", "content": "d"}],
        "non_preferred_output": [{"role": "assistant", "content": "e"}],
    }])
    assert report.valid, report.errors
    assert rows == [{"prompt": "c", "chosen": "d", "rejected": "e",
                     "context": [user("a"), assistant("b")]}]


def test_grpo_numeric_answers_become_text():
    _, rows = fixture("grpo.jsonl")
    assert {"prompt": "What is 7 times 6?", "answer": "42",
            "system": "Think step by step, then give the answer."} in rows
    assert any(r["answer"] == "72" for r in rows)


# -- methods ---------------------------------------------------------------------------------


def test_preference_data_is_refused_for_sft_with_the_reason():
    report, _ = fixture("preference.jsonl", method="sft")
    assert not report.valid and report.error_counts_by_kind == {"wrong_method": 2}
    assert report.reason == ("dataset is in preference format, which method 'sft' cannot train "
                             "on (sft takes alpaca or sharegpt or messages or prompt_completion or "
                             "text; preference suits dpo or orpo or cpo)")


@pytest.mark.parametrize("method", ["dpo", "orpo", "cpo", "grpo"])
def test_chat_data_is_refused_for_the_other_methods(method):
    report, _ = fixture("openai_chat.jsonl", method=method)
    assert not report.valid and set(report.error_counts_by_kind) == {"wrong_method"}
    assert report.reason.startswith(f"dataset is in messages format, which method {method!r}")


def test_a_requested_format_the_method_cannot_use_is_refused_before_reading():
    report, _ = fixture("grpo.jsonl", format="grpo", method="dpo")
    assert report.rows == 0 and [e.kind for e in report.errors] == ["wrong_method"]
    assert "grpo format" in report.reason


# -- warnings --------------------------------------------------------------------------------


def test_chat_warnings_broken_alternation_empty_answer():
    report, rows = check([
        {"messages": [user("a"), user("b"), assistant("c")]},
        {"messages": [user("q"), assistant("  ")]},
        {"messages": [assistant("hello"), user("hi")]},
    ])
    assert report.valid and len(rows) == 3
    assert report.warning_counts_by_kind == {"role_alternation": 2, "empty_output": 1}
    assert report.warnings[0] == ("data.jsonl line 1: messages[1]: roles do not alternate "
                                  "user/assistant (two user turns in a row)")


def test_chat_without_an_assistant_turn_is_an_error():
    # A warning before issue 12; OpenAI and Together reject it.
    report, _ = check([{"messages": [system("s"), user("only a question")]}])
    [error] = report.errors
    assert (error.line, error.field, error.kind) == (1, "messages", "no_assistant")


def test_parallel_tool_results_do_not_break_alternation():
    report, _ = check([{"messages": [
        user("weather in A and B?"),
        {"role": "assistant", "content": None, "tool_calls": [  # complete calls since issue 12
            {"id": "1", "type": "function", "function": {"name": "w", "arguments": '{"c": "A"}'}},
            {"id": "2", "type": "function", "function": {"name": "w", "arguments": '{"c": "B"}'}}]},
        {"role": "tool", "content": "A: 20C", "tool_call_id": "1"},
        {"role": "tool", "content": "B: 25C", "tool_call_id": "2"},
        assistant("A is 20C, B is 25C."),
    ]}])
    assert report.valid and report.warning_count == 0


def test_identical_preference_answers_are_a_warning():
    report, _ = check([{"prompt": "p", "chosen": "same", "rejected": "same"}])
    assert report.valid and report.warning_counts_by_kind == {"identical_pair": 1}


# -- detection -------------------------------------------------------------------------------


def test_a_row_with_two_structured_formats_is_ambiguous():
    report, _ = check([{"messages": [user("a"), assistant("b")], "instruction": "c", "output": "d"}])
    [error] = report.errors
    assert error.kind == "ambiguous_format"
    assert "messages: 'messages'" in error.message and "alpaca" in error.message


def test_null_fields_do_not_count_towards_a_format():
    report, rows = check([{"instruction": "q", "output": "a", "messages": None, "chosen": None}])
    assert report.valid and report.format == "alpaca" and len(rows) == 1


def test_forced_format_refuses_rows_of_another_format():
    report, _ = fixture("text.jsonl", format="grpo")
    assert report.error_counts_by_kind == {"format_mismatch": 2}
    assert "row is in text format, but format='grpo' was requested" in report.errors[0].message


def test_text_rows_must_not_be_empty():
    report, _ = check([{"text": "  "}, {"text": 3}])
    assert [(e.field, e.kind) for e in report.errors] == [("text", "empty_value"), ("text", "wrong_type")]
