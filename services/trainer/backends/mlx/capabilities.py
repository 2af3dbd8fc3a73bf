"""What the MLX worker offers: every method and adapter, full fine-tunes, 4/8-bit QLoRA,
mlx-lm-lora's rewards, the optimizers of mlx.optimizers (not bitsandbytes'), and the memory a
full fine-tune may fill (Apple's recommended working set on Metal, else the machine's RAM)."""

from __future__ import annotations

from tunebus.contracts.training import TrainerCapabilities
from tunebus.services.trainer.backend import BITSANDBYTES_OPTIMIZERS, FULL, PORTABLE_OPTIMIZERS
from tunebus.services.trainer.memory import machine_memory
from tunebus.services.trainer.plan import ALL_GRPO_LOSSES, ALL_METHODS
from tunebus.services.trainer.rewards import REWARDS


def capabilities() -> TrainerCapabilities:
    return TrainerCapabilities(
        backend="mlx", methods=ALL_METHODS, adapters=["dora", FULL, "lora"],
        quantization=["4bit", "8bit", "none"], grpo_loss_types=ALL_GRPO_LOSSES,
        reward_functions=reward_functions(), optimizers=list(PORTABLE_OPTIMIZERS), merge=True,
        memory_bytes=device_memory(),
        why_not={f"optimizer={name}": "bitsandbytes optimizers run on CUDA GPUs; the MLX worker "
                 "has mlx.optimizers" for name in BITSANDBYTES_OPTIMIZERS},
    )


def device_memory() -> int | None:
    """What MLX may use: Metal's recommended working set (unified memory), else the RAM."""
    try:
        import mlx.core as mx
    except ImportError:
        return machine_memory()
    info = mx.device_info()
    return (info.get("max_recommended_working_set_size") or info.get("memory_size")
            or machine_memory())


def reward_functions() -> list[str]:
    """Ours, plus the ones mlx-lm-lora registers itself (r1_*), which the MLX worker also runs."""
    names = set(REWARDS)
    try:
        from mlx_lm_lora.trainer.grpo_reward_functions import REWARD_REGISTRY  # plain Python
    except ImportError:
        pass
    else:
        names.update(REWARD_REGISTRY)
    return sorted(names)
