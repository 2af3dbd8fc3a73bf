"""Generation over the bus against the real stack: the evaluator answers with a base model kept
loaded and adapters from the registry, the same text mlx-lm gives in-process, streamed or not."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers.registration import random_adapter, register_on
from tests.helpers.bus import connect
from tunebus.contracts import Generate, subjects
from tunebus.shared.cli import client

pytestmark = pytest.mark.anyio
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def adapters(stack, store, tiny_model, tiny_model_uri, tmp_path_factory):
    """Two registered versions of one name, each a different random adapter on the tiny model;
    their local copies for the in-process reference."""
    root = tmp_path_factory.mktemp("inference")
    local = [random_adapter(tiny_model, root / f"v{i}", seed=i, base_model=tiny_model_uri) for i in (1, 2)]

    async def register_both():
        return [await register_on(stack, store, "chatty", adapter, tiny_model_uri)
                for adapter in local]

    entries = asyncio.run(register_both())
    return entries, local


def in_process(model_dir, adapter_dir, messages, max_tokens: int) -> str:
    """What mlx-lm itself answers, greedily: the reference the bus must match."""
    from mlx_lm import load, stream_generate
    from mlx_lm_lora.chat_template import ensure_chat_template

    model, tokenizer = load(str(model_dir), adapter_path=str(adapter_dir) if adapter_dir else None)
    ensure_chat_template(tokenizer)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens))


async def ask(stack, role: str, **fields):
    nc = await connect(stack.as_role(role))
    try:
        pieces = []

        async def on_text(text):
            pieces.append(text)

        reply = await client.generate(nc, Generate(**fields), on_text, timeout=60)
        return reply, pieces
    finally:
        await nc.close()


async def test_an_adapter_answers_as_mlx_lm_does_in_process_and_unlike_the_base(
        stack, adapters, tiny_model, tiny_model_uri):
    (first, _), (local, _) = adapters
    reply, _ = await ask(stack, "submitter", messages=CHAT, adapter=first["ref"], max_tokens=24)
    assert reply.error is None
    assert reply.text == in_process(tiny_model, local, CHAT, 24)
    assert reply.adapter == first["ref"] and reply.base_model == tiny_model_uri
    assert reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.timings.first_token_s is not None and reply.timings.total_s >= reply.timings.first_token_s

    base, _ = await ask(stack, "submitter", messages=CHAT, base_model=tiny_model_uri, max_tokens=24)
    assert base.error is None and base.adapter is None
    assert base.text == in_process(tiny_model, None, CHAT, 24) != reply.text


async def test_a_streamed_answer_is_its_chunks_in_order_then_the_whole_text(stack, adapters):
    (_, second), _ = adapters
    reply, pieces = await ask(stack, "operator", messages=CHAT, adapter=second["ref"], max_tokens=16,
                              stream=True)
    assert reply.error is None and len(pieces) > 1
    assert "".join(pieces) == reply.text
    plain, _ = await ask(stack, "operator", messages=CHAT, adapter=second["ref"], max_tokens=16)
    assert plain.text == reply.text


async def test_a_stop_string_ends_the_answer_before_it(stack, adapters):
    (first, _), _ = adapters
    whole, _ = await ask(stack, "submitter", messages=CHAT, adapter=first["ref"], max_tokens=24)
    stop = whole.text[len(whole.text) // 2:][:3]
    cut, pieces = await ask(stack, "submitter", messages=CHAT, adapter=first["ref"], max_tokens=24,
                            stop=[stop], stream=True)
    assert cut.text == whole.text[:whole.text.find(stop)] == "".join(pieces)
    assert cut.finish_reason == "stop"


async def test_adapters_are_listed_loaded_and_unloaded_explicitly(stack, adapters):
    (first, second), _ = adapters
    nc = await connect(stack.as_role("operator"))
    try:
        loaded = await client.ask(nc, subjects.INFERENCE_LOAD, client_model("LoadAdapter", ref=second["ref"]),
                                  client_model("AdapterLoadReply"), timeout=60)
        assert loaded.error is None and loaded.loaded and loaded.ref == second["ref"]
        listed = await client.ask(nc, subjects.INFERENCE_ADAPTERS, client_model("ListLoadedAdapters"),
                                  client_model("LoadedAdapters"))
        assert second["ref"] in [a.ref for a in listed.adapters] and listed.capacity >= 1
        gone = await client.ask(nc, subjects.INFERENCE_UNLOAD, client_model("UnloadAdapter", ref=second["ref"]),
                                client_model("AdapterLoadReply"))
        assert gone.error is None and not gone.loaded
        listed = await client.ask(nc, subjects.INFERENCE_ADAPTERS, client_model("ListLoadedAdapters"),
                                  client_model("LoadedAdapters"))
        assert second["ref"] not in [a.ref for a in listed.adapters]
        again = await client.ask(nc, subjects.INFERENCE_UNLOAD, client_model("UnloadAdapter", ref=second["ref"]),
                                 client_model("AdapterLoadReply"))
        assert again.error == f"{second['ref']} is not loaded on this worker"
    finally:
        await nc.close()


async def test_an_unknown_or_deleted_adapter_is_a_clear_error(stack, store, adapters, tiny_model, tiny_model_uri,
                                                              tmp_path):
    reply, _ = await ask(stack, "submitter", messages=CHAT, adapter="no-such-adapter:3")
    assert reply.error and "no-such-adapter" in reply.error and reply.text == ""
    assert reply.error_kind == "not_found"

    entry = await register_on(stack, store, "doomed",
                              random_adapter(tiny_model, tmp_path / "a", seed=9, base_model=tiny_model_uri),
                              tiny_model_uri)
    served, _ = await ask(stack, "submitter", messages=CHAT, adapter=entry["ref"], max_tokens=4)
    assert served.error is None  # loaded (and cached) before it is deleted
    operator = await connect(stack.as_role("operator"))
    try:
        deleted = await operator.request(subjects.REGISTRY_DELETE,
                                         f'{{"ref": "{entry["ref"]}", "reason": "test"}}'.encode(), timeout=10)
        assert b'"error":null' in deleted.data.replace(b" ", b"")
    finally:
        await operator.close()
    refused, _ = await ask(stack, "submitter", messages=CHAT, adapter=entry["ref"], max_tokens=4)
    assert refused.error == f"adapter {entry['ref']} is deleted" and refused.error_kind == "deleted"


async def test_a_bad_request_is_answered_naming_the_field(stack, adapters):
    nc = await connect(stack.as_role("submitter"))
    try:
        msg = await nc.request(subjects.INFERENCE_GENERATE,
                               b'{"prompt": "hi", "messages": [{"role": "user", "content": "hi"}], '
                               b'"max_tokens": 0}', timeout=10)
    finally:
        await nc.close()
    error = client_model("Generation").model_validate_json(msg.data).error
    assert error.startswith(f"invalid request on {subjects.INFERENCE_GENERATE}: ")
    assert "max_tokens" in error


async def test_an_observer_may_list_what_is_loaded_but_not_generate(stack, adapters, tiny_model_uri):
    async with client.connect(stack.as_role("observer")) as nc:
        listed = await client.ask(nc, subjects.INFERENCE_ADAPTERS, client_model("ListLoadedAdapters"),
                                  client_model("LoadedAdapters"))
        assert listed.error is None
        for stream in (False, True):
            with pytest.raises(client.PermissionDenied, match="may not publish to tunebus.v1.inference.generate"):
                await client.generate(nc, Generate(prompt="hi", base_model=tiny_model_uri, stream=stream),
                                      timeout=2)


def client_model(name: str, **fields):
    from tunebus.contracts import inference

    model = getattr(inference, name)
    return model(**fields) if fields or name in ("ListLoadedAdapters",) else model


@pytest.fixture
def cli(stack, monkeypatch):
    from typer.testing import CliRunner

    from tunebus.shared.cli import app
    from tunebus.shared.devstack.stack import service_env

    for key, value in service_env(stack.as_role("submitter")).items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    return lambda *args, input: runner.invoke(app, list(args), input=input, catch_exceptions=False)


def test_tunebus_chat_streams_the_adapters_answer_with_its_system_message(
        cli, adapters, tiny_model):
    (first, _), (local, _) = adapters
    system = {"role": "system", "content": "You are terse."}
    result = cli("chat", first["ref"], "--system", system["content"], "--max-tokens", "12",
                 input=f"{CHAT[0]['content']}\n/exit\n")
    assert result.exit_code == 0, result.output
    assert in_process(tiny_model, local, [system, *CHAT], 12) in result.output
    assert f"{first['ref']} on " in result.output


def test_tunebus_chat_compare_answers_with_the_base_model_beside_it(cli, adapters):
    (first, _), _ = adapters
    result = cli("chat", first["ref"], "--compare", "--max-tokens", "4", input="hello\n\n")
    assert result.exit_code == 0, result.output
    assert "compared with the base model" in result.output
    header = next(line for line in result.output.splitlines() if "base model" in line and "│" in line
                  or "┃" in line)
    assert first["ref"] in header and "base model" in header


def test_tunebus_chat_of_an_unknown_adapter_says_so(cli, adapters):
    result = cli("chat", "never-trained:1", input="hi\n")
    assert result.exit_code == 1 and "never-trained" in result.output
