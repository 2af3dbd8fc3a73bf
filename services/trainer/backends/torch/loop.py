"""Train a LoRA or DoRA adapter with torch + transformers + PEFT, through TRL's trainers.

The torch twin of the MLX backend's `loop.train`, with the interface of backend.py: the same canonical data
per method (`methods` turns each method into a TRL trainer), the same hooks, checkpoints
with true resume and `TrainingStopped`. It runs on CUDA (the point of it: bf16, flash or SDPA
attention, padding-free batches, Liger kernels, 4/8-bit QLoRA) and on a CPU-only torch for
development and CI, where quantization is refused.

Prompt masking follows TRL's prompt/completion split: the loss covers the last (assistant)
message after the chat template's generation prompt; mlx-lm-lora also trains on that generation
prompt (`<|im_start|>assistant\n` for ChatML), a few tokens per example.

What it leaves in out_dir, every adapter in both formats:

    out_dir/adapters.safetensors, adapter_config.json   mlx-lm's layout (as the MLX backend)
    out_dir/peft/adapter_model.safetensors,
                 adapter_config.json                    PEFT's (`PeftModel.from_pretrained`)
    out_dir/merged/                                     with spec.merge: base + adapter, HF layout
    out_dir/full/                                       instead of all of the above, a full
                                                        fine-tune: the whole model, HF layout
                                                        (TRL without PEFT; every weight, or
                                                        the last num_layers blocks, trains)

PEFT's is what was trained; the MLX copy is made by `tunebus.shared.adapter_layouts`, and
adapter_config.json in out_dir is written last, so a directory with it is a finished adapter.

Checkpoints are the Trainer's own (it restores weights, optimizer, schedule, RNG and the data
position), written as safetensors + JSON by `checkpoints.SafeCheckpoints` instead of
pickle, with our state.json beside them; a resumed run ends as the uninterrupted one would.

Batching (SFT): by default each step takes `batch_size` examples, as the MLX backend does, but
lays them end to end in one row with restarting position_ids and no attention mask (TRL's
padding-free collator). No padding is computed, and no example sees another: transformers turns
the position_ids into a block-diagonal mask for SDPA, and into varlen sequence boundaries for
flash attention. `batching="packed"` instead fills rows of max_seq_length tokens (TRL's
best-fit-decreasing packing, also padding-free): fewer, fuller steps, so an iteration then
counts rows, not examples. `batching="padded"` is the classic padded batch.

Several processes (`distributed.processes` > 1): `train` hands the job to `launch`, which starts
that many ranks with torch.distributed.run; each rank runs this same `train` (the Trainer does
DDP or FSDP: gloo on a CPU, nccl on GPUs), taking batch_size / processes examples per step so
the global batch is the spec's. Rank 0 alone saves checkpoints and the adapter and calls the
hooks; every rank writes its own RNG state into the shared checkpoint.

Synchronous and CPU/GPU-bound: the service runs it on its backend thread.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

import datasets
import torch
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PrinterCallback,
    TrainerCallback,
    set_seed,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from tunebus.services.trainer.backend import (
    BEST_WEIGHTS,
    FULL,
    BITSANDBYTES_OPTIMIZERS,
    OPTIMIZERS,
    PORTABLE_OPTIMIZERS,
    CheckpointState,
    Distributed,
    ProgressReport,
    ResolvedArgs,
    TrainingHooks,
    TrainingStopped,
    TrainResult,
    TrainSpec,
    checkpoint_problem,
    layers_to_adapt,
    lr_schedule,
    match_target_modules,
)
from tunebus.services.trainer.memory import machine_memory

from . import varlen
from .checkpoints import (
    SafeCheckpoints,
    keep_only_adapter_files,
    keep_only_checkpoint_files,
    keep_only_model_files,
)
from .methods import build_method, method_options, supported_methods
from tunebus.shared.adapter_layouts import FULL_DIR as FULL_SUBDIR
from tunebus.shared.adapter_layouts import MERGED_DIR as MERGED_SUBDIR
from tunebus.shared.adapter_layouts import PEFT, WEIGHTS
from tunebus.shared.adapter_layouts import PEFT_DIR as PEFT_SUBDIR
from tunebus.shared.adapter_layouts import peft_to_mlx
from tunebus.shared.chat import FALLBACK_CHAT_TEMPLATE

BACKEND = "cuda"  # the worker kind, also on a CPU-only torch
Batching = Literal["padding_free", "packed", "padded"]

@dataclass(frozen=True)
class TorchOptions:
    """How to run, as opposed to what to train (that is the TrainSpec).

    `attn_implementation` None picks flash_attention_2 when the flash-attn package and a CUDA GPU
    with bf16 are here, SDPA otherwise: called once per example (`varlen`) on SFT's
    padding-free rows, so no score between two examples is computed. `compile` runs the model
    through torch.compile (the Trainer's torch_compile). `liger` applies Liger kernels (RMSNorm, RoPE, SwiGLU) when
    liger-kernel is installed and the model is on CUDA; it is ignored otherwise.
    """

    batching: Batching = "padding_free"
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    liger: bool = True
    compile: bool = False


@dataclass(frozen=True)
class Hardware:
    """What this process can use; `detect_hardware()` reads it, tests build it by hand."""

    cuda: bool
    device_name: str
    bf16: bool
    bitsandbytes: bool
    flash_attn: bool
    liger_kernel: bool
    memory_bytes: int | None = None  # one GPU's memory, or the machine's RAM on a CPU


def detect_hardware() -> Hardware:
    cuda = torch.cuda.is_available()
    return Hardware(
        cuda=cuda,
        device_name=torch.cuda.get_device_name() if cuda else "cpu",
        bf16=cuda and torch.cuda.is_bf16_supported(),
        bitsandbytes=_installed("bitsandbytes"),
        flash_attn=_installed("flash_attn"),
        liger_kernel=_installed("liger_kernel"),
        memory_bytes=torch.cuda.get_device_properties(0).total_memory if cuda else machine_memory(),
    )


def capabilities(hw: Hardware) -> dict[str, set[str]]:
    """What a worker on this hardware accepts, in the shape of plan.MLX_CAPABILITIES."""
    quantization = {"none"}
    if quantization_refusal("4bit", hw) is None:
        quantization |= {"4bit", "8bit"}
    optimizers = set(PORTABLE_OPTIMIZERS)
    if optimizer_refusal(BITSANDBYTES_OPTIMIZERS[0], hw) is None:
        optimizers |= set(BITSANDBYTES_OPTIMIZERS)
    return {"methods": supported_methods(), "adapters": {"lora", "dora", FULL},
            "quantization": quantization,
            "optimizers": optimizers, **method_options()}


def optimizer_refusal(optimizer: str, hw: Hardware) -> str | None:
    """Why this hardware cannot train with `optimizer`, or None when it can."""
    if optimizer in PORTABLE_OPTIMIZERS:
        return None
    if optimizer not in BITSANDBYTES_OPTIMIZERS:
        return f"optimizer {optimizer!r} is unknown (supported: {', '.join(OPTIMIZERS)})"
    return _bitsandbytes_refusal(f"optimizer {optimizer!r}", hw)


def quantization_refusal(quantization: str, hw: Hardware) -> str | None:
    """Why this hardware cannot train with `quantization`, or None when it can."""
    if quantization == "none":
        return None
    if quantization not in ("4bit", "8bit"):
        return f"quantization {quantization!r} is unknown (supported: none, 4bit, 8bit)"
    return _bitsandbytes_refusal(f"quantization {quantization!r}", hw)


def _bitsandbytes_refusal(what: str, hw: Hardware) -> str | None:
    """Why `what` (a bitsandbytes optimizer or QLoRA quantization) cannot run here, or None."""
    if not hw.cuda:
        return f"{what} needs a CUDA GPU (bitsandbytes); this worker runs torch on the CPU"
    if not hw.bitsandbytes:
        return f"{what} needs the bitsandbytes package, which is not installed on this worker"
    return None


def train(
    model_dir: Path,
    data_dir: Path,
    out_dir: Path,
    spec: TrainSpec,
    hooks: TrainingHooks | None = None,
    resume_from: Path | None = None,
    *,
    options: TorchOptions = TorchOptions(),
    hardware: Hardware | None = None,
    distributed: Distributed = Distributed(),
    work_dir: Path | None = None,
    init_from: Path | None = None,
) -> TrainResult:
    """Train spec.method on data_dir/{train,valid}.jsonl and write the adapter to out_dir in both
    formats (see the module docstring), starting from the PEFT adapter in `init_from` when
    given; checkpoints, stops and resumes as backend.py describes.
    `work_dir` is where the Trainer writes checkpoints (a fresh temporary directory when None;
    one directory that all ranks of a job share)."""
    world = world_size()
    if distributed.processes > 1 and (
            reason := distributed_refusal(distributed, spec, hardware or detect_hardware())):
        raise ValueError(reason)
    if distributed.processes > 1 and world == 1:
        from .launch import train_in_processes  # the parent of the ranks trains nothing itself

        return train_in_processes(model_dir, data_dir, out_dir, spec, hooks, resume_from,
                                  options=options, distributed=distributed, init_from=init_from)
    if world != distributed.processes:
        raise ValueError(f"this is one of {world} processes, but the job asks for "
                         f"{distributed.processes}")
    started = time.perf_counter()
    out_dir, model_dir, data_dir = Path(out_dir), Path(model_dir), Path(data_dir)
    hooks = hooks or TrainingHooks()
    hw = hardware or detect_hardware()
    if reason := quantization_refusal(spec.quantization, hw) or optimizer_refusal(spec.optimizer, hw):
        raise ValueError(reason)
    state = CheckpointState.start(spec, BACKEND, processes=world)
    if resume_from is not None:
        if problem := checkpoint_problem(Path(resume_from), spec, BACKEND, processes=world):
            raise ValueError(f"cannot resume from {resume_from}: {problem}")
        state = CheckpointState.read(Path(resume_from))
    set_seed(spec.seed)
    datasets.disable_progress_bars()  # a worker logs events, not terminal bars

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    used_fallback_template = tokenizer.chat_template is None
    if used_fallback_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    method = build_method(spec, tokenizer, data_dir, options.batching)

    run = _resolve_run(options, hw,
                       padding_free=method.name == "sft" and options.batching != "padded")
    quantized = spec.quantization != "none"
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=run["dtype"],
        attn_implementation=run["attn_implementation"],
        quantization_config=_quantization_config(spec.quantization, run["dtype"]),
        device_map={"": torch.cuda.current_device()} if quantized else None,
        use_safetensors=True,
        trust_remote_code=False,
    )
    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=options.gradient_checkpointing)
    n_blocks = len(_blocks(model))
    full = spec.lora.kind == FULL
    lora = None if full else lora_config(spec, model)
    trained_blocks = train_only_last_blocks(model, spec) if full else lora.layers_to_transform
    args = resolve_args(spec, options, run, lora, method.resolved, model_dir=model_dir,
                        data_dir=data_dir, out_dir=out_dir, distributed=distributed,
                        chat_template_fallback=used_fallback_template,
                        trained_blocks=trained_blocks)
    loaded = time.perf_counter()

    progress = _ProgressCallback(spec, hooks, args, state, reward_key=method.reward_key)
    if resume_from is not None and (Path(resume_from) / BEST_WEIGHTS).is_file():
        progress.best = load_file(Path(resume_from) / BEST_WEIGHTS)
    with _scratch(work_dir) as scratch:
        trainer_class = type(f"Safe{method.trainer_class.__name__}",
                             (SafeCheckpoints, method.trainer_class), {})
        config = method.config_class(**_per_device(_common_config(
            spec, options, run, scratch, has_valid=method.valid_set is not None,
            distributed=distributed, layer_class=type(_blocks(model)[0]).__name__)
            | method.config, world))
        trainer = trainer_class(
            model=model,
            args=config,
            train_dataset=method.train_set,
            eval_dataset=method.valid_set,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[progress],
            **method.trainer_kwargs,
        )
        trainer.remove_callback(PrinterCallback)  # progress goes to the hooks, not stdout
        if init_from is not None:  # a resume then puts the checkpoint's weights over these
            load_initial_adapter(trainer.model, Path(init_from) / WEIGHTS[PEFT])
        if world > 1:  # what the Trainer set up, not what was asked (on_start sends it)
            args["distributed"] = "fsdp" if trainer.is_fsdp_enabled else "ddp"
        set_up = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        trained = time.perf_counter()
        if progress.stopped:
            raise TrainingStopped(progress.stopped, progress.state.step)
        if spec.keep == "best" and progress.best is not None:
            _load_weights(trainer.model, progress.best)
        saved = out_dir / (FULL_SUBDIR if full else PEFT_SUBDIR)  # what was trained
        writes = trainer.is_world_process_zero()
        if distributed.strategy == "fsdp" and world > 1:
            # The Trainer gathers the sharded weights (every rank takes part) and rank 0 writes
            # them, with the tokenizer and training_args.bin (a pickle) beside them.
            trainer.save_model(str(saved))
            if writes:
                keep_only_model_files(saved) if full else keep_only_adapter_files(saved)
        elif writes:
            trainer.model.save_pretrained(saved, safe_serialization=True)
    merged_dir = None
    if writes and full:
        # A whole model with the base model's tokenizer (as a merged model has it): no adapter
        # layouts to convert.
        AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False).save_pretrained(saved)
    elif writes:
        (saved / "README.md").unlink(missing_ok=True)  # PEFT's model card template: no facts
        merged_dir = _merge(model_dir, saved, out_dir / MERGED_SUBDIR, run) if spec.merge else None
        # The MLX copy, its config written last: a directory with it is a finished adapter.
        peft_to_mlx(saved, out_dir, num_hidden_layers=n_blocks)

    losses = [p["train_loss"] for p in progress.state.curve if p.get("train_loss") is not None]
    rewards = [p["reward"] for p in progress.state.curve if p.get("reward") is not None]
    return TrainResult(
        adapter_dir=out_dir,
        first_loss=losses[0],
        final_loss=losses[-1],
        final_val_loss=progress.val_loss,
        steps=progress.state.step,
        trained_tokens=progress.state.trained_tokens,
        seconds=time.perf_counter() - started,
        resolved_args=args,
        curve=progress.state.curve,
        first_reward=rewards[0] if rewards else None,
        final_reward=rewards[-1] if rewards else None,
        resumed_from_step=progress.resumed_from,
        merged_dir=merged_dir,
        timings={
            "model_load": loaded - started,
            "setup": set_up - loaded,
            "training": trained - set_up,
            "first_step_at": progress.state.first_step_at,
        },
        best_val_loss=progress.state.best_val_loss,
        best_step=progress.state.best_step,
        early_stopped=progress.state.early_stopped,
    )


def _load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Put kept adapter weights back into the model they were taken from."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in weights:
                parameter.copy_(weights[name])


def load_initial_adapter(model: torch.nn.Module, weights_path: Path) -> None:
    """Start the PEFT adapter of `model` from the weights in `weights_path` (init_from): every
    adapter tensor, with its shape, must be there, and nothing else."""
    weights = load_file(weights_path)
    where = f"init_from adapter {weights_path.name} does not fit this adapter"
    try:
        loaded = set_peft_model_state_dict(model, weights)
    except RuntimeError as e:  # load_state_dict's size mismatch
        raise ValueError(f"{where}: {e}") from None
    missing = [k for k in loaded.missing_keys if ".lora_" in k]
    if missing or loaded.unexpected_keys:
        raise ValueError(f"{where}: missing {missing[:3]}, unexpected {loaded.unexpected_keys[:3]}")


def distributed_refusal(distributed: Distributed, spec: TrainSpec, hw: Hardware) -> str | None:
    """Why this job cannot run over distributed.processes processes here, or None if it can."""
    n = distributed.processes
    if n == 1:
        return None
    if spec.batch_size % n:
        return f"batch_size {spec.batch_size} does not split evenly among {n} processes"
    if hw.cuda and n > torch.cuda.device_count():
        return f"{n} processes, but this node has {torch.cuda.device_count()} GPUs (one each)"
    if distributed.strategy == "fsdp":
        if not hw.cuda:
            # accelerate shards only over accelerators; on CPU processes it would quietly run DDP
            return "fsdp shards a model over GPUs; this worker runs torch on the CPU (use ddp)"
        if spec.checkpoint_every:
            return ("checkpoints of FSDP's sharded optimizer are not written (as safetensors) "
                    "yet: set checkpoint_every 0 for an fsdp job, or use ddp")
        if spec.keep == "best":
            return "keep 'best' holds a whole adapter in each process: use ddp, or keep 'last'"
    return None


def world_size() -> int:
    """How many processes run this job: torch.distributed.run says so in WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def lora_config(spec: TrainSpec, model: torch.nn.Module) -> LoraConfig:
    """PEFT's config for the spec: block-relative target modules in the last num_layers blocks,
    the same selection the MLX backend makes (and the converter writes)."""
    blocks = _blocks(model)
    n_blocks = len(blocks)
    num_layers = layers_to_adapt(spec.lora, n_blocks)
    linear = sorted(n for n, m in blocks[-1].named_modules() if isinstance(m, torch.nn.Linear))
    targets = linear if spec.lora.target_modules is None else match_target_modules(
        linear, spec.lora.target_modules)
    return LoraConfig(
        r=spec.lora.rank,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        use_dora=spec.lora.kind == "dora",
        target_modules=targets,
        layers_to_transform=list(range(n_blocks - num_layers, n_blocks)),
        layers_pattern="layers",
        bias="none",
        task_type="CAUSAL_LM",
    )


def train_only_last_blocks(model: torch.nn.Module, spec: TrainSpec) -> list[int]:
    """A full fine-tune: every weight trains (from_pretrained leaves them all trainable), or
    with num_layers N only the last N blocks' (as mlx-lm's full fine-tune). The blocks trained."""
    blocks = _blocks(model)
    n_blocks = len(blocks)
    num_layers = layers_to_adapt(spec.lora, n_blocks)
    if spec.lora.num_layers is not None:
        model.requires_grad_(False)
        for block in blocks[n_blocks - num_layers:]:
            block.requires_grad_(True)
    return list(range(n_blocks - num_layers, n_blocks))


def resolve_args(spec: TrainSpec, options: TorchOptions, run: dict, lora: LoraConfig | None,
                 method_resolved: dict, *, model_dir: Path, data_dir: Path, out_dir: Path,
                 distributed: Distributed = Distributed(),
                 chat_template_fallback: bool = False,
                 trained_blocks: list[int] | None = None) -> dict:
    """Every effective setting, JSON-ready, in the key set of backend.ResolvedArgs (`lora` None:
    a full fine-tune of `trained_blocks`)."""
    blocks = list(lora.layers_to_transform) if lora is not None else list(trained_blocks or [])
    packages = ["torch", "transformers", "peft", "trl", "accelerate"]
    if spec.quantization != "none" or spec.optimizer in BITSANDBYTES_OPTIMIZERS:
        packages.append("bitsandbytes")
    method_args = dict(method_resolved)
    mask_prompt = method_args.pop("mask_prompt", spec.mask_prompt)
    batching = method_args.pop("batching", options.batching)
    return ResolvedArgs.from_spec(
        spec, optimizer_class=_OPTIMIZER_CLASSES[spec.optimizer],
        world_size=distributed.processes,
        distributed=distributed.strategy if distributed.processes > 1 else "none",
        model=str(model_dir), data=str(data_dir), adapter_path=str(out_dir),
        num_layers=len(blocks),
        lora_parameters=None if lora is None else {
            "rank": spec.lora.rank, "dropout": spec.lora.dropout,
            "scale": spec.lora.alpha / spec.lora.rank, "keys": sorted(lora.target_modules)},
        base_quantization=_base_quantization(spec.quantization),
        mask_prompt=mask_prompt, batching=batching,
        grad_checkpoint=options.gradient_checkpointing,
        chat_template_fallback=chat_template_fallback,
        device=run["device"], dtype=str(run["dtype"]).removeprefix("torch."),
        mixed_precision="bf16" if run["bf16"] else "no",
        method_args=method_args,
        backend_args={
            "peft_adapter_path": str(out_dir / PEFT_SUBDIR) if lora is not None else None,
            "layers_to_transform": blocks,  # full: the blocks trained
            "full_model_path": str(out_dir / FULL_SUBDIR) if lora is None else None,
            "attn_implementation": run["attn_implementation"],
            "liger_kernel": run["liger"],
            "torch_options": asdict(options),
        },
        library_versions={p: _version(p) for p in packages},
    ).to_dict()


# The Hugging Face Trainer's name for each optimizer (`optim`), and the class it builds.
_HF_OPTIM = {"adamw": "adamw_torch", "adam": "adamw_torch", "sgd": "sgd", "adafactor": "adafactor",
             "adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
             "paged_adamw_32bit": "paged_adamw_32bit"}
_OPTIMIZER_CLASSES = {"adamw": "torch.optim.AdamW", "adam": "torch.optim.AdamW",
                      "sgd": "torch.optim.SGD", "adafactor": "transformers.Adafactor",
                      "adamw_8bit": "bitsandbytes.optim.AdamW (8-bit)",
                      "paged_adamw_8bit": "bitsandbytes.optim.AdamW (paged, 8-bit)",
                      "paged_adamw_32bit": "bitsandbytes.optim.AdamW (paged, 32-bit)"}


def _base_quantization(quantization: str) -> dict | None:
    """How _quantization_config quantizes the frozen base (bitsandbytes)."""
    if quantization == "4bit":
        return {"bits": 4, "quant_type": "nf4", "double_quant": True, "library": "bitsandbytes"}
    if quantization == "8bit":
        return {"bits": 8, "library": "bitsandbytes"}
    return None


def _optimization_config(spec: TrainSpec) -> dict:
    """The Trainer's arguments for backend.OPTIMIZERS[spec.optimizer] and backend.lr_schedule:
    its constant_with_warmup, and its warmup_stable_decay without a stable phase for linear and
    cosine (warmup from min_lr_ratio, decay to it)."""
    schedule = lr_schedule(spec)
    adam = OPTIMIZERS["adamw"]
    config = {
        "optim": _HF_OPTIM[spec.optimizer],
        "weight_decay": spec.weight_decay,
        "adam_beta1": adam["betas"][0],
        "adam_beta2": adam["betas"][1],
        "adam_epsilon": adam["eps"],
        "max_grad_norm": spec.max_grad_norm,  # 0: the Trainer does not clip
        "warmup_steps": spec.warmup_steps,
    }
    if schedule["name"] == "constant":
        return config | {"lr_scheduler_type": "constant_with_warmup"}
    return config | {"lr_scheduler_type": "warmup_stable_decay", "lr_scheduler_kwargs": {
        # The stable phase is what is left of the run: none (it is counted from max_steps).
        "num_decay_steps": schedule["decay_steps"],
        "warmup_type": "linear", "decay_type": schedule["name"],
        "min_lr_ratio": spec.min_lr_ratio}}


def _resolve_run(options: TorchOptions, hw: Hardware, *, padding_free: bool = False) -> dict:
    """The speed settings this hardware allows. `padding_free`: every batch is one row of
    examples end to end (SFT's padding-free or packed batches), which flash attention takes as
    varlen sequences and `varlen` splits for SDPA; padded batches keep transformers' SDPA."""
    bf16 = hw.cuda and hw.bf16
    attn = options.attn_implementation
    if attn is None:
        attn = ("flash_attention_2" if (bf16 and hw.flash_attn)
                else varlen.NAME if padding_free else "sdpa")
    if attn == varlen.NAME:
        varlen.register()
    return {
        "device": hw.device_name,
        # bf16 weights on a GPU that has it (PEFT keeps the adapter in fp32); fp32 elsewhere.
        "dtype": torch.bfloat16 if bf16 else torch.float32,
        "bf16": bf16,
        "attn_implementation": attn,
        "liger": options.liger and hw.cuda and hw.liger_kernel,
    }


def _quantization_config(quantization: str, dtype) -> BitsAndBytesConfig | None:
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.float16,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def _common_config(spec: TrainSpec, options: TorchOptions, run: dict, output_dir: str, *,
                   has_valid: bool, distributed: Distributed = Distributed(),
                   layer_class: str = "") -> dict:
    """TrainingArguments every method's config takes. Library defaults that differ from what
    the spec means are set explicitly: TRL turns bf16 and gradient checkpointing on by default,
    for example. Checkpoints are asked for by _ProgressCallback, not by a save strategy."""
    return {
        "output_dir": output_dir,
        "max_steps": math.ceil(spec.iters / spec.grad_accumulation_steps),
        "per_device_train_batch_size": spec.batch_size,  # all processes together: _per_device
        "per_device_eval_batch_size": spec.batch_size,
        **_fsdp_config(distributed, layer_class),
        "gradient_accumulation_steps": spec.grad_accumulation_steps,
        "learning_rate": spec.learning_rate,
        **_optimization_config(spec),
        "seed": spec.seed,
        "data_seed": spec.seed,
        "bf16": run["bf16"],
        "fp16": False,
        "tf32": True if run["bf16"] else None,
        "gradient_checkpointing": options.gradient_checkpointing,
        "use_liger_kernel": run["liger"],
        "torch_compile": options.compile,
        "logging_strategy": "steps",
        # The Trainer counts optimizer updates; the spec counts batches.
        "logging_steps": max(1, spec.steps_per_report // spec.grad_accumulation_steps),
        "eval_strategy": "steps" if has_valid else "no",
        "eval_steps": max(1, spec.steps_per_eval // spec.grad_accumulation_steps),
        "prediction_loss_only": True,
        "save_strategy": "no",
        "save_only_model": False,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "use_cpu": not torch.cuda.is_available(),
    }


def _per_device(config: dict, world: int) -> dict:
    """The batch sizes of a config (each method's, GRPO's counted in completions) split among
    the processes: the global batch stays the spec's."""
    return config | {key: config[key] // world
                     for key in ("per_device_train_batch_size", "per_device_eval_batch_size")}


def _fsdp_config(distributed: Distributed, layer_class: str) -> dict:
    """The Trainer's FSDP switches: every decoder block its own shard unit (the frozen base and
    the adapter inside one block wrap together, as PEFT's FSDP guide does), full state dicts."""
    if distributed.strategy != "fsdp" or distributed.processes == 1:
        return {}
    return {"fsdp": "full_shard auto_wrap",
            "fsdp_config": {"transformer_layer_cls_to_wrap": [layer_class], "use_orig_params": True,
                            "state_dict_type": "FULL_STATE_DICT"}}


@contextmanager
def _scratch(work_dir: Path | None) -> Iterator[str]:
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        yield str(work_dir)
        return
    with tempfile.TemporaryDirectory(prefix="tunebus-torch-") as scratch:
        yield scratch


class _ProgressCallback(TrainerCallback):
    """The Trainer's events as the hooks of backend.TrainingHooks, and its checkpoints as ours.

    Reports: one per step, steps strictly increasing, every steps_per_report steps, after the
    last step and at every checkpoint. The Trainer logs the training loss and then evaluates at
    the end of a step; the two are sent as one report when the next step begins, a checkpoint
    is taken or training ends. Those reports are the loss curve. Whenever report_interval_s has
    passed without one, an interim report (step, learning rate, memory; no loss) goes out and
    the loss window stays open, so the curve does not depend on how fast the machine is. Steps
    are counted in batches, as the spec counts them (the Trainer counts optimizer updates, one
    per grad_accumulation_steps batches).

    Checkpoints: every spec.checkpoint_every batches (at the first optimizer update that reaches
    it) this asks the Trainer to save, which SafeCheckpoints writes without pickle; `on_save`
    adds state.json (the run so far: step, loss curve, tokens) and hands the directory to the
    hooks. A report window always closes at a checkpoint, so a resumed run reports the same
    curve as an uninterrupted one. A stop reason makes the Trainer save (when checkpoints are
    on and the step is new) and end; `train` then raises TrainingStopped.

    Validation losses go through CheckpointState.note_validation: with keep="best" the adapter
    weights of a new best are copied aside (and written into each checkpoint as BEST_WEIGHTS),
    and a spent early_stopping_patience ends training after that step.
    """

    def __init__(self, spec: TrainSpec, hooks: TrainingHooks, resolved_args: dict,
                 state: CheckpointState, reward_key: str | None = None):
        self.spec = spec
        self.hooks = hooks
        self.resolved_args = resolved_args
        self.compiled = resolved_args["backend_args"]["torch_options"]["compile"]
        self.state = state  # the run so far, resumed parts included; what a checkpoint keeps
        self.reward_key = reward_key
        self.resumed_from = state.step or None
        self.checkpointed_step = state.step
        self.stopped: str | None = None
        self.best: dict[str, torch.Tensor] | None = None  # keep="best": the adapter's weights
        self.cuda = torch.cuda.is_available()
        self._tokens_before = state.trained_tokens  # TRL counts tokens from 0 in each process
        self._started: float | None = None
        self._pending: dict | None = None
        self._clock: tuple[float, int] = (0.0, 0)  # (time, tokens) at the last train report
        self._reported_at = 0.0  # perf_counter of the last report of any kind

    @property
    def val_loss(self) -> float | None:
        return next((p["val_loss"] for p in reversed(self.state.curve)
                     if p.get("val_loss") is not None), None)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.hooks.on_start(self.resolved_args, self.resumed_from)

    def on_step_begin(self, args, state, control, **kwargs):
        self._flush()
        if self._started is None:  # later steps are asked at the end of the one before
            if reason := self.hooks.should_stop():
                raise TrainingStopped(reason, self.state.step)
            self._started = time.perf_counter()
            if self.state.first_step_at is None:
                self.state.first_step_at = time.time()
            self._clock = (self._started, self.state.trained_tokens)
            self._reported_at = self._started

    def on_step_end(self, args, state, control, **kwargs):
        step = self.state.step = self._batches(state.global_step)
        if state.global_step >= state.max_steps:  # as mlx-lm: validate after the last step
            control.should_log = True
            control.should_evaluate = args.eval_strategy != "no"
            return
        every = self.spec.checkpoint_every
        if every and step // every > self.checkpointed_step // every:
            control.should_save = control.should_log = True
        if reason := self.hooks.should_stop():
            self.stopped = reason
            control.should_training_stop = True
            if every and step > self.checkpointed_step:
                control.should_save = control.should_log = True
        interval = self.spec.report_interval_s
        if (interval and not (control.should_log or control.should_evaluate)
                and time.perf_counter() - self._reported_at >= interval):
            self._report({"step": step, "train_loss": None, "val_loss": None,
                          "learning_rate": _last_update_rate(kwargs.get("lr_scheduler"),
                                                             state.global_step)})

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        step = self._batches(state.global_step)
        if "loss" in logs:
            now = time.perf_counter()
            if "num_tokens" in logs:
                self.state.trained_tokens = self._tokens_before + int(logs["num_tokens"])
            tokens = self.state.trained_tokens
            then, tokens_then = self._clock
            self._clock = (now, tokens)
            self._flush()
            self._pending = {
                "step": step, "train_loss": float(logs["loss"]), "val_loss": None,
                "learning_rate": _last_update_rate(kwargs.get("lr_scheduler"), state.global_step),
                "tokens_per_second": (tokens - tokens_then) / (now - then) if now > then else None,
                # Eager steps compile nothing; with torch.compile a new shape recompiles, which
                # this callback cannot tell apart.
                "steady_tokens_per_second": None if self.compiled else (
                    (tokens - tokens_then) / (now - then) if now > then else None),
                "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None,
                "reward": float(logs[self.reward_key]) if self.reward_key in logs else None,
                "metrics": _method_metrics(logs),
            }
        if "eval_loss" in logs:
            if self._pending is None or self._pending["step"] != step:
                self._flush()
                self._pending = {"step": step, "train_loss": None, "val_loss": None}
            self._pending["val_loss"] = float(logs["eval_loss"])
            self._validated(step, float(logs["eval_loss"]), kwargs.get("model"), control)

    def _validated(self, step: int, val_loss: float, model, control):
        """Keep the best weights (keep="best") and stop when patience is spent; every rank
        decides alike, the loss being the same on all."""
        if self.state.note_validation(step, val_loss) and self.spec.keep == "best":
            self.best = {name: p.detach().to("cpu", copy=True)
                         for name, p in model.named_parameters() if p.requires_grad}
        if self.state.patience_spent(self.spec) and step < self.spec.iters:
            self.state.early_stopped = True
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        self._flush()
        if not state.is_world_process_zero:  # its RNG state is in the directory already
            self.checkpointed_step = self.state.step
            return
        directory = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        try:
            keep_only_checkpoint_files(directory, args.world_size,
                                       full=self.spec.lora.kind == FULL)
            if self.best is not None:
                save_file(self.best, directory / BEST_WEIGHTS)
            self.state.train_seconds = time.perf_counter() - self._started
            self.state.write(directory)  # last: a directory with state.json is complete
            self.hooks.on_checkpoint(directory, self.state.step)
            self.checkpointed_step = self.state.step
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def on_train_end(self, args, state, control, **kwargs):
        self._flush()

    def _batches(self, optimizer_steps: int) -> int:
        return min(optimizer_steps * self.spec.grad_accumulation_steps, self.spec.iters)

    def _flush(self):
        if self._pending is None:
            return
        report, self._pending = self._pending, None
        point = {k: report[k] for k in ("step", "train_loss", "val_loss")}
        if report.get("reward") is not None:
            point["reward"] = report["reward"]
        self.state.curve.append(point)
        self._report(report)

    def _report(self, report: dict):
        self._reported_at = time.perf_counter()
        elapsed = self._reported_at - self._started if self._started else 0.0
        self.hooks.on_progress(ProgressReport(
            total_steps=self.spec.iters,
            trained_tokens=self.state.trained_tokens,
            elapsed_seconds=elapsed,
            start_step=self.resumed_from or 0,
            **{"learning_rate": None, "tokens_per_second": None, "steady_tokens_per_second": None,
               "reward": None,
               "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None}
            | report,
        ))


def _last_update_rate(scheduler, updates: int) -> float | None:
    """The learning rate the last of `updates` optimizer updates used, as the MLX backend
    reports it (the Trainer logs the rate of the update to come)."""
    if scheduler is None or updates < 1:
        return None
    return scheduler.base_lrs[0] * scheduler.lr_lambdas[0](updates - 1)


# Logged by every Trainer, reported in fields of their own or not at all.
_NOT_METRICS = {"loss", "learning_rate", "num_tokens", "epoch", "step"}


def _method_metrics(logs: dict) -> dict[str, float]:
    """What TRL logs besides the loss (rewards/margins, rewards/<function>/mean, entropy,
    mean_token_accuracy, grad_norm...), for ProgressReport.metrics."""
    return {key: float(value) for key, value in logs.items()
            if key not in _NOT_METRICS and isinstance(value, int | float)
            and not isinstance(value, bool) and math.isfinite(value)}


def _merge(model_dir: Path, peft_dir: Path, merged_dir: Path, run: dict) -> Path:
    """The base model with the adapter folded in, as safetensors with its tokenizer.

    Merged into the unquantized base in the training dtype, also after QLoRA: a merged model is
    for serving, and folding into 4-bit weights would round the adapter away.
    """
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=run["dtype"], use_safetensors=True, trust_remote_code=False)
    merged = PeftModel.from_pretrained(base, peft_dir).merge_and_unload()
    merged.save_pretrained(merged_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False).save_pretrained(merged_dir)
    return merged_dir


def _blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks ("model.layers" in the Llama/Qwen/Mistral family)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    blocks = getattr(base, "layers", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no decoder blocks at model.layers")
    return blocks


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def warm_up() -> None:
    """Load a throwaway model the way `train` loads a job's, and run it once: the imports and
    first-use costs of transformers, the tokenizer and the chat template are paid at start-up,
    not by the first job (tunebus.shared.warmup)."""
    from tunebus.shared.warmup import MESSAGES, write_warm_up_model

    with tempfile.TemporaryDirectory(prefix="tunebus-warm-up-") as tmp:
        path = write_warm_up_model(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     use_safetensors=True, trust_remote_code=False)
        with torch.no_grad():
            text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
            model(input_ids=torch.tensor([tokenizer.encode(text)]))
