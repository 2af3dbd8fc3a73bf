"""What the CUDA worker offers on this machine (QLoRA and the 8-bit/paged optimizers need a GPU
and bitsandbytes)."""

from __future__ import annotations

from tunebus.contracts.training import TrainerCapabilities
from tunebus.services.trainer.backend import BITSANDBYTES_OPTIMIZERS
from tunebus.services.trainer.rewards import REWARDS

from . import loop  # torch loads with the CUDA worker, not before


def capabilities() -> TrainerCapabilities:
    hardware = loop.detect_hardware()
    offered = loop.capabilities(hardware)
    why_not = {f"quantization={q}": reason for q in ("4bit", "8bit")
               if (reason := loop.quantization_refusal(q, hardware))}
    why_not |= {f"optimizer={name}": reason for name in BITSANDBYTES_OPTIMIZERS
                if (reason := loop.optimizer_refusal(name, hardware))}
    return TrainerCapabilities(
        backend=loop.BACKEND, methods=sorted(offered["methods"]), adapters=sorted(offered["adapters"]),
        quantization=sorted(offered["quantization"]),
        grpo_loss_types=sorted(offered.get("grpo_loss_types", ())),
        reward_functions=sorted(offered.get("reward_functions", REWARDS)),
        optimizers=sorted(offered["optimizers"]),
        merge=bool(offered.get("merge", True)), why_not=why_not,
        # A full fine-tune trains in the dtype `train` loads the model in (DDP: a copy per GPU).
        memory_bytes=hardware.memory_bytes, full_dtype="bfloat16" if hardware.bf16 else "float32",
    )
