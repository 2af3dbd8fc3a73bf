"""The `tunebus` command line against the running stack, as a person would use it."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from typer.testing import CliRunner

from tunebus.shared.cli import app
from tunebus.shared.devstack.stack import service_env


@pytest.fixture
def cli(stack, monkeypatch):
    for key, value in service_env(stack.settings).items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args), catch_exceptions=False)


def test_submit_watch_list_show_and_download(cli, tmp_path, tiny_model_uri):
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(
        json.dumps({"instruction": f"Spell {w}.", "output": " ".join(w)}) + "\n"
        for w in ["tune", "bus", "adapter", "model", "loss", "rank", "alpha", "token", "layer"]
    ))
    job_id = "cli-job-0001"
    result = cli("submit", str(data), "--adapter", "speller", "--base-model", tiny_model_uri,
                 "--job-id", job_id, "--iters", "20", "--learning-rate", "0.005",
                 "--max-seq-length", "64", "--watch")
    assert result.exit_code == 0, result.output
    assert "dataset.validated" in result.output and "adapter.registered speller:1" in result.output

    listing = cli("adapters", "list", "--name", "speller")
    assert listing.exit_code == 0 and "speller:1" in listing.output
    listed = json.loads(cli("adapters", "list", "--name", "speller", "--json").output)["adapters"]
    assert [(e["ref"], e["job_id"]) for e in listed] == [("speller:1", job_id)]

    shown = cli("adapters", "show", "speller:1")
    entry = json.loads(shown.output)
    assert entry["job_id"] == job_id and entry["evaluation"]["after"]["loss"] > 0

    downloaded = cli("adapters", "download", "speller:1", "--to", str(tmp_path / "out"))
    assert downloaded.exit_code == 0 and "mlx layout" in downloaded.output, downloaded.output
    target = tmp_path / "out" / "speller-v1"  # the layout it was trained in, flat: mlx-lm loads it
    by_name = {a["name"]: a["sha256"] for a in entry["artifacts"]}
    root = {name: sha for name, sha in by_name.items() if "/" not in name}
    assert {"adapters.safetensors", "adapter_config.json", "training_args.json"} <= set(root)
    assert sorted(p.name for p in target.iterdir()) == sorted(root)
    for name, sha in root.items():
        assert hashlib.sha256((target / name).read_bytes()).hexdigest() == sha

    # The stored PEFT copy itself, not a conversion: byte for byte what the trainer stored.
    as_peft = cli("adapters", "download", "speller:1", "--format", "peft", "--to", str(tmp_path / "peft"))
    assert as_peft.exit_code == 0 and "peft layout" in as_peft.output, as_peft.output
    assert "converted" not in as_peft.output
    peft_dir = tmp_path / "peft" / "speller-v1"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert hashlib.sha256((peft_dir / name).read_bytes()).hexdigest() == by_name[f"peft/{name}"]
    assert not (peft_dir / "adapters.safetensors").exists() and (peft_dir / "metrics.json").is_file()
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert config["base_model_name_or_path"] == tiny_model_uri


def test_unknown_adapter_is_a_clear_error(cli):
    result = cli("adapters", "show", "no-such-adapter:7")
    assert result.exit_code == 1
    assert "no adapter no-such-adapter:7" in result.output


def test_a_job_with_a_bad_dataset_fails_the_watch_with_the_reason(cli, tmp_path, tiny_model_uri):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    result = cli("submit", str(bad), "--adapter", "broken", "--base-model", tiny_model_uri, "--watch")
    assert result.exit_code == 1
    assert "dataset.rejected" in result.output
    assert re.search(r"line 2\b.*output", result.output.replace("\n", " "))
