"""Full fine-tuning (adapter.type full), one suite over both trainer backends: every weight
trains and the loss falls, the result is a whole model that transformers and mlx-lm load alike,
num_layers limits it to the last blocks, a stopped run resumes exactly; the request contract
refuses what makes no sense with it, and a model the worker's memory cannot hold is refused
before it is loaded, with the estimate and the memory in the reason."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load
from pydantic import ValidationError
from safetensors.numpy import load_file
from tunebus.contracts import TrainingRequested
from tunebus.contracts.training import AdapterSettings, TrainerCapabilities
from tunebus.services.trainer import backends
from tunebus.services.trainer.backend import CheckpointState, LoraSpec, ResolvedArgs
from tunebus.services.trainer.memory import (
    full_fine_tune_bytes,
    full_fine_tune_refusal,
    model_size,
)
from tunebus.services.trainer.runner import JobFailed, TrainingRun
from tunebus.shared.adapter_layouts import layout_files, layouts
from tunebus.shared.settings import Settings

from tests.helpers.backends import (
    FULL_RESUME,
    NAMES,
    ResumeRuns,
    quick_spec,
    train,
    write_chat_data,
)

FULL = LoraSpec(kind="full")


@pytest.fixture(scope="module", params=NAMES)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return write_chat_data(tmp_path_factory.mktemp("data"), n_train=16, n_valid=4)


@pytest.fixture(scope="module")
def full_runs(tiny_model, chat_data, tmp_path_factory):
    runs: dict = {}

    def run(backend: str):
        if backend not in runs:
            spec = quick_spec(iters=10, learning_rate=1e-3, steps_per_eval=5, lora=FULL)
            runs[backend] = train(backend, tiny_model, chat_data,
                                  tmp_path_factory.mktemp(f"full-{backend}"), spec)
        return runs[backend]

    return run


@pytest.fixture
def full_run(backend, full_runs):
    return full_runs(backend)


@pytest.fixture(scope="module")
def full_resumes(tiny_model, tmp_path_factory):
    runs: dict = {}

    def run(backend: str) -> ResumeRuns:
        if backend not in runs:
            runs[backend] = ResumeRuns(backend, tiny_model, tmp_path_factory.mktemp(
                f"full-resume-{backend}"), FULL_RESUME[backend])
        return runs[backend]

    return run


def weights(model_dir: Path) -> dict[str, np.ndarray]:
    return {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def changed(base: Path, tuned: Path) -> set[str]:
    before, after = weights(base), weights(tuned)
    assert before.keys() == after.keys()
    assert all(before[k].shape == after[k].shape for k in before)
    return {k for k in before if not np.array_equal(before[k], after[k])}


def test_a_full_fine_tune_lowers_the_loss_and_changes_every_weight(backend, full_run, tiny_model):
    assert full_run.final_loss < full_run.first_loss
    assert full_run.final_val_loss is not None and full_run.steps == 10
    out = full_run.adapter_dir
    assert {p.name for p in out.iterdir()} == {"full"}  # no adapter layout beside the model
    assert changed(tiny_model, out / "full") == set(weights(tiny_model))


def test_the_mlx_full_model_ships_no_code_of_the_base_model(tiny_model, chat_data, tmp_path):
    """mlx-lm's `save` copies the base model's *.py (remote code) and adds a model card; the
    result under full/ is weights, config and tokenizer only, as the torch variant's is."""
    import shutil

    base = shutil.copytree(tiny_model, tmp_path / "base")
    (base / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    result = train("mlx", base, chat_data, tmp_path / "out", quick_spec(iters=2, lora=FULL))
    shipped = {p.name for p in (result.adapter_dir / "full").iterdir()}
    assert "config.json" in shipped and any(n.endswith(".safetensors") for n in shipped)
    assert not [n for n in shipped if n.endswith(".py")] and "README.md" not in shipped


def test_the_full_model_loads_with_transformers_and_mlx_lm_alike(full_run, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    full_dir = full_run.adapter_dir / "full"
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in full_dir.iterdir()}
    tuned, tokenizer = load(str(full_dir))
    base, _ = load(str(tiny_model))
    ids = tokenizer.encode("Where is the ball?")
    mlx_logits = tuned(mx.array([ids]))
    assert not mx.allclose(mlx_logits, base(mx.array([ids])), atol=1e-3).item()
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(full_dir, use_safetensors=True,
                                                  dtype=torch.float32)
        hf_logits = hf(input_ids=torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(np.array(mlx_logits.astype(mx.float32)), hf_logits, atol=1e-3)


def test_the_resolved_args_say_full_in_the_key_set_of_every_backend(full_run):
    args = full_run.resolved_args
    assert set(args) == set(ResolvedArgs.keys())
    assert args["fine_tune_type"] == "full" and args["num_layers"] == 2
    assert args["lora_parameters"] is None and args["lora_alpha"] is None
    assert args["quantization"] == "none" and args["base_quantization"] is None


def test_num_layers_trains_only_the_last_blocks(backend, tiny_model, chat_data, tmp_path):
    spec = quick_spec(iters=2, learning_rate=1e-3, lora=LoraSpec(kind="full", num_layers=1))
    result = train(backend, tiny_model, chat_data, tmp_path / "top", spec)
    trained = changed(tiny_model, result.adapter_dir / "full")
    last_block = {k for k in weights(tiny_model) if k.startswith("model.layers.1.")}
    assert trained == last_block and result.resolved_args["num_layers"] == 1


def test_a_stopped_full_fine_tune_resumes_exactly_from_its_checkpoints(backend, full_resumes):
    resume = full_resumes(backend)
    whole, whole_checkpoints = resume.uninterrupted
    stopped, stopping, out_dir = resume.stopped
    assert stopped.step == 6 and stopping.steps == [4, 6]
    assert not (out_dir / "full").exists()
    for step in stopping.steps:
        files = [p for p in (stopping.keep / f"step-{step}").rglob("*") if p.is_file()]
        assert files and all(p.suffix in {".safetensors", ".json"} for p in files)
    starts = [stopping.keep / "step-6"]
    if resume.case.resume_periodic:
        starts.append(whole_checkpoints.keep / "step-4")
    expected = weights(whole.adapter_dir / "full")
    for checkpoint in starts:
        result, _ = resume.resumed(checkpoint)
        assert result.resumed_from_step == CheckpointState.read(checkpoint).step
        assert result.curve == whole.curve and result.final_loss == whole.final_loss
        got = weights(result.adapter_dir / "full")
        assert got.keys() == expected.keys()
        assert all(np.array_equal(got[k], expected[k]) for k in expected)


# -- what a worker refuses


def run_with(capabilities: TrainerCapabilities) -> TrainingRun:
    """A TrainingRun as far as the memory check reads it (the worker's capabilities and
    settings)."""
    service = SimpleNamespace(settings=Settings())
    return TrainingRun(service, capabilities.backend, "w", None, None, None, lambda: None,
                       capabilities=capabilities)


def test_a_model_the_worker_memory_cannot_hold_is_refused_with_the_estimate(tiny_model):
    spec = quick_spec(lora=FULL)
    needed = full_fine_tune_bytes(model_size(tiny_model), spec)
    size = model_size(tiny_model)
    # float32: the weights, their gradients, and AdamW's two states.
    assert needed == size.parameters * (4 + 4 + 8) and size.dtype == "float32"
    small = TrainerCapabilities(backend="mlx", methods=[], adapters=[], quantization=[],
                                memory_bytes=needed - 1)
    with pytest.raises(JobFailed) as refused:
        run_with(small)._check_full_fits(tiny_model, spec)
    reason = refused.value.reason
    assert refused.value.error_type == "model_too_large"
    assert f"{size.parameters:,} parameters ({size.parameters:,} trained) in float32" in reason
    assert f"{needed / 1e9:.2f} GB" in reason and f"{(needed - 1) / 1e9:.2f} GB" in reason
    assert "optimizer 'adamw'" in reason
    run_with(small.model_copy(update={"memory_bytes": needed}))._check_full_fits(tiny_model, spec)
    # Fewer trained blocks, less memory: the last block alone fits what the whole did not.
    top = quick_spec(lora=LoraSpec(kind="full", num_layers=1))
    assert full_fine_tune_bytes(size, top) < needed
    run_with(small)._check_full_fits(tiny_model, top)
    # FSDP shares the estimate among its devices; DDP keeps a whole copy on each.
    assert full_fine_tune_refusal(tiny_model, spec, needed // 2, shards=2) is None
    assert "per device of 2 (FSDP)" in full_fine_tune_refusal(tiny_model, spec, needed // 3,
                                                                shards=2)


class FilesOnDisk:
    """What a job asks of the object store before its memory check: the models bucket's name
    and the splits."""

    def __init__(self, root: Path, settings: Settings):
        self.root, self.settings = root, settings.s3

    def get_file(self, uri: str, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((self.root / uri.rsplit("/", 1)[1]).read_bytes())
        return path


@pytest.mark.anyio
async def test_a_job_the_worker_setting_cannot_hold_fails_before_the_model_loads(
        tiny_model, chat_data, tmp_path):
    from tunebus.contracts import DatasetValidated, DatasetValidatedEvent

    settings = Settings(work_dir=tmp_path / "work", models_root=tiny_model.parent,
                        trainer={"memory_gb": 0.001})
    request = TrainingRequested(job_id="too-big", adapter_name="big", base_model=str(tiny_model),
                                dataset={"uri": "s3://datasets/in.jsonl"}, adapter={"type": "full"})
    uri = "s3://datasets/too-big"
    dataset = {"format": "messages", "rows": 20, "train_rows": 16, "valid_rows": 4, "sha256": "0",
               "train_uri": f"{uri}/train.jsonl", "train_sha256": "0",
               "valid_uri": f"{uri}/valid.jsonl", "valid_sha256": "0",
               "manifest_uri": f"{uri}/manifest.json"}
    event = DatasetValidatedEvent.wrap(DatasetValidated(job_id="too-big", request=request,
                                                        dataset=dataset), source="test")
    service = SimpleNamespace(settings=settings, store=FilesOnDisk(chat_data, settings))
    run = TrainingRun(service, "mlx", "w", event, None, None, lambda: None,
                      capabilities=backends.capabilities("mlx", memory_gb=0.001))
    with pytest.raises(JobFailed, match=r"would not fit .* the worker has 0\.00 GB") as failed:
        await run.run()
    assert failed.value.error_type == "model_too_large" and "model_load" not in run.timings


def test_a_model_directory_that_cannot_be_sized_fails_the_job_saying_why(tmp_path):
    caps = backends.capabilities("mlx", memory_gb=1)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(JobFailed, match=r"cannot be sized .* holds no \.safetensors") as failed:
        run_with(caps)._check_full_fits(tmp_path, quick_spec(lora=FULL))
    assert failed.value.error_type == "model_refused"


def test_the_estimate_counts_the_reference_model_of_dpo_and_of_grpo_with_a_kl_term(tiny_model):
    from tunebus.services.trainer.backend import GRPOSpec

    size = model_size(tiny_model)
    sft = full_fine_tune_bytes(size, quick_spec(lora=FULL))
    assert full_fine_tune_bytes(size, quick_spec(lora=FULL, method="dpo")) == sft + size.parameters * 4
    kl = quick_spec(lora=FULL, method="grpo", grpo=GRPOSpec(beta=0.04))
    assert full_fine_tune_bytes(size, kl) == sft + size.parameters * 4
    no_kl = quick_spec(lora=FULL, method="grpo", grpo=GRPOSpec(beta=0.0))
    assert full_fine_tune_bytes(size, no_kl) == sft
    assert full_fine_tune_bytes(size, quick_spec(lora=FULL, method="orpo")) == sft
    reason = full_fine_tune_refusal(tiny_model, quick_spec(lora=FULL, method="dpo"), sft)
    assert "and dpo's reference model" in reason


def test_a_quantized_model_is_refused_for_a_full_fine_tune(tiny_model, tmp_path):
    import json
    import shutil

    quantized = shutil.copytree(tiny_model, tmp_path / "q")
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps(
        config | {"quantization": {"bits": 4, "group_size": 64}}))
    reason = full_fine_tune_refusal(quantized, quick_spec(lora=FULL), memory_bytes=None)
    assert "is quantized" in reason and "LoRA adapter (QLoRA)" in reason


def test_the_worker_setting_replaces_the_device_memory(backend):
    found = backends.capabilities(backend)
    assert "full" in found.adapters and found.memory_bytes and found.memory_bytes > 0
    assert backends.capabilities(backend, memory_gb=0.25).memory_bytes == 250_000_000


def test_the_estimate_counts_the_dtype_the_worker_trains_in(tiny_model):
    size, spec = model_size(tiny_model), quick_spec(lora=FULL)
    assert full_fine_tune_bytes(size, spec, "bfloat16") == size.parameters * (2 + 2 + 8)
    sgd = quick_spec(lora=FULL, optimizer="sgd")
    assert full_fine_tune_bytes(size, sgd) == size.parameters * (4 + 4)


# -- the request contract


def test_full_with_quantization_is_refused_naming_the_fields():
    for bits in ("4bit", "8bit"):
        with pytest.raises(ValidationError, match=r"adapter.quantization .* adapter.type 'full'"):
            AdapterSettings(type="full", quantization=bits)


def test_full_with_target_modules_or_merge_is_refused_naming_the_field():
    with pytest.raises(ValidationError, match="adapter.target_modules does not apply"):
        AdapterSettings(type="full", target_modules=["q_proj"])
    request = {"job_id": "j1", "adapter_name": "a", "base_model": "m",
               "dataset": {"uri": "s3://bucket/k.jsonl"}, "adapter": {"type": "full"}}
    with pytest.raises(ValidationError, match="merge applies to lora/dora adapters"):
        TrainingRequested.model_validate(request | {"merge": True})
    with pytest.raises(ValidationError, match="init_from continues a LoRA or DoRA adapter, and "
                                              "adapter.type 'full'"):
        TrainingRequested.model_validate(request | {"init_from": "parent:1"})
    accepted = TrainingRequested.model_validate(request | {"adapter": {"type": "full", "num_layers": 1}})
    # As every later service reads it back from an event, defaults and all.
    assert TrainingRequested.model_validate(accepted.model_dump(mode="json")) == accepted


# -- the layout


def test_a_full_model_in_the_prefix_is_the_full_layout_and_downloads_flat():
    names = ["training_args.json", "metrics.json", "full/config.json", "full/model.safetensors",
             "full/tokenizer.json", "evaluation.json"]
    assert layouts(names) == {"full": "full/"}
    assert layouts(["full/config.json"]) == {}  # no weights: no model
    assert layout_files(names, "full/") == {
        "training_args.json": "training_args.json", "metrics.json": "metrics.json",
        "evaluation.json": "evaluation.json", "config.json": "full/config.json",
        "model.safetensors": "full/model.safetensors", "tokenizer.json": "full/tokenizer.json"}
