"""A client in another language, from the documented contracts alone: examples/node submits a job
with the submitter's credentials, follows it through JetStream to its end and downloads the
adapter through the registry's presigned links, checking every sha256."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tunebus.shared.devstack.stack import service_env

EXAMPLE = Path(__file__).parents[2] / "examples" / "node"
NODE, NPM = shutil.which("node"), shutil.which("npm")

pytestmark = pytest.mark.skipif(
    NODE is None or NPM is None,
    reason="the Node client test needs node and npm on PATH (skipped: not installed)")


def installed() -> Path:
    """examples/node/node_modules, installed by `npm ci` once per package-lock.json."""
    lock = hashlib.sha256((EXAMPLE / "package-lock.json").read_bytes()).hexdigest()
    stamp = EXAMPLE / "node_modules" / ".tunebus-lock-sha256"
    if not stamp.is_file() or stamp.read_text() != lock:
        done = subprocess.run([NPM, "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.skip(f"npm ci failed (no registry?): {done.stderr[-2000:]}")
        stamp.write_text(lock)
    return EXAMPLE / "node_modules"


def test_the_node_client_trains_follows_and_downloads_an_adapter(stack, tiny_model_uri, tmp_path):
    installed()
    data = tmp_path / "words.jsonl"
    data.write_text("".join(
        json.dumps({"instruction": f"Spell {w}.", "output": " ".join(w)}) + "\n"
        for w in ["node", "client", "stream", "bucket", "inbox", "reply", "schema", "subject", "event"]))
    submitter = stack.as_role("submitter")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNEBUS_", "AWS_"))}
    env |= service_env(submitter)
    job_id = "node-client-job-1"
    out = tmp_path / "adapter"

    def run_client():
        done = subprocess.run(
            [NODE, "client.mjs", "--dataset", str(data), "--adapter", "node-speller",
             "--base-model", tiny_model_uri, "--job-id", job_id, "--out", str(out), "--timeout", "500",
             "--hyperparameters", json.dumps({"iters": 10, "learning_rate": 0.005, "max_seq_length": 64})],
            cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=560)
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        return done, lines

    done, lines = run_client()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = lines[-1]["summary"]
    assert summary["final"] == "tunebus.adapter.registered.v1" and summary["ref"] == "node-speller:1"
    seen = [line["event"] for line in lines if "event" in line]
    assert seen[0] == "tunebus.training.requested.v1" and "tunebus.training.completed.v1" in seen
    # Every file the registry lists, downloaded and matching its sha256 (the client checked too).
    assert {"adapters.safetensors", "adapter_config.json"} <= set(summary["files"])
    for name, sha in summary["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == sha
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["model"] == tiny_model_uri and "adapter_path" not in config

    # The same job id again: the request starts nothing, and the client hears why.
    done, lines = run_client()
    assert done.returncode == 1, done.stdout[-4000:] + done.stderr[-4000:]
    assert lines[-1]["summary"]["final"] == "tunebus.training.refused.v1"
