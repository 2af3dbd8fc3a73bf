"""Train a LoRA or DoRA adapter, or every weight (a full fine-tune), with mlx-lm-lora, by any
method of the job contract.

The setup is what `mlx_lm_lora.train` does (mlx_lm.load, optional quantization for QLoRA, freeze,
linear_to_lora_layers, the library's datasets), called through the Python API, with the
request's optimizer and learning-rate schedule from mlx.optimizers and the gradient norm clipped
as the Hugging Face Trainer clips it (backend.OPTIMIZERS, backend.lr_schedule). Nothing is
scraped from stdout and nothing is fused unless the request asks for a merged model.

The loop is ours, made of the library's parts (`methods`: batch iterators, losses,
evaluators, GRPO sampling and rewards), because the library's `train_*` loops cannot be resumed
(they restart at step 1 with a fresh optimizer and RNG), only `train_sft` can be stopped between
steps, and they report only every N steps. It keeps the library's semantics: each step draws one
random batch from a fresh shuffle, validation runs at step 1, every `steps_per_eval` steps and at
the last step, before that step's update; the update itself is compiled as the library compiles
it. Reporting goes through an mlx-lm `TrainingCallback` (the library's report dicts), so mlx-lm's
own callbacks (W&B, ...) plug in beside ours.

A full fine-tune is mlx-lm's: no LoRA layers, the trained weights unfrozen instead (all of
them, or with num_layers N the last N blocks), and the result saved as a whole model in the
Hugging Face layout with mlx-lm's `save` (what `mlx_lm fuse` writes), under `full/`.

Checkpoints (see backend.py) hold the trained weights (adapter or model), the optimizer's state
(its step too, so the schedule goes on where it was), MLX's RNG key and numpy's Mersenne Twister
state (which is the data position: it decides every following batch), so a resumed run continues
exactly as the uninterrupted one would have.

Synchronous and CPU/GPU-bound: the service runs it in a worker thread.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load, save_config, save_model
from mlx_lm_lora.chat_template import ensure_chat_template

from tunebus.services.trainer.backend import (
    BEST_WEIGHTS,
    FULL,
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
    layers_to_adapt,
    lr_schedule,
    match_target_modules,
)
from tunebus.shared.adapter_layouts import CONFIG, FULL_DIR, MLX, WEIGHTS
from tunebus.shared.adapter_layouts import MERGED_DIR as MERGED

from .methods import Objective, build_objective, load_reference

BACKEND = "mlx"
ADAPTER_WEIGHTS, ADAPTER_CONFIG = WEIGHTS[MLX], CONFIG
OPTIMIZER_STATE = "optimizer.safetensors"
RNG_STATE = "rng.safetensors"
QUANTIZATION_GROUP_SIZE = 64
WORKING_SET_KEY = "max_recommended_working_set_size"
# mx.distributed (ring) runs here, but this loop does not yet report, stop and checkpoint from
# rank 0 with losses summed over ranks: README, Training, says what a Mac cluster needs.
MULTI_PROCESS_REFUSAL = ("the MLX worker trains a job in one process; set "
                         "TUNEBUS_TRAINER__PROCESSES=1 (several processes: the CUDA worker)")


def train(
    model_dir: Path,
    data_dir: Path,
    out_dir: Path,
    spec: TrainSpec,
    hooks: TrainingHooks | None = None,
    resume_from: Path | None = None,
    *,
    distributed: Distributed = Distributed(),
    init_from: Path | None = None,
) -> TrainResult:
    """Train on data_dir/train.jsonl (validating on valid.jsonl if present) and write the
    adapter to out_dir, starting from the mlx-lm adapter in `init_from` when given; see
    backend.py for the hooks and checkpoints."""
    if distributed.processes > 1:
        raise ValueError(MULTI_PROCESS_REFUSAL)
    hooks = hooks or TrainingHooks()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    # Seed before the LoRA layers exist: their lora_a init draws from mx.random. (The CLI seeds
    # mx only after building them, so its adapters start differently on every run.)
    np.random.seed(spec.seed)
    mx.random.seed(spec.seed)
    if WORKING_SET_KEY in mx.device_info():  # Metal: wire the working set, as the library does
        mx.set_wired_limit(mx.device_info()[WORKING_SET_KEY])

    full = spec.lora.kind == FULL
    if full and spec.quantization != "none":
        raise ValueError(f"quantization {spec.quantization!r} does not apply to a full "
                         "fine-tune: its weights are trained themselves")
    model, tokenizer, config = load(str(model_dir), return_config=True)
    used_fallback_template = ensure_chat_template(tokenizer)
    quantization = quantize(model, spec.quantization)
    num_layers, lora_parameters = adapter_shape(spec, model)
    model.freeze()
    if full:
        unfreeze_trained(model, spec)
    else:
        linear_to_lora_layers(model, num_layers, lora_parameters, use_dora=spec.lora.kind == "dora")
        lora_parameters["keys"] = adapted_module_keys(model)
    if init_from is not None:
        load_initial_adapter(model, Path(init_from) / ADAPTER_WEIGHTS)
    loaded = time.perf_counter()

    objective = build_objective(
        spec, Path(model_dir), tokenizer, Path(data_dir),
        make_reference=lambda: load_reference(Path(model_dir), partial(quantize, how=spec.quantization)),
    )
    optimizer = build_optimizer(spec)
    args = ResolvedArgs.from_spec(
        spec, optimizer_class=f"mlx.optimizers.{type(optimizer).__name__}",
        model=str(model_dir), data=str(data_dir), adapter_path=str(out_dir),
        num_layers=num_layers, lora_parameters=lora_parameters,
        base_quantization=quantization,  # QLoRA: how the frozen base was quantized
        mask_prompt=objective.resolved.pop("mask_prompt"),  # as applied to this data
        batching="padded", grad_checkpoint=False, chat_template_fallback=used_fallback_template,
        device=mx.device_info().get("device_name", mx.default_device().type.name),
        dtype=_weight_dtype(model), mixed_precision="no",
        method_args=objective.resolved,
        backend_args={"batch_sampling": "one random batch per step from a fresh shuffle "
                                        "(mlx-lm-lora)"},
        library_versions={p: version(p) for p in ("mlx", "mlx-lm", "mlx-lm-lora")},
    ).to_dict()
    state = CheckpointState.start(spec, BACKEND)
    best = None
    if resume_from is not None:
        state = restore_checkpoint(Path(resume_from), model, optimizer)
        if (Path(resume_from) / BEST_WEIGHTS).is_file():
            best = mx.load(str(Path(resume_from) / BEST_WEIGHTS))
    resumed_from = state.step or None
    timings = {"model_load": loaded - started, "setup": time.perf_counter() - loaded}
    hooks.on_start(args, resumed_from)

    loop = TrainingLoop(model, optimizer, objective, spec, hooks, state,
                        checkpoint_root=out_dir.parent / f".{out_dir.name}.checkpoint", best=best,
                        adapter_config=args)
    with _settled():
        loop.run()

    out_dir.mkdir(parents=True, exist_ok=True)
    if spec.keep == "best" and loop.best is not None:
        model.load_weights(list(loop.best.items()), strict=False)
    merged = None
    if full:
        save_whole_model(out_dir / FULL_DIR, model_dir, model, tokenizer, config)
    else:
        mx.save_safetensors(str(out_dir / ADAPTER_WEIGHTS),
                            dict(tree_flatten(model.trainable_parameters())))
        # Written last: a directory with a config is a finished adapter.
        # (mlx-lm's save_config would add a quantization_config beside our "quantization".)
        (out_dir / ADAPTER_CONFIG).write_text(json.dumps(args, indent=4, sort_keys=True) + "\n")
        merged = merge(Path(model_dir), out_dir, out_dir / MERGED) if spec.merge else None

    windows = [p for p in state.curve if "train_loss" in p]
    rewards = [p["reward"] for p in windows if p.get("reward") is not None]
    vals = [p["val_loss"] for p in state.curve if "val_loss" in p]
    timings["training"] = state.train_seconds
    if state.first_step_at is not None:
        timings["first_step_at"] = state.first_step_at
    return TrainResult(
        adapter_dir=out_dir,
        first_loss=windows[0]["train_loss"],
        final_loss=windows[-1]["train_loss"],
        final_val_loss=vals[-1] if vals else None,
        steps=state.step,
        trained_tokens=state.trained_tokens,
        seconds=time.perf_counter() - started,
        resolved_args=args,
        curve=state.curve,
        first_reward=rewards[0] if rewards else None,
        final_reward=rewards[-1] if rewards else None,
        resumed_from_step=resumed_from,
        merged_dir=merged,
        timings=timings,
        best_val_loss=state.best_val_loss,
        best_step=state.best_step,
        early_stopped=state.early_stopped,
    )


def build_optimizer(spec: TrainSpec) -> optim.Optimizer:
    """The spec's optimizer from mlx.optimizers, every setting as backend.OPTIMIZERS says (mlx's
    Adam defaults to no bias correction; torch's, and ours, correct)."""
    lr, settings, decay = learning_rate_schedule(spec), OPTIMIZERS[spec.optimizer], spec.weight_decay
    if spec.optimizer == "adam":
        return optim.Adam(learning_rate=lr, **settings)
    if spec.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=decay, **settings)
    if spec.optimizer == "sgd":
        return optim.SGD(learning_rate=lr, weight_decay=decay, **settings)
    if spec.optimizer == "adafactor":
        return optim.Adafactor(learning_rate=lr, weight_decay=decay,
                               **settings | {"eps": tuple(settings["eps"])})
    raise ValueError(f"optimizer {spec.optimizer!r} is not offered by the MLX worker "
                     f"(supported: {', '.join(PORTABLE_OPTIMIZERS)})")


def learning_rate_schedule(spec: TrainSpec):
    """backend.lr_schedule(spec) made of mlx.optimizers' schedules, over optimizer updates."""
    schedule = lr_schedule(spec)
    lr, end = spec.learning_rate, spec.learning_rate * spec.min_lr_ratio
    warmup = schedule["warmup_steps"]
    if schedule["name"] == "constant":
        if not warmup:
            return lr
        main = optim.linear_schedule(lr, lr, 1)
    elif schedule["name"] == "linear":
        main = optim.linear_schedule(lr, end, schedule["decay_steps"])
    else:
        main = optim.cosine_decay(lr, schedule["decay_steps"], end)
    if not warmup:
        return main
    ramp = optim.linear_schedule(lr * schedule["warmup_start"], lr, warmup)
    return optim.join_schedules([ramp, main], [warmup])


class TrainingLoop:
    """Steps `state.step + 1 … spec.iters`: batch, (validation), update, report, checkpoint."""

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, objective: Objective,
                 spec: TrainSpec, hooks: TrainingHooks, state: CheckpointState, *,
                 checkpoint_root: Path, callback: TrainingCallback | None = None,
                 best: dict[str, mx.array] | None = None, adapter_config: dict | None = None):
        self.model, self.optimizer, self.objective = model, optimizer, objective
        # Written into each checkpoint beside the weights: a checkpoint is then an mlx-lm
        # adapter too, which a later job can continue from (init_from).
        self.adapter_config = adapter_config
        self.best = best  # keep="best": the adapter weights of the lowest validation loss
        self.spec, self.hooks, self.state = spec, hooks, state
        self.checkpoint_root = checkpoint_root
        self.callback = callback or ProgressCallback(spec, objective.reward_key, hooks.on_progress)
        self.grad = None  # gradients accumulated since the last update
        self.checkpointed_step = state.step

    def run(self) -> None:
        spec, state, objective = self.spec, self.state, self.objective
        step_fn = self._compiled_step()
        self.model.train()
        self.start_step = state.step
        self.started = time.perf_counter()
        since = _Since(state.step, state.trained_tokens)
        self.steady = _Steady()
        for step in range(state.step + 1, spec.iters + 1):
            if reason := self.hooks.should_stop():
                self._checkpoint(final=True)
                raise TrainingStopped(reason, state.step)
            if state.first_step_at is None:
                state.first_step_at = time.time()
            # A fresh iterator per step takes the first batch of a new shuffle (as train_sft).
            batch = next(objective.iterate(objective.train_set, spec.batch_size,
                                           spec.max_seq_length, train=True))
            val = self._evaluate(step) if self._validates(step) else None
            tic = time.perf_counter()
            inputs = objective.prepare(self.model, batch)
            accumulated = (step - 1) % spec.grad_accumulation_steps + 1
            update = accumulated == spec.grad_accumulation_steps or step == spec.iters
            loss, tokens, metrics, self.grad = step_fn(inputs, self.grad,
                                                       accumulated if update else None)
            mx.eval(self.model.state, self.optimizer.state, loss, tokens, metrics, self.grad)
            seconds = time.perf_counter() - tic
            state.train_seconds += seconds
            since.train_seconds += seconds
            state.step = step
            self.steady.add(inputs, int(tokens), seconds)
            self._accumulate(float(loss), int(tokens), {k: float(v) for k, v in metrics.items()})

            # Early stopping ends the run after this step, its report window closed.
            stopping = val is not None and state.patience_spent(spec)
            window_full = step % spec.steps_per_report == 0 or step == spec.iters or stopping
            interval = spec.report_interval_s
            overdue = interval is not None and time.perf_counter() - since.reported >= interval
            if window_full or val is not None or overdue:
                self._report(step, since, val, close_window=window_full)
                since = _Since(step, state.trained_tokens)
            if stopping:
                state.early_stopped = step < spec.iters
                break
            if spec.checkpoint_every and step % spec.checkpoint_every == 0 and step < spec.iters:
                self._checkpoint()

    def _compiled_step(self):
        model, optimizer = self.model, self.optimizer
        max_grad_norm = self.spec.max_grad_norm
        loss_and_grad = nn.value_and_grad(model, self.objective.loss)

        def step(inputs, previous, accumulated):
            (loss, tokens, metrics), grad = loss_and_grad(model, *inputs)
            if previous is not None:
                grad = tree_map(lambda g, p: g + p, grad, previous)
            if accumulated is not None:
                grad = average_gradients(grad)
                if accumulated > 1:
                    grad = tree_map(lambda g: g / accumulated, grad)
                if max_grad_norm:
                    grad, _ = optim.clip_grad_norm(grad, max_grad_norm)
                optimizer.update(model, grad)
                grad = None
            return loss, tokens, metrics, grad

        if not self.objective.compiled:
            return step
        state = [model.state, optimizer.state, mx.random.state]
        return partial(mx.compile, inputs=state, outputs=state)(step)

    def _validates(self, step: int) -> bool:
        spec = self.spec
        return self.objective.valid_set is not None and (
            step == 1 or step % spec.steps_per_eval == 0 or step == spec.iters)

    def _evaluate(self, step: int) -> dict:
        tic = time.perf_counter()
        loss, metrics = self.objective.evaluate(self.model, self.objective.valid_set)
        self.model.train()
        val = {"iteration": step, "val_loss": float(loss), "val_time": time.perf_counter() - tic,
               **{f"val_{k}": float(v) for k, v in metrics.items()}}
        point = {"step": step, "val_loss": float(loss)}
        if (key := self.objective.reward_key) and key in metrics:
            point["val_reward"] = float(metrics[key])
        self.state.curve.append(point)
        if self.state.note_validation(step, float(loss)) and self.spec.keep == "best":
            # The weights this loss was measured on (before this step's update); MLX arrays
            # are immutable, so holding them is a copy.
            self.best = dict(tree_flatten(self.model.trainable_parameters()))
        return val

    def _accumulate(self, loss: float, tokens: int, metrics: dict[str, float]) -> None:
        window = self.state.window
        window["steps"] = window.get("steps", 0) + 1
        window["loss"] = window.get("loss", 0.0) + loss
        for key, value in metrics.items():
            window[f"metric.{key}"] = window.get(f"metric.{key}", 0.0) + value
        self.state.trained_tokens += tokens

    def _report(self, step: int, since: _Since, val: dict | None, *, close_window: bool) -> None:
        state, window = self.state, self.state.window
        n = window["steps"]
        metrics = {k.removeprefix("metric."): v / n for k, v in window.items() if k.startswith("metric.")}
        train_loss = window["loss"] / n
        rate = since.train_seconds or float("inf")
        if val is not None:
            self.callback.on_val_loss_report(val)
        info = {
            "iteration": step,
            "train_loss": train_loss,
            "learning_rate": float(self.optimizer.learning_rate),
            "iterations_per_second": (step - since.step) / rate,
            "tokens_per_second": (state.trained_tokens - since.tokens) / rate,
            "steady_tokens_per_second": self.steady.rate(),
            "trained_tokens": state.trained_tokens,
            "peak_memory": mx.get_peak_memory() / 1e9,
            **{f"train_{k}": v for k, v in metrics.items()},
            # Ours, beside mlx-lm's keys: how far along this process is.
            "elapsed_seconds": time.perf_counter() - self.started,
            "start_step": self.start_step,
            "window_closed": close_window,
        }
        self.callback.on_train_loss_report(info)
        if close_window:
            point = {"step": step, "train_loss": train_loss, "learning_rate": info["learning_rate"]}
            if (key := self.objective.reward_key) and key in metrics:
                point["reward"] = metrics[key]
            state.curve.append(point)
            state.window = {}

    def _checkpoint(self, *, final: bool = False) -> None:
        """Write the state after `state.step` and hand it to the hooks: never with gradients
        half accumulated (they are not saved), and on a stop (`final`) only when checkpoints are
        on and there is something new to keep."""
        state = self.state
        if self.grad is not None or (final and (
                not self.spec.checkpoint_every or state.step <= self.checkpointed_step)):
            return
        directory = self.checkpoint_root / f"step-{state.step:07d}"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        try:
            if self.best is not None:
                mx.save_safetensors(str(directory / BEST_WEIGHTS), self.best)
            if self.adapter_config is not None:
                (directory / ADAPTER_CONFIG).write_text(
                    json.dumps(self.adapter_config, indent=4, sort_keys=True) + "\n")
            write_checkpoint(directory, self.model, self.optimizer, state)
            self.hooks.on_checkpoint(directory, state.step)
            self.checkpointed_step = state.step
        finally:
            shutil.rmtree(directory, ignore_errors=True)


@dataclass
class _Since:
    """Where the last report left off, for the rates in the next one."""

    step: int
    tokens: int
    reported: float = field(default_factory=time.perf_counter)
    train_seconds: float = 0.0


@dataclass
class _Steady:
    """Tokens and seconds of the steps whose batch shapes were seen before: mx.compile traces
    the step once per shape, so a step with a new shape pays a compile, the others do not."""

    shapes: set = field(default_factory=set)
    tokens: int = 0
    seconds: float = 0.0

    def add(self, inputs, tokens: int, seconds: float) -> None:
        shape = tuple(a.shape for _, a in tree_flatten(inputs) if isinstance(a, mx.array))
        if shape in self.shapes:
            self.tokens += tokens
            self.seconds += seconds
        self.shapes.add(shape)

    def rate(self) -> float | None:
        return self.tokens / self.seconds if self.seconds else None


class ProgressCallback(TrainingCallback):
    """mlx-lm's report dicts (as its trainers send them) as ProgressReports, one per step.

    The loop sends a validation report, if any, right before the training report of the same
    step; the two become one ProgressReport.
    """

    def __init__(self, spec: TrainSpec, reward_key: str | None, on_progress):
        self.spec = spec
        self.reward_key = reward_key
        self.on_progress = on_progress
        self._val: dict | None = None

    def on_val_loss_report(self, val_info: dict):
        self._val = val_info

    def on_train_loss_report(self, train_info: dict):
        val, self._val = self._val, None
        metrics = {k.removeprefix("train_"): v for k, v in train_info.items()
                   if k.startswith("train_") and k != "train_loss"}
        if val is not None:
            metrics.update({k: v for k, v in val.items()
                            if k.startswith("val_") and k not in ("val_loss", "val_time")})
        self.on_progress(ProgressReport(
            step=train_info["iteration"],
            total_steps=self.spec.iters,
            train_loss=train_info["train_loss"],
            val_loss=val["val_loss"] if val is not None else None,
            learning_rate=train_info["learning_rate"],
            tokens_per_second=train_info["tokens_per_second"],
            trained_tokens=train_info["trained_tokens"],
            peak_memory_gb=train_info["peak_memory"],
            reward=metrics.get(self.reward_key) if self.reward_key else None,
            metrics=metrics,
            elapsed_seconds=train_info["elapsed_seconds"],
            start_step=train_info["start_step"],
            steady_tokens_per_second=train_info.get("steady_tokens_per_second"),
        ))


# -- checkpoints


def write_checkpoint(directory: Path, model: nn.Module, optimizer: optim.Optimizer,
                     state: CheckpointState) -> None:
    """Arrays as safetensors, the rest as JSON; state.json last, so its presence means complete."""
    mx.save_safetensors(str(directory / ADAPTER_WEIGHTS), dict(tree_flatten(model.trainable_parameters())))
    mx.save_safetensors(str(directory / OPTIMIZER_STATE), dict(tree_flatten(optimizer.state)))
    generator, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    mx.save_safetensors(str(directory / RNG_STATE), {
        "mlx_key": mx.random.state[0],
        "numpy_keys": mx.array(keys.astype(np.uint32)),
    })
    state.rng = {"numpy": {"bit_generator": generator, "position": int(position),
                           "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}}
    state.data_position = {
        "sampling": "one random batch per step, from numpy's global RNG (mlx-lm-lora)",
        "batches_drawn": state.step,
    }
    state.write(directory)


def restore_checkpoint(directory: Path, model: nn.Module, optimizer: optim.Optimizer) -> CheckpointState:
    """Put the model, the optimizer and both RNGs back where `write_checkpoint` found them."""
    state = CheckpointState.read(directory)
    model.load_weights(str(directory / ADAPTER_WEIGHTS), strict=False)
    saved = mx.load(str(directory / OPTIMIZER_STATE))
    optimizer.init(model.trainable_parameters())
    missing = {path for path, _ in tree_flatten(optimizer.state)} - saved.keys()
    if missing:
        raise ValueError(f"checkpoint {directory} lacks optimizer state for {sorted(missing)[:3]}")
    optimizer.state = tree_map_with_path(lambda path, _: saved[path], optimizer.state)
    rng = mx.load(str(directory / RNG_STATE))
    high, low = rng["mlx_key"].tolist()
    mx.random.seed((high << 32) | low)  # a key [high, low] is what seed((high << 32) | low) sets
    numpy = state.rng["numpy"]
    np.random.set_state((numpy["bit_generator"], np.array(rng["numpy_keys"], dtype=np.uint32),
                         numpy["position"], numpy["has_gauss"], numpy["cached_gaussian"]))
    return state


# -- setup


def load_initial_adapter(model: nn.Module, weights_path: Path) -> None:
    """Start the adapter from the weights in `weights_path` (init_from): every adapter array of
    the model, with its shape, must be there, and nothing else."""
    weights = mx.load(str(weights_path))
    own = dict(tree_flatten(model.trainable_parameters()))
    missing, unexpected = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"init_from adapter {weights_path.name} does not fit this adapter: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    if wrong := [k for k in own if own[k].shape != weights[k].shape]:
        raise ValueError(f"init_from adapter {weights_path.name} does not fit this adapter: "
                         f"{wrong[0]} is {tuple(weights[wrong[0]].shape)}, "
                         f"not {tuple(own[wrong[0]].shape)}")
    model.load_weights([(k, v.astype(own[k].dtype)) for k, v in weights.items()], strict=False)


def quantize(model: nn.Module, how: str) -> dict | None:
    """Quantize the base model's layers in place for QLoRA (`how`: none, 4bit, 8bit); layers whose
    input width is not a multiple of the group size stay as they are."""
    if how == "none":
        return None
    bits = {"4bit": 4, "8bit": 8}[how]
    group_size = QUANTIZATION_GROUP_SIZE
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=lambda _, m: (
        hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0))
    return {"bits": bits, "group_size": group_size, "mode": "affine"}


def adapter_shape(spec: TrainSpec, model: nn.Module) -> tuple[int, dict | None]:
    """How many of the last blocks to adapt and mlx-lm's lora_parameters for them (its
    `scale` is PEFT's alpha / rank); a full fine-tune has none (None, as mlx-lm says it)."""
    lora = spec.lora
    if lora.kind == FULL:
        return layers_to_adapt(lora, len(model.layers)), None
    lora_parameters = {"rank": lora.rank, "dropout": lora.dropout, "scale": lora.alpha / lora.rank}
    if lora.target_modules is not None:
        linear = [name for name, m in model.layers[-1].named_modules()
                  if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
        lora_parameters["keys"] = match_target_modules(linear, lora.target_modules)
    return layers_to_adapt(lora, len(model.layers)), lora_parameters


def unfreeze_trained(model: nn.Module, spec: TrainSpec) -> None:
    """A full fine-tune's trained weights: every one, or with num_layers N those of the last N
    blocks (mlx-lm's full fine-tune, which leaves embeddings, final norm and LM head frozen)."""
    if spec.lora.num_layers is None:
        model.unfreeze()
        return
    for block in model.layers[-layers_to_adapt(spec.lora, len(model.layers)):]:
        block.unfreeze()


def _weight_dtype(model: nn.Module) -> str:
    """The dtype the base model computes in (a quantized base keeps its scales in it)."""
    for _, value in tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            return str(value.dtype).removeprefix("mlx.core.")
    return "unknown"


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


def merge(model_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """The base model with the adapter fused in, saved as a model directory (what `mlx_lm fuse`
    does); from the full-precision base, also after QLoRA."""
    model, tokenizer, config = load(str(model_dir), adapter_path=str(adapter_dir), return_config=True)
    fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    save_whole_model(out_dir, model_dir, model, tokenizer, config)
    return out_dir


def save_whole_model(out_dir: Path, model_dir: Path, model: nn.Module, tokenizer,
                     config: dict) -> None:
    """Weights, config, tokenizer and generation config: what mlx-lm's `save` writes, without
    the base model's *.py files (remote code, which a tunebus model never runs and never ships)
    and the README model card it adds."""
    save_model(out_dir, model, donate_model=False)
    # Models with a vision tower need vision_config to load again (as mlx-lm's save keeps it).
    save_config(config, config_path=out_dir / "config.json",
                keep_vision_config="vision_tower" in getattr(model, "model", {}))
    tokenizer.save_pretrained(out_dir)
    if (generation := Path(model_dir) / "generation_config.json").is_file():
        shutil.copy(generation, out_dir)


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


def warm_up() -> None:
    """Load a throwaway model the way `train` loads a job's, and run it once: the imports and
    first-use costs of mlx-lm, the tokenizer and the chat template are paid at start-up, not by
    the first job (tunebus.shared.warmup)."""
    import tempfile

    from tunebus.shared.warmup import MESSAGES, write_warm_up_model

    with tempfile.TemporaryDirectory(prefix="tunebus-warm-up-") as tmp:
        model, tokenizer = load(str(write_warm_up_model(Path(tmp))))
        ensure_chat_template(tokenizer)
        text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
        mx.eval(model(mx.array([tokenizer.encode(text)])))
