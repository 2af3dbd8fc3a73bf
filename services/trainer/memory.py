"""Whether a full fine-tune fits the worker: an estimate from the model's parameter count and
dtype, made before any weights are loaded, so a model that cannot fit is refused with a reason
instead of dying of out-of-memory minutes later.

    estimate = parameters x weight bytes                      the model
             + trained parameters x weight bytes              their gradients
             + trained parameters x 4 x optimizer states      the optimizer (counted in float32)
             + parameters x weight bytes                      the frozen reference model, for
                                                              DPO and GRPO with beta > 0

Activations come on top and are not counted (they depend on batch and sequence length), so the
estimate is a lower bound of the model's part and an upper bound of the optimizer's (MLX keeps
Adam's states in the weights' dtype). Parameter count and dtype are read from the safetensors
headers of the model directory, never from the tensors.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .backend import TrainSpec

GB = 1e9
# States per trained weight, in float32 units (8-bit Adam: two states of one byte each; paged
# ones may spill to host memory but are counted where they start; Adafactor factors its second
# moment, which is at most one state).
OPTIMIZER_STATES = {"adamw": 2.0, "adam": 2.0, "sgd": 0.0, "adafactor": 1.0,
                    "adamw_8bit": 0.5, "paged_adamw_8bit": 0.5, "paged_adamw_32bit": 2.0}
DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_BLOCK = re.compile(r"\blayers\.(\d+)\.")


@dataclass(frozen=True)
class ModelSize:
    """What the safetensors headers of a model directory say."""

    parameters: int
    dtype: str  # the floating dtype of most weights (float32, bfloat16, ...)
    block_parameters: dict[int, int]  # per numbered transformer block (model.layers.<i>.)
    quantized: bool  # the config says its weights are quantized


def model_size(model_dir: Path) -> ModelSize:
    """Parameter count and dtype of the model in `model_dir`, from its safetensors headers."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} holds no .safetensors weights")
    parameters, by_dtype, blocks = 0, {}, {}
    for path in files:
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():  # noqa: SIM118 (no __iter__)
                tensor = f.get_slice(name)
                count = 1
                for dim in tensor.get_shape():
                    count *= dim
                parameters += count
                dtype = _SAFETENSORS_DTYPES.get(tensor.get_dtype(), tensor.get_dtype())
                by_dtype[dtype] = by_dtype.get(dtype, 0) + count
                if match := _BLOCK.search(name):
                    index = int(match[1])
                    blocks[index] = blocks.get(index, 0) + count
    counted = {d: n for d, n in by_dtype.items() if d in DTYPE_BYTES} or by_dtype
    config = json.loads((Path(model_dir) / "config.json").read_text())
    quantized = bool(config.get("quantization") or config.get("quantization_config"))
    return ModelSize(parameters=parameters, dtype=max(counted, key=counted.get),
                     block_parameters=blocks, quantized=quantized)


def trained_parameters(size: ModelSize, num_layers: int | None) -> int:
    """Every parameter, or (num_layers N) those of the last N blocks."""
    if num_layers is None:
        return size.parameters
    indices = sorted(size.block_parameters)[-num_layers:]
    return sum(size.block_parameters[i] for i in indices)


def full_fine_tune_bytes(size: ModelSize, spec: TrainSpec, dtype: str | None = None) -> int:
    """The estimate of the module docstring; `dtype` is the one the worker trains in (None: the
    model's own)."""
    weight = DTYPE_BYTES.get(dtype or size.dtype, 4)
    trained = trained_parameters(size, spec.lora.num_layers)
    copies = 2 if needs_reference(spec) else 1
    return int(copies * size.parameters * weight
               + trained * (weight + 4 * OPTIMIZER_STATES[spec.optimizer]))


def needs_reference(spec: TrainSpec) -> bool:
    """Whether the method keeps a frozen copy of the starting weights beside the trained ones
    (a full fine-tune has no adapter to switch off for it: it is a second model)."""
    return spec.method == "dpo" or (spec.method == "grpo" and spec.grpo.beta > 0)


def full_fine_tune_refusal(model_dir: Path, spec: TrainSpec, memory_bytes: int | None,
                           dtype: str | None = None, shards: int = 1) -> str | None:
    """Why this worker cannot fully fine-tune the model in `model_dir` with `spec`, or None.
    `memory_bytes` is one device's; `shards` devices share the estimate (FSDP), where DDP keeps a
    whole copy on each."""
    size = model_size(model_dir)
    if size.quantized:
        return (f"adapter.type 'full' trains every weight, and the model at {model_dir.name} is "
                "quantized (its config.json has a quantization): fully fine-tune an unquantized "
                "model, or train a LoRA adapter (QLoRA) on this one")
    if memory_bytes is None:
        return None
    needed = full_fine_tune_bytes(size, spec, dtype) // shards
    if needed <= memory_bytes:
        return None
    trained = trained_parameters(size, spec.lora.num_layers)
    per_device = f" per device of {shards} (FSDP)" if shards > 1 else ""
    reference = f", and {spec.method}'s reference model" if needs_reference(spec) else ""
    return (f"adapter.type 'full' would not fit this worker's memory: {size.parameters:,} "
            f"parameters ({trained:,} trained) in {dtype or size.dtype} with optimizer "
            f"{spec.optimizer!r} need about {needed / GB:.2f} GB{per_device} (weights, "
            f"gradients and optimizer states{reference}, before activations), and the worker has "
            f"{memory_bytes / GB:.2f} GB; train a LoRA adapter instead, fewer blocks "
            "(adapter.num_layers), or use a worker with more memory")


def machine_memory() -> int | None:
    """The machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
