"""What only the MLX training backend does (tests/unit/test_backend_contract.py holds what every
backend does): mlx-lm's adapter config, its interval reports, warmup, seeding, one process."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from tunebus.services.trainer.backend import TrainingHooks, TrainSpec
from tunebus.services.trainer.backends.mlx.loop import train

from tests.helpers.backends import quick_spec, write_chat_data


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return write_chat_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def lora_run(lora_runs):
    return lora_runs("mlx")


def test_adapter_config_spells_out_the_run_and_matches_resolved_args(lora_run):
    result, _, _ = lora_run
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config == json.loads(json.dumps(result.resolved_args))
    assert config["merge"] is False


def test_reports_also_come_every_interval_while_steps_are_slow(tiny_model, chat_data, tmp_path):
    reports = []
    spec = quick_spec(iters=6, steps_per_report=100, steps_per_eval=100, report_interval_s=1e-9)
    train(tiny_model, chat_data, tmp_path / "timed", spec, TrainingHooks(on_progress=reports.append))
    assert [r.step for r in reports] == [1, 2, 3, 4, 5, 6]
    # Between windows the loss is the running mean of the steps so far.
    assert all(r.train_loss is not None for r in reports)


def test_warmup_ramps_the_learning_rate(tiny_model, chat_data, tmp_path):
    reports = []
    spec = quick_spec(iters=4, steps_per_report=1, warmup_steps=8)
    result = train(tiny_model, chat_data, tmp_path / "warm", spec, TrainingHooks(on_progress=reports.append))
    rates = [r.learning_rate for r in reports if r.learning_rate is not None]
    assert rates == sorted(rates) and rates[-1] < spec.learning_rate
    assert result.resolved_args["lr_schedule"]["warmup_steps"] == 8


def test_same_seed_gives_identical_adapter_weights(tiny_model, chat_data, tmp_path):
    spec = quick_spec(iters=3)
    first = train(tiny_model, chat_data, tmp_path / "a", spec)
    second = train(tiny_model, chat_data, tmp_path / "b", spec)
    a = mx.load(str(first.adapter_dir / "adapters.safetensors"))
    b = mx.load(str(second.adapter_dir / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_backend_dataclasses_import_without_any_ml_library():
    blocked = ["mlx", "mlx.core", "mlx_lm", "mlx_lm_lora", "numpy", "torch"]
    code = (
        f"import sys; sys.modules.update(dict.fromkeys({blocked!r}));"
        "import tunebus.services.trainer.backend as b; b.TrainSpec(iters=1)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_several_processes_are_refused_saying_why(tmp_path):
    from tunebus.services.trainer.backend import Distributed

    with pytest.raises(ValueError, match="TUNEBUS_TRAINER__PROCESSES=1"):
        train(tmp_path, tmp_path, tmp_path / "adapter", TrainSpec(iters=1),
              distributed=Distributed(processes=2))


RING_ALL_SUM = """
import mlx.core as mx
group = mx.distributed.init(strict=True, backend="ring")
total = mx.distributed.all_sum(mx.array([group.rank() + 1.0]), group=group)
print(f"rank {group.rank()} of {group.size()}: {total.item()}", flush=True)
"""


def test_mx_distributed_ring_runs_two_local_processes_here(tmp_path):
    """What README says about the MLX worker: the ring backend itself works on this machine."""
    launcher = Path(sys.executable).with_name("mlx.launch")
    if not launcher.exists():
        pytest.skip("mlx.launch is not installed")
    script = tmp_path / "all_sum.py"
    script.write_text(RING_ALL_SUM)
    with socket.socket() as probe:  # a free port (and, most likely, the next) for the ring
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run([str(launcher), "--backend", "ring", "-n", "2", "--starting-port",
                           str(port), sys.executable, str(script)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(line for line in done.stdout.splitlines() if line.startswith("rank")) == [
        "rank 0 of 2: 3.0", "rank 1 of 2: 3.0"]
