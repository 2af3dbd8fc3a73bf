"""Train a LoRA or DoRA adapter with mlx-lm-lora's SFT trainer, through its Python API.

The steps are the ones `mlx_lm_lora.train` takes for `--train-mode sft`, called directly so that
nothing is scraped from stdout and nothing is fused: mlx_lm.load, freeze, linear_to_lora_layers,
the library's chat dataset (with prompt masking), Adam, `train_sft` with a callback. The output
directory ends up with exactly what mlx-lm writes for an adapter: adapters.safetensors and an
adapter_config.json that `mlx_lm.load(model, adapter_path=...)` understands.

Synchronous and CPU/GPU-bound: the service runs it in a worker thread.
"""

from __future__ import annotations

import os
import threading
import time
import types
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.utils import build_schedule, linear_to_lora_layers
from mlx_lm.utils import load, save_config
from mlx_lm_lora.chat_template import ensure_chat_template
from mlx_lm_lora.trainer import sft_trainer
from mlx_lm_lora.trainer.datasets import CacheDataset, load_local_dataset
from mlx_lm_lora.trainer.sft_trainer import SFTTrainingArgs, iterate_batches, train_sft

from tunebus.services.trainer.backend import (
    ProgressReport,
    TrainResult,
    TrainSpec,
    TrainingStopped,
)

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def train_lora(
    model_dir: Path,
    data_dir: Path,
    out_dir: Path,
    spec: TrainSpec,
    *,
    on_progress: Callable[[ProgressReport], None] = lambda r: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> TrainResult:
    """Train on data_dir/train.jsonl (chat "messages" lines), validate on valid.jsonl if present,
    and write the adapter to out_dir. Raises TrainingStopped, leaving no adapter behind, as soon
    as should_stop() returns True; it is asked once per step."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    # Seed before the LoRA layers exist: their lora_a init draws from mx.random. (The CLI seeds
    # mx only after building them, so its adapters start differently on every run.)
    np.random.seed(spec.seed)
    mx.random.seed(spec.seed)

    model, tokenizer = load(str(model_dir))
    used_fallback_template = ensure_chat_template(tokenizer)
    args = resolve_args(spec, model, model_dir=model_dir, data_dir=data_dir, out_dir=out_dir)
    model.freeze()
    linear_to_lora_layers(
        model,
        args["num_layers"],
        args["lora_parameters"],
        use_dora=args["fine_tune_type"] == "dora",
    )
    args["lora_parameters"]["keys"] = adapted_module_keys(model)
    args["chat_template_fallback"] = used_fallback_template

    dataset_config = types.SimpleNamespace(train_mode="sft", mask_prompt=spec.mask_prompt)
    train_set, valid_set, _ = load_local_dataset(Path(data_dir), tokenizer, dataset_config)
    if len(train_set) == 0:
        raise ValueError(f"no training examples in {Path(data_dir) / 'train.jsonl'}")

    progress = _ProgressCallback(spec, on_progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    with metal_working_set_shim(), _settled():
        train_sft(
            model=model,
            optimizer=optim.Adam(learning_rate=_learning_rate(args)),
            train_dataset=CacheDataset(train_set),
            val_dataset=CacheDataset(valid_set) if len(valid_set) else None,
            args=SFTTrainingArgs(
                loss_type=args["sft_loss_type"],
                batch_size=spec.batch_size,
                iters=spec.iters,
                gradient_accumulation_steps=spec.grad_accumulation_steps,
                val_batches=spec.val_batches,
                steps_per_report=spec.steps_per_report,
                steps_per_eval=spec.steps_per_eval,
                # Past the last step: no numbered checkpoint files, out_dir holds the artifact only.
                steps_per_save=spec.iters + 1,
                max_seq_length=spec.max_seq_length,
                adapter_file=str(out_dir / ADAPTER_WEIGHTS),
                grad_checkpoint=args["grad_checkpoint"],
            ),
            iterate_batches=_stop_aware_batches(should_stop),
            training_callback=progress,
        )
    # Written last: a directory with a config is a finished adapter.
    save_config(dict(args), out_dir / ADAPTER_CONFIG)

    return TrainResult(
        adapter_dir=out_dir,
        first_loss=progress.train_losses[0],
        final_loss=progress.train_losses[-1],
        final_val_loss=progress.val_loss,
        steps=spec.iters,
        trained_tokens=progress.trained_tokens,
        seconds=time.perf_counter() - started,
        resolved_args=args,
    )


def resolve_args(spec: TrainSpec, model: nn.Module, *, model_dir, data_dir, out_dir) -> dict:
    """Every effective setting, named as mlx-lm names them in adapter_config.json.

    None in the spec becomes the concrete value it stands for here, so the file (and the
    TrainResult) reproduce the run without the library defaults of the day.
    """
    lora = spec.lora
    num_layers = len(model.layers) if lora.num_layers is None else lora.num_layers
    if not 0 < num_layers <= len(model.layers):
        raise ValueError(f"num_layers={num_layers}, but the model has {len(model.layers)} layers")
    lora_parameters = {
        "rank": lora.rank,
        "dropout": lora.dropout,
        # mlx-lm multiplies the low-rank product by `scale`; PEFT's alpha means scale = alpha/r.
        "scale": lora.alpha / lora.rank,
    }
    if lora.target_modules is not None:
        lora_parameters["keys"] = _match_target_modules(model, lora.target_modules)
    warmup = None
    if spec.warmup_steps:
        # A constant schedule behind mlx-lm's linear warmup from 0, in its config format.
        lr = spec.learning_rate
        warmup = {"name": "linear_schedule", "arguments": [lr, lr, 1], "warmup": spec.warmup_steps}
    return {
        "model": str(model_dir),
        "data": str(data_dir),
        "adapter_path": str(out_dir),
        "train_mode": "sft",
        "sft_loss_type": "nll",
        "fine_tune_type": lora.kind,
        "num_layers": num_layers,
        "lora_parameters": lora_parameters,
        "lora_alpha": lora.alpha,
        "iters": spec.iters,
        "batch_size": spec.batch_size,
        "gradient_accumulation_steps": spec.grad_accumulation_steps,
        "learning_rate": spec.learning_rate,
        "warmup_steps": spec.warmup_steps,
        "lr_schedule": warmup,
        "optimizer": "adam",
        "optimizer_config": {"adam": {"betas": [0.9, 0.999], "eps": 1e-8}},
        "max_seq_length": spec.max_seq_length,
        "mask_prompt": spec.mask_prompt,
        "grad_checkpoint": False,
        "seed": spec.seed,
        "steps_per_report": spec.steps_per_report,
        "steps_per_eval": spec.steps_per_eval,
        "val_batches": spec.val_batches,
        "fuse": False,
        "library_versions": {p: version(p) for p in ("mlx", "mlx-lm", "mlx-lm-lora")},
    }


def adapted_module_keys(model: nn.Module) -> list[str]:
    """Block-relative paths (e.g. "self_attn.q_proj") that now carry LoRA/DoRA weights."""
    return sorted(
        {
            name
            for layer in model.layers
            for name, module in layer.named_modules()
            if hasattr(module, "lora_a")
        }
    )


def _match_target_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """PEFT-style names ("q_proj") to mlx-lm's block-relative keys ("self_attn.q_proj")."""
    linear = [
        name
        for name, m in model.layers[-1].named_modules()
        if isinstance(m, (nn.Linear, nn.QuantizedLinear))
    ]
    keys = set()
    for target in targets:
        matches = [n for n in linear if n == target or n.endswith("." + target)]
        if not matches:
            raise ValueError(f"target module {target!r} matches none of {sorted(linear)}")
        keys.update(matches)
    return sorted(keys)


def _learning_rate(args: dict):
    if args["lr_schedule"] is None:
        return args["learning_rate"]
    return build_schedule(args["lr_schedule"])


@contextmanager
def _settled():
    """Let MLX finish the work it queued asynchronously before an exception leaves the loop:
    a process exiting with work still in flight aborts ("terminate called without an active
    exception") instead of shutting down cleanly."""
    try:
        yield
    except BaseException:
        mx.synchronize()
        raise


def _stop_aware_batches(should_stop: Callable[[], bool]):
    """The library's batch iterator, asking should_stop() before each training batch.

    train_sft opens a fresh iterator for every step and takes one batch from it, so this is a
    per-step check without touching the loop itself. A validation split smaller than the batch
    size (common for small datasets) is evaluated in one smaller batch: the library would raise.
    """

    def batches(dataset, batch_size, max_seq_length, train=False):
        if train and should_stop():
            raise TrainingStopped("should_stop() returned True")
        if not train:
            batch_size = min(batch_size, len(dataset))
        yield from iterate_batches(dataset, batch_size, max_seq_length, train=train)

    return batches


class _ProgressCallback(TrainingCallback):
    """mlx-lm's report dicts as ProgressReports, one per step, steps strictly increasing.

    The library validates at the start of an iteration and reports training loss at its end;
    when both happen in the same iteration they are sent as one report.
    """

    def __init__(self, spec: TrainSpec, on_progress: Callable[[ProgressReport], None]):
        self.spec = spec
        self.on_progress = on_progress
        self.train_losses: list[float] = []
        self.val_loss: float | None = None
        self.trained_tokens = 0
        self._val_waiting: float | None = None

    def on_val_loss_report(self, val_info: dict):
        step = val_info["iteration"]
        self.val_loss = float(val_info["val_loss"])
        if step % self.spec.steps_per_report == 0 or step == self.spec.iters:
            self._val_waiting = self.val_loss
            return
        self._send(step, train_loss=None, val_loss=self.val_loss)

    def on_train_loss_report(self, train_info: dict):
        self.train_losses.append(float(train_info["train_loss"]))
        self.trained_tokens = int(train_info["trained_tokens"])
        val_loss, self._val_waiting = self._val_waiting, None
        self._send(
            train_info["iteration"],
            train_loss=self.train_losses[-1],
            val_loss=val_loss,
            learning_rate=float(train_info["learning_rate"]),
            tokens_per_second=float(train_info["tokens_per_second"]),
            peak_memory_gb=float(train_info["peak_memory"]),
        )

    def _send(self, step, *, train_loss, val_loss, learning_rate=None, tokens_per_second=None,
              peak_memory_gb=None):
        self.on_progress(
            ProgressReport(
                step=step,
                total_steps=self.spec.iters,
                train_loss=train_loss,
                val_loss=val_loss,
                learning_rate=learning_rate,
                tokens_per_second=tokens_per_second,
                trained_tokens=self.trained_tokens,
                peak_memory_gb=peak_memory_gb,
            )
        )


WORKING_SET_KEY = "max_recommended_working_set_size"
_shim_lock = threading.Lock()
_shim_users = 0  # trainings inside the shim right now; the last one out restores the module


@contextmanager
def metal_working_set_shim():
    """Let mlx-lm-lora 5.10's train_sft start on machines without Metal.

    train_sft begins with `mx.set_wired_limit(mx.device_info()[WORKING_SET_KEY])`. Only Metal
    reports that key; on Linux (CPU or CUDA) the lookup raises KeyError before the first step.
    Wired memory is a Metal notion and set_wired_limit does nothing elsewhere, so the value only
    has to be plausible: the device's memory size, or the host's RAM when the device has none.

    Narrow on purpose: when the key is already there this does nothing; otherwise only the
    trainer module's `mx` name is swapped, for a view of mlx.core whose device_info() adds the
    key, and it is put back when the last concurrent training leaves.
    """
    global _shim_users
    if WORKING_SET_KEY in mx.device_info():
        yield
        return
    with _shim_lock:
        if _shim_users == 0:
            sft_trainer.mx = _MlxWithWorkingSet(mx, _device_memory_bytes())
        _shim_users += 1
    try:
        yield
    finally:
        with _shim_lock:
            _shim_users -= 1
            if _shim_users == 0:
                sft_trainer.mx = mx


class _MlxWithWorkingSet:
    """mlx.core, except that device_info() also reports WORKING_SET_KEY."""

    def __init__(self, core, working_set: int):
        self._core = core
        self._working_set = working_set

    def __getattr__(self, name):
        return getattr(self._core, name)

    def device_info(self, *args, **kwargs):
        return {**self._core.device_info(*args, **kwargs), WORKING_SET_KEY: self._working_set}


def _device_memory_bytes() -> int:
    info = mx.device_info()
    for key in ("memory_size", "total_memory"):
        if key in info:
            return int(info[key])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
