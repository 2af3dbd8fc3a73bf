"""What the trainer stores beside its adapter (both layouts, the files that explain a run), and
how `tunebus watch` shows progress."""

from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import load_file, save_file
from structlog.testing import capture_logs
from tunebus.contracts import TrainingMetrics, TrainingProgress
from tunebus.services.trainer.artifacts import add_peft_layout, write_run_files
from tunebus.shared.cli.watching import eta_text, progress_stats

from tests.helpers.adapters import write_mlx_adapter

CURVE = [
    {"step": 1, "val_loss": 3.0},
    {"step": 5, "train_loss": 2.5, "learning_rate": 1e-3, "reward": 0.1},
    {"step": 10, "train_loss": 2.0, "learning_rate": 1e-3, "reward": 0.4},
    {"step": 10, "val_loss": 2.2},
]


def test_arguments_metrics_and_the_loss_curve_are_written_as_json_and_a_png(tmp_path):
    metrics = TrainingMetrics(first_loss=2.5, final_loss=2.0, steps=10, trained_tokens=100,
                              seconds=1.0, tokens_per_second=100.0)
    write_run_files(tmp_path, {"learning_rate": 1e-3}, metrics, CURVE, title="adder · job-1")
    assert json.loads((tmp_path / "loss_curve.json").read_text()) == CURVE
    assert json.loads((tmp_path / "training_args.json").read_text()) == {"learning_rate": 1e-3}
    assert TrainingMetrics.model_validate_json((tmp_path / "metrics.json").read_text()) == metrics
    png = (tmp_path / "loss_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_the_progress_line_shows_what_the_event_carries():
    event = TrainingProgress(job_id="j", step=5, total_steps=10, epoch=0.5, train_loss=2.3456,
                             val_loss=2.5, learning_rate=2e-4, tokens_per_second=1234.5,
                             peak_memory_gb=0.123, eta_seconds=83.4)
    assert progress_stats(event) == (
        "loss 2.346 · val 2.500 · lr 2.0e-04 · 1,234 tok/s · 0.12 GB · epoch 0.50")
    assert eta_text(event.eta_seconds) == "ETA 0:01:23"
    grpo = TrainingProgress(job_id="j", step=1, total_steps=10, reward=0.75)
    assert progress_stats(grpo) == "reward 0.750" and eta_text(None) == ""


def test_an_mlx_adapter_gets_a_peft_copy_that_names_the_requested_base_model(tmp_path):
    adapter = write_mlx_adapter(tmp_path / "adapter", kind="dora")
    assert add_peft_layout(adapter, "Qwen/Qwen2.5-0.5B-Instruct", revision="a1b2c3")

    config = json.loads((adapter / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert config["revision"] == "a1b2c3"
    assert config["peft_type"] == "LORA" and config["use_dora"] and config["r"] == 4
    mlx, peft = (load_file(str(adapter / "adapters.safetensors")),
                 load_file(str(adapter / "peft" / "adapter_model.safetensors")))
    q = "model.layers.2.self_attn.q_proj"
    np.testing.assert_array_equal(peft[f"base_model.model.{q}.lora_A.weight"], mlx[f"{q}.lora_a"].T)
    # The mlx-lm layout at the root is left as it was.
    assert json.loads((adapter / "adapter_config.json").read_text())["fine_tune_type"] == "dora"


def test_a_peft_copy_the_backend_wrote_keeps_its_weights_and_gets_the_requested_base_model(tmp_path):
    adapter = write_mlx_adapter(tmp_path / "adapter")
    peft_dir = adapter / "peft"  # as the torch backend leaves it: the worker's model cache path
    peft_dir.mkdir()
    weights = {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": np.ones((2, 4), np.float32)}
    save_file(weights, str(peft_dir / "adapter_model.safetensors"))
    written = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "revision": None,
               "base_model_name_or_path": "/var/tunebus/models/s3-tunebus-models-tiny-llama"}
    (peft_dir / "adapter_config.json").write_text(json.dumps(written))
    before = (peft_dir / "adapter_model.safetensors").read_bytes()

    assert add_peft_layout(adapter, "s3://tunebus-models/tiny-llama")
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config == written | {"base_model_name_or_path": "s3://tunebus-models/tiny-llama"}
    assert (peft_dir / "adapter_model.safetensors").read_bytes() == before


def test_an_adapter_peft_cannot_express_stays_mlx_only_with_a_warning(tmp_path):
    adapter = write_mlx_adapter(tmp_path / "adapter")
    weights = load_file(str(adapter / "adapters.safetensors"))
    rng = np.random.default_rng(1)
    weights |= {"model.embed_tokens.lora_a": rng.normal(size=(32, 4)).astype(np.float32),
                "model.embed_tokens.lora_b": rng.normal(size=(4, 16)).astype(np.float32)}
    save_file(weights, str(adapter / "adapters.safetensors"))

    with capture_logs() as logs:
        assert not add_peft_layout(adapter, "s3://tunebus-models/tiny-llama")
    assert not (adapter / "peft").exists()
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert "MLX layout only" in warning["event"]
    assert "model.embed_tokens is an embedding" in warning["reason"]


def test_shipped_arguments_name_the_requested_base_model_and_no_worker_path():
    from tunebus.services.trainer.artifacts import without_worker_paths

    args = {"model": "/var/cache/tunebus/models/abc", "data": "/tmp/job/data",
            "adapter_path": "/tmp/job/adapter", "peft_adapter_path": "/tmp/job/adapter/peft",
            "learning_rate": 1e-3}
    assert without_worker_paths(args, "Qwen/Qwen2.5-0.5B", "main") == {
        "model": "Qwen/Qwen2.5-0.5B", "base_model_revision": "main", "learning_rate": 1e-3}
