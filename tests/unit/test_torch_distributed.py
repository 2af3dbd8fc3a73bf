"""One job over two processes (torch.distributed.run, DDP over gloo on the CPU): the loss of one
process at the same global batch, progress and checkpoints from rank 0 only, exact resume."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from tunebus.services.trainer.backend import (
    CHECKPOINT_STATE,
    CheckpointState,
    Distributed,
    GRPOSpec,
    TrainingHooks,
    TrainingStopped,
    TrainSpec,
    checkpoint_problem,
)
from tunebus.services.trainer.backends.torch.checkpoints import checkpoint_files
from tunebus.services.trainer.backends.torch.launch import stop_reason
from tunebus.services.trainer.backends.torch.loop import train

from tests.helpers.data import write_rows
from tests.helpers.backends import quick_spec, write_chat_data
from tests.helpers.backends import Recorder

# Global batch 4: one process takes 4 examples a step, each of two takes 2. No dropout: the two
# runs then differ only in the order floats are summed (per-rank gradients, then all-reduced).
SPEC = {"iters": 12, "batch_size": 4, "steps_per_report": 2, "steps_per_eval": 6,
        "checkpoint_every": 4, "learning_rate": 5e-3}
TWO = Distributed(processes=2, strategy="ddp")
# Relative difference allowed between the training losses of one and of two processes. The
# Trainer averages tokens across ranks (average_tokens_across_devices), so the gradient is the
# one-process gradient summed in another order: fp32 rounding, ~1e-7 relative (measured 1.4e-7
# over the whole curve). 1e-4 leaves room for that to grow over more steps and other CPUs, and
# still fails a per-rank mean of means (~1e-2 here) or a wrong shard of the data.
TOLERANCE = 1e-4
# The validation loss is the Trainer's mean of per-batch losses, and two ranks split the held-out
# set into other batches (2 + 2 examples instead of 4): it agrees in weighting, not in rounding
# (measured 0.5 %).
VAL_TOLERANCE = 2e-2


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return write_chat_data(tmp_path_factory.mktemp("data"), n_train=24, n_valid=4)


@pytest.fixture(scope="module")
def one(tiny_model, chat_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    return train(tiny_model, chat_data, root / "adapter", quick_spec(**SPEC),
                 Recorder(root / "checkpoints").hooks())


@pytest.fixture(scope="module")
def two(tiny_model, chat_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    recorder = Recorder(root / "checkpoints")
    started = []
    hooks = recorder.hooks()
    hooks.on_start = lambda args, step: started.append((args, step))
    tic = time.perf_counter()
    result = train(tiny_model, chat_data, root / "adapter", quick_spec(**SPEC), hooks,
                   distributed=TWO)
    return result, recorder, started, time.perf_counter() - tic


def _losses(result):
    return [(p["step"], p["train_loss"]) for p in result.curve if p.get("train_loss") is not None]


def test_two_processes_end_at_the_loss_of_one_at_equal_global_batch(one, two):
    result, *_, seconds = two
    steps_one, steps_two = zip(*_losses(one)), zip(*_losses(result))
    (s1, l1), (s2, l2) = steps_one, steps_two
    assert s1 == s2
    worst = max(abs(a - b) / a for a, b in zip(l1, l2))
    print(f"\nfinal loss: one process {one.final_loss:.6f}, two {result.final_loss:.6f}; "
          f"largest relative difference on the curve {worst:.2e}; two-process run {seconds:.1f}s")
    assert result.final_loss == pytest.approx(one.final_loss, rel=TOLERANCE)
    assert worst < TOLERANCE
    assert result.final_val_loss == pytest.approx(one.final_val_loss, rel=VAL_TOLERANCE)
    assert result.final_loss < result.first_loss


def test_resolved_args_name_the_world_size_and_the_strategy(two):
    result, _, started, _ = two
    assert len(started) == 1 and started[0][0] == result.resolved_args
    args = result.resolved_args
    assert (args["world_size"], args["distributed"], args["per_device_batch_size"],
            args["batch_size"]) == (2, "ddp", 2, 4)


def test_progress_and_checkpoints_come_once_from_rank_zero(two):
    result, recorder, started, _ = two
    steps = [r.step for r in recorder.reports]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # one report per step: rank 0's
    assert recorder.steps == [4, 8]
    for step in recorder.steps:
        directory = recorder.keep / f"step-{step}"
        assert {p.name for p in directory.iterdir()} == checkpoint_files(2) | {CHECKPOINT_STATE}
        state = CheckpointState.read(directory)
        assert (state.step, state.processes) == (step, 2)
    assert {p.name for p in (result.adapter_dir / "peft").iterdir()} == {
        "adapter_model.safetensors", "adapter_config.json"}


def test_resume_of_a_two_process_run_ends_exactly_as_it(two, tiny_model, chat_data, tmp_path):
    whole, recorder, *_ = two
    resumed = Recorder(tmp_path / "checkpoints")
    result = train(tiny_model, chat_data, tmp_path / "adapter", quick_spec(**SPEC), resumed.hooks(),
                   resume_from=recorder.keep / "step-4", distributed=TWO)
    assert result.resumed_from_step == 4 and resumed.steps == [8]
    assert result.curve == whole.curve
    for name in ("adapters.safetensors", "peft/adapter_model.safetensors"):
        assert (result.adapter_dir / name).read_bytes() == (whole.adapter_dir / name).read_bytes()


def test_a_checkpoint_of_two_processes_does_not_resume_one(two):
    _, recorder, *_ = two
    directory = recorder.keep / "step-4"
    spec = quick_spec(**SPEC)
    assert checkpoint_problem(directory, spec, "cuda", processes=2) is None
    assert checkpoint_problem(directory, spec, "cuda") == "written by 2 processes, this run has 1"


def test_the_job_file_holds_the_spec_as_json():
    spec = quick_spec(**SPEC)
    assert TrainSpec.from_json(spec.to_json()) == spec
    json.loads(spec.to_json())


def test_a_stop_ends_every_rank_after_the_same_step_and_resumes_exactly(two, tiny_model,
                                                                          chat_data, tmp_path):
    whole, *_ = two
    # Told after the report of step 2: ten steps (about a second) are left to hear it in.
    stopping = Recorder(tmp_path / "checkpoints", stop_after=2)
    with pytest.raises(TrainingStopped) as stopped:
        train(tiny_model, chat_data, tmp_path / "first", quick_spec(**SPEC), stopping.hooks(),
              distributed=TWO)
    step = stopped.value.step
    assert stopped.value.reason == "told to stop"
    assert 2 <= step < 12 and stopping.steps[-1] == step  # the stop's own checkpoint
    assert not (tmp_path / "first" / "adapter_config.json").exists()

    result = train(tiny_model, chat_data, tmp_path / "second", quick_spec(**SPEC),
                   Recorder(tmp_path / "more").hooks(),
                   resume_from=tmp_path / "checkpoints" / f"step-{step}", distributed=TWO)
    # The stop closed a report window early, so the curve has one more point; the weights agree.
    assert result.resumed_from_step == step and result.steps == 12
    assert ((result.adapter_dir / "adapters.safetensors").read_bytes()
            == (whole.adapter_dir / "adapters.safetensors").read_bytes())


def test_fsdp_is_refused_on_a_cpu_and_an_uneven_batch_anywhere(tiny_model, chat_data, tmp_path):
    with pytest.raises(ValueError, match="fsdp shards a model over GPUs"):
        train(tiny_model, chat_data, tmp_path, quick_spec(**SPEC),
              distributed=Distributed(processes=2, strategy="fsdp"))
    with pytest.raises(ValueError, match="does not split evenly among 3 processes"):
        train(tiny_model, chat_data, tmp_path, quick_spec(**SPEC), distributed=Distributed(3))


def test_a_failing_rank_fails_the_job_with_what_the_ranks_said(tiny_model, tmp_path):
    with pytest.raises(RuntimeError, match="(?s)the ranks exited with.*train.jsonl"):
        train(tiny_model, tmp_path / "no-data", tmp_path / "adapter", quick_spec(**SPEC),
              distributed=TWO)


def test_the_ranks_stop_when_their_worker_is_gone(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert stop_reason(tmp_path / "stop", os.getpid()) is None
    assert "is gone" in stop_reason(tmp_path / "stop", gone.pid)
    (tmp_path / "stop").write_text("cancelled")
    assert stop_reason(tmp_path / "stop", os.getpid()) == "cancelled"


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_two_processes_resume_the_reference_and_sampling_methods_exactly(method, tiny_model,
                                                                         tmp_path):
    """Each rank's RNG (GRPO samples completions with it) and the global batch (GRPO's counted in
    completions) carry over to several processes."""
    if method == "grpo":
        rows = [{"prompt": f"Say a word with the letter a ({i}).", "answer": "a"} for i in range(12)]
        spec = TrainSpec(iters=6, method="grpo", batch_size=2, learning_rate=2e-2,
                         steps_per_report=2, steps_per_eval=100, val_batches=1, checkpoint_every=3,
                         grpo=GRPOSpec(group_size=4, max_completion_length=2,
                                       reward_functions=("contains",)))
    else:
        rows = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}.",
                 "rejected": f"I think it is {a * b + 1}, maybe."} for a in range(1, 7) for b in range(1, 5)]
        spec = TrainSpec(iters=6, method="dpo", batch_size=2, learning_rate=1e-2, steps_per_report=2,
                         steps_per_eval=100, val_batches=1, checkpoint_every=3)
    data = write_rows(tmp_path / "data", rows)
    saved = tmp_path / "checkpoint"

    def keep(directory: Path, step: int) -> None:
        if step == 3:
            shutil.copytree(directory, saved)

    full = train(tiny_model, data, tmp_path / "full", spec, TrainingHooks(on_checkpoint=keep),
                 distributed=TWO)
    resumed = train(tiny_model, data, tmp_path / "resumed", spec, resume_from=saved, distributed=TWO)
    assert full.resolved_args["per_device_batch_size"] == 1
    assert resumed.resumed_from_step == 3 and resumed.curve == full.curve
    assert ((resumed.adapter_dir / "adapters.safetensors").read_bytes()
            == (full.adapter_dir / "adapters.safetensors").read_bytes())
