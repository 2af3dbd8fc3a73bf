"""GGUF copies over the real stack: the registry writes gguf/adapter.gguf when it registers a
version, and `format: gguf` on registry.download-url (and `tunebus adapters download --format
gguf`) hands out a file whose every tensor is the PEFT adapter's under its llama.cpp name;
`--format gguf-merged` turns a version's merged model into one full GGUF."""

from __future__ import annotations

import asyncio
import hashlib
import json
import urllib.request

import numpy as np
import pytest
from gguf import GGUFReader
from typer.testing import CliRunner

from tests.helpers.gguf_names import expected_tensors
from tests.helpers.registration import GGUF_NAMES, llama_cpp_tensors, random_adapter, register_on
from tests.helpers.bus import connect
from tunebus.contracts import DownloadUrls, GetDownloadUrls, subjects
from tunebus.shared.adapter_layouts import MERGED_DIR, PEFT_DIR
from tunebus.shared.cli import app, client
from tunebus.shared.devstack.stack import service_env


@pytest.fixture(scope="module")
def registered(stack, store, tiny_model, tiny_model_uri, tmp_path_factory):
    local = random_adapter(tiny_model, tmp_path_factory.mktemp("gguf") / "a", seed=5,
                           keys=tuple(GGUF_NAMES), base_model=tiny_model_uri)

    return asyncio.run(register_on(stack, store, "gguffy", local, tiny_model_uri)), local


def ask_urls(stack, ref: str, layout: str) -> DownloadUrls:
    async def run():
        nc = await connect(stack.as_role("observer"))
        try:
            return await client.ask(nc, subjects.REGISTRY_DOWNLOAD_URL, GetDownloadUrls(ref=ref, format=layout),
                                    DownloadUrls)
        finally:
            await nc.close()

    return asyncio.run(run())


def assert_is_the_peft_adapter(path, peft_dir, config):
    reader = GGUFReader(path)
    found = {t.name: np.asarray(t.data) for t in reader.tensors}
    want = llama_cpp_tensors(peft_dir, config)
    assert sorted(found) == sorted(want)
    for name, value in want.items():
        assert found[name].shape == value.shape and np.array_equal(found[name], value), name


def test_a_registered_version_has_a_gguf_copy_downloadable_by_presigned_link(
        stack, registered, tiny_model, tmp_path):
    entry, local = registered
    assert entry["formats"]["gguf"] == "gguf/"
    reply = ask_urls(stack, entry["ref"], "gguf")
    assert reply.error is None and "adapter.gguf" in reply.urls
    assert not any(name.endswith(".safetensors") for name in reply.urls)  # only this layout
    body = urllib.request.urlopen(reply.urls["adapter.gguf"], timeout=10).read()
    assert hashlib.sha256(body).hexdigest() == reply.sha256["adapter.gguf"]
    (tmp_path / "adapter.gguf").write_bytes(body)
    config = json.loads((tiny_model / "config.json").read_text())
    assert_is_the_peft_adapter(tmp_path / "adapter.gguf", local / PEFT_DIR, config)


def test_the_cli_downloads_the_gguf_layout(stack, registered, tiny_model, tmp_path, monkeypatch):
    entry, local = registered
    for key, value in service_env(stack.as_role("submitter")).items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, ["adapters", "download", entry["ref"], "--format", "gguf",
                                      "--to", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    folder = tmp_path / entry["ref"].replace(":", "-v")
    assert "gguf layout" in result.output and (folder / "adapter.gguf").is_file()
    config = json.loads((tiny_model / "config.json").read_text())
    assert_is_the_peft_adapter(folder / "adapter.gguf", local / PEFT_DIR, config)


@pytest.fixture(scope="module")
def registered_with_merged(stack, store, tiny_model, tiny_model_uri, tmp_path_factory):
    """A version stored as the trainer stores `merge: true`: the adapter fused into the tiny
    model by the MLX worker's own merge, under merged/."""
    from tunebus.services.trainer.backends.mlx.loop import merge

    local = random_adapter(tiny_model, tmp_path_factory.mktemp("gguf-merged") / "a", seed=6,
                           base_model=tiny_model_uri)
    merge(tiny_model, local, local / MERGED_DIR)

    return asyncio.run(register_on(stack, store, "merged-gguf", local, tiny_model_uri)), local


def download(stack, monkeypatch, ref, fmt, to):
    for key, value in service_env(stack.as_role("submitter")).items():
        monkeypatch.setenv(key, value)
    return CliRunner().invoke(app, ["adapters", "download", ref, "--format", fmt, "--to", str(to)],
                              catch_exceptions=False)


def test_the_cli_writes_the_merged_model_as_one_full_gguf(
        stack, registered_with_merged, tmp_path, monkeypatch):
    entry, local = registered_with_merged
    result = download(stack, monkeypatch, entry["ref"], "gguf-merged", tmp_path)
    assert result.exit_code == 0, result.output
    path = tmp_path / entry["ref"].replace(":", "-v") / "model.gguf"
    reader = GGUFReader(path)
    found = {t.name: np.asarray(t.data) for t in reader.tensors}
    merged = local / MERGED_DIR
    config = json.loads((merged / "config.json").read_text())
    want = expected_tensors(merged, config, reorder=True)
    assert sorted(found) == sorted(want)
    for name, value in want.items():
        assert np.array_equal(found[name], value), name
    assert reader.fields["general.type"].contents() == "model"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == config["vocab_size"]


def test_gguf_merged_of_a_version_without_a_merged_model_says_so(stack, registered, tmp_path, monkeypatch):
    entry, _ = registered
    result = download(stack, monkeypatch, entry["ref"], "gguf-merged", tmp_path)
    assert result.exit_code == 1
    assert "has no merged model" in result.output and "merge: true" in result.output
    assert not list(tmp_path.rglob("*.gguf"))
