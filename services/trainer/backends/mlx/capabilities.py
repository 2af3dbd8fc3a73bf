"""What the MLX worker offers: every method and adapter, 4/8-bit QLoRA, mlx-lm-lora's rewards,
the optimizers of mlx.optimizers (not bitsandbytes')."""

from __future__ import annotations

from tunebus.contracts.training import TrainerCapabilities
from tunebus.services.trainer.backend import BITSANDBYTES_OPTIMIZERS, PORTABLE_OPTIMIZERS
from tunebus.services.trainer.plan import ALL_GRPO_LOSSES, ALL_METHODS
from tunebus.services.trainer.rewards import REWARDS


def capabilities() -> TrainerCapabilities:
    return TrainerCapabilities(
        backend="mlx", methods=ALL_METHODS, adapters=["dora", "lora"],
        quantization=["4bit", "8bit", "none"], grpo_loss_types=ALL_GRPO_LOSSES,
        reward_functions=reward_functions(), optimizers=list(PORTABLE_OPTIMIZERS), merge=True,
        why_not={f"optimizer={name}": "bitsandbytes optimizers run on CUDA GPUs; the MLX worker "
                 "has mlx.optimizers" for name in BITSANDBYTES_OPTIMIZERS},
    )


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
