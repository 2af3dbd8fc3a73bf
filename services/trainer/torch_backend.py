"""Train a LoRA or DoRA adapter with torch + transformers + PEFT, through TRL's SFTTrainer.

The torch twin of `mlx_backend.train`, with the interface of backend.py: the same chat
"messages" data with the prompt masked, the same hooks (on_start, on_progress, should_stop) and the
same `TrainingStopped`. It runs on CUDA (the point of it: bf16, flash or SDPA attention,
padding-free batches, Liger kernels, 4/8-bit QLoRA) and on a CPU-only torch for development and CI,
where quantization is refused. Not yet: checkpoints and resume, and methods other than SFT.

Prompt masking follows TRL's prompt/completion split: the loss covers the last (assistant)
message after the chat template's generation prompt; mlx-lm-lora also trains on that generation
prompt (`<|im_start|>assistant\n` for ChatML), a few tokens per example.

What it leaves in out_dir, every adapter in both formats:

    out_dir/adapters.safetensors, adapter_config.json   mlx-lm's layout (as the MLX backend)
    out_dir/peft/adapter_model.safetensors,
                 adapter_config.json                    PEFT's (`PeftModel.from_pretrained`)
    out_dir/merged/                                     with spec.merge: base + adapter, HF layout

PEFT's is what was trained; the MLX copy is made by `tunebus.shared.adapter_formats`, and
adapter_config.json in out_dir is written last, so a directory with it is a finished adapter.

Batching: by default each step takes `batch_size` examples, as the MLX backend does, but lays
them end to end in one row with restarting position_ids and no attention mask (TRL's
padding-free collator). No padding is computed, and no example sees another: transformers turns
the position_ids into a block-diagonal mask for SDPA, and into varlen sequence boundaries for
flash attention. `batching="packed"` instead fills rows of max_seq_length tokens (TRL's
best-fit-decreasing packing, also padding-free): fewer, fuller steps, so an iteration then
counts rows, not examples. `batching="padded"` is the classic padded batch.

Synchronous and CPU/GPU-bound: the service runs it in a worker thread.
"""

from __future__ import annotations

import importlib.util
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

import datasets
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PrinterCallback,
    TrainerCallback,
    set_seed,
)
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from tunebus.services.trainer.backend import (
    ProgressReport,
    TrainingHooks,
    TrainingStopped,
    TrainResult,
    TrainSpec,
)
from tunebus.shared.adapter_formats import peft_to_mlx

PEFT_SUBDIR = "peft"
MERGED_SUBDIR = "merged"
Batching = Literal["padding_free", "packed", "padded"]

# mlx-lm-lora's fallback for base checkpoints without a chat template, so that both backends
# format such a model's prompts alike.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}"
    "{{ (eos_token or '') if message['role'] == 'assistant' else '' }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@dataclass(frozen=True)
class TorchOptions:
    """How to run, as opposed to what to train (that is the TrainSpec).

    `attn_implementation` None picks flash_attention_2 when the flash-attn package and a CUDA GPU
    with bf16 are here, SDPA otherwise. `liger` applies Liger kernels (RMSNorm, RoPE, SwiGLU) when
    liger-kernel is installed and the model is on CUDA; it is ignored otherwise.
    """

    batching: Batching = "padding_free"
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    liger: bool = True


@dataclass(frozen=True)
class Hardware:
    """What this process can use; `detect_hardware()` reads it, tests build it by hand."""

    cuda: bool
    device_name: str
    bf16: bool
    bitsandbytes: bool
    flash_attn: bool
    liger_kernel: bool


def detect_hardware() -> Hardware:
    cuda = torch.cuda.is_available()
    return Hardware(
        cuda=cuda,
        device_name=torch.cuda.get_device_name() if cuda else "cpu",
        bf16=cuda and torch.cuda.is_bf16_supported(),
        bitsandbytes=_installed("bitsandbytes"),
        flash_attn=_installed("flash_attn"),
        liger_kernel=_installed("liger_kernel"),
    )


def capabilities(hw: Hardware) -> dict[str, set[str]]:
    """What a worker on this hardware accepts, in the shape of plan.MLX_CAPABILITIES."""
    quantization = {"none"}
    if quantization_refusal("4bit", hw) is None:
        quantization |= {"4bit", "8bit"}
    return {"methods": {"sft"}, "adapters": {"lora", "dora"}, "quantization": quantization}


def quantization_refusal(quantization: str, hw: Hardware) -> str | None:
    """Why this hardware cannot train with `quantization`, or None when it can."""
    if quantization == "none":
        return None
    if quantization not in ("4bit", "8bit"):
        return f"quantization {quantization!r} is unknown (supported: none, 4bit, 8bit)"
    if not hw.cuda:
        return (f"quantization {quantization!r} needs a CUDA GPU (bitsandbytes QLoRA); this "
                "worker runs torch on the CPU")
    if not hw.bitsandbytes:
        return (f"quantization {quantization!r} needs the bitsandbytes package, which is not "
                "installed on this worker")
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
) -> TrainResult:
    """Train on data_dir/train.jsonl (chat "messages" lines), validate on valid.jsonl if present,
    and write the adapter to out_dir in both formats (see the module docstring).

    hooks.should_stop() is asked before every optimizer step; a reason raises TrainingStopped
    and leaves no adapter behind. Not here yet: checkpoints (spec.checkpoint_every is not acted
    on, resolved_args says 0) and resume_from, which is refused.
    """
    started = time.perf_counter()
    out_dir, model_dir, data_dir = Path(out_dir), Path(model_dir), Path(data_dir)
    hooks = hooks or TrainingHooks()
    if resume_from is not None:
        raise ValueError("the torch backend cannot resume from a checkpoint yet")
    if spec.method != "sft":
        raise ValueError(f"method {spec.method!r} is not supported by the torch backend (sft)")
    hw = hardware or detect_hardware()
    if reason := quantization_refusal(spec.quantization, hw):
        raise ValueError(reason)
    set_seed(spec.seed)
    datasets.disable_progress_bars()  # a worker logs events, not terminal bars

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    used_fallback_template = tokenizer.chat_template is None
    if used_fallback_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_set = read_chat_jsonl(data_dir / "train.jsonl", spec.mask_prompt)
    if len(train_set) == 0:
        raise ValueError(f"no training examples in {data_dir / 'train.jsonl'}")
    valid_set = None
    if (data_dir / "valid.jsonl").is_file():
        valid_set = read_chat_jsonl(data_dir / "valid.jsonl", spec.mask_prompt)
        if spec.val_batches > 0:
            keep = min(len(valid_set), spec.val_batches * spec.batch_size)
            valid_set = valid_set.select(range(keep))
        valid_set = valid_set if len(valid_set) else None

    run = _resolve_run(options, hw)
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
    lora = lora_config(spec, model)
    args = resolve_args(spec, options, run, lora, model_dir=model_dir, data_dir=data_dir,
                        out_dir=out_dir)
    args["chat_template_fallback"] = used_fallback_template
    loaded = time.perf_counter()

    progress = _ProgressCallback(spec, hooks, args)
    with tempfile.TemporaryDirectory(prefix="tunebus-torch-") as scratch:
        trainer = SFTTrainer(
            model=model,
            args=_sft_config(spec, options, run, scratch, has_valid=valid_set is not None),
            train_dataset=train_set,
            eval_dataset=valid_set,
            processing_class=tokenizer,
            peft_config=lora,
            data_collator=_collator(options.batching, tokenizer),
            callbacks=[progress],
        )
        trainer.remove_callback(PrinterCallback)  # progress goes to the hooks, not stdout
        set_up = time.perf_counter()
        trainer.train()
        trained = time.perf_counter()
        peft_dir = out_dir / PEFT_SUBDIR
        trainer.model.save_pretrained(peft_dir, safe_serialization=True)
    (peft_dir / "README.md").unlink(missing_ok=True)  # PEFT's model card template: no facts
    merged_dir = _merge(model_dir, peft_dir, out_dir / MERGED_SUBDIR, run) if spec.merge else None
    # The MLX copy, its config written last: a directory with it is a finished adapter.
    peft_to_mlx(peft_dir, out_dir, num_hidden_layers=n_blocks)

    return TrainResult(
        adapter_dir=out_dir,
        first_loss=progress.train_losses[0],
        final_loss=progress.train_losses[-1],
        final_val_loss=progress.val_loss,
        steps=progress.last_step,
        trained_tokens=progress.trained_tokens,
        seconds=time.perf_counter() - started,
        resolved_args=args,
        curve=progress.curve,
        merged_dir=merged_dir,
        timings={
            "model_load": loaded - started,
            "setup": set_up - loaded,
            "training": trained - set_up,
            "first_step_at": progress.first_step_at,
        },
    )


def train_lora(
    model_dir: Path,
    data_dir: Path,
    out_dir: Path,
    spec: TrainSpec,
    *,
    on_progress: Callable[[ProgressReport], None] = lambda r: None,
    should_stop: Callable[[], bool] = lambda: False,
    options: TorchOptions = TorchOptions(),
    hardware: Hardware | None = None,
) -> TrainResult:
    """`train` with the earlier interface: a progress callback and a yes/no should_stop."""
    hooks = TrainingHooks(
        on_progress=on_progress,
        should_stop=lambda: "should_stop() returned True" if should_stop() else None,
    )
    return train(model_dir, data_dir, out_dir, spec, hooks, options=options, hardware=hardware)


def read_chat_jsonl(path: Path, mask_prompt: bool) -> Dataset:
    """Chat "messages" lines as TRL's conversational datasets.

    With mask_prompt, each line becomes prompt (every message but the last) and completion (the
    last, an assistant message), and TRL computes the loss on the completion only; otherwise the
    whole conversation is trained on.
    """
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{number}: not a chat line with a 'messages' list "
                                 f"({type(e).__name__}: {e})") from None
            if not isinstance(messages, list) or not messages:
                raise ValueError(f"{path}:{number}: 'messages' must be a non-empty list")
            if mask_prompt:
                if messages[-1].get("role") != "assistant" or len(messages) < 2:
                    raise ValueError(f"{path}:{number}: messages[-1].role must be 'assistant' "
                                     "after at least one prompt message (mask_prompt)")
                rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
            else:
                rows.append({"messages": messages})
    return Dataset.from_list(rows)


def lora_config(spec: TrainSpec, model: torch.nn.Module) -> LoraConfig:
    """PEFT's config for the spec: block-relative target modules in the last num_layers blocks,
    the same selection the MLX backend makes (and the converter writes)."""
    blocks = _blocks(model)
    n_blocks = len(blocks)
    num_layers = n_blocks if spec.lora.num_layers is None else spec.lora.num_layers
    if not 0 < num_layers <= n_blocks:
        raise ValueError(f"num_layers={num_layers}, but the model has {n_blocks} layers")
    linear = sorted(n for n, m in blocks[-1].named_modules() if isinstance(m, torch.nn.Linear))
    if spec.lora.target_modules is None:
        targets = linear
    else:
        targets = set()
        for target in spec.lora.target_modules:
            matches = [n for n in linear if n == target or n.endswith("." + target)]
            if not matches:
                raise ValueError(f"target module {target!r} matches none of {linear}")
            targets.update(matches)
        targets = sorted(targets)
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


def resolve_args(spec: TrainSpec, options: TorchOptions, run: dict, lora: LoraConfig, *,
                 model_dir: Path, data_dir: Path, out_dir: Path) -> dict:
    """Every effective setting, JSON-ready; names shared with the MLX backend where they agree."""
    packages = ["torch", "transformers", "peft", "trl", "accelerate"]
    if spec.quantization != "none":
        packages.append("bitsandbytes")
    return {
        "model": str(model_dir),
        "data": str(data_dir),
        "adapter_path": str(out_dir),
        "peft_adapter_path": str(out_dir / PEFT_SUBDIR),
        "train_mode": "sft",
        "fine_tune_type": spec.lora.kind,
        "num_layers": len(lora.layers_to_transform),
        "layers_to_transform": list(lora.layers_to_transform),
        "target_modules": sorted(lora.target_modules),
        "lora_parameters": {"rank": spec.lora.rank, "dropout": spec.lora.dropout,
                            "scale": spec.lora.alpha / spec.lora.rank},
        "lora_alpha": spec.lora.alpha,
        "iters": spec.iters,
        "batch_size": spec.batch_size,
        "gradient_accumulation_steps": spec.grad_accumulation_steps,
        "learning_rate": spec.learning_rate,
        "warmup_steps": spec.warmup_steps,
        "lr_schedule": "constant_with_warmup" if spec.warmup_steps else "constant",
        "optimizer": "adamw_torch",
        "optimizer_config": {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
        "max_grad_norm": None,
        "max_seq_length": spec.max_seq_length,
        "mask_prompt": spec.mask_prompt,
        "seed": spec.seed,
        "steps_per_report": spec.steps_per_report,
        "steps_per_eval": spec.steps_per_eval,
        "val_batches": spec.val_batches,
        "grad_checkpoint": options.gradient_checkpointing,
        "checkpoint_every": 0,  # not implemented by this backend yet
        "merge": spec.merge,
        "quantization": spec.quantization,
        "batching": options.batching,
        "device": run["device"],
        "dtype": str(run["dtype"]).removeprefix("torch."),
        "mixed_precision": "bf16" if run["bf16"] else "no",
        "attn_implementation": run["attn_implementation"],
        "liger_kernel": run["liger"],
        "library_versions": {p: _version(p) for p in packages},
        "torch_options": asdict(options),
    }


def _resolve_run(options: TorchOptions, hw: Hardware) -> dict:
    """The speed settings this hardware allows."""
    bf16 = hw.cuda and hw.bf16
    attn = options.attn_implementation
    if attn is None:
        attn = "flash_attention_2" if (bf16 and hw.flash_attn) else "sdpa"
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


def _sft_config(spec: TrainSpec, options: TorchOptions, run: dict, output_dir: str, *,
                has_valid: bool) -> SFTConfig:
    # Defaults of SFTConfig that differ from what the spec means are all set explicitly: bf16
    # and gradient checkpointing are on by default there, for example.
    return SFTConfig(
        output_dir=output_dir,
        max_steps=math.ceil(spec.iters / spec.grad_accumulation_steps),
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.grad_accumulation_steps,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="constant_with_warmup" if spec.warmup_steps else "constant",
        warmup_steps=spec.warmup_steps,
        optim="adamw_torch",
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=0.0,  # no clipping, as in the MLX backend
        seed=spec.seed,
        data_seed=spec.seed,
        bf16=run["bf16"],
        fp16=False,
        tf32=True if run["bf16"] else None,
        gradient_checkpointing=options.gradient_checkpointing,
        use_liger_kernel=run["liger"],
        max_length=spec.max_seq_length,
        packing=options.batching == "packed",
        packing_strategy="bfd",
        padding_free=False,  # padding-free batches come from _collator (see there)
        completion_only_loss=spec.mask_prompt,
        logging_strategy="steps",
        logging_steps=spec.steps_per_report,
        eval_strategy="steps" if has_valid else "no",
        eval_steps=spec.steps_per_eval,
        prediction_loss_only=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )


def _collator(batching: Batching, tokenizer):
    """TRL's padding-free collator for the default batching, else TRL's own choice (None).

    TRL refuses padding_free=True without packing when max_length is set, on the grounds that
    the collator then cannot enforce it; but TRL truncates every example to max_length while it
    prepares the dataset, before any collator runs, so passing the collator itself is sound.
    """
    if batching != "padding_free":
        return None
    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)


class _ProgressCallback(TrainerCallback):
    """The Trainer's events as the hooks of backend.TrainingHooks.

    Reports: one per step, steps strictly increasing, every steps_per_report steps, after the
    last step, and whenever report_interval_s has passed. The Trainer logs the training loss and
    then evaluates at the end of a step; the two are sent as one report when the next step
    begins or training ends. Steps are counted in batches, as the spec counts them (the Trainer
    counts optimizer updates, one per grad_accumulation_steps batches).
    """

    def __init__(self, spec: TrainSpec, hooks: TrainingHooks, resolved_args: dict):
        self.spec = spec
        self.hooks = hooks
        self.resolved_args = resolved_args
        self.cuda = torch.cuda.is_available()
        self.train_losses: list[float] = []
        self.val_loss: float | None = None
        self.trained_tokens = 0
        self.last_step = 0
        self.curve: list[dict] = []
        self.first_step_at: float | None = None
        self._started: float | None = None
        self._pending: dict | None = None
        self._clock: tuple[float, int] = (0.0, 0)  # (time, tokens) at the last train report

    def on_train_begin(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.hooks.on_start(self.resolved_args, None)

    def on_step_begin(self, args, state, control, **kwargs):
        self._flush()
        if reason := self.hooks.should_stop():
            raise TrainingStopped(reason, self.last_step)
        if self._started is None:
            self._started, self.first_step_at = time.perf_counter(), time.time()
            self._clock = (self._started, 0)

    def on_step_end(self, args, state, control, **kwargs):
        self.last_step = self._batches(state.global_step)
        interval = self.spec.report_interval_s
        if (state.global_step >= state.max_steps
                or (interval and time.perf_counter() - self._clock[0] >= interval)):
            control.should_log = True
        if state.global_step >= state.max_steps:  # as mlx-lm: validate after the last step
            control.should_evaluate = args.eval_strategy != "no"

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        step = self._batches(state.global_step)
        if "loss" in logs:
            now = time.perf_counter()
            tokens = int(logs.get("num_tokens", self.trained_tokens))
            then, tokens_then = self._clock
            self._clock = (now, tokens)
            self.trained_tokens = tokens
            self.train_losses.append(float(logs["loss"]))
            self._flush()
            self._pending = {
                "step": step, "train_loss": self.train_losses[-1], "val_loss": None,
                "learning_rate": float(logs["learning_rate"]) if "learning_rate" in logs else None,
                "tokens_per_second": (tokens - tokens_then) / (now - then) if now > then else None,
                "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None,
            }
        if "eval_loss" in logs:
            self.val_loss = float(logs["eval_loss"])
            if self._pending is None or self._pending["step"] != step:
                self._flush()
                self._pending = {"step": step, "train_loss": None, "val_loss": None}
            self._pending["val_loss"] = self.val_loss

    def on_train_end(self, args, state, control, **kwargs):
        self._flush()

    def _batches(self, optimizer_steps: int) -> int:
        return min(optimizer_steps * self.spec.grad_accumulation_steps, self.spec.iters)

    def _flush(self):
        if self._pending is None:
            return
        report, self._pending = self._pending, None
        self.curve.append({k: report[k] for k in ("step", "train_loss", "val_loss")})
        elapsed = time.perf_counter() - self._started if self._started else 0.0
        self.hooks.on_progress(ProgressReport(
            total_steps=self.spec.iters,
            trained_tokens=self.trained_tokens,
            elapsed_seconds=elapsed,
            **{"learning_rate": None, "tokens_per_second": None, "peak_memory_gb": None} | report,
        ))


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
