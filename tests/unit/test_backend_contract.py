"""What every trainer backend promises, one suite over `BACKENDS`: it trains (loss down, progress
once per step), writes an adapter mlx-lm loads, honours DoRA, target modules and num_layers,
refuses what it cannot adapt, stops when told leaving no adapter, merges on request, checkpoints
every n steps and when stopped, and resumes a checkpoint of its run exactly.

Where the backends' libraries differ in what they report (MLX validates at step 1 too; TRL's
loss falls faster), the difference is a table row here; what only one backend does is tested in
tests/unit/test_mlx_backend.py and tests/unit/test_torch_backend.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load
from safetensors.numpy import load_file
from tunebus.services.trainer.backend import (
    CheckpointState,
    LoraSpec,
    TrainingHooks,
    TrainingStopped,
    checkpoint_problem,
)
from tunebus.services.trainer.backends import BACKENDS

from tests.helpers.backends import NAMES, quick_spec, train, write_chat_data

ALL_LINEAR = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj",
              "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
# Per backend: the steps a 30-step run (reports every 5, validation every 10) reports and
# validates at; how many times lower its final loss is than its first at least; DoRA's steps.
REPORT_STEPS = {"mlx": [1, 5, 10, 15, 20, 25, 30], "cuda": [5, 10, 15, 20, 25, 30]}
VAL_STEPS = {"mlx": [1, 10, 20, 30], "cuda": [10, 20, 30]}
LOSS_FALLS_BY = {"mlx": 1, "cuda": 2}
DORA_ITERS = {"mlx": 30, "cuda": 20}
MERGE_ITERS = {"mlx": 2, "cuda": 4}
# What the adapter directory holds (the torch backend writes PEFT's layout and converts to
# mlx-lm's), and the mlx-lm config's num_layers (-1: all blocks, mlx-lm's spelling).
FILES = {"mlx": {"adapters.safetensors", "adapter_config.json"},
         "cuda": {"adapters.safetensors", "adapter_config.json", "peft"}}
NUM_LAYERS = {"mlx": 2, "cuda": -1}
# Of each backend's RESUME run (tests/helpers/backends.py): the steps it checkpoints at (none at
# the last: the adapter is the result then) and the step its stop comes after.
CHECKPOINT_STEPS = {"mlx": [10, 20], "cuda": [8, 16]}
STOP_STEP = {"mlx": 14, "cuda": 12}


@pytest.fixture(scope="module", params=NAMES)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return write_chat_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def lora_run(backend, lora_runs):
    return lora_runs(backend)


@pytest.fixture
def resume(backend, resume_runs):
    return resume_runs(backend)


def adapter_tensor_names(adapter_dir: Path) -> set[str]:
    return set(mx.load(str(adapter_dir / "adapters.safetensors")))


def mlx_config(adapter_dir: Path) -> dict:
    return json.loads((adapter_dir / "adapter_config.json").read_text())


def changes_the_output(tiny_model: Path, adapter_dir: Path) -> bool:
    base, tokenizer = load(str(tiny_model))
    tuned, _ = load(str(tiny_model), adapter_path=str(adapter_dir))
    ids = mx.array([tokenizer.encode("Where is the ball?")])
    return not mx.allclose(base(ids), tuned(ids)).item()


def test_lora_training_lowers_train_and_validation_loss(backend, lora_run):
    result, reports, _ = lora_run
    assert result.final_loss < result.first_loss / LOSS_FALLS_BY[backend]
    val_losses = [r.val_loss for r in reports if r.val_loss is not None]
    assert len(val_losses) == len(VAL_STEPS[backend]) and val_losses[-1] < val_losses[0]
    assert result.final_val_loss == val_losses[-1]
    assert result.steps == 30 and result.trained_tokens > 0 and result.seconds > 0


def test_progress_reports_arrive_at_most_once_per_step_in_increasing_order(backend, lora_run):
    result, reports, started = lora_run
    assert [r.step for r in reports] == REPORT_STEPS[backend]
    assert [r.step for r in reports if r.val_loss is not None] == VAL_STEPS[backend]
    assert all(r.total_steps == 30 and r.train_loss is not None for r in reports)
    assert reports[-1].train_loss == result.final_loss
    tokens = [r.trained_tokens for r in reports]
    assert tokens == sorted(tokens) and tokens[-1] == result.trained_tokens
    elapsed = [r.elapsed_seconds for r in reports]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert len(started) == 1 and started[0] == (result.resolved_args, None)


def test_the_loss_curve_has_one_point_per_report_window_and_validation(backend, lora_run):
    result, reports, _ = lora_run
    train_points = [p for p in result.curve if "train_loss" in p]
    assert [p["step"] for p in train_points] == [5, 10, 15, 20, 25, 30]
    assert [p["train_loss"] for p in train_points] == [r.train_loss for r in reports if r.step % 5 == 0]
    assert [p["step"] for p in result.curve if p.get("val_loss") is not None] == VAL_STEPS[backend]
    assert result.first_loss == train_points[0]["train_loss"]


def test_writes_only_the_adapter_in_its_layouts(backend, lora_run):
    assert {p.name for p in lora_run[0].adapter_dir.iterdir()} == FILES[backend]


def test_the_mlx_layout_config_has_the_scale_and_adapts_every_linear_module(backend, lora_run):
    config = mlx_config(lora_run[0].adapter_dir)
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == NUM_LAYERS[backend]
    assert config["lora_parameters"]["scale"] == pytest.approx(16.0 / 8)
    assert config["lora_parameters"]["keys"] == ALL_LINEAR
    names = adapter_tensor_names(lora_run[0].adapter_dir)
    assert names and all(n.endswith((".lora_a", ".lora_b")) for n in names)


def test_the_adapter_loads_back_with_mlx_lm_and_changes_the_output(lora_run, tiny_model):
    assert changes_the_output(tiny_model, lora_run[0].adapter_dir)


def test_the_shipped_config_names_the_requested_base_model_and_no_worker_path(lora_run, tiny_model, tmp_path):
    import shutil

    from tunebus.services.trainer.artifacts import WORKER_PATHS, ship_mlx_config

    result = lora_run[0]
    downloaded = tmp_path / "downloaded"  # elsewhere, as a client's download would be
    shutil.copytree(result.adapter_dir, downloaded)
    ship_mlx_config(downloaded, "s3://tunebus-models/tiny", "rev-1")
    config = mlx_config(downloaded)
    assert config["model"] == "s3://tunebus-models/tiny" and config["base_model_revision"] == "rev-1"
    assert not set(WORKER_PATHS) - {"model"} & set(config)
    assert str(tiny_model) not in json.dumps(config) and str(result.adapter_dir) not in json.dumps(config)
    assert changes_the_output(tiny_model, downloaded)


def test_dora_trains_and_saves_magnitude_vectors(backend, tiny_model, chat_data, tmp_path):
    spec = quick_spec(iters=DORA_ITERS[backend], lora=LoraSpec(kind="dora"))
    result = train(backend, tiny_model, chat_data, tmp_path / "dora", spec)
    assert result.final_loss < result.first_loss / LOSS_FALLS_BY[backend]
    assert sum(n.endswith(".m") for n in adapter_tensor_names(result.adapter_dir)) == 14
    assert mlx_config(result.adapter_dir)["fine_tune_type"] == "dora"
    if BACKENDS[backend].layout == "peft":  # and in the layout it trained in
        peft = load_file(str(result.adapter_dir / "peft" / "adapter_model.safetensors"))
        assert sum(k.endswith(".lora_magnitude_vector") for k in peft) == 14
    load(str(tiny_model), adapter_path=str(result.adapter_dir))  # mlx-lm rebuilds DoRA layers


def test_target_modules_and_num_layers_limit_what_is_adapted(backend, tiny_model, chat_data, tmp_path):
    lora = LoraSpec(target_modules=["q_proj", "v_proj"], num_layers=1)
    result = train(backend, tiny_model, chat_data, tmp_path / "qv", quick_spec(iters=2, lora=lora))
    config = mlx_config(result.adapter_dir)
    assert config["num_layers"] == 1
    assert config["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    layers = {n.split(".")[2] for n in adapter_tensor_names(result.adapter_dir)}
    assert layers == {"1"}  # counted from the top


def test_an_unknown_target_module_is_refused_naming_it(backend, tiny_model, chat_data, tmp_path):
    lora = LoraSpec(target_modules=["qkv_proj"])
    with pytest.raises(ValueError, match="qkv_proj"):
        train(backend, tiny_model, chat_data, tmp_path / "bad", quick_spec(iters=2, lora=lora))


def test_should_stop_raises_training_stopped_and_leaves_no_adapter(backend, tiny_model, chat_data,
                                                                   tmp_path):
    asked = []

    def stop_on_third_step() -> str | None:
        asked.append(True)
        return "enough" if len(asked) >= 3 else None

    out_dir = tmp_path / "stopped"
    with pytest.raises(TrainingStopped) as stopped:
        train(backend, tiny_model, chat_data, out_dir, quick_spec(),
              TrainingHooks(should_stop=stop_on_third_step))
    assert len(asked) == 3 and (stopped.value.reason, stopped.value.step) == ("enough", 2)
    assert not (out_dir / "adapters.safetensors").exists()
    assert not (out_dir / "adapter_config.json").exists()
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_a_merged_model_is_written_only_when_asked_and_computes_base_plus_adapter(
        backend, lora_run, tiny_model, chat_data, tmp_path):
    plain = lora_run[0]
    assert plain.merged_dir is None and not (plain.adapter_dir / "merged").exists()

    result = train(backend, tiny_model, chat_data, tmp_path / "m",
                   quick_spec(iters=MERGE_ITERS[backend], merge=True))
    assert result.merged_dir == tmp_path / "m" / "merged"
    assert (result.merged_dir / "config.json").is_file()
    assert list(result.merged_dir.glob("*.safetensors"))
    merged, tokenizer = load(str(result.merged_dir))
    adapted, _ = load(str(tiny_model), adapter_path=str(result.adapter_dir))
    ids = mx.array([tokenizer.encode("Where is the ball?")])
    assert mx.allclose(merged(ids), adapted(ids), atol=1e-4).item()
    if BACKENDS[backend].layout == "peft":  # and as transformers + PEFT compute it
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        assert (result.merged_dir / "model.safetensors").is_file()
        assert (result.merged_dir / "tokenizer.json").is_file()
        ids = torch.tensor([tokenizer.encode("Where is the ball?")])
        with torch.no_grad():
            merged = AutoModelForCausalLM.from_pretrained(result.merged_dir, use_safetensors=True)
            adapted = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "m" / "peft")
            torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)


def test_checkpoints_come_every_n_steps_hold_no_pickle_and_say_whose_they_are(backend, resume):
    whole, recorder = resume.uninterrupted
    spec = resume.case.spec
    assert recorder.steps == CHECKPOINT_STEPS[backend]
    for step in recorder.steps:
        directory = recorder.keep / f"step-{step}"
        files = [p for p in directory.rglob("*") if p.is_file()]
        assert files and all(p.suffix in {".safetensors", ".json"} for p in files)
        state = CheckpointState.read(directory)
        assert (state.step, state.backend, state.total_steps) == (step, backend, spec.iters)
    assert whole.resolved_args["checkpoint_every"] == spec.checkpoint_every


def test_a_stop_checkpoints_the_step_it_stopped_after_and_leaves_no_adapter(backend, resume):
    stopped, stopping, out_dir = resume.stopped
    step = STOP_STEP[backend]
    assert (stopped.reason, stopped.step) == ("cancel", step)
    assert stopping.steps == [s for s in CHECKPOINT_STEPS[backend] if s < step] + [step]
    assert not (out_dir / "adapter_config.json").exists()


def test_a_run_resumed_from_a_checkpoint_ends_exactly_as_the_uninterrupted_one(backend, resume):
    """From the stop's checkpoint; where the row says, also from the periodic one a killed
    worker leaves."""
    whole, whole_checkpoints = resume.uninterrupted
    stopped, stopping, _ = resume.stopped
    starts = [stopping.keep / f"step-{stopped.step}"]
    if resume.case.resume_periodic:
        starts.append(whole_checkpoints.keep / f"step-{CHECKPOINT_STEPS[backend][0]}")
    adapter_files = ["adapters.safetensors"]
    if BACKENDS[backend].layout == "peft":  # and in the layout it trained in
        adapter_files.append("peft/adapter_model.safetensors")
    for checkpoint in starts:
        start = CheckpointState.read(checkpoint).step
        result, recorder = resume.resumed(checkpoint)
        assert result.resumed_from_step == start and result.steps == resume.case.spec.iters
        assert recorder.reports[0].step > start
        assert recorder.steps == [s for s in whole_checkpoints.steps if s > start]
        assert result.curve == whole.curve
        assert result.final_loss == whole.final_loss
        assert result.trained_tokens == whole.trained_tokens
        for name in adapter_files:
            assert ((result.adapter_dir / name).read_bytes()
                    == (whole.adapter_dir / name).read_bytes())
        a = mx.load(str(whole.adapter_dir / "adapters.safetensors"))
        b = mx.load(str(result.adapter_dir / "adapters.safetensors"))
        assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_a_checkpoint_resumes_only_the_run_it_was_written_for(backend, resume):
    spec = resume.case.spec
    step = CHECKPOINT_STEPS[backend][0]
    directory = resume.uninterrupted[1].keep / f"step-{step}"
    assert checkpoint_problem(directory, spec, backend) is None
    assert checkpoint_problem(directory, replace(spec, checkpoint_every=3), backend) is None
    assert checkpoint_problem(directory, replace(spec, learning_rate=0.5), backend) == (
        "written for different training settings")
    for other in set(NAMES) - {backend}:
        assert checkpoint_problem(directory, spec, other) == (
            f"written by the {backend} backend, this is {other}")
    assert CheckpointState.read(directory).step == step


@pytest.fixture
def continued(backend, continued_runs):
    return continued_runs(backend)


def test_a_run_continued_from_an_adapter_starts_at_its_loss_not_the_bases(
        backend, lora_run, continued, tiny_model, tmp_path):
    parent, (whole, _) = lora_run[0], continued.uninterrupted
    fresh_spec = replace(continued.case.spec, iters=1, checkpoint_every=0, init_from=None)
    fresh = train(backend, tiny_model, continued.data, tmp_path / "fresh", fresh_spec)
    # Step 1's loss is measured before its update, on the same first batch (same seed).
    assert whole.curve[0]["step"] == fresh.curve[0]["step"] == 1
    assert whole.first_loss < fresh.first_loss / 2
    assert abs(whole.first_loss - parent.final_loss) < abs(fresh.first_loss - parent.final_loss) / 4
    assert whole.resolved_args["init_from"] == "parent:1"
    assert fresh.resolved_args["init_from"] is None


def test_a_continued_run_resumed_from_a_checkpoint_ends_exactly_as_the_uninterrupted_one(
        backend, continued):
    whole, _ = continued.uninterrupted
    stopped, stopping, _ = continued.stopped
    checkpoint = stopping.keep / f"step-{stopped.step}"
    state = CheckpointState.read(checkpoint)
    assert (state.step, state.init_from, state.adapter["rank"]) == (3, "parent:1", 8)
    result, _ = continued.resumed(checkpoint)
    assert result.resumed_from_step == 3 and result.curve == whole.curve
    assert ((result.adapter_dir / "adapters.safetensors").read_bytes()
            == (whole.adapter_dir / "adapters.safetensors").read_bytes())


def test_an_init_from_adapter_of_another_shape_is_refused_naming_init_from(
        backend, lora_run, chat_data, tiny_model, tmp_path):
    from tests.helpers.backends import layout_dir

    parent = layout_dir(backend, lora_run[0].adapter_dir)
    with pytest.raises(ValueError, match="init_from adapter"):
        train(backend, tiny_model, chat_data, tmp_path / "bad", quick_spec(iters=2, lora=LoraSpec(rank=4)),
              init_from=parent)


def test_an_adapter_the_other_backend_trained_continues_once_converted(
        backend, lora_runs, continued, tiny_model, tmp_path):
    """As the trainer fetches a parent stored only in the other layout (parents.fetch_parent)."""
    from tunebus.shared.adapter_layouts import mlx_to_peft

    other = next(name for name in NAMES if name != backend)
    trained = lora_runs(other)[0].adapter_dir
    if BACKENDS[backend].layout == "peft":
        parent = mlx_to_peft(trained, tmp_path / "converted", base_model=str(tiny_model))
    else:
        parent = trained  # the torch backend's adapter directory holds the mlx-lm layout too
    spec = replace(continued.case.spec, iters=1, checkpoint_every=0)
    fresh = train(backend, tiny_model, continued.data, tmp_path / "fresh", replace(spec, init_from=None))
    result = train(backend, tiny_model, continued.data, tmp_path / "on", spec, init_from=parent)
    assert result.first_loss < fresh.first_loss / 2
