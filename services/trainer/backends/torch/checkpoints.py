"""Checkpoints of a Hugging Face Trainer run as safetensors and JSON, never pickle.

The Trainer checkpoints and resumes well (adapter weights, optimizer, LR schedule, RNG, data
position, trainer_state.json) but writes optimizer, schedule, RNG state and training arguments
with `torch.save`, which is pickle. `SafeCheckpoints` is a mixin for any Trainer class (TRL's
SFT, DPO, GRPO... trainers are Trainers) that keeps the Trainer's own save/resume logic and
replaces only those writers and readers:

    adapter_model.safetensors, adapter_config.json   the adapter (PEFT writes safetensors)
    model*.safetensors(.index.json), config.json     instead, a full fine-tune's whole model
    (generation_config.json)                         (transformers writes safetensors)
    trainer_state.json                               global step, log history (the Trainer's)
    optimizer.safetensors                            every optimizer state tensor; its param
                                                     groups as JSON in the file's metadata
    scheduler.json                                   the LR scheduler's state_dict
    rng_state.safetensors                            torch CPU (and CUDA) and numpy RNG arrays;
                                                     Python's and numpy's scalars in metadata
    rng_state_<rank>.safetensors                     instead, one per process, when several
                                                     run the job (as the Trainer names them)

With several processes rank 0 writes everything but the other ranks' RNG states, and every rank
waits for the others before the checkpoint is handed over.

`keep_only_checkpoint_files` removes what else the Trainer leaves in a checkpoint directory
(training_args.bin, a pickle; tokenizer files; a model card), so none of it is ever uploaded.
The Trainer reads the directory back with `trainer.train(resume_from_checkpoint=...)`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file
from tunebus.shared.adapter_layouts import CONFIG, MODEL_CONFIG, PEFT, WEIGHTS

OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.json"
RNG_FILE = "rng_state.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
ADAPTER_FILES = (WEIGHTS[PEFT], CONFIG)
CHECKPOINT_FILES = {*ADAPTER_FILES, TRAINER_STATE_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE}
GENERATION_CONFIG = "generation_config.json"


def checkpoint_files(processes: int = 1, *, full: bool = False) -> set[str]:
    """The files every checkpoint written by `processes` processes has (`full`: of a full
    fine-tune, whose model weights `is_model_file` names besides)."""
    files = CHECKPOINT_FILES - set(ADAPTER_FILES) | {MODEL_CONFIG} if full else CHECKPOINT_FILES
    if processes == 1:
        return files
    return files - {RNG_FILE} | {rng_file(rank, processes) for rank in range(processes)}


def is_model_file(name: str) -> bool:
    """A whole model's weights as transformers writes them: one file, or shards and their index."""
    return name.startswith("model") and name.endswith((".safetensors", ".safetensors.index.json"))


def rng_file(rank: int, processes: int) -> str:
    return RNG_FILE if processes == 1 else f"rng_state_{rank}.safetensors"


class SafeCheckpoints:
    """Mix in before the Trainer class: `type("T", (SafeCheckpoints, SFTTrainer), {})`.

    Overrides four Trainer methods that are private by name but have kept their signatures
    since transformers 4.x; tests/unit/test_torch_checkpoints.py round-trips through them.
    """

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.args.should_save:  # rank 0 writes; the optimizers of DDP ranks are equal
            return
        save_optimizer_state(self.optimizer.state_dict(), Path(output_dir) / OPTIMIZER_FILE)
        (Path(output_dir) / SCHEDULER_FILE).write_text(
            _json(self.lr_scheduler.state_dict(), "the LR scheduler's state"))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        directory = Path(checkpoint)
        self.optimizer.load_state_dict(load_optimizer_state(directory / OPTIMIZER_FILE))
        self.lr_scheduler.load_state_dict(json.loads((directory / SCHEDULER_FILE).read_text()))

    def _save_rng_state(self, output_dir: str) -> None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        save_rng_state(Path(output_dir) / rng_file(self.args.process_index, self.args.world_size))
        self.accelerator.wait_for_everyone()  # the checkpoint is whole once every rank wrote

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is not None:
            load_rng_state(Path(checkpoint) / rng_file(self.args.process_index,
                                                       self.args.world_size))


def keep_only_checkpoint_files(directory: Path, processes: int = 1, *, full: bool = False) -> None:
    """Delete what a Trainer checkpoint holds besides checkpoint_files (and subdirectories)."""
    keep = checkpoint_files(processes, full=full)
    for path in directory.iterdir():
        if path.is_file() and path.name not in keep and not (full and (
                is_model_file(path.name) or path.name == GENERATION_CONFIG)):
            path.unlink()
    names = {p.name for p in directory.iterdir()}
    missing = keep - names | ({"model.safetensors"} if full and not any(map(is_model_file, names))
                              else set())
    if missing:
        raise RuntimeError(f"checkpoint {directory} lacks {', '.join(sorted(missing))}")


def keep_only_model_files(directory: Path) -> None:
    """Delete what Trainer.save_model writes beside a whole model besides its tokenizer
    (training_args.bin, a pickle)."""
    (directory / "training_args.bin").unlink(missing_ok=True)


def keep_only_adapter_files(directory: Path) -> None:
    """Delete what Trainer.save_model writes beside the adapter (tokenizer, training_args.bin)."""
    for path in directory.iterdir():
        if path.is_file() and path.name not in ADAPTER_FILES:
            path.unlink()


# -- optimizer: {"state": {index: {name: tensor | number}}, "param_groups": [{...}]}


def save_optimizer_state(state_dict: dict, path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            key = f"state.{index}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().contiguous().cpu()
            else:
                scalars[key] = value
    save_file(tensors, str(path), metadata={
        "param_groups": _json(state_dict["param_groups"], "the optimizer's param groups"),
        "scalars": _json(scalars, "the optimizer's scalar state"),
    })


def load_optimizer_state(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint lacks {path.name} (the optimizer state): {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    state: dict[int, dict[str, Any]] = {}
    entries = [*load_file(str(path)).items(), *json.loads(metadata["scalars"]).items()]
    for key, value in entries:
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    groups = json.loads(metadata["param_groups"])
    for group in groups:  # JSON has no tuples; torch's optimizers unpack betas as given
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


# -- RNG: what the Trainer's own _save_rng_state keeps, as arrays + JSON


def save_rng_state(path: Path) -> None:
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    arrays = {"torch_cpu": torch.random.get_rng_state().numpy(),
              "numpy_keys": np.asarray(keys, dtype=np.uint32),
              "python_internal": np.asarray(internal, dtype=np.uint32)}
    if torch.cuda.is_available():
        arrays["torch_cuda"] = torch.cuda.random.get_rng_state().numpy()
    save_numpy(arrays, str(path), metadata={"state": json.dumps({
        "python": {"version": version, "gauss_next": gauss},
        "numpy": {"bit_generator": name, "position": int(position), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
    })})


def load_rng_state(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint lacks {path.name} (the RNG state): {path}")
    with safe_open(str(path), framework="np") as f:
        scalars = json.loads(f.metadata()["state"])
        arrays = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (no __iter__)
    python, numpy = scalars["python"], scalars["numpy"]
    random.setstate((python["version"], tuple(int(x) for x in arrays["python_internal"]),
                     python["gauss_next"]))
    np.random.set_state((numpy["bit_generator"], arrays["numpy_keys"], numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.random.set_rng_state(torch.from_numpy(arrays["torch_cpu"]))
    if "torch_cuda" in arrays and torch.cuda.is_available():
        torch.cuda.random.set_rng_state(torch.from_numpy(arrays["torch_cuda"]))


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value)
    except TypeError as e:
        raise TypeError(f"{what} cannot be written as JSON ({e}); refusing to pickle it") from None
