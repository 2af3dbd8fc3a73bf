"""Run mlx-lm-lora's own trainers (and so its CLI) off Metal: the raw side of trainer_mlx.py.

Here, beside the benchmark that needs it, not in the trainer: the service's MLX loop never
reads the Metal-only key without asking for it first.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import mlx.core as mx
from mlx_lm_lora.trainer import cpo_trainer, dpo_trainer, orpo_trainer, sft_trainer
from tunebus.services.trainer.backends.mlx.loop import WORKING_SET_KEY


_TRAINER_MODULES = (sft_trainer, dpo_trainer, orpo_trainer, cpo_trainer)
_shim_lock = threading.Lock()
_shim_users = 0  # trainings inside the shim right now; the last one out restores the modules


@contextmanager
def metal_working_set_shim():
    """Let mlx-lm-lora 5.10's `train_sft`, `train_dpo`, `train_orpo` and `train_cpo` (and so its
    CLI) start on machines without Metal.

    They begin with `mx.set_wired_limit(mx.device_info()[WORKING_SET_KEY])`. Only Metal reports
    that key; on Linux (CPU or CUDA) the lookup raises KeyError before the first step. Wired
    memory is a Metal notion and set_wired_limit does nothing elsewhere, so the value only has
    to be plausible: the device's memory size, or the host's RAM when the device has none.

    The service's own loop does not need it (it asks for the key before using it); only what runs
    the library's loops on Linux does: the raw-CLI side of benchmarks/trainer_mlx.py.

    Narrow on purpose: when the key is already there this does nothing; otherwise only those
    trainer modules' `mx` name is swapped, for a view of mlx.core whose device_info() adds the
    key, and it is put back when the last concurrent user leaves.
    """
    global _shim_users
    if WORKING_SET_KEY in mx.device_info():
        yield
        return
    with _shim_lock:
        if _shim_users == 0:
            view = _MlxWithWorkingSet(mx, _device_memory_bytes())
            for module in _TRAINER_MODULES:
                module.mx = view
        _shim_users += 1
    try:
        yield
    finally:
        with _shim_lock:
            _shim_users -= 1
            if _shim_users == 0:
                for module in _TRAINER_MODULES:
                    module.mx = mx


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
