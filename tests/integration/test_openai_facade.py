"""`tunebus serve --openai` against the real stack, spoken to with the official openai client:
models listed from the registry, chat completions (streamed too) as the bus answers them, each
request on the caller's own identity."""

from __future__ import annotations

import asyncio
import threading
import time

import openai
import pytest
import uvicorn

from tests.helpers.registration import random_adapter, register_on
from tunebus.contracts import Generate
from tunebus.shared.cli import client
from tunebus.shared.cli.openai_api import create_app
from tunebus.shared.devstack.stack import free_port

CHAT = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def entry(stack, store, tiny_model, tiny_model_uri, tmp_path_factory):
    local = random_adapter(tiny_model, tmp_path_factory.mktemp("openai") / "a", seed=11,
                           base_model=tiny_model_uri)

    return asyncio.run(register_on(stack, store, "oai", local, tiny_model_uri))


@pytest.fixture(scope="module")
def base_url(stack):
    """The facade on a free port, in a thread, as `tunebus serve --openai` runs it."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(stack.settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(10)


def api(stack, base_url, role: str) -> openai.OpenAI:
    settings = stack.as_role(role)
    key = f"{settings.nats.user}:{settings.nats.password.get_secret_value()}"
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)


def on_the_bus(stack, **fields):
    async def run():
        async with client.connect(stack.as_role("submitter")) as nc:
            return await client.generate(nc, Generate(**fields))

    return asyncio.run(run())


def test_models_are_the_registered_versions_their_aliases_and_base_models(stack, base_url, entry,
                                                                          tiny_model_uri):
    ids = {m.id for m in api(stack, base_url, "observer").models.list()}
    # (not promoted: its evaluation was skipped, so no oai@production)
    assert {entry["ref"], "oai@latest", tiny_model_uri} <= ids and "oai@production" not in ids


def test_a_chat_completion_is_the_buses_answer(stack, base_url, entry):
    completion = api(stack, base_url, "submitter").chat.completions.create(
        model="oai@latest", messages=CHAT, max_tokens=16, temperature=0)
    expected = on_the_bus(stack, messages=CHAT, adapter=entry["ref"], max_tokens=16)
    assert completion.choices[0].message.content == expected.text
    assert completion.choices[0].finish_reason == expected.finish_reason
    assert completion.usage.completion_tokens == expected.usage.completion_tokens


def test_a_streamed_chat_completion_is_the_same_text_in_chunks(stack, base_url, entry, tiny_model_uri):
    stream = api(stack, base_url, "operator").chat.completions.create(
        model=tiny_model_uri, messages=CHAT, max_tokens=16, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3 and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert text == on_the_bus(stack, messages=CHAT, base_model=tiny_model_uri, max_tokens=16).text


def test_an_unknown_model_a_wrong_key_and_an_observer_are_refused(stack, base_url, entry):
    with pytest.raises(openai.NotFoundError, match="never-was"):
        api(stack, base_url, "submitter").chat.completions.create(model="never-was:1", messages=CHAT)
    wrong = openai.OpenAI(base_url=base_url, api_key="submitter:wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.PermissionDeniedError, match="may not publish to tunebus.v1.inference.generate"):
        api(stack, base_url, "observer").chat.completions.create(model=entry["ref"], messages=CHAT)
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.role"):
        api(stack, base_url, "submitter").chat.completions.create(
            model=entry["ref"], messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
