"""The MLX training backend: trains through mlx-lm-lora's API and writes only an adapter."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import pytest
from mlx_lm import load
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm_lora.trainer import sft_trainer
from mlx_lm_lora.trainer.datasets import CacheDataset, ChatDataset
from tunebus.services.trainer.backend import LoraSpec, TrainingHooks, TrainingStopped, TrainSpec
from tunebus.services.trainer.backends.mlx.loop import (
    WORKING_SET_KEY,
    metal_working_set_shim,
    train,
)

FACTS = [
    ("What colour is the sky?", "The sky is blue."),
    ("Where is the ball?", "The ball is in the garden."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Who bakes the bread?", "The baker bakes the bread."),
]


def chat_example(i: int) -> dict:
    question, answer = FACTS[i % len(FACTS)]
    return {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def write_chat_data(data_dir: Path, n_train: int = 40, n_valid: int = 8) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("valid", n_valid)):
        lines = [json.dumps(chat_example(i)) for i in range(n)]
        (data_dir / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return data_dir


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return write_chat_data(tmp_path_factory.mktemp("data"))


def quick_spec(**overrides) -> TrainSpec:
    settings = dict(
        iters=30, learning_rate=1e-2, steps_per_report=5, steps_per_eval=10, val_batches=2
    )
    return TrainSpec(**(settings | overrides))


@pytest.fixture(scope="module")
def lora_run(tiny_model, chat_data, tmp_path_factory):
    reports = []
    out_dir = tmp_path_factory.mktemp("lora")
    result = train(tiny_model, chat_data, out_dir, quick_spec(), TrainingHooks(on_progress=reports.append))
    return result, reports


def adapter_tensor_names(adapter_dir: Path) -> set[str]:
    return set(mx.load(str(adapter_dir / "adapters.safetensors")))


def test_lora_training_lowers_train_and_validation_loss(lora_run):
    result, reports = lora_run
    assert result.final_loss < result.first_loss
    val_losses = [r.val_loss for r in reports if r.val_loss is not None]
    assert val_losses[-1] < val_losses[0]
    assert result.final_val_loss == val_losses[-1]
    assert result.steps == 30 and result.trained_tokens > 0 and result.seconds > 0


def test_progress_reports_arrive_at_most_once_per_step_in_increasing_order(lora_run):
    result, reports = lora_run
    # Every report window (5 steps) and every validation (steps 1, 10, 20, 30) is reported.
    assert [r.step for r in reports] == [1, 5, 10, 15, 20, 25, 30]
    assert [r.step for r in reports if r.val_loss is not None] == [1, 10, 20, 30]
    assert all(r.total_steps == 30 and r.train_loss is not None for r in reports)
    assert reports[-1].train_loss == result.final_loss
    tokens = [r.trained_tokens for r in reports]
    assert tokens == sorted(tokens) and tokens[-1] == result.trained_tokens


def test_the_loss_curve_has_one_point_per_report_window_and_validation(lora_run):
    result, reports = lora_run
    train_points = [p for p in result.curve if "train_loss" in p]
    assert [p["step"] for p in train_points] == [5, 10, 15, 20, 25, 30]
    assert [p["train_loss"] for p in train_points] == [r.train_loss for r in reports[1:]]
    assert [p["step"] for p in result.curve if "val_loss" in p] == [1, 10, 20, 30]
    assert result.first_loss == train_points[0]["train_loss"]


def test_reports_also_come_every_interval_while_steps_are_slow(tiny_model, chat_data, tmp_path):
    reports = []
    spec = quick_spec(iters=6, steps_per_report=100, steps_per_eval=100, report_interval_s=1e-9)
    train(tiny_model, chat_data, tmp_path / "timed", spec, TrainingHooks(on_progress=reports.append))
    assert [r.step for r in reports] == [1, 2, 3, 4, 5, 6]
    # Between windows the loss is the running mean of the steps so far.
    assert all(r.train_loss is not None for r in reports)


def test_writes_only_adapter_weights_and_config(lora_run):
    result, _ = lora_run
    assert {p.name for p in result.adapter_dir.iterdir()} == {
        "adapters.safetensors",
        "adapter_config.json",
    }
    names = adapter_tensor_names(result.adapter_dir)
    assert names and all(n.endswith((".lora_a", ".lora_b")) for n in names)


def test_adapter_config_spells_out_the_run_and_matches_resolved_args(lora_run):
    result, _ = lora_run
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config == json.loads(json.dumps(result.resolved_args))
    assert config["fine_tune_type"] == "lora"
    assert config["num_layers"] == 2
    assert config["merge"] is False
    assert config["lora_parameters"]["scale"] == pytest.approx(16.0 / 8)
    assert config["lora_parameters"]["keys"] == [
        "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj",
        "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj",
    ]


def test_adapter_loads_back_with_mlx_lm_and_changes_the_output(lora_run, tiny_model):
    result, _ = lora_run
    base, tokenizer = load(str(tiny_model))
    tuned, _ = load(str(tiny_model), adapter_path=str(result.adapter_dir))
    ids = mx.array([tokenizer.encode("Where is the ball?")])
    assert not mx.allclose(base(ids), tuned(ids)).item()


def test_dora_trains_and_saves_magnitude_vectors(tiny_model, chat_data, tmp_path):
    spec = quick_spec(lora=LoraSpec(kind="dora"))
    result = train(tiny_model, chat_data, tmp_path / "dora", spec)
    assert result.final_loss < result.first_loss
    assert any(n.endswith(".m") for n in adapter_tensor_names(result.adapter_dir))
    load(str(tiny_model), adapter_path=str(result.adapter_dir))  # mlx-lm rebuilds DoRA layers


def test_target_modules_and_num_layers_limit_what_is_adapted(tiny_model, chat_data, tmp_path):
    lora = LoraSpec(target_modules=["q_proj", "v_proj"], num_layers=1)
    result = train(tiny_model, chat_data, tmp_path / "qv", quick_spec(iters=2, lora=lora))
    keys = result.resolved_args["lora_parameters"]["keys"]
    assert keys == ["self_attn.q_proj", "self_attn.v_proj"]
    layers = {n.split(".")[2] for n in adapter_tensor_names(result.adapter_dir)}
    assert layers == {"1"}  # counted from the top


def test_unknown_target_module_is_rejected(tiny_model, chat_data, tmp_path):
    lora = LoraSpec(target_modules=["qkv_proj"])
    with pytest.raises(ValueError, match="qkv_proj"):
        train(tiny_model, chat_data, tmp_path / "bad", quick_spec(iters=2, lora=lora))


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


def test_should_stop_raises_training_stopped_and_leaves_no_adapter(tiny_model, chat_data, tmp_path):
    asked = []

    def stop_on_third_step() -> str | None:
        asked.append(True)
        return "enough" if len(asked) >= 3 else None

    out_dir = tmp_path / "stopped"
    with pytest.raises(TrainingStopped) as stopped:
        train(tiny_model, chat_data, out_dir, quick_spec(), TrainingHooks(should_stop=stop_on_third_step))
    assert len(asked) == 3 and (stopped.value.reason, stopped.value.step) == ("enough", 2)
    assert not (out_dir / "adapters.safetensors").exists()
    assert not (out_dir / "adapter_config.json").exists()


def _one_step_of_train_sft(model_dir: Path, adapter_file: Path) -> None:
    """Call the library trainer directly, exactly as it would run without our wrapper."""
    model, tokenizer = load(str(model_dir))
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "dropout": 0.0, "scale": 1.0})
    data = CacheDataset(ChatDataset([chat_example(i) for i in range(4)], tokenizer))
    sft_trainer.train_sft(
        model=model,
        optimizer=optim.Adam(learning_rate=1e-3),
        train_dataset=data,
        args=sft_trainer.SFTTrainingArgs(iters=1, batch_size=4, adapter_file=str(adapter_file)),
    )


def test_train_sft_runs_off_metal_only_with_the_working_set_shim(tiny_model, tmp_path):
    if WORKING_SET_KEY in mx.device_info():  # Metal: the library works as is, the shim stays out
        with metal_working_set_shim():
            assert sft_trainer.mx is mx
        return
    with pytest.raises(KeyError, match=WORKING_SET_KEY):
        _one_step_of_train_sft(tiny_model, tmp_path / "without.safetensors")
    with metal_working_set_shim():
        _one_step_of_train_sft(tiny_model, tmp_path / "with.safetensors")
    assert (tmp_path / "with.safetensors").exists()


def test_shim_restores_the_trainer_module_even_after_an_error():
    with pytest.raises(RuntimeError):
        with metal_working_set_shim():
            with metal_working_set_shim():  # a second training in another thread, say
                pass
            assert WORKING_SET_KEY in sft_trainer.mx.device_info()
            raise RuntimeError("training failed")
    assert sft_trainer.mx is mx
    assert mx.device_info() == sft_trainer.mx.device_info()


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


def test_the_shipped_config_names_the_requested_base_model_and_no_worker_path(lora_run, tiny_model, tmp_path):
    import shutil

    from tunebus.services.trainer.artifacts import WORKER_PATHS, ship_mlx_config

    result, _ = lora_run
    downloaded = tmp_path / "downloaded"  # elsewhere, as a client's download would be
    shutil.copytree(result.adapter_dir, downloaded)
    ship_mlx_config(downloaded, "s3://tunebus-models/tiny", "rev-1")
    config = json.loads((downloaded / "adapter_config.json").read_text())
    assert config["model"] == "s3://tunebus-models/tiny" and config["base_model_revision"] == "rev-1"
    assert not set(WORKER_PATHS) - {"model"} & set(config)
    assert str(tiny_model) not in json.dumps(config) and str(result.adapter_dir) not in json.dumps(config)
    base, tokenizer = load(str(tiny_model))
    tuned, _ = load(str(tiny_model), adapter_path=str(downloaded))
    ids = mx.array([tokenizer.encode("Where is the ball?")])
    assert not mx.allclose(base(ids), tuned(ids)).item()
