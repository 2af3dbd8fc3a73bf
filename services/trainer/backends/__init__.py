"""The trainer's backends: each is one package here and one row of `BACKENDS`.

A backend package holds its training loop, its methods, its checkpoints and its capabilities,
and offers them as `TrainerBackend` says. Nothing else in the trainer names a backend: the app,
the runner and the routing take it from the worker's settings and look it up here. A third
backend is a folder beside `mlx/` and `torch/` plus a row below.

The packages import their ML stack lazily: `capabilities(name)` is cheap for MLX (plain Python)
and imports torch for the CUDA worker (it asks the hardware); `load(name)` imports the training
loop, seconds the first time, on the backend thread.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tunebus.contracts.training import TrainerCapabilities
from tunebus.shared.adapter_layouts import MLX, PEFT

from ..backend import Distributed, TrainingHooks, TrainResult, TrainSpec


class TrainerBackend(Protocol):
    """What a backend's `loop` module offers."""

    BACKEND: str  # its name, as in BACKENDS

    def train(self, model_dir: Path, data_dir: Path, out_dir: Path, spec: TrainSpec,
              hooks: TrainingHooks | None = None, resume_from: Path | None = None, *,
              distributed: Distributed = Distributed(),
              init_from: Path | None = None) -> TrainResult:
        """Train `spec` on the model in `model_dir` with the splits in `data_dir`; the adapter
        (its native layout) in `out_dir`; resume from the checkpoint in `resume_from`; over
        `distributed.processes` processes of this machine (ValueError if the backend cannot);
        starting from the adapter in `init_from` (in `layout`) instead of a fresh one."""

    def warm_up(self) -> None:
        """Pay the first model load's costs (imports, tokenizer and model code) now."""


@dataclass(frozen=True)
class Backend:
    name: str  # as requests, settings, events and service discovery say it
    package: str  # the folder under backends/
    layout: str  # the adapter layout it trains in (the other one is converted)
    requires: tuple[str, ...]  # import names of the libraries it needs


BACKENDS = {backend.name: backend for backend in (
    Backend("mlx", "mlx", layout=MLX, requires=("mlx", "mlx_lm", "mlx_lm_lora")),
    Backend("cuda", "torch", layout=PEFT, requires=("torch", "transformers", "peft", "trl")),
)}


def capabilities(name: str, *, memory_gb: float | None = None) -> TrainerCapabilities:
    """What a worker of this backend can run on this machine (announced over discovery);
    `memory_gb` (the worker's setting) replaces the memory the backend found on the device."""
    found = _module(name, "capabilities").capabilities()
    if memory_gb is None:
        return found
    return found.model_copy(update={"memory_bytes": int(memory_gb * 1e9)})


def load(name: str) -> TrainerBackend:
    """The backend's training loop (seconds, the first time: the ML stack imports)."""
    return _module(name, "loop")


def warm_up(name: str) -> None:
    """Import the backend's loop and load a throwaway model through it (seconds)."""
    load(name).warm_up()


def _module(name: str, module: str):
    return importlib.import_module(f".{BACKENDS[name].package}.{module}", __package__)
